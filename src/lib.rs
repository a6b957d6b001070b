//! ferry: ship build output and containers to your own servers over SSH, from GitLab CI.
//!
//! See ARCHITECTURE.md for the map of modules and the path a deploy takes through them.

pub mod check;
pub mod ci;
pub mod cli;
pub mod deploy;
pub mod docker;
pub mod fleet;
pub mod gate;
pub mod gitlab;
pub mod inventory;
pub mod keys;
pub mod known_hosts;
pub mod ledger;
pub mod lock;
pub mod logging;
pub mod playbook;
pub mod report;
pub mod rules;
pub mod shell;
pub mod ssh;
pub mod status;
pub mod sync;
pub mod template;
