//! `ferry check`: can ferry deploy to these hosts? Connects to each and reports reachability,
//! authentication, host key status, OS/arch, docker, and free disk at the deploy root.

use crate::fleet::Outcome;
use crate::inventory::Host;
use crate::shell;
use crate::ssh::{HostKeyStatus, Session, SshError};

/// One row of the check table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostCheck {
    pub host: String,
    pub address: String,
    pub reachable: bool,
    /// `None` when authentication was never tried (unreachable, or the host key failed first).
    pub authenticated: Option<bool>,
    /// `known`, `certified`, `accepted`, `mismatch`, `unknown`, `revoked`, or `-` when never reached.
    pub host_key: String,
    pub os: Option<String>,
    /// Docker server version, or why docker does not work.
    pub docker: Option<String>,
    pub docker_ok: bool,
    pub root: String,
    pub free_bytes: Option<u64>,
    pub error: Option<String>,
}

const PROBE: &str = r#"
root=$1; shift
echo "os=$(uname -sm 2>/dev/null)"
if v=$("$@" version --format '{{.Server.Version}}' 2>&1); then echo "docker=ok $v"; else echo "docker=no $(printf '%s' "$v" | tail -n 1)"; fi
d=$root
while [ ! -d "$d" ] && [ "$d" != / ]; do d=$(dirname "$d"); done
echo "free=$(df -Pk "$d" 2>/dev/null | awk 'NR==2 {print $4}')"
"#;

/// Probe one connected host.
pub async fn probe(host: &Host, session: &Session) -> anyhow::Result<HostCheck> {
    let mut args = vec![host.root.clone()];
    args.extend(host.docker.iter().cloned());
    let out = session
        .run_script(PROBE, &args, Some(std::time::Duration::from_secs(30)))
        .await?;
    let text = out.stdout_str();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")).map(str::to_string))
    };
    let docker = field("docker").unwrap_or_default();
    let (docker_ok, docker) = match docker.split_once(' ') {
        Some(("ok", v)) => (true, v.trim().to_string()),
        Some((_, why)) => (false, why.trim().to_string()),
        None => (false, "not found".to_string()),
    };
    Ok(HostCheck {
        host: host.name().to_string(),
        address: host.target.to_string(),
        reachable: true,
        authenticated: Some(true),
        host_key: match session.host_key {
            HostKeyStatus::Known => "known",
            HostKeyStatus::Certified => "certified",
            HostKeyStatus::Accepted => "accepted",
        }
        .into(),
        os: field("os").filter(|s| !s.is_empty()),
        docker: Some(if docker.is_empty() {
            "not found".into()
        } else {
            docker
        }),
        docker_ok,
        root: host.root.clone(),
        free_bytes: field("free")
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|k| k * 1024),
        error: None,
    })
}

/// A row for a host whose connection failed, classified by how far it got.
pub fn failed(host: &Host, err: &anyhow::Error) -> HostCheck {
    let (reachable, authenticated, host_key) = match err.downcast_ref::<SshError>() {
        Some(SshError::Connect { .. } | SshError::Timeout { .. }) => (false, None, "-"),
        Some(SshError::HostKeyMismatch { .. }) => (true, None, "MISMATCH"),
        Some(SshError::HostKeyUnknown { .. }) => (true, None, "unknown"),
        Some(SshError::HostKeyRevoked { .. }) => (true, None, "REVOKED"),
        Some(SshError::AuthFailed { .. } | SshError::Agent { .. }) => (true, Some(false), "known"),
        _ => (true, None, "?"),
    };
    HostCheck {
        host: host.name().to_string(),
        address: host.target.to_string(),
        reachable,
        authenticated,
        host_key: host_key.into(),
        os: None,
        docker: None,
        docker_ok: false,
        root: host.root.clone(),
        free_bytes: None,
        error: Some(format!("{err:#}")),
    }
}

pub fn rows(hosts: &[Host], outcomes: Vec<Outcome<HostCheck>>) -> Vec<HostCheck> {
    hosts
        .iter()
        .zip(outcomes)
        .map(|(h, o)| match o.result {
            Ok(c) => c,
            Err(e) => failed(h, &e),
        })
        .collect()
}

pub fn render(rows: &[HostCheck]) -> String {
    let yn = |b: bool| if b { "yes" } else { "NO" }.to_string();
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.host.clone(),
                yn(r.reachable),
                r.authenticated.map_or_else(|| "-".into(), yn),
                r.host_key.clone(),
                r.os.clone().unwrap_or_else(|| "-".into()),
                match (&r.docker, r.docker_ok) {
                    (Some(v), true) => v.clone(),
                    (Some(why), false) => format!("NO ({why})"),
                    (None, _) => "-".into(),
                },
                match r.free_bytes {
                    Some(b) => format!(
                        "{} at {}",
                        crate::report::human_bytes(b),
                        shell::quote_str(&r.root)
                    ),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    let mut out = crate::report::table(
        &[
            "HOST",
            "REACHABLE",
            "AUTH",
            "HOST KEY",
            "OS/ARCH",
            "DOCKER",
            "FREE DISK",
        ],
        &table_rows,
    );
    for r in rows {
        if let Some(e) = &r.error {
            out.push_str(&format!("\n{}: {e}", r.host));
        }
    }
    if rows.iter().any(|r| r.error.is_some()) {
        out.push('\n');
    }
    out
}
