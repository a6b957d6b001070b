//! Deploy locks on the hosts. (Being built: see issue 5.)

use std::time::Duration;

use crate::cli::{Global, Target};
use crate::deploy::StepCtx;

pub struct Lock;

impl Lock {
    pub async fn acquire(_ctx: &StepCtx<'_>, _wait: Option<Duration>) -> anyhow::Result<Lock> {
        Ok(Lock)
    }

    pub async fn release(self) -> anyhow::Result<()> {
        Ok(())
    }
}

pub async fn cli_status(_g: &Global, _t: &Target) -> anyhow::Result<i32> {
    anyhow::bail!("lock status is not built yet")
}

pub async fn cli_unlock(_g: &Global, _t: &Target) -> anyhow::Result<i32> {
    anyhow::bail!("unlock is not built yet")
}
