//! Integration tests: the real `ferry` binary against real OpenSSH servers (and, for containers,
//! a real Docker engine and registry). One test binary, topic modules.

mod support;

mod docker;
mod foundation;
mod pipeline;
mod playbooks;
