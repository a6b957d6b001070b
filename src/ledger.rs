//! The per-host deploy ledger: an append-only file of JSON lines, one per deploy attempt (deploy,
//! rollback, stop), that `ferry status` and `ferry history` read back. It lives at
//! `<state dir>/ledger.jsonl` (see `Host::state_dir`: outside any ref-dependent part of the root, so
//! one ledger holds every branch).
//!
//! Appending: the record is written to a temp file and added with one `cat tmp >> ledger`, then
//! `sync FILE` (GNU coreutils ≥ 8.24 and BusyBox both have it). A deploy appends while it holds the
//! app/environment lock, in the exec that then releases it ([`Appending`]). Environments that
//! share a root also share the ledger and hold different locks, so their appends may race. Each append is a single `write(2)` of one line (well under
//! `cat`'s 128 KiB buffer) to an `O_APPEND` file, and Linux applies those whole at the end of the file,
//! so lines do not interleave. A reader skips a line it cannot parse, with a warning, and does not fail.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::deploy::{StepCtx, StepReport};
use crate::inventory::Host;
use crate::ssh::Session;

/// Format version of a ledger line; readers skip lines with a newer version.
pub const VERSION: u32 = 1;
/// Cap on the error text kept in a record.
const MAX_ERROR: usize = 2000;

/// One deploy attempt on one host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub version: u32,
    pub app: String,
    pub env: String,
    pub host: String,
    #[serde(rename = "ref")]
    pub ref_name: String,
    #[serde(default)]
    pub is_tag: bool,
    #[serde(default)]
    pub ref_slug: String,
    pub sha: String,
    pub pipeline_id: Option<String>,
    pub job_url: Option<String>,
    /// This run's release id: names the deploy (`--to` takes it).
    pub release: String,
    /// The files release live after the run (sync's; a sync that changed nothing keeps the older
    /// one), when the environment syncs files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_release: Option<String>,
    /// The same per sync target (path → release): targets of one run can differ (a target whose
    /// files did not change keeps its older release).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub files_releases: std::collections::BTreeMap<String, String>,
    /// `deploy`, `rollback` or `stop`.
    pub action: String,
    pub ok: bool,
    pub error: Option<String>,
    pub steps: Vec<LedgerStep>,
    /// Unix time the attempt started, and how long it took.
    pub started_at: u64,
    pub seconds: f64,
    pub bytes_sent: u64,
    pub files_sent: u64,
    /// Who ran it: GitLab user (or local user), and the controller's host name.
    pub user: String,
    pub controller: String,
}

/// A step's outcome as the ledger keeps it (no log lines).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LedgerStep {
    pub step: String,
    pub changed: bool,
    pub summary: String,
    #[serde(default)]
    pub bytes_sent: u64,
    #[serde(default)]
    pub files_sent: u64,
}

impl Record {
    pub fn new(
        ctx: &StepCtx<'_>,
        action: &str,
        steps: &[StepReport],
        ok: bool,
        error: Option<&str>,
        started_at: u64,
        took: Duration,
    ) -> Record {
        let d = ctx.deploy;
        Record {
            version: VERSION,
            app: ctx.app.into(),
            env: ctx.env.into(),
            host: ctx.host.name().into(),
            ref_name: d.ref_name.clone(),
            is_tag: d.is_tag,
            ref_slug: d.ref_slug(),
            sha: d.sha.clone(),
            pipeline_id: d.pipeline_id.clone(),
            job_url: d.job_url.clone(),
            release: ctx.release.into(),
            files_release: None,
            files_releases: Default::default(),
            action: action.into(),
            ok,
            error: error.map(|e| truncate(e, MAX_ERROR)),
            steps: steps
                .iter()
                .map(|s| LedgerStep {
                    step: s.step.clone(),
                    changed: s.changed,
                    summary: truncate(&s.summary, MAX_ERROR),
                    bytes_sent: s.bytes_sent,
                    files_sent: s.files_sent,
                })
                .collect(),
            started_at,
            seconds: took.as_secs_f64(),
            bytes_sent: steps.iter().map(|s| s.bytes_sent).sum(),
            files_sent: steps.iter().map(|s| s.files_sent).sum(),
            user: d.user.clone(),
            controller: crate::ci::controller_host(),
        }
    }

    /// The deploy context this record was made with (for re-expanding its paths and names).
    pub fn context(&self) -> crate::ci::DeployContext {
        crate::ci::DeployContext {
            ref_name: self.ref_name.clone(),
            is_tag: self.is_tag,
            ref_slug: if self.ref_slug.is_empty() {
                crate::template::slug(&self.ref_name)
            } else {
                self.ref_slug.clone()
            },
            sha: self.sha.clone(),
            pipeline_id: self.pipeline_id.clone(),
            job_url: self.job_url.clone(),
            user: self.user.clone(),
        }
    }

    /// The record of a run that ended without one (killed, its connection lost), from the holder
    /// of its lock on `host`; `ended` says what removed the lock.
    pub fn interrupted(
        app: &str,
        env: &str,
        host: &str,
        holder: &crate::lock::Holder,
        ended: &str,
    ) -> Record {
        Record {
            version: VERSION,
            app: app.into(),
            env: env.into(),
            host: host.into(),
            ref_name: holder.ref_name.clone(),
            is_tag: false,
            ref_slug: crate::template::slug(&holder.ref_name),
            sha: holder.sha.clone(),
            pipeline_id: holder.pipeline_id.clone(),
            job_url: holder.job_url.clone(),
            release: String::new(),
            files_release: None,
            files_releases: Default::default(),
            action: "interrupted".into(),
            ok: false,
            error: Some(format!(
                "ended without recording itself (killed, or its connection lost; {} pid {}); \
                 {ended}",
                holder.controller, holder.pid
            )),
            steps: vec![],
            started_at: holder.started_at,
            seconds: 0.0,
            bytes_sent: 0,
            files_sent: 0,
            user: holder.user.clone(),
            controller: holder.controller.clone(),
        }
    }

    /// A deploy or rollback that succeeded: what it left is live until a later one (or a stop).
    pub fn good(&self) -> bool {
        self.ok && (self.action == "deploy" || self.action == "rollback")
    }

    /// Whether this run left `release` live at one of its sync targets (a run that changed no
    /// files there keeps an earlier release).
    pub fn left_files(&self, release: &str) -> bool {
        self.files_release.as_deref() == Some(release)
            || self.files_releases.values().any(|f| f == release)
    }

    /// The one JSON line this record is stored as (no newline inside: JSON escapes them).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a record serializes")
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Parse a ledger's text: records in file order, and a note per line that was skipped.
pub fn parse(text: &str) -> (Vec<Record>, Vec<String>) {
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) if r.version <= VERSION => records.push(r),
            Ok(r) => skipped.push(format!(
                "line {}: version {} is newer than this ferry",
                i + 1,
                r.version
            )),
            Err(e) => skipped.push(format!("line {}: {e}", i + 1)),
        }
    }
    (records, skipped)
}

/// Which earlier deploy a rollback returns to, from one host's records (one app and environment,
/// oldest first): the deploy whose release (or files release) `to` names; else, when a deploy made
/// what is live, what was live before it; when a rollback did, the good deploy before the one that
/// made that release (so repeated rollbacks walk back through history). Either way, records that
/// left the host as it is now (same commit and files) are passed over. `Ok(None)` when the ledger
/// is empty (nothing to choose from: the step modules decide).
///
/// After a run that ended unrecorded (`cut`: this run took over its lock; or the ledger's last
/// record says `interrupted`), what is live may be that run's: the target is the last good run
/// itself, the last state the ledger knows.
pub fn rollback_target<'a>(
    records: &'a [Record],
    to: Option<&str>,
    cut: bool,
) -> Result<Option<&'a Record>, String> {
    let good = |r: &&Record| r.good();
    let deploys: Vec<&Record> = records
        .iter()
        .filter(good)
        .filter(|r| r.action == "deploy")
        .collect();
    if records.is_empty() {
        return Ok(None);
    }
    if let Some(to) = to {
        let named = |r: &&&Record| r.release == to || r.files_release.as_deref() == Some(to);
        return match deploys.iter().rev().find(named) {
            Some(r) => Ok(Some(*r)),
            None => Err(format!(
                "no successful deploy of release {to} in the ledger; known releases: {}",
                known(&deploys)
            )),
        };
    }
    let Some(at) = records.iter().rposition(|r| good(&r)) else {
        return Err("no successful deploy in the ledger to roll back from".into());
    };
    if cut || records.last().is_some_and(|r| r.action == "interrupted") {
        return Ok(Some(&records[at]));
    }
    let live = &records[at];
    // (Records that left the host as it is now, as a retried job does, are no step back.)
    let other = |r: &&Record| r.release != live.release && !same_state(r, live);
    // The record that made the live state: the good ones after it (a retried job, a redeploy of
    // the same build) left it as it was.
    let made_at = (0..=at)
        .rev()
        .filter(|&i| records[i].good())
        .take_while(|&i| !other(&&records[i]))
        .last()
        .unwrap_or(at);
    let made = &records[made_at];
    let nothing = || {
        format!(
            "nothing to roll back to: no successful deploy in the ledger before release {} left \
             another commit or other files",
            made.release
        )
    };
    if made.action == "deploy" {
        // Undo that deploy: back to what was live before it (a deploy, or a rollback's target).
        return records[..made_at]
            .iter()
            .rev()
            .filter(good)
            .find(other)
            .map(Some)
            .ok_or_else(nothing);
    }
    // Already rolled back: go further back, past the deploy that made the live release (never
    // forward to the one rolled away from).
    let target_at = records[..made_at]
        .iter()
        .rposition(|r| r.good() && r.action == "deploy" && r.release == made.release)
        .unwrap_or(made_at);
    records[..target_at]
        .iter()
        .rev()
        .filter(good)
        .filter(|r| r.action == "deploy")
        .find(other)
        .map(Some)
        .ok_or_else(nothing)
}

/// Whether two good records left the host in one state: the same commit and the same files
/// releases (a retried job; a redeploy that changed nothing).
fn same_state(a: &Record, b: &Record) -> bool {
    a.sha == b.sha && a.files_release == b.files_release && a.files_releases == b.files_releases
}

fn known(deploys: &[&Record]) -> String {
    let mut v: Vec<&str> = deploys
        .iter()
        .rev()
        .map(|r| r.release.as_str())
        .take(10)
        .collect();
    v.dedup();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Shell: `ledger_append DIR LINE` appends LINE to `DIR/ledger.jsonl`, fsync'd; non-zero (and
/// the reason on stderr) when it cannot.
/// (Chained with `&&`: `set -e` does nothing in a function whose status `||` tests.)
const APPEND_FN: &str = r#"
ledger_append() {
  lt="$1/.ledger.$$.tmp"
  { [ -d "$1" ] || mkdir -p "$1"; } && printf '%s\n' "$2" > "$lt" &&
    { cat "$lt" >> "$1/ledger.jsonl" || { rm -f "$lt"; false; }; } &&
    rm -f "$lt" && { sync "$1/ledger.jsonl" 2>/dev/null || sync; }
}
"#;

/// Printed on stderr by [`Appending`]'s script when the record could not be added.
const FAILED: &str = "ferry-ledger: not recorded";

/// A record to append as the first part of another script (the deploy lock's release: one exec
/// for both).
pub struct Appending {
    /// The state directory and the record's line: the script's arguments.
    pub args: [String; 2],
}

impl Appending {
    /// Records appended in one go, one per line.
    pub fn new(ctx: &StepCtx<'_>, records: &[Record]) -> Appending {
        Appending::to(ctx.host, records)
    }

    fn to(host: &Host, records: &[Record]) -> Appending {
        let lines: Vec<String> = records.iter().map(Record::to_line).collect();
        Appending {
            args: [host.state_dir(), lines.join("\n")],
        }
    }

    /// The shell that appends, finding [`Self::args`] at positional parameter `first` and the next.
    pub fn script(&self, first: usize) -> String {
        let next = first + 1;
        format!(
            "{APPEND_FN}ledger_append \"${{{first}}}\" \"${{{next}}}\" || echo '{FAILED}' >&2\n"
        )
    }

    /// Whether the record was not added, judged from the script's stderr.
    pub fn failed(stderr: &str) -> bool {
        stderr.contains(FAILED)
    }
}

const READ: &str = r#"f="$1/ledger.jsonl"
if [ -e "$f" ]; then cat "$f"; fi
"#;

/// Read every record of the host's ledger (an absent ledger is empty).
pub async fn read(host: &Host, session: &Session) -> anyhow::Result<Vec<Record>> {
    let dir = host.state_dir();
    let out = session
        .run_script(READ, &[dir.as_str()], Some(Duration::from_secs(60)))
        .await?;
    if !out.success() {
        anyhow::bail!(
            "{}: cannot read {dir}/ledger.jsonl: {}",
            host.name(),
            out.tail()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (records, skipped) = parse(&text);
    for s in skipped {
        tracing::warn!("{}: {dir}/ledger.jsonl: skipped {s}", host.name());
    }
    Ok(records)
}

/// Append `records` to the host's ledger, in an exec of its own.
pub async fn append(host: &Host, session: &Session, records: &[Record]) -> anyhow::Result<()> {
    let a = Appending::to(host, records);
    let out = session
        .run_script(&a.script(1), &a.args, Some(Duration::from_secs(60)))
        .await?;
    if !out.success() || Appending::failed(&String::from_utf8_lossy(&out.stderr)) {
        anyhow::bail!(
            "cannot append to {}/ledger.jsonl: {}",
            a.args[0],
            out.tail()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn record(env: &str, host: &str, r: &str, sha: &str, ok: bool, at: u64) -> Record {
        Record {
            version: VERSION,
            app: "shop".into(),
            env: env.into(),
            host: host.into(),
            ref_name: r.into(),
            is_tag: false,
            ref_slug: crate::template::slug(r),
            sha: sha.into(),
            pipeline_id: Some("7".into()),
            job_url: None,
            release: format!("2026-{at}"),
            files_release: None,
            files_releases: Default::default(),
            action: "deploy".into(),
            ok,
            error: (!ok).then(|| "boom".into()),
            steps: vec![],
            started_at: at,
            seconds: 1.5,
            bytes_sent: 10,
            files_sent: 1,
            user: "alice".into(),
            controller: "runner".into(),
        }
    }

    #[test]
    fn lines_round_trip_and_bad_lines_are_skipped() {
        let hostile = record(
            "staging",
            "web1",
            "release-$(touch /tmp/pwned)\n",
            "ab",
            true,
            5,
        );
        let line = hostile.to_line();
        assert!(!line.contains('\n'));
        let text = format!(
            "{line}\n{{not json\n\n{}\n",
            line.replace("\"version\":1", "\"version\":99")
        );
        let (records, skipped) = parse(&text);
        assert_eq!(records, vec![hostile]);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[1].contains("newer"), "{skipped:?}");
    }

    #[test]
    fn rollback_goes_to_the_deploy_before_the_live_one() {
        let at = |rs: &[Record], to: Option<&str>, cut: bool| {
            rollback_target(rs, to, cut).unwrap().unwrap().started_at
        };
        let mut rs = vec![
            record("s", "h", "release-1", "aa", true, 1),
            record("s", "h", "release-2", "bb", true, 2),
            record("s", "h", "release-3", "cc", false, 3),
            record("s", "h", "release-3", "cc", true, 4),
        ];
        assert_eq!(at(&rs, None, false), 2);
        assert_eq!(
            rollback_target(&rs, Some("2026-1"), false)
                .unwrap()
                .unwrap()
                .sha,
            "aa"
        );
        assert!(
            rollback_target(&rs, Some("nope"), false)
                .unwrap_err()
                .contains("2026-4, 2026-2, 2026-1")
        );
        // After rolling back to release 2, the next rollback goes to release 1, not forward.
        let mut rb = record("s", "h", "release-2", "bb", true, 5);
        rb.action = "rollback".into();
        rb.release = "2026-2".into();
        rs.push(rb);
        assert_eq!(at(&rs, None, false), 1);
        assert!(
            rollback_target(&rs[..1], None, false)
                .unwrap_err()
                .contains("nothing to roll back to")
        );
        assert_eq!(rollback_target(&[], None, false).unwrap(), None);
        // A deploy after a rollback is undone back to the rollback's target, not to the deploy
        // that happened to come before it.
        rs.push(record("s", "h", "release-4", "dd", true, 6));
        assert_eq!(at(&rs, None, false), 5);
        rs.pop();
        // After a run that ended unrecorded, the last good run is the target: what is live may
        // be the cut run's.
        assert_eq!(at(&rs, None, true), 5);
        let mut cut = record("s", "h", "release-5", "ee", false, 9);
        cut.action = "interrupted".into();
        rs.push(cut);
        assert_eq!(at(&rs, None, false), 5);
        rs.pop();
        // A retried job (the same commit and files) is no step back: the rollback goes past it.
        let mut retried = record("s", "h", "release-4", "dd", true, 7);
        let mut again = retried.clone();
        retried.files_release = Some("files-4".into());
        again.files_release = Some("files-4".into());
        again.release = "2026-8".into();
        again.started_at = 8;
        rs.extend([retried, again]);
        assert_eq!(at(&rs, None, false), 5);
        rs.truncate(rs.len() - 2);
        // A retried job after a rollback (the rolled-back-to commit again, nothing changed) is
        // still that rollback: the next goes further back, never forward to what it undid.
        let mut redo = rs[1].clone();
        redo.release = "2026-10".into();
        redo.started_at = 10;
        rs.push(redo);
        assert_eq!(at(&rs, None, false), 1);
        rs.pop();
        // Deploys that left the files alone share a files release; --to may name either id.
        for r in rs.iter_mut() {
            r.files_release = Some("files-1".into());
        }
        assert_eq!(at(&rs, Some("files-1"), false), 4);
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let s = "ä".repeat(3000);
        let t = truncate(&s, 2001);
        assert!(t.len() <= 2004 && t.ends_with('…'));
    }
}
