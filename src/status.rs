//! `ferry status` and `ferry history`. (Being built: see issue 5.)

use crate::cli::{Global, Target};

pub async fn cli_status(_g: &Global, _t: &Target, _ref_name: Option<&str>) -> anyhow::Result<i32> {
    anyhow::bail!("status is not built yet")
}

pub async fn cli_history(
    _g: &Global,
    _t: &Target,
    _ref_name: Option<&str>,
    _n: usize,
) -> anyhow::Result<i32> {
    anyhow::bail!("history is not built yet")
}
