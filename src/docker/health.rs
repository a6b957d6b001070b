//! Waiting for a new container to be healthy: Docker's own HEALTHCHECK state, or an HTTP or TCP
//! probe made "from the host" through an SSH direct-tcpip channel, so the host needs no curl or wget.
//! A container that exits while we wait fails at once.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::engine::{DockerError, Engine};
use crate::playbook::{HealthCheck, HealthKind};
use crate::ssh::Session;

/// How long a container without a health check must stay up to count as started.
const SETTLE: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a container did not become healthy (shown with its logs).
#[derive(Debug, thiserror::Error)]
pub enum Unhealthy {
    #[error("container {name} exited with code {code} while ferry waited for it to be healthy")]
    Exited { name: String, code: i64 },
    #[error(
        "container {name} exited{} and was restarted by its restart policy while ferry waited for \
         it to be healthy (it keeps exiting)",
        code.map(|c| format!(" with code {c}")).unwrap_or_default()
    )]
    Restarted { name: String, code: Option<i64> },
    #[error("container {name} disappeared while ferry waited for it")]
    Gone { name: String },
    #[error("container {name}: Docker reports it unhealthy")]
    Unhealthy { name: String },
    #[error(
        "container {name}: its image has no HEALTHCHECK; use health type `http` or `tcp` instead"
    )]
    NoHealthcheck { name: String },
    #[error("container {name} not healthy after {after:?}: {last}")]
    Timeout {
        name: String,
        after: Duration,
        last: String,
    },
    #[error(transparent)]
    Docker(#[from] DockerError),
}

/// Wait until container `name` is healthy by `check` (or, without one, stays running for a moment).
/// Called right after `docker start`, which sets its RestartCount to 0 (Docker and Podman alike):
/// any restart counted since is the restart policy at work. Returns a line saying how health was
/// established.
pub async fn wait(
    engine: &Engine<'_>,
    name: &str,
    check: Option<&HealthCheck>,
) -> Result<String, Unhealthy> {
    let started = Instant::now();
    let (timeout, interval) = check
        .map(|c| (c.timeout, c.interval()))
        .unwrap_or((SETTLE * 2, Duration::from_millis(500)));
    loop {
        let state = engine
            .container(name)
            .await?
            .ok_or_else(|| Unhealthy::Gone { name: name.into() })?;
        if !state.running || state.restarting {
            return Err(Unhealthy::Exited {
                name: name.into(),
                code: state.exit_code,
            });
        }
        // A crash loop fast enough to be running at every look still counts its restarts (even
        // one that had restarted before our first look).
        if state.restart_count > 0 {
            let code = engine.last_exit_code(&state).await;
            return Err(Unhealthy::Restarted {
                name: name.into(),
                code,
            });
        }
        let probe: Result<String, String> = match check.map(|c| c.kind) {
            None if started.elapsed() >= SETTLE => Ok("running (no health check)".into()),
            None => Err("settling".into()),
            Some(HealthKind::Docker) => match state.health.as_deref() {
                None => return Err(Unhealthy::NoHealthcheck { name: name.into() }),
                Some("healthy") => Ok("Docker reports healthy".into()),
                Some("unhealthy") => return Err(Unhealthy::Unhealthy { name: name.into() }),
                Some(other) => Err(format!("Docker health status {other}")),
            },
            Some(HealthKind::Http) => {
                let url = check.and_then(|c| c.url.as_deref()).unwrap_or_default();
                probe_http(engine.session, url).await
            }
            Some(HealthKind::Tcp) => {
                let addr = check.and_then(|c| c.address.as_deref()).unwrap_or_default();
                probe_tcp(engine.session, addr).await
            }
        };
        let last = match probe {
            Ok(how) => return Ok(how),
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            return Err(Unhealthy::Timeout {
                name: name.into(),
                after: timeout,
                last,
            });
        }
        tokio::time::sleep(interval).await;
    }
}

/// Why `address` could not be reached through the host.
fn unreachable(address: &str, e: crate::ssh::SshError) -> String {
    match e {
        crate::ssh::SshError::Forward { .. } => e.to_string(),
        e => format!("cannot connect to {address} on the host: {e}"),
    }
}

/// GET `url` from the host; Ok for a 2xx or 3xx answer.
pub async fn probe_http(session: &Session, url: &str) -> Result<String, String> {
    let (host, port, path) = parse_http_url(url)?;
    let work = async {
        let mut s = session
            .connect_tcp(&host, port)
            .await
            .map_err(|e| unreachable(&format!("{host}:{port}"), e))?;
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: ferry\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        // The status line is all we need.
        while !buf.contains(&b'\n') && buf.len() < 8192 {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("GET {url}: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let _ = s.shutdown().await;
        let code = parse_status(&buf).ok_or_else(|| {
            format!(
                "GET {url}: no HTTP answer (connection closed after {} bytes)",
                buf.len()
            )
        })?;
        if (200..400).contains(&code) {
            Ok(format!("GET {url} answered {code}"))
        } else {
            Err(format!("GET {url} answered {code}"))
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| Err(format!("GET {url}: no answer within {PROBE_TIMEOUT:?}")))
}

/// Connect to `host:port` from the host. A port that accepts and closes at once (Docker's proxy
/// with nothing behind it) does not count; one that stays open or speaks does.
pub async fn probe_tcp(session: &Session, address: &str) -> Result<String, String> {
    let (host, port) = split_host_port(address)?;
    let mut s = session
        .connect_tcp(&host, port)
        .await
        .map_err(|e| unreachable(address, e))?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_millis(300), s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Err(format!("{address} accepted and closed the connection")),
        Ok(Ok(_)) | Err(_) => Ok(format!("{address} accepts connections")),
    }
}

/// `http://HOST[:PORT]/PATH` into its parts. Only plain HTTP: the probe runs on the host's loopback.
pub fn parse_http_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("health url `{url}`: only http:// URLs can be probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = if authority.contains(':') {
        split_host_port(authority)?
    } else {
        (authority.to_string(), 80)
    };
    if host.is_empty() {
        return Err(format!("health url `{url}`: no host"));
    }
    Ok((host, port, path.to_string()))
}

fn split_host_port(s: &str) -> Result<(String, u16), String> {
    let (h, p) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}`: expected host:port"))?;
    let port = p
        .parse::<u16>()
        .map_err(|_| format!("`{s}`: invalid port `{p}`"))?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Ok((h.to_string(), port))
}

/// The status code of an HTTP response's first line.
pub fn parse_status(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_http_url("http://127.0.0.1:8080/health?x=1").unwrap(),
            ("127.0.0.1".into(), 8080, "/health?x=1".into())
        );
        assert_eq!(
            parse_http_url("http://localhost").unwrap(),
            ("localhost".into(), 80, "/".into())
        );
        assert_eq!(
            parse_http_url("http://[::1]:81/").unwrap(),
            ("::1".into(), 81, "/".into())
        );
        assert!(parse_http_url("https://x/").is_err());
        assert!(parse_http_url("http://x:port/").is_err());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\nServer: x\r\n"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.1 404 Not Found\r\n"), Some(404));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
