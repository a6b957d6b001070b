//! ferry: ship build output and containers to your own servers over SSH, from GitLab CI.
//!
//! See ARCHITECTURE.md for the map of modules and the path a deploy takes through them.

pub mod playbook;
