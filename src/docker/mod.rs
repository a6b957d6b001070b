//! Docker on the hosts, through the `docker` CLI over SSH. (Being built: see issue 4.)
//!
//! Every container ferry starts carries labels: `ferry.app`, `ferry.env`, `ferry.ref`, `ferry.sha`,
//! `ferry.release` and `ferry.spec` (hash of the resolved spec), so that status and idempotence
//! checks read facts from the host rather than guess.

use crate::deploy::{StepCtx, StepReport};
use crate::inventory::Host;
use crate::playbook::{ContainerSpec, Step};
use crate::ssh::Session;

/// What runs under one container name on one host, for `ferry status` (read-only).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LiveContainer {
    pub name: String,
    /// False when no container of that name exists.
    pub exists: bool,
    pub running: bool,
    /// Docker's health status (`healthy`, `unhealthy`, `starting`) when the image has a check.
    pub health: Option<String>,
    pub image: Option<String>,
    /// From ferry's labels on the container.
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    pub sha: Option<String>,
    pub release: Option<String>,
}

pub async fn run(_ctx: &StepCtx<'_>, step: &Step) -> anyhow::Result<StepReport> {
    anyhow::bail!("{} is not built yet", step.kind())
}

pub async fn rollback(_ctx: &StepCtx<'_>, _spec: &ContainerSpec) -> anyhow::Result<StepReport> {
    anyhow::bail!("container rollback is not built yet")
}

/// Read what runs as `spec.name` on `host` (templates expanded with the host's variables).
pub async fn live(
    _host: &Host,
    _session: &Session,
    _spec: &ContainerSpec,
) -> anyhow::Result<LiveContainer> {
    anyhow::bail!("container live state is not built yet")
}
