//! Logging setup: `tracing` to stderr, quiet by default, `-v`/`-vv` or `FERRY_LOG` for more.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Crates whose `trace` level dumps what goes over the wire: the GitLab token in ureq's request
/// headers, registry passwords and secret env files in russh's channel data. They never log below
/// `debug`, whatever `FERRY_LOG` asks.
const WIRE: [&str; 3] = ["ureq", "ureq_proto", "russh"];

pub fn init(verbose: u8) {
    let default = match verbose {
        0 => "ferry=warn",
        1 => "ferry=info",
        _ => "ferry=debug,russh=info",
    };
    let asked = std::env::var("FERRY_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| default.to_string());
    let filter = EnvFilter::try_new(clamped(&asked)).unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| QuietStderr)
        // Colour only for a person at a terminal: CI logs and files get plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .try_init();
}

/// stderr for log lines, whose errors are dropped: tracing-subscriber reports a failed write with
/// `eprintln!`, which panics when stderr is closed (`ferry deploy 2>&1 | head`).
struct QuietStderr;

impl std::io::Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// `spec` (an EnvFilter string) with the [`WIRE`] crates held at `debug` or less: a directive
/// that would let one trace (`russh=trace`, `russh=TRACE`, `russh=5`, a bare `russh`) is
/// dropped, and under a global `trace`, or one for a target that begins a crate's name (`u`,
/// `rus`: EnvFilter matches targets by prefix), each crate no kept directive names gets `=debug`
/// (the more specific directive wins).
fn clamped(spec: &str) -> String {
    let is_trace = |level: &str| level.trim().eq_ignore_ascii_case("trace") || level.trim() == "5";
    let is_level = |d: &str| {
        ["off", "error", "warn", "info", "debug", "trace"]
            .iter()
            .any(|l| d.eq_ignore_ascii_case(l))
            || matches!(d, "0" | "1" | "2" | "3" | "4" | "5")
    };
    let mut kept: Vec<String> = Vec::new();
    let mut named = Vec::new();
    // Wire crates that a kept directive would let trace: held at debug by one of their own.
    let mut clamp = Vec::new();
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // `target[span{field=value}]=level`: the level follows the last `=` outside brackets.
        let (head, level) = match d.rfind(']') {
            Some(end) => (&d[..=end], d[end + 1..].strip_prefix('=')),
            None => match d.rsplit_once('=') {
                Some((t, l)) => (t, Some(l)),
                None if is_level(d) => ("", Some(d)),
                None => (d, None),
            },
        };
        let target = head.split('[').next().unwrap_or_default().trim();
        let wire = WIRE
            .into_iter()
            .find(|w| target == *w || target.starts_with(&format!("{w}::")));
        let trace = level.is_none_or(is_trace);
        match wire {
            Some(_) if trace => {}
            Some(w) => {
                named.push(w);
                kept.push(d.to_string());
            }
            // A target matches every target it begins (`u` matches `ureq`), so one that begins
            // a wire crate's name, or none, traces it too.
            None if trace && WIRE.iter().any(|w| w.starts_with(target)) => {
                // (A span filter enables within its spans whatever crates log there, over any
                // per-crate directive: at most debug.)
                if head.contains('[') {
                    kept.push(format!("{head}=debug"));
                } else {
                    clamp.extend(WIRE.into_iter().filter(|w| w.starts_with(target)));
                    kept.push(d.to_string());
                }
            }
            None => kept.push(d.to_string()),
        }
    }
    for w in WIRE
        .into_iter()
        .filter(|w| clamp.contains(w) && !named.contains(w))
    {
        kept.push(format!("{w}=debug"));
    }
    kept.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_crates_never_trace() {
        assert_eq!(
            clamped("trace"),
            "trace,ureq=debug,ureq_proto=debug,russh=debug"
        );
        assert_eq!(clamped("ferry=debug,russh=info"), "ferry=debug,russh=info");
        assert_eq!(clamped("russh=trace,ureq::unversioned=trace,info"), "info");
        assert_eq!(
            clamped("russh::keys=trace,trace"),
            "trace,ureq=debug,ureq_proto=debug,russh=debug"
        );
        // Levels in any case, as numbers, and after span filters.
        assert_eq!(clamped("ureq=TRACE,ureq_proto=Trace,russh=5"), "");
        assert_eq!(clamped("5"), "5,ureq=debug,ureq_proto=debug,russh=debug");
        assert_eq!(
            clamped("TRACE,russh=4"),
            "TRACE,russh=4,ureq=debug,ureq_proto=debug"
        );
        assert_eq!(
            clamped("russh[conn{id=1}]=trace,ferry=debug"),
            "ferry=debug"
        );
        assert_eq!(
            clamped("[host]=trace,ferry[host]=trace"),
            "[host]=debug,ferry[host]=trace"
        );
        // A target that begins a wire crate's name matches it.
        assert_eq!(clamped("u=trace"), "u=trace,ureq=debug,ureq_proto=debug");
        assert_eq!(clamped("ureq_=trace"), "ureq_=trace,ureq_proto=debug");
        assert_eq!(
            clamped("rus=5,ferry=trace"),
            "rus=5,ferry=trace,russh=debug"
        );
        assert_eq!(clamped("r[host]=trace"), "r[host]=debug");
    }

    /// What the clamped filter lets through, asked of tracing itself: no wire crate at trace.
    #[test]
    fn no_directive_lets_a_wire_crate_trace() {
        use tracing_subscriber::layer::SubscriberExt;
        for spec in [
            "u=trace",
            "ure=trace",
            "r=trace",
            "rus=TRACE",
            "trace",
            "ureq=trace",
        ] {
            let filter = EnvFilter::try_new(clamped(spec)).unwrap();
            let subscriber = tracing_subscriber::registry().with(filter);
            tracing::subscriber::with_default(subscriber, || {
                for w in WIRE {
                    let on = match w {
                        "ureq" => tracing::enabled!(target: "ureq", tracing::Level::TRACE),
                        "ureq_proto" => {
                            tracing::enabled!(target: "ureq_proto", tracing::Level::TRACE)
                        }
                        _ => tracing::enabled!(target: "russh", tracing::Level::TRACE),
                    };
                    assert!(!on, "{spec}: {w} traces");
                }
            });
        }
    }
}
