//! Operations commands: the CronJobs and the operator run the same binary as the service.

pub mod backup;
pub mod check;
pub mod maintain;
pub mod restore;
pub mod verify;
