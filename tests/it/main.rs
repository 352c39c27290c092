//! The integration tests, as one crate: one link against the whole dependency tree instead of one
//! per file. One module per area; the helpers are the `helpers` module (databases, Redis, the
//! application in process, the real binary, the operations commands' files).
//!
//! All tests run at once in this one process; the load-heavy and time-bounded ones take
//! [`helpers::heavy`] first, so they run one at a time.

mod helpers;

mod api_contract;
mod configuration;
mod counting_invariants;
mod database_tls;
mod every_command;
mod failover;
mod hostile_clients;
mod ops_backup;
mod ops_check;
mod ops_drill;
mod ops_maintain;
mod ops_restore;
mod ops_secrets;
mod ops_verify;
