//! Sync: ship a local build directory to hosts by content-hash diff, into atomic releases.
//! (Being built: see issue 3.)

use crate::deploy::{StepCtx, StepReport};
use crate::inventory::Host;
use crate::playbook::{SyncRemoveStep, SyncStep};
use crate::ssh::Session;

/// What is live at one sync target on one host, for `ferry status` (read-only, one round trip).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LiveSync {
    /// The remote path (`to`, expanded).
    pub path: String,
    /// The live release id, or `None` when nothing was ever deployed there.
    pub release: Option<String>,
    /// Ref and commit the live release was built from (from its metadata).
    #[serde(rename = "ref")]
    pub ref_name: Option<String>,
    pub sha: Option<String>,
    /// Unix time the live release was made.
    pub deployed_at: Option<u64>,
    /// Why the path does not look like ferry left it (edited by hand, not a symlink, ...), if so.
    pub drift: Option<String>,
}

pub async fn run(_ctx: &StepCtx<'_>, _step: &SyncStep) -> anyhow::Result<StepReport> {
    anyhow::bail!("sync is not built yet")
}

pub async fn rollback(
    _ctx: &StepCtx<'_>,
    _step: &SyncStep,
    _to: Option<&str>,
) -> anyhow::Result<StepReport> {
    anyhow::bail!("sync rollback is not built yet")
}

pub async fn remove(_ctx: &StepCtx<'_>, _step: &SyncRemoveStep) -> anyhow::Result<StepReport> {
    anyhow::bail!("sync_remove is not built yet")
}

/// Read what is live at `step.to` on `host` (templates expanded with the host's variables).
pub async fn live(_host: &Host, _session: &Session, _step: &SyncStep) -> anyhow::Result<LiveSync> {
    anyhow::bail!("sync live state is not built yet")
}
