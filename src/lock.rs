//! Deploy locks: one deploy per app and environment at a time, on each host.
//!
//! The lock is a directory `<state dir>/locks/<app>-<env>` made with an atomic `mkdir`. Inside it are
//! `token` (random, this run's), `holder.json` (ref, sha, pipeline, job URL, user, controller, time),
//! `expires` (unix time on the host's clock) and `holders/` (one entry per host of the run). A
//! running deploy renews `expires` in the background.
//!
//! Hosts that share storage (an NFS `/srv`) see one lock: the hosts of one run share it (same
//! token, each adds itself to `holders/`), and the last one out removes it. Another run stays out.
//!
//! Taking over an expired lease: Deployer's auto-unlock raced when two controllers both judged a lock
//! stale and both removed it, or when an unlock removed a lock that someone had just taken. Here every
//! removal (takeover, release, unlock) happens under a second `mkdir` guard (`<lock>.guard`), and it
//! re-checks the lock under that guard. A takeover re-reads `expires` and removes the lock only if it
//! is still expired. A release removes the lock only if `token` is still ours. The lock is moved aside
//! to a unique name first, so a half-finished `rm` never leaves a partial lock. A plain `mkdir` cannot
//! succeed while the lock directory exists, so it needs no guard. A guard left by a controller killed
//! inside that short critical section is cleared after 30 seconds. Expiry is judged on the host's own
//! clock (`date +%s`), so clock skew between controllers does not matter.

use std::time::{Duration, Instant};

use crate::ci::DeployContext;
use crate::cli::{Global, Setup, Target};
use crate::deploy::StepCtx;
use crate::inventory::Host;
use crate::ledger;
use crate::report;
use crate::ssh::Session;

/// How long a lock stays valid without renewal (override: `FERRY_LOCK_LEASE`, e.g. `30s`).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(60);

/// Who holds a lock, as stored in `holder.json`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Holder {
    pub token: String,
    #[serde(rename = "ref")]
    pub ref_name: String,
    pub sha: String,
    pub pipeline_id: Option<String>,
    pub job_url: Option<String>,
    pub user: String,
    pub controller: String,
    pub pid: u32,
    pub started_at: u64,
}

impl Holder {
    fn new(token: &str, d: &DeployContext) -> Holder {
        Holder {
            token: token.into(),
            ref_name: d.ref_name.clone(),
            sha: d.sha.clone(),
            pipeline_id: d.pipeline_id.clone(),
            job_url: d.job_url.clone(),
            user: d.user.clone(),
            controller: crate::ci::controller_host(),
            pid: std::process::id(),
            started_at: report::unix_now(),
        }
    }

    /// One line naming the holder, for errors and `ferry lock status`.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "ref {} (commit {})",
            crate::shell::quote_str(&self.ref_name),
            crate::ci::short_sha(&self.sha)
        );
        if let Some(p) = &self.pipeline_id {
            s += &format!(", pipeline {p}");
        }
        if let Some(j) = &self.job_url {
            s += &format!(", job {j}");
        }
        s += &format!(
            ", by {} from {} (pid {})",
            self.user, self.controller, self.pid
        );
        s
    }
}

/// What a host said about a lock.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LockState {
    /// The lock directory on the host.
    pub path: String,
    pub held: bool,
    /// `None` when the lock exists but its holder file is missing or unreadable.
    pub holder: Option<Holder>,
    /// Seconds until the lease expires on the host's clock (negative: expired).
    pub expires_in: Option<i64>,
}

/// A lock could not be taken; callers branch on it (wait, report).
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{host}: the deploy lock {path} is held by {holder}{lease}; wait for it with --lock-wait 10m, or if that run was killed remove it with `ferry unlock {playbook} --env {env} --force`"
    )]
    Held {
        host: String,
        path: String,
        /// The playbook, quoted for a shell.
        playbook: String,
        env: String,
        holder: String,
        lease: String,
    },
    #[error("{host}: cannot use the deploy lock {path}: {reason}")]
    Failed {
        host: String,
        path: String,
        reason: String,
    },
    #[error("{host}: lost the deploy lock {path}: {why}")]
    Lost {
        host: String,
        path: String,
        why: String,
    },
    /// No renewal got through for a whole lease: the host (or the way to it) is gone.
    #[error(
        "{host}: the host has not answered for {after:?} (the deploy lock {path} could not be \
         renewed): the connection is lost"
    )]
    Unreachable {
        host: String,
        path: String,
        after: Duration,
    },
}

/// A held lock. Release it with [`Lock::release`]; while steps run, drive [`Lock::keep_alive`].
#[derive(Debug)]
pub struct Lock {
    host: String,
    state_dir: String,
    name: String,
    /// This run's token, shared by its hosts (hosts on shared storage share one lock).
    token: String,
    /// This host's entry under `holders/`.
    me: String,
    lease: Duration,
    /// The holder of the expired lock this run took over: a run that ended without recording
    /// itself (killed, its connection lost), which the ledger then records as interrupted.
    pub taken_over: Option<Holder>,
}

/// A new run token: every host of one run locks with it.
pub fn run_token() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The lock directory's name for an app and environment: safe as one path component whatever the
/// names are (other bytes become `_`, and a hash keeps such names distinct; so it does when a name
/// holds the `-` between them: app `a-b` in `c` and app `a` in `b-c` are two locks).
pub fn lock_name(app: &str, env: &str) -> String {
    let raw = format!("{app}-{env}");
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == raw && !raw.starts_with('.') && !app.contains('-') && !env.contains('-') {
        clean
    } else {
        let h = blake3::hash(format!("{app}\0{env}").as_bytes()).to_hex();
        format!("_{clean}-{}", &h[..8])
    }
}

pub fn lease_from_env() -> Duration {
    std::env::var("FERRY_LOCK_LEASE")
        .ok()
        .and_then(|s| crate::playbook::parse_duration(&s).ok())
        .filter(|d| d.as_secs() >= 2)
        .unwrap_or(DEFAULT_LEASE)
}

/// Shared by the scripts: the guard around every removal.
const GUARD: &str = r#"
guard_take() {
  i=0
  while ! mkdir "$lock.guard" 2>/dev/null; do
    at=$(cat "$lock.guard/at" 2>/dev/null || true)
    # (No time in it: one just made, or one whose `at` could not be written, on a full disk. The
    # directory's mtime says when it was made.)
    case $at in ''|*[!0-9]*) at=$(date -r "$lock.guard" +%s 2>/dev/null || date +%s) ;; esac
    if [ $(( $(date +%s) - at )) -gt 30 ]; then rm -rf "$lock.guard"; continue; fi
    i=$((i + 1)); [ "$i" -le 50 ] || return 1
    sleep 0.2 2>/dev/null || sleep 1
  done
  # (Ours once made: on a full disk `at` stays empty, and its mtime tells.)
  date +%s > "$lock.guard/at" 2>/dev/null || :
}
guard_drop() { rm -rf "$lock.guard"; }
read_exp() {
  exp=$(cat "$lock/expires" 2>/dev/null || true)
  case $exp in ''|*[!0-9]*) exp= ;; esac
}
show() {
  now=$(date +%s)
  read_exp
  echo "now $now"
  echo "expires $exp"
  printf 'holder '; cat "$lock/holder.json" 2>/dev/null || true; echo
}
"#;

/// args: state dir, lock name, run token, holder JSON, lease seconds, this host's id.
/// exit 0 + `acquired` | `joined` | `took-over` + old holder; exit 1 `held` + holder; other: failure.
const ACQUIRE: &str = r#"
locks="$1/locks"; lock="$locks/$2"; tok=$3; holder=$4; lease=$5; me=$6
[ -d "$locks" ] || mkdir -p "$locks" || exit 3
# The token goes last: a host of the same run (shared storage) joins once it sees it, and must
# find the rest in place (it adds itself to holders/).
write_lock() {
  mkdir "$lock/holders" && : > "$lock/holders/$me" &&
  printf '%s\n' "$holder" > "$lock/holder.json" &&
  echo $(( $(date +%s) + lease )) > "$lock/expires" &&
  printf '%s\n' "$tok" > "$lock/token"
}
# A lock that vanishes while we look (the run we would join just finished) is tried again.
n=0
while :; do
  if mkdir "$lock" 2>/dev/null; then
    write_lock || { rm -rf "$lock"; exit 3; }
    echo acquired; exit 0
  fi
  # Held by this same run (another host on the same storage, e.g. NFS): join it. A lock just made
  # may not have its token yet: give it a moment.
  i=0
  while [ -d "$lock" ] && [ ! -s "$lock/token" ] && [ "$i" -lt 20 ]; do
    sleep 0.1 2>/dev/null || sleep 1; i=$((i + 1))
  done
  if [ "$(cat "$lock/token" 2>/dev/null)" = "$tok" ]; then
    guard_take || { echo held; show; exit 1; }
    if [ "$(cat "$lock/token" 2>/dev/null)" = "$tok" ] && mkdir -p "$lock/holders" && : > "$lock/holders/$me"; then
      guard_drop; echo joined; exit 0
    fi
    guard_drop
  fi
  now=$(date +%s); read_exp
  if [ -n "$exp" ] && [ "$exp" -lt "$now" ]; then
    guard_take || { echo held; show; exit 1; }
    now=$(date +%s); read_exp
    if [ -n "$exp" ] && [ "$exp" -lt "$now" ]; then
      echo took-over; show
      mv "$lock" "$lock.stale.$tok" && rm -rf "$lock.stale.$tok"
      if mkdir "$lock" 2>/dev/null; then
        write_lock || { rm -rf "$lock"; guard_drop; exit 3; }
        guard_drop; exit 0
      fi
    fi
    guard_drop
  fi
  if [ ! -d "$lock" ] && [ "$n" -lt 5 ]; then
    # A release or takeover may be under way (it holds the guard): let it finish, then look again
    # only if the lock is really gone.
    i=0
    while [ -d "$lock.guard" ] && [ "$i" -lt 50 ]; do sleep 0.1 2>/dev/null || sleep 1; i=$((i + 1)); done
    if [ ! -d "$lock" ]; then n=$((n + 1)); continue; fi
  fi
  break
done
echo held; show; exit 1
"#;

/// args: state dir, lock name, token, lease seconds. exit 0 renewed, 1 lost (`gone`, or `held` +
/// the new holder), other: could not tell (retried).
const RENEW: &str = r#"
lock="$1/locks/$2"
[ -d "$lock" ] || { echo lost gone; exit 1; }
t=$(cat "$lock/token" 2>/dev/null) || { echo "renew: cannot read $lock/token"; exit 2; }
[ "$t" = "$3" ] || { printf 'lost held '; cat "$lock/holder.json" 2>/dev/null; echo; exit 1; }
echo $(( $(date +%s) + $4 )) > "$lock/expires.$3" && mv -f "$lock/expires.$3" "$lock/expires"
"#;

/// args: state dir, lock name, run token, this host's id. Removes the lock only if the token is
/// ours and no other host of this run still holds it.
const RELEASE: &str = r#"
lock="$1/locks/$2"
[ -d "$lock" ] || { echo gone; exit 0; }
guard_take || { echo "guard busy"; exit 3; }
t=; read -r t < "$lock/token" 2>/dev/null || :
if [ "$t" = "$3" ]; then
  others=
  for h in "$lock/holders"/* "$lock/holders"/.[!.]* "$lock/holders"/..?*; do
    if [ -e "$h" ] && [ "$h" != "$lock/holders/$4" ]; then others=1; break; fi
  done
  if [ -n "$others" ]; then
    rm -f "$lock/holders/$4"
    echo "released; still held by other hosts of this run"
  else
    # (One `rm` takes the lock, moved aside first so no one sees it half gone, and the guard.)
    if mv "$lock" "$lock.released.$3.$4"; then
      rm -rf "$lock.released.$3.$4" "$lock.guard"; echo released; exit 0
    fi
    echo "cannot remove $lock"
  fi
else
  echo "not ours"
fi
guard_drop
"#;

/// args: state dir, lock name, force (1/0), a unique suffix. exit 0 removed/free, 4 lease still live.
const UNLOCK: &str = r#"
lock="$1/locks/$2"
[ -d "$lock" ] || { echo free; exit 0; }
guard_take || { echo "guard busy"; exit 3; }
show
if [ "$3" != 1 ] && [ -n "$exp" ] && [ "$exp" -ge "$now" ]; then guard_drop; exit 4; fi
mv "$lock" "$lock.unlocked.$4" && rm -rf "$lock.unlocked.$4"
guard_drop
echo removed
"#;

/// args: state dir, lock name.
const STATUS: &str = r#"
lock="$1/locks/$2"
if [ -d "$lock" ]; then echo held; show; else echo free; fi
"#;

fn script(body: &str) -> String {
    format!("{GUARD}{body}")
}

/// Parse the `show` block: `now N`, `expires N`, `holder JSON`.
fn parse_show(text: &str) -> (Option<i64>, Option<Holder>) {
    let mut now = None;
    let mut exp = None;
    let mut holder = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("now ") {
            now = v.trim().parse::<i64>().ok();
        } else if let Some(v) = line.strip_prefix("expires ") {
            exp = v.trim().parse::<i64>().ok();
        } else if let Some(v) = line.strip_prefix("holder ") {
            holder = serde_json::from_str(v.trim()).ok();
        }
    }
    let expires_in = match (now, exp) {
        (Some(n), Some(e)) => Some(e - n),
        _ => None,
    };
    (expires_in, holder)
}

fn lease_text(expires_in: Option<i64>) -> String {
    match expires_in {
        Some(s) if s >= 0 => format!(" (lease expires in {s}s unless renewed)"),
        Some(s) => format!(" (lease expired {}s ago)", -s),
        None => " (no lease recorded yet)".into(),
    }
}

impl Lock {
    /// The lock's directory on the host.
    pub fn path(&self) -> String {
        format!("{}/locks/{}", self.state_dir, self.name)
    }

    /// Take the lock on `ctx.host`, waiting up to `wait` for another deploy to finish.
    pub async fn acquire(
        ctx: &StepCtx<'_>,
        run: &str,
        wait: Option<Duration>,
    ) -> Result<Lock, LockError> {
        let host = ctx.host.name().to_string();
        let mut lock = Lock {
            me: blake3::hash(host.as_bytes()).to_hex()[..16].to_string(),
            host,
            state_dir: ctx.host.state_dir(),
            name: lock_name(ctx.app, ctx.env),
            token: run.to_string(),
            lease: lease_from_env(),
            taken_over: None,
        };
        let holder = serde_json::to_string(&Holder::new(&lock.token, ctx.deploy))
            .expect("holder serializes");
        let deadline = wait.map(|w| Instant::now() + w);
        let mut announced = false;
        loop {
            let out = ctx
                .session
                .run_script(
                    &script(ACQUIRE),
                    &[
                        lock.state_dir.as_str(),
                        lock.name.as_str(),
                        lock.token.as_str(),
                        holder.as_str(),
                        &lock.lease.as_secs().to_string(),
                        lock.me.as_str(),
                    ],
                    Some(Duration::from_secs(60)),
                )
                .await
                .map_err(|e| lock.failed(format!("{e:#}")))?;
            let text = out.stdout_str();
            match out.status {
                Some(0) => {
                    if text.starts_with("took-over") {
                        let (exp, old) = parse_show(&text);
                        let who = old
                            .as_ref()
                            .map(|h| h.describe())
                            .unwrap_or_else(|| "unknown".into());
                        lock.taken_over = old;
                        tracing::warn!(
                            "{}: took over the expired deploy lock {} of {who}{}",
                            lock.host,
                            lock.path(),
                            lease_text(exp)
                        );
                    }
                    return Ok(lock);
                }
                Some(1) => {
                    let (exp, holder) = parse_show(&text);
                    let holder = holder
                        .map(|h| h.describe())
                        .unwrap_or_else(|| "a run whose holder file is missing".into());
                    if let Some(d) = deadline.filter(|d| Instant::now() < *d) {
                        if !announced {
                            ctx.progress.println(&format!(
                                "{}: waiting up to {} for the deploy lock held by {holder}",
                                lock.host,
                                report::human_duration(d - Instant::now())
                            ));
                            announced = true;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    return Err(LockError::Held {
                        host: lock.host.clone(),
                        path: lock.path(),
                        playbook: crate::shell::quote_str(&ctx.playbook.to_string_lossy()),
                        env: ctx.env.to_string(),
                        holder,
                        lease: lease_text(exp),
                    });
                }
                _ => return Err(lock.failed(out.tail())),
            }
        }
    }

    fn failed(&self, reason: String) -> LockError {
        LockError::Failed {
            host: self.host.clone(),
            path: self.path(),
            reason,
        }
    }

    /// How long the lock stays valid without renewal.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Renew the lease every third of it until the lock is found lost, or no renewal got through
    /// for a whole lease (returned as the error). A try may take until the lease would run out (at
    /// least a sixth of it): on a link the stream fills, a renewal queues behind the data for
    /// seconds, and one cut short would never get through. A failed one is retried a twelfth of
    /// the lease later.
    /// Run it alongside the steps; a loss stops the deploy before its next step (a step is cut
    /// off only when the host is unreachable).
    pub async fn keep_alive(&self, session: &Session) -> LockError {
        let mut wait = self.lease / 3;
        let mut renewed = std::time::Instant::now();
        loop {
            tokio::time::sleep(wait).await;
            wait = self.lease / 12;
            if renewed.elapsed() > self.lease {
                return LockError::Unreachable {
                    host: self.host.clone(),
                    path: self.path(),
                    after: renewed.elapsed(),
                };
            }
            let r = session
                .run_script(
                    RENEW,
                    &[
                        self.state_dir.as_str(),
                        self.name.as_str(),
                        self.token.as_str(),
                        &self.lease.as_secs().to_string(),
                    ],
                    Some(
                        self.lease
                            .saturating_sub(renewed.elapsed())
                            .max(self.lease / 6),
                    ),
                )
                .await;
            match r {
                Ok(out) if out.success() => {
                    tracing::debug!("renewed the deploy lock");
                    wait = self.lease / 3;
                    renewed = std::time::Instant::now();
                }
                Ok(out) if out.status == Some(1) && out.stdout_str().starts_with("lost") => {
                    let text = out.stdout_str();
                    let why = match text.strip_prefix("lost held ") {
                        Some(h) => format!(
                            "after our lease expired it was taken over by {}",
                            serde_json::from_str::<Holder>(h.trim())
                                .map(|h| h.describe())
                                .unwrap_or_else(|_| "another run".into())
                        ),
                        None => {
                            "the lock directory was removed (by `ferry unlock --force`, or by hand)"
                                .into()
                        }
                    };
                    return LockError::Lost {
                        host: self.host.clone(),
                        path: self.path(),
                        why,
                    };
                }
                Ok(out) => tracing::warn!("cannot renew the deploy lock: {}", out.tail()),
                Err(e) => tracing::warn!("cannot renew the deploy lock: {e:#}"),
            }
        }
    }

    /// Append a ledger record, then remove the lock if it is still ours: one exec. Returns the
    /// script's stderr (where the ledger says if it could not add the record).
    pub async fn release_after(
        self,
        session: &Session,
        record: Option<&ledger::Appending>,
    ) -> Result<String, LockError> {
        let mut args = vec![
            self.state_dir.as_str(),
            self.name.as_str(),
            self.token.as_str(),
            self.me.as_str(),
        ];
        let mut body = String::new();
        if let Some(r) = record {
            body.push_str(&r.script(args.len() + 1));
            args.extend(r.args.iter().map(String::as_str));
        }
        body.push_str(RELEASE);
        let out = session
            .run_script(&script(&body), &args, Some(Duration::from_secs(60)))
            .await
            .map_err(|e| self.failed(format!("{e:#}")))?;
        let text = out.stdout_str();
        if !out.success() {
            return Err(self.failed(out.tail()));
        }
        if text.starts_with("cannot remove") {
            tracing::warn!(
                "{}: could not remove the deploy lock {}; it stays until its lease runs out (or \
                 `ferry unlock`): check the directory's permissions",
                self.host,
                self.path()
            );
        } else if !text.starts_with("released") {
            tracing::warn!(
                "{}: the deploy lock {} was no longer ours at release ({})",
                self.host,
                self.path(),
                text.trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Read the lock state on one host.
pub async fn state(
    host: &Host,
    session: &Session,
    app: &str,
    env: &str,
) -> anyhow::Result<LockState> {
    let (dir, name) = (host.state_dir(), lock_name(app, env));
    let out = session
        .run_script(
            &script(STATUS),
            &[dir.as_str(), name.as_str()],
            Some(Duration::from_secs(30)),
        )
        .await?;
    if !out.success() {
        anyhow::bail!(
            "{}: cannot read the deploy lock: {}",
            host.name(),
            out.tail()
        );
    }
    let text = out.stdout_str();
    let (expires_in, holder) = parse_show(&text);
    Ok(LockState {
        path: format!("{dir}/locks/{name}"),
        held: text.starts_with("held"),
        holder,
        expires_in,
    })
}

/// A setup for reading a host's state without a particular ref (ref-dependent roots resolve to
/// placeholders; the state dir does not depend on them).
pub fn state_setup(g: &Global, target: &Target, env: &str) -> anyhow::Result<Setup> {
    Setup::new(
        g,
        &target.playbook,
        env,
        Some(&DeployContext::placeholder()),
    )
}

/// `ferry lock status`.
pub async fn cli_status(g: &Global, target: &Target) -> anyhow::Result<i32> {
    let env = target.required_env("lock status")?;
    let setup = state_setup(g, target, &env)?;
    let app = setup.playbook.app.clone();
    let outcomes = crate::fleet::run(
        &setup.connector,
        &setup.hosts,
        setup.settings.forks,
        |host, session| {
            let (app, env) = (app.clone(), env.clone());
            async move {
                let r = state(&host, &session, &app, &env).await;
                session.close().await;
                r
            }
        },
    )
    .await;
    let mut ok = true;
    let mut json = Vec::new();
    let mut rows = Vec::new();
    for o in outcomes {
        match o.result {
            Ok(s) => {
                rows.push(vec![
                    o.host.clone(),
                    if s.held { "held".into() } else { "free".into() },
                    s.holder.as_ref().map(Holder::describe).unwrap_or_default(),
                    if s.held {
                        lease_text(s.expires_in).trim().to_string()
                    } else {
                        String::new()
                    },
                    s.path.clone(),
                ]);
                json.push(serde_json::json!({"host": o.host, "lock": s}));
            }
            Err(e) => {
                ok = false;
                rows.push(vec![o.host.clone(), "unknown".into(), format!("{e:#}")]);
                json.push(serde_json::json!({"host": o.host, "error": format!("{e:#}")}));
            }
        }
    }
    if g.json {
        crate::outln!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        crate::out!(
            "{}",
            report::table(&["HOST", "LOCK", "HOLDER", "LEASE", "PATH"], &rows)
        );
    }
    Ok(if ok { 0 } else { 1 })
}

/// `ferry unlock`: remove the lock (a live lease needs `--force`), saying what was removed. The
/// run that held it ended unrecorded, as far as the user knows: the ledger records it as
/// `interrupted` (as a takeover does), so that `ferry history` and `rollback` know of it.
pub async fn cli_unlock(g: &Global, target: &Target, force: bool) -> anyhow::Result<i32> {
    let env = target.required_env("unlock")?;
    let setup = state_setup(g, target, &env)?;
    let app = setup.playbook.app.clone();
    let name = lock_name(&app, &env);
    let outcomes = crate::fleet::run(
        &setup.connector,
        &setup.hosts,
        setup.settings.forks,
        |host, session| {
            let (name, app, env) = (name.clone(), app.clone(), env.clone());
            async move {
                let dir = host.state_dir();
                let suffix = format!("{:016x}", rand::random::<u64>());
                let out = session
                    .run_script(
                        &script(UNLOCK),
                        &[
                            dir.as_str(),
                            name.as_str(),
                            if force { "1" } else { "0" },
                            suffix.as_str(),
                        ],
                        Some(Duration::from_secs(60)),
                    )
                    .await;
                let out = match out {
                    Ok(o) => o,
                    Err(e) => {
                        session.close().await;
                        return Err(e.into());
                    }
                };
                let path = format!("{dir}/locks/{name}");
                let text = out.stdout_str();
                let (exp, holder) = parse_show(&text);
                let recorded = match &holder {
                    Some(h) if out.status == Some(0) && !text.starts_with("free") => {
                        let how = "its lock was removed by `ferry unlock`";
                        let r = ledger::Record::interrupted(&app, &env, host.name(), h, how);
                        match ledger::append(&host, &session, &[r]).await {
                            Ok(()) => "; recorded in the ledger as interrupted".to_string(),
                            Err(e) => format!("; NOT recorded in the ledger as interrupted: {e:#}"),
                        }
                    }
                    _ => String::new(),
                };
                session.close().await;
                let who = holder
                    .map(|h| h.describe())
                    .unwrap_or_else(|| "an unknown holder".into());
                match out.status {
                    Some(0) if text.starts_with("free") => Ok(format!("no lock at {path}")),
                    Some(0) => Ok(format!(
                        "removed {path}, held by {who}{}{recorded}",
                        lease_text(exp)
                    )),
                    Some(4) => anyhow::bail!(
                        "{path} is held by {who}{}: that deploy may still be running; pass --force to remove it anyway",
                        lease_text(exp)
                    ),
                    _ => anyhow::bail!("cannot remove {path}: {}", out.tail()),
                }
            }
        },
    )
    .await;
    let mut ok = true;
    let mut json = Vec::new();
    for o in outcomes {
        match o.result {
            Ok(msg) => {
                if !g.json {
                    crate::outln!("{}: {msg}", o.host);
                }
                json.push(serde_json::json!({"host": o.host, "result": msg}));
            }
            Err(e) => {
                ok = false;
                if !g.json {
                    crate::outln!("{}: NOT removed: {e:#}", o.host);
                }
                json.push(serde_json::json!({"host": o.host, "error": format!("{e:#}")}));
            }
        }
    }
    if g.json {
        crate::outln!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(if ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_one_safe_component() {
        assert_eq!(lock_name("shop", "staging"), "shop-staging");
        let odd = lock_name("shop", "a/../b c");
        assert!(odd.starts_with("_shop-a_.._b_c-"), "{odd}");
        assert!(!odd.contains('/'));
        assert_ne!(lock_name("shop", "a/b"), lock_name("shop", "a_b"));
        assert!(!lock_name(".", ".").starts_with('.'));
        assert_ne!(lock_name("a-b", "c"), lock_name("a", "b-c"));
    }

    #[test]
    fn show_block_parses() {
        let h = Holder {
            token: "t".into(),
            ref_name: "release-$(x)".into(),
            sha: "0123456789".into(),
            ..Default::default()
        };
        let text = format!(
            "held\nnow 100\nexpires 90\nholder {}\n",
            serde_json::to_string(&h).unwrap()
        );
        assert_eq!(parse_show(&text), (Some(-10), Some(h)));
        assert_eq!(parse_show("held\nnow 5\nexpires \nholder \n"), (None, None));
        assert!(lease_text(Some(-10)).contains("expired 10s ago"));
    }
}
