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

/// How long a step runs in CI before a line says so (its section shows once it ends).
const NOTICE_AFTER: Duration = Duration::from_secs(5);

/// A GitLab collapsible log section around one host's step; plain `==>` headers outside GitLab CI.
///
/// Hosts run at once, and sections whose markers interleave do not collapse in GitLab. So in CI the
/// section's lines are buffered, and the whole section (start marker with the step's start time,
/// lines, end marker) is written in one go when it ends. A step still running after a few seconds
/// gets a one-line notice, so that a long step still shows progress.
pub struct Section {
    name: String,
    header: String,
    started: u64,
    lines: Vec<String>,
    gitlab: bool,
    /// Shown open in GitLab (a failed step).
    expanded: bool,
    /// In CI: says the step still runs, should it take a while.
    notice: Option<tokio::task::JoinHandle<()>>,
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
        // (With --json in CI, stdout has the facts: no sections.)
        let gitlab = style.gitlab && !style.json;
        let notice = if gitlab {
            let line = format!("{header}: running ...");
            tokio::runtime::Handle::try_current().ok().map(|rt| {
                rt.spawn(async move {
                    tokio::time::sleep(NOTICE_AFTER).await;
                    crate::errln!("{line}");
                })
            })
        } else {
            if !style.json {
                crate::errln!("==> {header}");
            }
            None
        };
        Section {
            name,
            header: header.to_string(),
            started: unix_now(),
            lines: Vec::new(),
            gitlab,
            expanded: false,
            notice,
        }
    }

    /// A line of the section's log.
    pub fn line(&mut self, progress: &Progress, line: &str) {
        if self.gitlab {
            self.lines.push(line.to_string());
        } else {
            progress.println(line);
        }
    }

    /// Show this section open in GitLab (for a failure).
    pub fn expand(&mut self) {
        self.expanded = true;
    }

    /// The whole section as GitLab's log parser wants it.
    fn render(&self, ended: u64) -> String {
        let mut out = format!(
            "\x1b[0Ksection_start:{}:{}[collapsed={}]\r\x1b[0K{}\n",
            self.started, self.name, !self.expanded, self.header
        );
        for l in &self.lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(&format!(
            "\x1b[0Ksection_end:{ended}:{}\r\x1b[0K\n",
            self.name
        ));
        out
    }
}

impl Drop for Section {
    fn drop(&mut self) {
        if let Some(n) = self.notice.take() {
            n.abort();
        }
        // (A section with nothing in it, a step's under `--plan` or `--json`, would be an empty fold.)
        if self.gitlab && !self.lines.is_empty() {
            flush();
            let text = self.render(unix_now());
            let mut err = std::io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        }
    }
}

/// `print!` for results on stdout. A reader that went away (`ferry status | head -3`) is not an
/// error: the rest is dropped and the command's exit code stands.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::report::write_out(&format!($($arg)*)) };
}

/// [`out!`] with a newline.
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::report::write_out(&format!("{}\n", format_args!($($arg)*))) };
}

/// `eprintln!` for progress and notices on stderr, which never panics: a closed stderr
/// (`ferry deploy 2>&1 | head`) must not stop a deploy half-way.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub fn write_out(text: &str) {
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(text.as_bytes()).and_then(|()| o.flush())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        crate::errln!("ferry: cannot write the results to stdout: {e}");
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

/// `text` with each secret value of four or more characters replaced by `[MASKED]` (shorter ones
/// would mask common words, and reveal little).
pub fn mask<'a>(text: &str, secrets: impl IntoIterator<Item = &'a str>) -> String {
    // Longest first: a secret inside another must not leave the rest of that one readable.
    let mut values: Vec<&str> = secrets.into_iter().filter(|v| v.len() >= 4).collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
        .into_iter()
        .fold(text.to_string(), |t, v| t.replace(v, "[MASKED]"))
}

/// A Unix time as `2026-11-24 06:00:00Z`.
pub fn utc_time(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix.min(i64::MAX as u64) as i64)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Render rows as an aligned text table.
/// Cells may hold what a host or an old ledger says: control characters (a newline, a terminal
/// escape) are shown escaped, never sent to the terminal.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| escape_controls(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
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
    for r in &rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// `s` with its control characters escaped (`\n`, `\u{1b}`); other text as it is.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
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
            None => crate::errln!("{line}"),
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
                crate::errln!(
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
    fn secrets_are_masked_longest_first() {
        assert_eq!(mask("pw hunter2, x", ["hunter2", "x"]), "pw [MASKED], x");
        assert_eq!(
            mask("abcdefgh abcd", ["abcd", "abcdefgh"]),
            "[MASKED] [MASKED]"
        );
    }

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
        // What a host or an old ledger holds never reaches the terminal raw.
        let t = table(&["ref"], &[vec!["a\nb\u{1b}[31m".into()]]);
        assert_eq!(t, "ref\na\\nb\\u{1b}[31m\n");
    }

    #[test]
    fn a_section_is_one_block_with_its_lines() {
        let mut s = Section {
            name: "web1_1_sync".into(),
            header: "web1: sync (deploy)".into(),
            started: 100,
            lines: vec![],
            gitlab: true,
            expanded: false,
            notice: None,
        };
        s.lines.push("sent 3 files".into());
        let text = s.render(105);
        s.gitlab = false; // do not print on drop
        assert_eq!(
            text,
            "\x1b[0Ksection_start:100:web1_1_sync[collapsed=true]\r\x1b[0Kweb1: sync (deploy)\nsent 3 files\n\x1b[0Ksection_end:105:web1_1_sync\r\x1b[0K\n"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_duration(Duration::from_secs(3700)), "1h1m");
    }
}
