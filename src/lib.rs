//! endpoint-stats: counts accesses to its API endpoints exactly, durably and fast, across any
//! number of replicas, plus the operations commands that keep it running.
//!
//! - [`cli`]: the command line: `serve` and the operations subcommands
//! - [`config`]: environment and flags, validated once
//! - [`startup`]: `Application::build` and graceful shutdown
//! - [`server`]: the HTTP/1 connection loop: timeouts, connection cap, shutdown of connections
//! - [`routes`]: the HTTP contract
//! - [`endpoints`]: which endpoints are counted
//! - [`store`]: the counting store (group commit over PostgreSQL or SQLite)
//! - [`windows`]: recent-window counters (Redis or in-process)
//! - [`redis_conn`]: connecting to Redis, bounded, and reading its memory figures
//! - [`telemetry`]: logs and metrics
//! - [`ops`]: backup, verify-backup, restore, maintain, check

pub mod cli;
pub mod config;
pub mod endpoints;
pub mod ops;
pub mod redis_conn;
pub mod routes;
pub mod server;
pub mod signals;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod windows;
