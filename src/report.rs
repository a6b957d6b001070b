//! Output for people and machines: tables and JSON on stdout, GitLab collapsible sections, progress
//! bars on a terminal and plain progress lines in CI on stderr.
//!
//! Results go to stdout; progress and logs go to stderr, so `--json` output stays clean.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How this run presents itself.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    pub json: bool,
    /// GitLab CI: collapsible sections, no bars.
    pub gitlab: bool,
    /// stderr is a terminal: draw bars.
    pub tty: bool,
}

impl Style {
    pub fn detect(json: bool) -> Style {
        Style {
            json,
            gitlab: crate::ci::in_gitlab_ci(),
            tty: std::io::stderr().is_terminal(),
        }
    }
}

/// A GitLab collapsible log section around a block of output; a no-op outside GitLab CI.
pub struct Section {
    name: String,
    enabled: bool,
}

impl Section {
    pub fn start(style: Style, name: &str, header: &str) -> Section {
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if style.gitlab {
            flush();
            eprint!(
                "\x1b[0Ksection_start:{}:{name}[collapsed=false]\r\x1b[0K{header}\n",
                unix_now()
            );
        } else if !style.json {
            eprintln!("==> {header}");
        }
        Section {
            name,
            enabled: style.gitlab,
        }
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        if self.enabled {
            flush();
            eprint!("\x1b[0Ksection_end:{}:{}\r\x1b[0K\n", unix_now(), self.name);
        }
    }
}

fn flush() {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Render rows as an aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(widths[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86400 {
        format!("{}d{}h", s / 86400, (s % 86400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Per-host progress: indicatif bars on a terminal, a plain line every few seconds in CI, nothing
/// with `--json` unless stderr is a terminal.
#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
    style: Style,
}

/// One host's progress through a transfer.
#[derive(Clone)]
pub struct HostProgress {
    bar: Option<ProgressBar>,
    host: String,
    total: u64,
    done: Arc<AtomicU64>,
    last_line: Arc<Mutex<Instant>>,
    plain: bool,
}

impl Progress {
    pub fn new(style: Style) -> Progress {
        let multi = style
            .tty
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Progress { multi, style }
    }

    /// A progress indicator for `total` bytes on `host`.
    pub fn host(&self, host: &str, what: &str, total: u64) -> HostProgress {
        let bar = self.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(total));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:20!} {msg:10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(host.to_string());
            b.set_message(what.to_string());
            b
        });
        HostProgress {
            bar,
            host: host.to_string(),
            total,
            done: Arc::new(AtomicU64::new(0)),
            last_line: Arc::new(Mutex::new(Instant::now())),
            plain: self.multi.is_none() && !self.style.json,
        }
    }

    /// Print a log line without tearing the bars.
    pub fn println(&self, line: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }
}

impl HostProgress {
    pub fn add(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(b) = &self.bar {
            b.set_position(done);
        } else if self.plain {
            let mut last = self.last_line.lock().unwrap();
            if last.elapsed() >= Duration::from_secs(5) {
                *last = Instant::now();
                eprintln!(
                    "{}: {} / {}",
                    self.host,
                    human_bytes(done),
                    human_bytes(self.total)
                );
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["host", "ok"],
            &[
                vec!["web1".into(), "yes".into()],
                vec!["db".into(), "no".into()],
            ],
        );
        assert_eq!(t, "host  ok\nweb1  yes\ndb    no\n");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_duration(Duration::from_secs(3700)), "1h1m");
    }
}
