//! The pipeline: deploy locks, the ledger, `ferry status` / `history`, stop, and GitLab reporting,
//! with the real binary against real sshd hosts (OpenSSH + coreutils, and BusyBox-only).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::gitlab_stub;
use crate::support::*;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
const SHA2: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// A ferry run as GitLab CI would start it for `ref_name`.
fn ci(host: &[&Sshd], ref_name: &str, sha: &str, pipeline: &str) -> Ferry {
    Ferry::new()
        .trusting(host)
        .env("GITLAB_CI", "true")
        .env("CI_COMMIT_REF_NAME", ref_name)
        .env("CI_COMMIT_SHA", sha)
        .env("CI_PIPELINE_ID", pipeline)
        .env(
            "CI_JOB_URL",
            format!("https://gitlab.example.com/-/jobs/{pipeline}"),
        )
        .env("GITLAB_USER_LOGIN", "alice")
}

/// A playbook with rules and an environment `test` of `steps` (YAML list items, indented by 6).
fn pb(dir: &TempDir, hosts: &[String], root: &str, steps: &str, extra: &str) -> PathBuf {
    let hosts_yaml: String = hosts.iter().map(|h| format!("      - \"{h}\"\n")).collect();
    dir.write(
        "ferry.yml",
        format!(
            "app: testapp\nrules:\n  - branch: \"release-*\"\n    deploy: test\n  - branch: \"feature/*\"\n    deploy: test\n  - branch: master\n    deploy: []\nenvironments:\n  test:\n    url: http://test.example.com/\n    root: \"{root}\"\n    hosts:\n{hosts_yaml}    steps:\n{steps}{extra}"
        ),
    )
}

/// A root the BusyBox user can write too.
fn open_root(dir: &TempDir) -> String {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    for p in [dir.path(), root.as_path()] {
        run_ok(Command::new("chmod").arg("777").arg(p));
    }
    root.display().to_string()
}

fn ledger(state: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(state.join("ledger.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect(l))
        .collect()
}

/// GitLab collapsible sections: `n` of them, each end right after its own start (never interleaved,
/// though hosts run at once).
fn assert_sections_pair_up(stderr: &str, n: usize) {
    let mut open: Option<String> = None;
    let mut count = 0;
    for line in stderr.lines() {
        if let Some(rest) = line.split("section_start:").nth(1) {
            assert!(open.is_none(), "nested or interleaved section: {stderr}");
            let name = rest.split(':').nth(1).unwrap().split('[').next().unwrap();
            open = Some(name.to_string());
        } else if let Some(rest) = line.split("section_end:").nth(1) {
            let name = rest.split(':').nth(1).unwrap().split('\r').next().unwrap();
            assert_eq!(open.take().as_deref(), Some(name), "{stderr}");
            count += 1;
        }
    }
    assert!(open.is_none() && count == n, "{count} sections: {stderr}");
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `run` step that touches `started` and then holds its deploy (and lock) until the test
/// creates `release` (or two minutes pass, should the test fail first): the tests decide when it
/// ends, not a sleep that a slow machine outlasts.
fn gated_step(started: &Path, release: &Path) -> String {
    format!(
        "      - run: {{ command: [\"sh\", \"-c\", \"touch \\\"$0\\\"; i=0; while [ ! -e \\\"$1\\\" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\", \"{}\", \"{}\"] }}\n",
        started.display(),
        release.display()
    )
}

/// Opens a [`gated_step`]'s gate (creates `release`) when dropped, so that a failed assertion
/// does not leave the step, and the lock, waiting.
struct Gate(PathBuf);

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "");
    }
}

#[test]
fn deploy_records_the_ledger_and_releases_the_lock_on_both_shells() {
    for busybox in [false, true] {
        let host = Sshd::start_with(SshdOptions {
            busybox,
            ..Default::default()
        });
        let dir = TempDir::new("ledger");
        let root = open_root(&dir);
        let p = pb(
            &dir,
            &[host.address()],
            &root,
            "      - run: { command: [\"echo\", \"hello ${ref_slug}\"] }\n",
            "",
        );
        let run = ci(&[&host], "release-1.4", SHA, "101")
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
        assert!(run.stderr.contains("hello release-1-4"), "{}", run.stderr);
        assert!(
            run.stderr.contains("section_start:") && run.stderr.contains("section_end:"),
            "CI output has collapsible sections: {}",
            run.stderr
        );
        let state = Path::new(&root).join(".ferry");
        let records = ledger(&state);
        assert_eq!(records.len(), 1, "{records:?}");
        let r = &records[0];
        assert_eq!(r["version"], 1);
        assert_eq!(r["app"], "testapp");
        assert_eq!(r["env"], "test");
        assert_eq!(r["ref"], "release-1.4");
        assert_eq!(r["sha"], SHA);
        assert_eq!(r["pipeline_id"], "101");
        assert_eq!(r["job_url"], "https://gitlab.example.com/-/jobs/101");
        assert_eq!(r["user"], "alice");
        assert_eq!(r["action"], "deploy");
        assert_eq!(r["ok"], true);
        assert_eq!(r["steps"][0]["step"], "run");
        assert!(r["release"].as_str().unwrap().ends_with("-01234567"));
        // Released: the lock directory is gone, and a second deploy appends.
        assert!(!state.join("locks/testapp-test").exists());
        ci(&[&host], "release-1.4", SHA2, "102")
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
        assert_eq!(ledger(&state).len(), 2);
        // Reading it back works on this shell too: status, history, lock status, unlock.
        let status = Ferry::new()
            .trusting(&[&host])
            .args(["status", "--json"])
            .arg(&p)
            .run()
            .success();
        let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert_eq!(v[0]["rows"][0]["sha"], SHA2, "{v}");
        assert_eq!(v[0]["rows"][0]["state"], "live", "{v}");
        let history = Ferry::new()
            .trusting(&[&host])
            .arg("history")
            .arg(&p)
            .run()
            .success();
        assert_eq!(history.stdout.lines().count(), 3, "{}", history.stdout);
        let lock = Ferry::new()
            .trusting(&[&host])
            .args(["lock", "status", "--env", "test"])
            .arg(&p)
            .run()
            .success();
        assert!(lock.stdout.contains("free"), "{}", lock.stdout);
        stale_lock(&root, 10);
        let unlock = Ferry::new()
            .trusting(&[&host])
            .args(["unlock", "--env", "test"])
            .arg(&p)
            .run()
            .success();
        assert!(unlock.stdout.contains("removed"), "{}", unlock.stdout);
    }
}

#[test]
fn a_failed_step_is_recorded_releases_the_lock_and_exits_1() {
    let host = Sshd::start();
    let dir = TempDir::new("fail");
    let root = open_root(&dir);
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        "      - run: { command: \"echo out; exit 3\" }\n      - run: { command: [\"touch\", \"never\"] }\n",
        "",
    );
    let run = ci(&[&host], "release-2", SHA, "7")
        .arg("deploy")
        .arg(&p)
        .run()
        .failure(1);
    assert!(run.stdout.contains("FAILED"), "{}", run.stdout);
    let state = Path::new(&root).join(".ferry");
    let r = &ledger(&state)[0];
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("step 1 (run)"), "{r}");
    assert!(!state.join("locks/testapp-test").exists());
    assert!(!Path::new(&root).join("never").exists());
}

/// A `run` step's output is shown whole: stdout and stderr when it succeeds, and when it fails,
/// stdout beside the error that quotes stderr.
#[test]
fn run_step_output_keeps_both_streams() {
    let host = Sshd::start();
    let dir = TempDir::new("runout");
    let root = open_root(&dir);
    let steps = "      - run: { command: \"echo to-out; echo to-err >&2\" }\n      \
                 - run: { command: \"echo tok=1; echo bad thing >&2; exit 2\" }\n";
    let p = pb(&dir, &[host.address()], &root, steps, "");
    let run = ci(&[&host], "release-1", SHA, "8")
        .args(["deploy", "--json"])
        .arg(&p)
        .run()
        .failure(1);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let log = v[0]["steps"][0]["log"].to_string();
    assert!(
        log.contains("to-out") && log.contains("stderr: to-err"),
        "{log}"
    );
    assert!(run.stderr.contains("tok=1"), "{}", run.stderr);
    assert!(run.stderr.contains("bad thing"), "{}", run.stderr);
    // Outside GitLab and --json, the lines are shown as they come, once.
    let plain = Ferry::new()
        .trusting(&[&host])
        .args([
            "deploy",
            "--env",
            "test",
            "--ref",
            "release-1",
            "--sha",
            SHA,
        ])
        .arg(&p)
        .run()
        .failure(1);
    for line in [": to-out\n", ": stderr: to-err\n", ": tok=1\n"] {
        assert_eq!(
            plain.stderr.matches(line).count(),
            1,
            "{line}: {}",
            plain.stderr
        );
    }
}

/// A `run` step's secrets reach the command as environment variables over stdin, on both shells:
/// never on a command line (sshd's log), in ferry's output or in the ledger; a missing one fails
/// the step before anything runs, naming the variable.
#[test]
fn run_step_secret_env_reaches_the_command_only() {
    let secret = "s3cr3t-'quoted' $(touch pwned) \\x";
    for busybox in [false, true] {
        // Every command line the host runs is written down (sshd logs none of them).
        let dir = TempDir::new("runsecret");
        let root = open_root(&dir);
        let (log_commands, commands) = logging_commands(Path::new(&root));
        let host = Sshd::start_with(SshdOptions {
            busybox,
            extra_config: vec![log_commands],
            ..Default::default()
        });
        let out = Path::new(&root).join("token");
        let p = pb(
            &dir,
            &[host.address()],
            &root,
            &format!(
                "      - run:\n          command: [\"sh\", \"-c\", \"printf '%s' \\\"$TOKEN\\\" > \\\"$0\\\"; echo \\\"token is $TOKEN\\\"\", \"{}\"]\n          secret_env: {{ TOKEN: TEST_RUN_TOKEN }}\n",
                out.display()
            ),
            "",
        );
        let run = ci(&[&host], "release-1", SHA, "9")
            .env("TEST_RUN_TOKEN", secret)
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), secret);
        assert!(
            !run.all().contains(secret),
            "secret in output: {}",
            run.all()
        );
        assert!(run.all().contains("token is [MASKED]"), "{}", run.all());
        let logged = std::fs::read_to_string(&commands).unwrap();
        assert!(
            logged.contains("ferry-run"),
            "the wrapper saw the commands: {logged}"
        );
        assert!(
            !logged.contains("s3cr3t"),
            "secret on a command line: {logged}"
        );
        let ledger = std::fs::read_to_string(Path::new(&root).join(".ferry/ledger.jsonl")).unwrap();
        assert!(!ledger.contains("s3cr3t"), "{ledger}");
        // Found before any host is touched: a usage error.
        let run = ci(&[&host], "release-1", SHA, "10")
            .arg("deploy")
            .arg(&p)
            .run()
            .failure(2);
        assert!(
            run.all().contains(
                "secret_env TOKEN reads environment variable TEST_RUN_TOKEN, which is not set"
            ),
            "{}",
            run.all()
        );
        // Set, but not text: said so, not "not set".
        let run = ci(&[&host], "release-1", SHA, "11")
            .env(
                "TEST_RUN_TOKEN",
                <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"\xff\xfe"),
            )
            .arg("deploy")
            .arg(&p)
            .run()
            .failure(2);
        assert!(
            run.all()
                .contains("TEST_RUN_TOKEN, which does not hold UTF-8 text"),
            "{}",
            run.all()
        );
    }
}

/// Two deploys at once: the second fails fast naming the first; with --lock-wait it waits its turn.
#[test]
fn concurrent_deploys_are_serialised_by_the_lock() {
    let host = Sshd::start();
    let dir = TempDir::new("concurrent");
    let root = open_root(&dir);
    let (marker, release) = (dir.join("first-running"), dir.join("release"));
    let gate = Gate(release.clone());
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        &gated_step(&marker, &release),
        "",
    );
    let lock_dir = Path::new(&root).join(".ferry/locks/testapp-test");
    let first = {
        let p = p.clone();
        let ferry = ci(&[&host], "release-1", SHA, "201").arg("deploy").arg(&p);
        std::thread::spawn(move || ferry.run())
    };
    wait_for("the first deploy to run its step", || marker.exists());
    let second = ci(&[&host], "release-2", SHA2, "202")
        .arg("deploy")
        .arg(&p)
        .run()
        .failure(1);
    let all = second.all();
    assert!(all.contains("held by ref release-1"), "{all}");
    assert!(all.contains("pipeline 201"), "{all}");
    assert!(all.contains("--lock-wait"), "{all}");
    // The refused deploy did not touch the holder's lock.
    assert!(lock_dir.exists());
    let (mut third, _home) = ci(&[&host], "release-3", SHA2, "203")
        .args(["deploy", "--lock-wait", "60s"])
        .arg(&p)
        .spawn();
    let stderr = third.stderr.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let mut s = seen.lock().unwrap();
                s.push_str(&line.unwrap());
                s.push('\n');
            }
        })
    };
    wait_for("the third deploy to wait for the lock", || {
        seen.lock().unwrap().contains("waiting up to")
    });
    drop(gate);
    first.join().unwrap().success();
    let out = third.wait_with_output().unwrap();
    reader.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", seen.lock().unwrap());
    let refs: Vec<String> = ledger(&Path::new(&root).join(".ferry"))
        .iter()
        .map(|r| r["ref"].as_str().unwrap().to_string())
        .collect();
    // The refused deploy never ran, so it recorded nothing; the waiting one ran after the first.
    assert_eq!(refs, ["release-1", "release-3"]);
    assert!(!lock_dir.exists());
}

/// GitLab's `CI_COMMIT_REF_SLUG` is used only when it is the slug of the ref deployed: one left
/// from another branch does not name this branch's paths.
#[test]
fn a_ref_slug_of_another_ref_is_not_used() {
    let host = Sshd::start();
    let dir = TempDir::new("slug");
    let root = open_root(&dir);
    dir.write("dist/index.html", "x");
    let step = format!(
        "      - sync: {{ from: \"{}\", to: \"site-${{ref_slug}}\" }}\n",
        dir.join("dist").display()
    );
    let p = pb(&dir, &[host.address()], &root, &step, "");
    for (slug, want) in [
        ("release-2-0", "release-2-0"),
        ("release-1-4", "release-2-0"),
    ] {
        let run = ci(&[&host], "release-2.0", SHA, "201")
            .env("CI_COMMIT_REF_SLUG", slug)
            .args(["deploy", "--plan"])
            .arg(&p)
            .run()
            .success();
        assert!(
            run.all().contains(&format!("{root}/site-{want}")),
            "CI_COMMIT_REF_SLUG={slug}: {}",
            run.all()
        );
    }
}

/// Two deploys of one two-host environment at once, without `--lock-wait`: the hosts take their
/// locks in one order, so the deploys meet at the first host and one goes on; never does each
/// take one host's lock and fail on the other's.
#[test]
fn two_deploys_of_two_hosts_at_once_never_both_fail() {
    let hosts = [Sshd::start(), Sshd::start()];
    let dir = TempDir::new("concurrent2");
    let root = format!("{}/${{host}}", open_root(&dir));
    dir.write("dist/index.html", "x");
    let step = format!(
        "      - sync: {{ from: \"{}\", to: site }}\n",
        dir.join("dist").display()
    );
    let p = pb(
        &dir,
        &[hosts[0].address(), hosts[1].address()],
        &root,
        &step,
        "",
    );
    for round in 0..6 {
        let runs: Vec<_> = [("release-1", SHA), ("release-2", SHA2)]
            .into_iter()
            .map(|(r, sha)| {
                let ferry = ci(&[&hosts[0], &hosts[1]], r, sha, "201")
                    .arg("deploy")
                    .arg(&p);
                std::thread::spawn(move || ferry.run())
            })
            .collect();
        let runs: Vec<Run> = runs.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(
            runs.iter().any(|r| r.code == 0),
            "round {round}: both failed:\n{}\n{}",
            runs[0].all(),
            runs[1].all()
        );
    }
}

/// A killed controller leaves its lock: `lock status` names it, `unlock` refuses while the lease
/// is live, and once the lease expires a new deploy takes it over.
#[test]
fn a_killed_deploys_lock_is_shown_expires_and_is_taken_over() {
    let host = Sshd::start();
    let dir = TempDir::new("killed");
    let root = open_root(&dir);
    let marker = dir.join("running");
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        &format!(
            "      - run: {{ command: [\"sh\", \"-c\", \"touch \\\"$0\\\"; sleep 60\", \"{}\"] }}\n",
            marker.display()
        ),
        "",
    );
    let kh = host.known_hosts_line();
    let key = std::fs::read_to_string(&default_key().private).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["deploy", "--ref", "release-killed", "--sha", SHA])
        .arg(&p)
        .env("SSH_PRIVATE_KEY", &key)
        .env("SSH_KNOWN_HOSTS", &kh)
        .env("FERRY_LOCK_LEASE", "3s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the deploy to start", || marker.exists());
    child.kill().unwrap();
    child.wait().unwrap();
    // The lease (3s) is the killed run's; the test sets its end so that a slow machine cannot
    // let it lapse before the checks that need it live.
    set_lock_expiry(&root, 3600);
    let status = Ferry::new()
        .trusting(&[&host])
        .args(["lock", "status", "--env", "test"])
        .arg(&p)
        .run()
        .success();
    assert!(status.stdout.contains("held"), "{}", status.stdout);
    assert!(
        status.stdout.contains("release-killed"),
        "{}",
        status.stdout
    );
    let json = Ferry::new()
        .trusting(&[&host])
        .args(["lock", "status", "--env", "test", "--json"])
        .arg(&p)
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(v[0]["lock"]["holder"]["ref"], "release-killed");
    // Still inside the lease: unlock refuses without --force.
    let early = Ferry::new()
        .trusting(&[&host])
        .args(["unlock", "--env", "test"])
        .arg(&p)
        .run()
        .failure(1);
    assert!(early.stdout.contains("--force"), "{}", early.stdout);
    set_lock_expiry(&root, -10);
    let run = ci(&[&host], "release-next", SHA2, "301")
        .args(["deploy", "--plan"])
        .arg(&p)
        .run()
        .success();
    assert!(run.stdout.contains("ok"), "{}", run.stdout);
    // --plan takes no lock: the stale one is still there; a real deploy takes it over.
    let p2 = pb(
        &dir,
        &[host.address()],
        &root,
        "      - run: { command: [\"true\"] }\n",
        "",
    );
    let run = ci(&[&host], "release-next", SHA2, "301")
        .arg("deploy")
        .arg(&p2)
        .run()
        .success();
    assert!(
        run.stderr.contains("took over the expired deploy lock"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("release-killed"), "{}", run.stderr);
    let lock_dir = Path::new(&root).join(".ferry/locks/testapp-test");
    assert!(!lock_dir.exists());
}

#[test]
fn unlock_removes_a_lock_and_says_whose_it_was() {
    let host = Sshd::start();
    let dir = TempDir::new("unlock");
    let root = open_root(&dir);
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        "      - run: { command: [\"true\"] }\n",
        "",
    );
    // A lock as a killed run leaves it, with a live lease.
    let lock_dir = Path::new(&root).join(".ferry/locks/testapp-test");
    std::fs::create_dir_all(&lock_dir).unwrap();
    std::fs::write(lock_dir.join("token"), "abc\n").unwrap();
    std::fs::write(
        lock_dir.join("holder.json"),
        format!("{{\"token\":\"abc\",\"ref\":\"feature/äöü spaces\",\"sha\":\"{SHA}\",\"pipeline_id\":\"55\",\"job_url\":null,\"user\":\"bob\",\"controller\":\"runner-9\",\"pid\":4242,\"started_at\":1}}\n"),
    )
    .unwrap();
    let far = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    std::fs::write(lock_dir.join("expires"), format!("{far}\n")).unwrap();
    let refused = Ferry::new()
        .trusting(&[&host])
        .args(["unlock", "--env", "test"])
        .arg(&p)
        .run()
        .failure(1);
    assert!(refused.stdout.contains("--force"), "{}", refused.stdout);
    assert!(lock_dir.exists());
    let removed = Ferry::new()
        .trusting(&[&host])
        .args(["unlock", "--force", "--env", "test"])
        .arg(&p)
        .run()
        .success();
    assert!(removed.stdout.contains("removed"), "{}", removed.stdout);
    assert!(
        removed.stdout.contains("'feature/äöü spaces'") && removed.stdout.contains("pipeline 55"),
        "{}",
        removed.stdout
    );
    assert!(!lock_dir.exists());
    // The run that held it is in the ledger, as interrupted, for history and rollback.
    assert!(
        removed
            .stdout
            .contains("recorded in the ledger as interrupted"),
        "{}",
        removed.stdout
    );
    let records = ledger(&Path::new(&root).join(".ferry"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["action"], "interrupted");
    assert_eq!(records[0]["ref"], "feature/äöü spaces");
    assert_eq!(records[0]["pipeline_id"], "55");
    assert_eq!(records[0]["ok"], false);
    let why = records[0]["error"].as_str().unwrap();
    assert!(why.contains("removed by `ferry unlock`"), "{why}");
    let history = Ferry::new()
        .trusting(&[&host])
        .args(["history", "--env", "test"])
        .arg(&p)
        .run()
        .success();
    assert!(
        history.stdout.contains("interrupted") && history.stdout.contains("'feature/äöü spaces'"),
        "{}",
        history.stdout
    );
    let again = Ferry::new()
        .trusting(&[&host])
        .args(["unlock", "--env", "test"])
        .arg(&p)
        .run()
        .success();
    assert!(again.stdout.contains("no lock"), "{}", again.stdout);
    assert_eq!(ledger(&Path::new(&root).join(".ferry")).len(), 1);
}

/// Review apps: hostile branch names deploy to their own roots, status shows every branch without
/// `--ref`, `stop` removes one, and nothing is ever run from a name.
#[test]
fn hostile_branch_names_are_safe_in_paths_locks_ledger_status_and_stop() {
    let host = Sshd::start();
    let dir = TempDir::new("review");
    let root = open_root(&dir);
    let pwned = Path::new("/tmp/pwned");
    let _ = std::fs::remove_file(pwned);
    let steps = "      - run: { command: [\"sh\", \"-c\", \"mkdir -p \\\"$0\\\" && printf %s \\\"$1\\\" > \\\"$0/ref\\\"\", \"${root}\", \"${ref}\"] }\n";
    let on_stop = "    on_stop:\n      - run: { command: [\"rm\", \"-rf\", \"${root}\"] }\n";
    let p = pb(
        &dir,
        &[host.address()],
        &format!("{root}/${{ref_slug}}"),
        steps,
        on_stop,
    );
    let long = format!("feature/{}", "x".repeat(192));
    let refs = [
        "release-$(touch${IFS}/tmp/pwned)".to_string(),
        "feature/äöü-ünïcode".to_string(),
        long.clone(),
    ];
    for (i, r) in refs.iter().enumerate() {
        ci(&[&host], r, SHA, &format!("40{i}"))
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
    }
    assert!(!pwned.exists(), "a branch name was run as a command");
    for (r, slug) in [
        (&refs[0], "release---touch--ifs--tmp-pwned".to_string()),
        (&refs[1], "feature------n-code".to_string()),
        (&refs[2], format!("feature-{}", "x".repeat(55))),
    ] {
        let f = Path::new(&root).join(&slug).join("ref");
        assert_eq!(&std::fs::read_to_string(&f).expect(&slug), r);
    }
    // One ledger for every branch, under the ref-independent part of the root.
    let records = ledger(&Path::new(&root).join(".ferry"));
    let recorded: Vec<&str> = records.iter().map(|r| r["ref"].as_str().unwrap()).collect();
    assert_eq!(
        recorded,
        refs.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let status = Ferry::new()
        .trusting(&[&host])
        .args(["status", "--json"])
        .arg(&p)
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).expect(&status.stdout);
    let rows = v[0]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{v}");
    for r in &refs {
        let row = rows.iter().find(|x| x["ref"] == r.as_str()).expect(r);
        assert_eq!(row["state"], "live", "{row}");
        assert_eq!(row["sha"], SHA);
    }
    let text = Ferry::new()
        .trusting(&[&host])
        .arg("status")
        .arg(&p)
        .run()
        .success();
    assert!(
        text.stdout.contains("'release-$(touch${IFS}/tmp/pwned)'"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("'feature/äöü-ünïcode'"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("STATE"), "{}", text.stdout);
    // Only that branch's deployment goes; an operator outside CI and git names the ref alone
    // (a stop ships no commit).
    Ferry::new()
        .trusting(&[&host])
        .current_dir(dir.path())
        .args(["stop", "--env", "test", "--ref", "feature/äöü-ünïcode"])
        .arg(&p)
        .run()
        .success();
    assert!(!Path::new(&root).join("feature------n-code").exists());
    // As a GitLab on_stop job runs it: only CI variables, the environment from the ref's rule.
    ci(&[&host], &long, SHA, "411")
        .arg("stop")
        .arg(&p)
        .run()
        .success();
    assert!(
        !Path::new(&root)
            .join(format!("feature-{}", "x".repeat(55)))
            .exists()
    );
    assert!(
        Path::new(&root)
            .join("release---touch--ifs--tmp-pwned")
            .exists()
    );
    let one = Ferry::new()
        .trusting(&[&host])
        .args(["status", "--json", "--ref", "feature/äöü-ünïcode"])
        .arg(&p)
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&one.stdout).unwrap();
    let rows = v[0]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{v}");
    assert_eq!(rows[0]["state"], "stopped");
    assert_eq!(rows[0]["result"], "stop ok");
    let history = Ferry::new()
        .trusting(&[&host])
        .args(["history", "-n", "2"])
        .arg(&p)
        .run()
        .success();
    let lines: Vec<&str> = history.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", history.stdout);
    assert!(
        lines[1].contains("stop") && lines[1].contains(&long),
        "{}",
        history.stdout
    );
    assert!(
        lines[2].contains("stop") && lines[2].contains("'feature/äöü-ünïcode'"),
        "{}",
        history.stdout
    );
    // The stop outside CI and git could not tell its commit: it records the one it stopped.
    assert!(
        lines[2].contains(&format!("{}  stop", &SHA[..8])),
        "{}",
        history.stdout
    );
    assert!(!pwned.exists());
}

/// A branch name is data: in a `run` command given as one string (read by the host's shell), a
/// ref that is not one plain word stops the run before any host is touched, pointing at the
/// template; the list form takes it quoted.
#[test]
fn a_hostile_ref_never_becomes_shell_code() {
    let host = Sshd::start();
    let dir = TempDir::new("hostile-run");
    let root = open_root(&dir);
    let pwned = dir.join("pwned");
    let hostile = format!("release-1;touch${{IFS}}{}", pwned.display());
    let steps = format!(
        "      - run: {{ command: [sh, -c, 'printf %s \"$1\" > \"$0\"', \"{root}/argv\", \"${{ref}}\"] }}\n      \
         - run: {{ command: \"echo '${{ref}}' > {root}/string\" }}\n"
    );
    let p = pb(&dir, &[host.address()], &root, &steps, "");
    let run = ci(&[&host], &hostile, SHA, "601")
        .arg("deploy")
        .arg(&p)
        .run()
        .failure(2);
    assert!(
        run.stderr.contains(&format!("{}:17:32:", p.display())),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("`${ref}` holds characters a shell would read"),
        "{}",
        run.stderr
    );
    assert!(!pwned.exists());
    assert!(!Path::new(&root).join("argv").exists());
    // Without the string form, the list form runs with the ref as one word.
    let steps = steps.lines().next().unwrap().to_string() + "\n";
    let p = pb(&dir, &[host.address()], &root, &steps, "");
    ci(&[&host], &hostile, SHA, "602")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    assert_eq!(
        std::fs::read_to_string(Path::new(&root).join("argv")).unwrap(),
        hostile
    );
    assert!(!pwned.exists());
}

/// Two hosts of one environment on different commits, and a failed last attempt: status says so.
#[test]
fn status_flags_hosts_that_disagree_and_failed_attempts() {
    let (a, b) = (Sshd::start(), Sshd::start());
    let dir = TempDir::new("disagree");
    let root = open_root(&dir);
    // Each host gets its own root via the host name, as two machines would have.
    let steps = "      - run: { command: \"test ! -e \\\"${root}/fail\\\"\" }\n";
    let p = pb(
        &dir,
        &[a.address(), b.address()],
        &format!("{root}/${{host}}"),
        steps,
        "",
    );
    let both = ci(&[&a, &b], "release-1", SHA, "501")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    assert_sections_pair_up(&both.stderr, 2);
    // Each step's header shows once: in its section (a quick step gets no "running" notice).
    for h in [&a, &b] {
        let header = format!("{}: run (deploy)", h.address());
        assert_eq!(both.stderr.matches(&header).count(), 1, "{}", both.stderr);
    }
    // With --json in CI, stdout has the facts and stderr no empty sections.
    let json = ci(&[&a, &b], "release-1", SHA, "501")
        .args(["deploy", "--json"])
        .arg(&p)
        .run()
        .success();
    assert!(!json.stderr.contains("section_start"), "{}", json.stderr);
    // So with --plan: the plan is the result, on stdout.
    let plan = ci(&[&a, &b], "release-1", SHA, "501")
        .args(["deploy", "--plan"])
        .arg(&p)
        .run()
        .success();
    assert!(!plan.stderr.contains("section_start"), "{}", plan.stderr);
    assert!(plan.stdout.contains(&a.address()), "{}", plan.stdout);
    ci(&[&a, &b], "release-2", SHA2, "502")
        .args(["deploy", "--limit", &a.address()])
        .arg(&p)
        .run()
        .success();
    // A failed attempt on b.
    let b_root = Path::new(&root).join(b.address());
    std::fs::write(b_root.join("fail"), "").unwrap();
    ci(&[&a, &b], "release-3", SHA2, "503")
        .args(["deploy", "--limit", &b.address()])
        .arg(&p)
        .run()
        .failure(1);
    let run = Ferry::new()
        .trusting(&[&a, &b])
        .arg("status")
        .arg(&p)
        .run()
        .success();
    assert!(run.stdout.contains("hosts disagree"), "{}", run.stdout);
    assert!(
        run.stdout.contains("replaced by release-2"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("last attempt failed"), "{}", run.stdout);
    assert!(run.stdout.contains("never deployed ok"), "{}", run.stdout);
}

fn gitlab_pb(dir: &TempDir, host: &Sshd, root: &str, step: &str) -> PathBuf {
    pb(
        dir,
        &[host.address()],
        root,
        step,
        "gitlab:\n  deployments: true\n",
    )
}

const TOKEN: &str = "glpat-secret-token-0123456789";

/// Commit status running → success (and a deployment) through a stub that checks GitLab's API.
#[test]
fn gitlab_gets_commit_status_and_deployment_and_never_sees_the_token_in_output() {
    let host = Sshd::start();
    let dir = TempDir::new("gitlab");
    let root = open_root(&dir);
    let stub = gitlab_stub::GitlabStub::start(TOKEN, "group/shop");
    // `ferry deploy` of playbook `p` on `ref_name` in pipeline `pipeline`, reporting to the stub.
    let deploy = |ref_name: &str, pipeline: &str, p: &Path| {
        ci(&[&host], ref_name, SHA, pipeline)
            .env("CI_API_V4_URL", &stub.api_url)
            .env("CI_PROJECT_ID", "group/shop")
            .env("FERRY_GITLAB_TOKEN", TOKEN)
            .arg("deploy")
            .arg(p)
            .run()
    };
    let p = gitlab_pb(&dir, &host, &root, "      - run: { command: [\"true\"] }\n");
    let run = deploy("release-9", "901", &p).success();
    assert!(!run.all().contains(TOKEN), "the token leaked");
    assert_eq!(stub.problems(), Vec::<String>::new());
    let statuses: Vec<_> = stub
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/statuses/"))
        .collect();
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert_eq!(
        statuses[0].path,
        format!("/api/v4/projects/group%2Fshop/statuses/{SHA}")
    );
    assert_eq!(statuses[0].body["state"], "running");
    assert_eq!(statuses[1].body["state"], "success");
    assert_eq!(statuses[1].body["name"], "ferry/test");
    assert_eq!(statuses[1].body["target_url"], "http://test.example.com/");
    // The job's own commit: its pipeline (which says the ref; a merge request pipeline's ref is
    // not the branch's, and GitLab matches sha, ref and pipeline together).
    assert_eq!(statuses[1].body["pipeline_id"], 901);
    assert!(statuses[1].body.get("ref").is_none(), "{:?}", statuses[1]);
    assert_eq!(stub.deployments(), vec![(100, "success".to_string())]);
    // The environment has the playbook's url: its link in GitLab.
    let url = Some("http://test.example.com/".to_string());
    assert_eq!(stub.environments(), vec![("test".to_string(), url.clone())]);

    // A failing deploy reports failed.
    let p = gitlab_pb(
        &dir,
        &host,
        &root,
        "      - run: { command: [\"false\"] }\n",
    );
    deploy("release-9", "902", &p).failure(1);
    let last = stub
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path.contains("/statuses/"))
        .unwrap();
    assert_eq!(last.body["state"], "failed");
    assert_eq!(stub.deployments()[1], (101, "failed".to_string()));
    assert_eq!(stub.problems(), Vec::<String>::new());

    // An environment deployed per branch is reported as `test/<ref slug>`, as GitLab names review
    // apps.
    let p = gitlab_pb(
        &dir,
        &host,
        &format!("{root}/${{ref_slug}}"),
        "      - run: { command: [\"true\"] }\n",
    );
    // (One that GitLab made without a URL, say by an earlier deployment, gets it.)
    stub.add_environment("test/feature-x");
    deploy("feature/x", "904", &p).success();
    assert!(
        stub.environments()
            .contains(&("test/feature-x".to_string(), url.clone())),
        "{:?}",
        stub.environments()
    );
    let post = stub
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path.ends_with("/deployments"))
        .unwrap();
    assert_eq!(post.body["environment"], "test/feature-x");
    assert_eq!(stub.problems(), Vec::<String>::new());

    // A job with an `environment:` of its own gets its deployment from GitLab: ferry sets the
    // commit status only.
    let (deployments, requests) = (stub.deployments().len(), stub.requests().len());
    let p = gitlab_pb(&dir, &host, &root, "      - run: { command: [\"true\"] }\n");
    ci(&[&host], "release-9", SHA, "905")
        .env("CI_API_V4_URL", &stub.api_url)
        .env("CI_PROJECT_ID", "group/shop")
        .env("FERRY_GITLAB_TOKEN", TOKEN)
        .env("CI_ENVIRONMENT_NAME", "test")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    assert_eq!(stub.deployments().len(), deployments);
    let new: Vec<_> = stub.requests().into_iter().skip(requests).collect();
    assert_eq!(new.len(), 2, "running and success statuses: {new:?}");
    assert!(new.iter().all(|r| r.path.contains("/statuses/")), "{new:?}");
    assert_eq!(stub.problems(), Vec::<String>::new());
    // Not when that environment's `action:` makes no deployment, nor for another environment.
    for (name, action) in [("test", "prepare"), ("other", "start")] {
        let deployments = stub.deployments().len();
        ci(&[&host], "release-9", SHA, "905")
            .env("CI_API_V4_URL", &stub.api_url)
            .env("CI_PROJECT_ID", "group/shop")
            .env("FERRY_GITLAB_TOKEN", TOKEN)
            .env("CI_ENVIRONMENT_NAME", name)
            .env("CI_ENVIRONMENT_ACTION", action)
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
        assert_eq!(stub.deployments().len(), deployments + 1, "{name} {action}");
    }
    // Another commit than the job's (`--sha`): its pipeline is not that commit's; the ref goes.
    let other = "1".repeat(40);
    ci(&[&host], "release-9", SHA, "907")
        .env("CI_API_V4_URL", &stub.api_url)
        .env("CI_PROJECT_ID", "group/shop")
        .env("FERRY_GITLAB_TOKEN", TOKEN)
        .args(["deploy", "--sha", &other])
        .arg(&p)
        .run()
        .success();
    let last = stub
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path.contains("/statuses/"))
        .unwrap();
    assert!(last.path.ends_with(&other), "{last:?}");
    assert_eq!(last.body["ref"], "release-9");
    assert!(last.body.get("pipeline_id").is_none(), "{last:?}");
    assert_eq!(stub.problems(), Vec::<String>::new());

    // The most verbose logging shows no piece of the token (ureq's trace dumps request headers
    // in pieces of 16 bytes).
    let traced = ci(&[&host], "release-9", SHA, "906")
        .env("CI_API_V4_URL", &stub.api_url)
        .env("CI_PROJECT_ID", "group/shop")
        .env("FERRY_GITLAB_TOKEN", TOKEN)
        .env("CI_ENVIRONMENT_NAME", "test")
        .env("FERRY_LOG", "trace")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    assert!(traced.stderr.contains("DEBUG"), "{}", traced.stderr);
    for piece in ["secret-t", "token-01", "23456789"] {
        assert!(!traced.all().contains(piece), "{piece}: {}", traced.all());
    }
    // Nor a filter for a target that begins ureq's name (EnvFilter matches by prefix).
    let traced = ci(&[&host], "release-9", SHA, "906")
        .env("CI_API_V4_URL", &stub.api_url)
        .env("CI_PROJECT_ID", "group/shop")
        .env("FERRY_GITLAB_TOKEN", TOKEN)
        .env("FERRY_LOG", "u=trace")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    for piece in ["secret-t", "token-01", "23456789", "private-token"] {
        assert!(!traced.all().contains(piece), "{piece}: {}", traced.all());
    }
}

/// GitLab down (500s, or nothing listening): a warning, and the deploy still succeeds.
#[test]
fn a_gitlab_outage_warns_and_never_fails_a_good_deploy() {
    let host = Sshd::start();
    let dir = TempDir::new("outage");
    let root = open_root(&dir);
    let p = gitlab_pb(&dir, &host, &root, "      - run: { command: [\"true\"] }\n");
    let down = gitlab_stub::GitlabStub::failing(TOKEN, "42");
    let nothing = format!("http://127.0.0.1:{}/api/v4", free_port());
    for api in [down.api_url.clone(), nothing] {
        let run = ci(&[&host], "release-9", SHA, "903")
            .env("CI_API_V4_URL", &api)
            .env("CI_PROJECT_ID", "42")
            .env("FERRY_GITLAB_TOKEN", TOKEN)
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
        assert!(
            run.stderr
                .contains("warning: cannot set the commit status ferry/test"),
            "{}",
            run.stderr
        );
        assert!(!run.all().contains(TOKEN), "the token leaked");
    }
    assert!(down.requests().len() >= 2, "the failing stub was called");
    // Both deploys happened and were recorded.
    assert_eq!(ledger(&Path::new(&root).join(".ferry")).len(), 2);
    // Redirected elsewhere: not followed (the token would go along), said so, and, GitLab's API
    // not being there, nothing more is tried this run.
    let elsewhere = gitlab_stub::GitlabStub::start(TOKEN, "42");
    let moved = gitlab_stub::GitlabStub::redirecting(
        TOKEN,
        "42",
        &elsewhere.api_url.replace("/api/v4", ""),
    );
    let run = ci(&[&host], "release-9", SHA, "904")
        .env("CI_API_V4_URL", &moved.api_url)
        .env("CI_PROJECT_ID", "42")
        .env("FERRY_GITLAB_TOKEN", TOKEN)
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    assert!(run.stderr.contains("a redirect to"), "{}", run.stderr);
    assert!(
        run.stderr.contains("not reporting the rest of this deploy"),
        "{}",
        run.stderr
    );
    assert_eq!(moved.requests().len(), 1, "{:?}", moved.requests());
    assert!(
        elsewhere.requests().is_empty(),
        "{:?}",
        elsewhere.requests()
    );
}

/// Rollback picks the previous deploy from the ledger, records it, and status shows it live.
#[test]
fn rollback_returns_to_the_previous_deploy_and_is_recorded() {
    let host = Sshd::start();
    let dir = TempDir::new("rollback");
    let root = open_root(&dir);
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        // (A rollback runs no `run` step, so it needs none of their secrets.)
        "      - run: { command: [\"true\"], secret_env: { TOKEN: TEST_ROLLBACK_TOKEN } }\n",
        "",
    );
    ci(&[&host], "release-1", SHA, "601")
        .env("TEST_ROLLBACK_TOKEN", "t")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    std::thread::sleep(Duration::from_millis(1100)); // release ids have second resolution
    ci(&[&host], "release-2", SHA2, "602")
        .env("TEST_ROLLBACK_TOKEN", "t")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    let state = Path::new(&root).join(".ferry");
    let first_release = ledger(&state)[0]["release"].as_str().unwrap().to_string();
    let bad = ci(&[&host], "release-2", SHA2, "603")
        .args([
            "rollback",
            "--env",
            "test",
            "--to",
            "20000101T000000Z-deadbeef",
        ])
        .arg(&p)
        .run()
        .failure(1);
    assert!(bad.stdout.contains("known releases"), "{}", bad.stdout);
    assert!(bad.stdout.contains(&first_release), "{}", bad.stdout);
    let run = ci(&[&host], "release-2", SHA2, "604")
        .args(["rollback", "--env", "test"])
        .arg(&p)
        .run()
        .success();
    assert!(
        run.stderr
            .contains(&format!("rolling back to release {first_release}")),
        "{}",
        run.stderr
    );
    let records = ledger(&state);
    let last = records.last().unwrap();
    assert_eq!(last["action"], "rollback");
    assert_eq!(last["ref"], "release-1");
    assert_eq!(last["sha"], SHA);
    assert_eq!(last["release"], first_release.as_str());
    let status = Ferry::new()
        .trusting(&[&host])
        .args(["status", "--json"])
        .arg(&p)
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let rows = v[0]["rows"].as_array().unwrap();
    let row = |r: &str| rows.iter().find(|x| x["ref"] == r).unwrap();
    assert_eq!(row("release-1")["state"], "live", "{v}");
    assert_eq!(row("release-1")["result"], "rollback ok", "{v}");
    assert_eq!(row("release-2")["state"], "replaced by release-1", "{v}");
}

/// Ctrl-C (or a cancelled job's SIGTERM) during the steps: recorded as interrupted, lock released.
#[test]
fn an_interrupted_deploy_records_the_attempt_and_releases_the_lock() {
    let host = Sshd::start();
    let dir = TempDir::new("interrupt");
    let root = open_root(&dir);
    let marker = dir.join("running");
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        &format!(
            "      - run: {{ command: [\"sh\", \"-c\", \"touch \\\"$0\\\"; sleep 60\", \"{}\"] }}\n",
            marker.display()
        ),
        "",
    );
    for signal in ["INT", "TERM"] {
        let _ = std::fs::remove_file(&marker);
        let child = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["deploy", "--ref", "release-int", "--sha", SHA])
            .arg(&p)
            .env(
                "SSH_PRIVATE_KEY",
                std::fs::read_to_string(&default_key().private).unwrap(),
            )
            .env("SSH_KNOWN_HOSTS", host.known_hosts_line())
            .env_remove("GITLAB_CI")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for("the step to start", || marker.exists());
        run_ok(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string()),
        );
        let started = Instant::now();
        let out = child.wait_with_output().unwrap();
        assert!(started.elapsed() < Duration::from_secs(20));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{signal}: {stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        let state = Path::new(&root).join(".ferry");
        let last = ledger(&state).pop().unwrap();
        assert_eq!(last["ok"], false);
        assert!(
            last["error"].as_str().unwrap().contains("interrupted"),
            "{last}"
        );
        assert!(
            !state.join("locks/testapp-test").exists(),
            "{signal}: lock left behind"
        );
    }
}

/// Write a lock as a killed run leaves it, expired `ago` seconds ago (negative: still valid).
fn stale_lock(root: &str, ago: i64) -> PathBuf {
    let lock_dir = Path::new(root).join(".ferry/locks/testapp-test");
    std::fs::create_dir_all(&lock_dir).unwrap();
    std::fs::write(lock_dir.join("token"), "dead\n").unwrap();
    std::fs::write(
        lock_dir.join("holder.json"),
        format!("{{\"token\":\"dead\",\"ref\":\"release-dead\",\"sha\":\"{SHA}\",\"pipeline_id\":null,\"job_url\":null,\"user\":\"bob\",\"controller\":\"gone\",\"pid\":1,\"started_at\":1}}\n"),
    )
    .unwrap();
    set_lock_expiry(root, -ago);
    lock_dir
}

/// Make the lock's lease end `secs` from now (negative: it has expired).
fn set_lock_expiry(root: &str, secs: i64) {
    let lock_dir = Path::new(root).join(".ferry/locks/testapp-test");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    std::fs::write(lock_dir.join("expires"), format!("{}\n", now + secs)).unwrap();
}

/// A run that ended without recording itself (killed, its connection lost) is recorded as
/// interrupted by the run that takes over its expired lock: history and status show it.
#[test]
fn a_taken_over_run_is_recorded_as_interrupted() {
    let host = Sshd::start();
    let dir = TempDir::new("takenover");
    let root = open_root(&dir);
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        "      - run: { command: [\"true\"] }\n",
        "",
    );
    stale_lock(&root, 100);
    ci(&[&host], "release-1", SHA, "811")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    let records = ledger(&Path::new(&root).join(".ferry"));
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[0]["action"], "interrupted");
    assert_eq!(records[0]["ref"], "release-dead");
    assert_eq!(records[0]["ok"], false);
    assert_eq!(records[1]["ref"], "release-1");
    let history = ci(&[&host], "release-1", SHA, "812")
        .arg("history")
        .arg(&p)
        .run()
        .success();
    assert!(
        history.stdout.contains("interrupted") && history.stdout.contains("release-dead"),
        "{}",
        history.stdout
    );
}

/// A rollback that takes over the lock of a run that ended unrecorded (what is live may be that
/// run's) goes to the last good run, the last state the ledger knows, not the one before it.
#[test]
fn a_rollback_after_an_unrecorded_run_goes_to_the_last_good_one() {
    let host = Sshd::start();
    let dir = TempDir::new("rbcut");
    let root = open_root(&dir);
    let steps = format!(
        "      - sync: {{ from: \"{}\", to: site }}\n",
        dir.join("dist").display()
    );
    let p = pb(&dir, &[host.address()], &root, &steps, "");
    for n in 1..=2u32 {
        dir.write("dist/index.html", format!("build {n}\n"));
        ci(&[&host], "release-1", &format!("{n:040}"), "821")
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
    }
    let page = || std::fs::read_to_string(Path::new(&root).join("site/index.html")).unwrap();
    // A third run switched to its build and was killed before it recorded anything.
    let live = std::fs::read_link(Path::new(&root).join("site")).unwrap();
    dir.write("dist/index.html", "build 3\n");
    ci(&[&host], "release-1", &format!("{:040}", 3), "822")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    let records = ledger(&Path::new(&root).join(".ferry"));
    std::fs::write(
        Path::new(&root).join(".ferry/ledger.jsonl"),
        records[..2]
            .iter()
            .map(|r| format!("{r}\n"))
            .collect::<String>(),
    )
    .unwrap();
    stale_lock(&root, 100);
    assert_eq!(page(), "build 3\n");
    ci(&[&host], "release-1", &format!("{:040}", 3), "823")
        .args(["rollback", "--env", "test"])
        .arg(&p)
        .run()
        .success();
    assert_eq!(page(), "build 2\n");
    assert_eq!(
        std::fs::read_link(Path::new(&root).join("site")).unwrap(),
        live
    );
}

/// A retried deploy that takes over the lock of a run killed after its switch (its files live,
/// nothing recorded) first puts the host back on the last good run: should it fail, its files
/// then go back to what the ledger knows, not stay on the killed run's beside older containers.
#[test]
fn a_deploy_after_an_unrecorded_run_starts_from_the_last_good_one() {
    let host = Sshd::start();
    let dir = TempDir::new("rdcut");
    let root = open_root(&dir);
    let steps = |last: &str| {
        format!(
            "      - sync: {{ from: \"{}\", to: site }}\n      - run: {{ command: [\"{last}\"] }}\n",
            dir.join("dist").display()
        )
    };
    let p = pb(&dir, &[host.address()], &root, &steps("true"), "");
    let deploy = |n: u32| {
        ci(&[&host], "release-1", &format!("{n:040}"), "831")
            .arg("deploy")
            .arg(&p)
            .run()
    };
    dir.write("dist/index.html", "build 1\n");
    deploy(1).success();
    let good = std::fs::read_link(Path::new(&root).join("site")).unwrap();
    let page = || std::fs::read_to_string(Path::new(&root).join("site/index.html")).unwrap();
    // Build 2 switched and was killed before it recorded anything.
    dir.write("dist/index.html", "build 2\n");
    deploy(2).success();
    let records = ledger(&Path::new(&root).join(".ferry"));
    std::fs::write(
        Path::new(&root).join(".ferry/ledger.jsonl"),
        format!("{}\n", records[0]),
    )
    .unwrap();
    stale_lock(&root, 100);
    // Its retry fails after the sync step.
    let p = pb(&dir, &[host.address()], &root, &steps("false"), "");
    let retry = ci(&[&host], "release-1", &format!("{:040}", 2), "832")
        .arg("deploy")
        .arg(&p)
        .run()
        .failure(1);
    assert!(
        retry.stderr.contains("putting the host back on release"),
        "{}",
        retry.stderr
    );
    assert_eq!(page(), "build 1\n", "{}", retry.stderr);
    assert_eq!(
        std::fs::read_link(Path::new(&root).join("site")).unwrap(),
        good
    );
    // Retried once more with the step fixed: build 2 goes live, and the ledger knows it.
    let p = pb(&dir, &[host.address()], &root, &steps("true"), "");
    ci(&[&host], "release-1", &format!("{:040}", 2), "833")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    assert_eq!(page(), "build 2\n");
    let records = ledger(&Path::new(&root).join(".ferry"));
    let actions: Vec<_> = records
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["ok"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("deploy", true),
            ("interrupted", false),
            ("deploy", false),
            ("deploy", true)
        ],
        "{records:?}"
    );
}

/// A guard left with no time in it (its controller killed, or its `at` unwritable on a full disk)
/// goes stale by its directory's age: an expired lock under it is still taken over.
#[test]
fn a_guard_without_a_time_goes_stale() {
    let host = Sshd::start();
    let dir = TempDir::new("guard");
    let root = open_root(&dir);
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        "      - run: { command: [\"true\"] }\n",
        "",
    );
    let lock_dir = stale_lock(&root, 100);
    let guard = lock_dir.with_extension("guard");
    std::fs::create_dir(&guard).unwrap();
    std::fs::write(guard.join("at"), "").unwrap();
    run_ok(
        Command::new("touch")
            .args(["-d", "@1000000000"])
            .arg(&guard),
    );
    let run = ci(&[&host], "release-1", SHA, "801")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    assert!(
        run.all().contains("took over the expired deploy lock"),
        "{}",
        run.all()
    );
    assert!(!guard.exists() && !lock_dir.exists());
}

/// Deployer's auto-unlock race: several controllers find the same expired lock at once. Exactly one
/// may take it over; the others must see it held (by the winner), never both "win".
#[test]
fn only_one_of_many_controllers_takes_over_an_expired_lock() {
    let host = Sshd::start();
    let dir = TempDir::new("race");
    let root = open_root(&dir);
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        &gated_step(&dir.join("started"), &dir.join("release")),
        "",
    );
    let gate = Gate(dir.join("release"));
    let lock_dir = stale_lock(&root, 100);
    let runs: Vec<_> = (0..4)
        .map(|i| {
            let ferry = ci(&[&host], &format!("release-r{i}"), SHA, &format!("70{i}"))
                .arg("deploy")
                .arg(&p);
            std::thread::spawn(move || ferry.run())
        })
        .collect();
    // The winner holds the lock until the three others have given up.
    wait_for(
        "three controllers to give up (or two took the lock)",
        || runs.iter().filter(|t| t.is_finished()).count() >= 3,
    );
    drop(gate);
    let runs: Vec<Run> = runs.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<&Run> = runs.iter().filter(|r| r.code == 0).collect();
    assert_eq!(winners.len(), 1, "{runs:#?}");
    // The winner took the expired lock over, or (under load) made a fresh one in the instant after
    // another controller's takeover removed the stale one; either way only a winner says so.
    for r in &runs {
        if r.stderr.contains("took over the expired deploy lock") {
            assert_eq!(r.code, 0, "{r:#?}");
        }
    }
    for r in runs.iter().filter(|r| r.code != 0) {
        assert_eq!(r.code, 1, "{r:#?}");
        assert!(r.stdout.contains("is held by"), "{r:#?}");
        // The fix it names runs as written: the playbook is in it.
        let unlock = format!("`ferry unlock {} --env test --force`", p.display());
        assert!(r.stdout.contains(&unlock), "{unlock}: {r:#?}");
    }
    // One deploy ran (and, when the winner took the lock over, it recorded the dead run as
    // interrupted); no leftovers of the takeover; the lock is released.
    let records = ledger(&Path::new(&root).join(".ferry"));
    let ran = records.iter().filter(|r| r["action"] != "interrupted");
    assert_eq!(ran.count(), 1, "{records:?}");
    assert!(records.len() <= 2, "{records:?}");
    assert!(!lock_dir.exists());
    let left: Vec<String> = std::fs::read_dir(Path::new(&root).join(".ferry/locks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A deploy longer than its lease keeps the lock by renewing it: nobody can take it over.
#[test]
fn a_running_deploy_renews_its_lease() {
    let host = Sshd::start();
    let dir = TempDir::new("renew");
    let root = open_root(&dir);
    let marker = dir.join("running");
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        &gated_step(&marker, &dir.join("release")),
        "",
    );
    let gate = Gate(dir.join("release"));
    // (A lease of 6s: its renewals time out after a sixth of it, which a loaded machine's SSH
    // round trips can need.)
    let first = {
        let ferry = ci(&[&host], "release-long", SHA, "801")
            .env("FERRY_LOCK_LEASE", "6s")
            .arg("deploy")
            .arg(&p);
        std::thread::spawn(move || ferry.run())
    };
    wait_for("the long step to start", || marker.exists());
    std::thread::sleep(Duration::from_secs(8)); // past the first lease
    let second = ci(&[&host], "release-other", SHA2, "802")
        .env("FERRY_LOCK_LEASE", "6s")
        .arg("deploy")
        .arg(&p)
        .run()
        .failure(1);
    drop(gate);
    assert!(
        second.stdout.contains("held by ref release-long"),
        "{}",
        second.stdout
    );
    assert!(!second.stderr.contains("took over"), "{}", second.stderr);
    first.join().unwrap().success();
}

/// The lock removed under a running deploy (`unlock --force`): the running step finishes, the next
/// one never starts, and the run fails saying why.
#[test]
fn a_deploy_that_loses_its_lock_stops_before_the_next_step() {
    let host = Sshd::start();
    let dir = TempDir::new("lost");
    let root = open_root(&dir);
    let (started, finished) = (dir.join("started"), dir.join("finished"));
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        &format!(
            "      - run: {{ command: [\"sh\", \"-c\", \"touch \\\"$0\\\"; sleep 5; touch \\\"$1\\\"\", \"{}\", \"{}\"] }}\n      - run: {{ command: [\"touch\", \"{}\"] }}\n",
            started.display(),
            finished.display(),
            dir.join("never").display()
        ),
        "",
    );
    let run = {
        let ferry = ci(&[&host], "release-lost", SHA, "811")
            .env("FERRY_LOCK_LEASE", "3s")
            .arg("deploy")
            .arg(&p);
        std::thread::spawn(move || ferry.run())
    };
    wait_for("the step to start", || started.exists());
    Ferry::new()
        .trusting(&[&host])
        .args(["unlock", "--force", "--env", "test"])
        .arg(&p)
        .run()
        .success();
    let run = run.join().unwrap().failure(1);
    assert!(finished.exists(), "the running step was cut off");
    assert!(!dir.join("never").exists(), "a step ran without the lock");
    assert!(
        run.stdout.contains("stopped before step 2"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("lock directory was removed"),
        "{}",
        run.stdout
    );
}

/// With real sync steps: status reads each branch's live files release and commit from the hosts,
/// and reports drift when a live file was edited by hand.
#[test]
fn status_reads_live_files_per_branch_and_flags_hand_edits() {
    let host = Sshd::start();
    let dir = TempDir::new("livesync");
    let root = open_root(&dir);
    dir.write("dist/index.html", "<h1>hello</h1>\n");
    let p = pb(
        &dir,
        &[host.address()],
        &format!("{root}/${{ref_slug}}"),
        &format!(
            "      - sync: {{ from: \"{}\", to: site }}\n",
            dir.join("dist").display()
        ),
        "",
    );
    for (r, sha) in [("feature/a", SHA), ("feature/b", SHA2)] {
        ci(&[&host], r, sha, "901")
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
    }
    let status = |args: &[&str]| {
        let run = Ferry::new()
            .trusting(&[&host])
            .args(["status", "--json"])
            .args(args)
            .arg(&p)
            .run()
            .success();
        let v: serde_json::Value = serde_json::from_str(&run.stdout).expect(&run.stdout);
        v[0]["rows"].as_array().unwrap().clone()
    };
    let rows = status(&[]);
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in &rows {
        assert_eq!(row["state"], "live", "{row}");
        assert_eq!(row["notes"], serde_json::json!([]), "{row}");
    }
    // Edit feature/b's live file by hand.
    let live = Path::new(&root).join("feature-b/site/index.html");
    std::fs::write(&live, "<h1>hacked</h1>\n").unwrap();
    let rows = status(&["--ref", "feature/b"]);
    let notes = rows[0]["notes"].to_string();
    assert!(notes.contains("drift"), "{notes}");
    let rows = status(&["--ref", "feature/a"]);
    assert_eq!(rows[0]["notes"], serde_json::json!([]), "{rows:?}");
    // One branch rolled back from outside CI and git: the ref alone names it.
    dir.write("dist/index.html", "<h1>second</h1>\n");
    ci(&[&host], "feature/a", SHA2, "902")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    let site = Path::new(&root).join("feature-a/site/index.html");
    assert_eq!(std::fs::read_to_string(&site).unwrap(), "<h1>second</h1>\n");
    Ferry::new()
        .trusting(&[&host])
        .current_dir(dir.path())
        .args(["rollback", "--env", "test", "--ref", "feature/a"])
        .arg(&p)
        .run()
        .success();
    assert_eq!(std::fs::read_to_string(&site).unwrap(), "<h1>hello</h1>\n");
    let rows = status(&["--ref", "feature/a"]);
    assert_eq!(rows[0]["sha"], SHA, "{rows:?}");
    // feature/b's review app removed by hand, files and store: gone, not live; feature/a stays.
    std::fs::remove_dir_all(Path::new(&root).join("feature-b")).unwrap();
    let rows = status(&[]);
    let row = |r: &str| rows.iter().find(|x| x["ref"] == r).unwrap().clone();
    let b = row("feature/b");
    assert_eq!(b["state"], "gone", "{b}");
    assert_eq!(b["live"], false, "{b}");
    assert!(b["notes"].to_string().contains("nothing live at"), "{b}");
    assert_eq!(row("feature/a")["state"], "live", "{rows:?}");
}

/// Two hosts on the same storage (as NFS would give, and as test hosts on one machine are): the
/// hosts of one run share the lock; another run is still kept out; the last host out removes it.
#[test]
fn hosts_of_one_run_share_a_lock_on_shared_storage() {
    let (a, b) = (Sshd::start(), Sshd::start());
    let dir = TempDir::new("shared");
    let root = open_root(&dir);
    let marker = dir.join("running");
    let p = pb(
        &dir,
        &[a.address(), b.address()],
        &root,
        &gated_step(&marker, &dir.join("release")),
        "",
    );
    let gate = Gate(dir.join("release"));
    let first = {
        let ferry = ci(&[&a, &b], "release-s", SHA, "951").arg("deploy").arg(&p);
        std::thread::spawn(move || ferry.run())
    };
    wait_for("the steps to start", || marker.exists());
    let other = ci(&[&a, &b], "release-t", SHA2, "952")
        .arg("deploy")
        .arg(&p)
        .run()
        .failure(1);
    assert!(
        other.stdout.contains("held by ref release-s"),
        "{}",
        other.stdout
    );
    drop(gate);
    first.join().unwrap().success();
    let records = ledger(&Path::new(&root).join(".ferry"));
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(
        records
            .iter()
            .all(|r| r["ok"] == true && r["ref"] == "release-s")
    );
    assert!(!Path::new(&root).join(".ferry/locks/testapp-test").exists());
    let status = Ferry::new()
        .trusting(&[&a, &b])
        .args(["status", "--json"])
        .arg(&p)
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(v[0]["rows"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(v[0]["flags"], serde_json::json!([]), "{v}");
}

/// A playbook whose one `run` step writes its pid to `pidfile`, then sleeps for a minute.
fn sleeper(dir: &TempDir, host: &Sshd, root: &str, pidfile: &Path, extra: &str) -> PathBuf {
    pb(
        dir,
        &[host.address()],
        root,
        &format!(
            "      - run: {{ command: [\"sh\", \"-c\", \"echo $$$$ > \\\"$0\\\"; exec sleep 60\", \"{}\"]{extra} }}\n",
            pidfile.display()
        ),
        "",
    )
}

/// A `run` step cut off by its timeout is stopped on the host too (it does not go on there after
/// the lock is released), under a coreutils and a BusyBox login.
#[test]
fn a_run_step_past_its_timeout_is_stopped_on_the_host() {
    for busybox in [false, true] {
        let host = Sshd::start_with(SshdOptions {
            busybox,
            ..Default::default()
        });
        let dir = TempDir::new("runtimeout");
        let root = open_root(&dir);
        let pidfile = dir.join("pid");
        let p = sleeper(&dir, &host, &root, &pidfile, ", timeout: 3s");
        let run = ci(&[&host], "release-1", SHA, "301")
            .arg("deploy")
            .arg(&p)
            .run()
            .failure(1);
        assert!(
            run.all().contains("did not finish within 3s"),
            "{}",
            run.all()
        );
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        assert!(pid.trim().parse::<u32>().is_ok(), "pid file: {pid:?}");
        wait_for("the command to be stopped", || gone(pid.trim()));
    }
}

/// Ctrl-C during a `run` step stops the command on the host too (ferry closes its channel at once;
/// the host's wrapper then sends the command SIGTERM).
#[test]
fn a_run_step_cut_off_by_ctrl_c_is_stopped_on_the_host() {
    let host = Sshd::start();
    let dir = TempDir::new("runctrlc");
    let root = open_root(&dir);
    let pidfile = dir.join("pid");
    let p = sleeper(&dir, &host, &root, &pidfile, "");
    let (mut child, _home) = ci(&[&host], "release-1", SHA, "302")
        .arg("deploy")
        .arg(&p)
        .spawn();
    wait_for("the command to start", || {
        std::fs::read_to_string(&pidfile).is_ok_and(|p| p.ends_with('\n'))
    });
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    assert!(!gone(pid.trim()), "the command runs as pid {pid}");
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1));
    wait_for("the command to be stopped", || gone(pid.trim()));
    assert!(!Path::new(&root).join(".ferry/locks/testapp-test").exists());
}

/// A `run` command starts with the signal dispositions of a plain `ssh host cmd` (its wrapper runs
/// it in the foreground: a background job would have SIGINT and SIGQUIT ignored, and so would
/// every daemon it starts).
#[test]
fn a_run_command_does_not_inherit_ignored_signals() {
    let host = Sshd::start();
    let dir = TempDir::new("runsig");
    let root = open_root(&dir);
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        "      - run: { command: [\"sh\", \"-c\", \"grep SigIgn /proc/$$$$/status\"] }\n",
        "",
    );
    let run = ci(&[&host], "release-1", SHA, "303")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    let all = run.all();
    let mask = all
        .lines()
        .find_map(|l| Some(l.split("SigIgn:").nth(1)?.trim().to_string()))
        .unwrap_or_else(|| panic!("no SigIgn line: {all}"));
    let mask = u64::from_str_radix(&mask, 16).unwrap();
    assert_eq!(mask & 0b110, 0, "SIGINT or SIGQUIT ignored: {mask:x}");
}

/// A review environment keeps one ledger for every branch: `ferry rollback` of one branch takes
/// that branch's files back to its own previous deploy and leaves the other branches alone.
#[test]
fn rollback_in_a_review_environment_stays_on_its_branch() {
    let host = Sshd::start();
    // The root per branch, or (as the README's recipe) one root and a sync target per branch.
    for per_branch_root in [true, false] {
        let dir = TempDir::new("reviewrb");
        let root = open_root(&dir);
        let (env_root, to) = if per_branch_root {
            (format!("{root}/${{ref_slug}}"), "site")
        } else {
            (root.clone(), "${ref_slug}/site")
        };
        let steps = format!(
            "      - sync: {{ from: \"{}\", to: \"{to}\" }}\n",
            dir.join("dist").display()
        );
        let p = pb(&dir, &[host.address()], &env_root, &steps, "");
        let deploy = |r: &str, n: u32| {
            dir.write("dist/index.html", format!("{r} {n}\n"));
            ci(&[&host], r, &format!("{n:040}"), &format!("50{n}"))
                .arg("deploy")
                .arg(&p)
                .run()
                .success();
        };
        deploy("feature/a", 1);
        deploy("feature/a", 2);
        deploy("feature/b", 3);
        ci(&[&host], "feature/a", &format!("{:040}", 2), "509")
            .arg("rollback")
            .arg(&p)
            .args(["--env", "test"])
            .run()
            .success();
        let page = |slug: &str| {
            std::fs::read_to_string(Path::new(&root).join(slug).join("site/index.html")).unwrap()
        };
        assert_eq!(
            page("feature-a"),
            "feature/a 1\n",
            "root per branch: {per_branch_root}"
        );
        assert_eq!(
            page("feature-b"),
            "feature/b 3\n",
            "root per branch: {per_branch_root}"
        );
    }
}

/// Two branches with one slug would share a review app: the second one's deploy and stop are
/// refused while the first is there, and go ahead once it is stopped.
#[test]
fn branches_with_one_slug_do_not_share_a_review_app() {
    let host = Sshd::start();
    let dir = TempDir::new("slugclash");
    let root = open_root(&dir);
    let steps = format!(
        "      - sync: {{ from: \"{}\", to: site }}\n",
        dir.join("dist").display()
    );
    let on_stop = "    on_stop:\n      - run: { command: [\"rm\", \"-rf\", \"${root}\"] }\n";
    let p = pb(
        &dir,
        &[host.address()],
        &format!("{root}/${{ref_slug}}"),
        &steps,
        on_stop,
    );
    let page = || std::fs::read_to_string(Path::new(&root).join("feature-a/site/index.html"));
    let run = |r: &str, what: &[&str]| {
        dir.write("dist/index.html", format!("{r}\n"));
        ci(&[&host], r, &format!("{:040}", 1), "601")
            .args(what)
            .arg(&p)
            .args(["--env", "test"])
            .run()
    };
    run("feature/a", &["deploy"]).success();
    for what in [&["deploy"][..], &["deploy", "--plan"], &["stop"]] {
        let refused = run("feature-a", what).failure(1);
        assert!(
            refused
                .all()
                .contains("feature-a and feature/a have the same slug `feature-a`")
                && refused
                    .all()
                    .contains("ferry stop --env test --ref feature/a"),
            "{what:?}: {}",
            refused.all()
        );
        assert_eq!(page().unwrap(), "feature/a\n", "{what:?}");
    }
    // The refused deploy and stop are this branch's failed attempts (the plan records nothing),
    // and hold nothing against the other branch.
    let history = run("feature-a", &["history", "--json"]).success();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&history.stdout).unwrap();
    let refused: Vec<&str> = rows
        .iter()
        .filter(|r| r["ref"] == "feature-a")
        .map(|r| {
            assert_eq!(r["ok"], false, "{r}");
            r["action"].as_str().unwrap()
        })
        .collect();
    assert_eq!(refused.len(), 2, "{}", history.stdout);
    assert!(
        refused.contains(&"deploy") && refused.contains(&"stop"),
        "{refused:?}"
    );
    run("feature/a", &["deploy"]).success();
    run("feature/a", &["stop"]).success();
    assert!(page().is_err());
    run("feature-a", &["deploy"]).success();
    assert_eq!(page().unwrap(), "feature-a\n");
}

/// A reader that goes away (`ferry status | head -1`) is no error: ferry exits as it would have,
/// without a panic on the broken pipe.
#[test]
fn results_into_a_closed_pipe_are_no_error() {
    let host = Sshd::start();
    let dir = TempDir::new("epipe");
    let root = open_root(&dir);
    dir.write("dist/index.html", "hello\n");
    let steps = format!(
        "      - sync: {{ from: \"{}\", to: site }}\n",
        dir.join("dist").display()
    );
    let p = pb(&dir, &[host.address()], &root, &steps, "");
    ci(&[&host], "release-1", &format!("{:040}", 1), "1")
        .arg("deploy")
        .arg(&p)
        .run()
        .success();
    for what in [
        &["status", "--json"][..],
        &["history"],
        &["deploy", "--plan"],
    ] {
        let (mut child, _home) = ci(&[&host], "release-1", &format!("{:040}", 1), "2")
            .args(what)
            .arg(&p)
            .spawn();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{what:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{what:?}: {stderr}");
    }
    // `2>&1 | head`: a deploy whose stdout and stderr both close goes on to the end (with log
    // lines too: tracing's own report of a failed write panics).
    dir.write("dist/index.html", "hello again\n");
    let (mut child, _home) = ci(&[&host], "release-1", &format!("{:040}", 2), "3")
        .args(["deploy", "-vv"])
        .arg(&p)
        .spawn();
    drop((child.stdout.take(), child.stderr.take()));
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(Path::new(&root).join("site/index.html")).unwrap(),
        "hello again\n"
    );
}

/// A retried job (the same commit, nothing changed) is no step back: a rollback after it goes to
/// the commit before, and `status` names the ref that deployed last.
#[test]
fn rollback_after_a_retried_job_goes_to_the_commit_before() {
    let host = Sshd::start();
    let dir = TempDir::new("retried");
    let root = open_root(&dir);
    let steps = format!(
        "      - sync: {{ from: \"{}\", to: site }}\n",
        dir.join("dist").display()
    );
    let p = pb(&dir, &[host.address()], &root, &steps, "");
    let deploy = |r: &str, n: u32, pipeline: &str| {
        dir.write("dist/index.html", format!("build {n}\n"));
        ci(&[&host], r, &format!("{n:040}"), pipeline)
            .arg("deploy")
            .arg(&p)
            .run()
            .success();
    };
    deploy("release-1", 1, "11");
    deploy("release-1", 2, "12");
    deploy("release-1", 2, "12");
    ci(&[&host], "release-1", &format!("{:040}", 2), "13")
        .arg("rollback")
        .arg(&p)
        .args(["--env", "test"])
        .run()
        .success();
    let page = || std::fs::read_to_string(Path::new(&root).join("site/index.html")).unwrap();
    assert_eq!(page(), "build 1\n");
    // Another branch deploys the same build: it is live, not "replaced" by the first one.
    deploy("release-2", 1, "14");
    let status = ci(&[&host], "release-2", &format!("{:040}", 1), "15")
        .arg("status")
        .arg(&p)
        .arg("--json")
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let rows = v[0]["rows"].as_array().expect("rows");
    let state = |r: &str| {
        rows.iter()
            .find(|x| x["ref"] == r)
            .map(|x| x["state"].as_str().unwrap().to_string())
    };
    assert_eq!(
        state("release-2").as_deref(),
        Some("live"),
        "{}",
        status.stdout
    );
    assert_eq!(
        state("release-1").as_deref(),
        Some("replaced by release-2"),
        "{}",
        status.stdout
    );
}

/// With `keep: 2`, a run whose sync step switched and pruned, and whose next step failed, goes back
/// to the release that was live, and that one's rollback target is still on the host.
#[test]
fn a_run_failing_after_its_sync_keeps_the_rollback_target_of_the_live_release() {
    let host = Sshd::start();
    let dir = TempDir::new("keep2");
    let root = open_root(&dir);
    let flag = dir.join("fail");
    let steps = format!(
        "      - sync: {{ from: \"{}\", to: site, keep: 2 }}\n      - run: {{ command: [\"test\", \"!\", \"-e\", \"{}\"] }}\n",
        dir.join("dist").display(),
        flag.display()
    );
    let p = pb(&dir, &[host.address()], &root, &steps, "");
    let deploy = |n: u32| {
        dir.write("dist/index.html", format!("build {n}\n"));
        ci(&[&host], "release-1", &format!("{n:040}"), &n.to_string())
            .arg("deploy")
            .arg(&p)
            .run()
    };
    let page = || std::fs::read_to_string(Path::new(&root).join("site/index.html")).unwrap();
    deploy(1).success();
    std::thread::sleep(Duration::from_millis(1100)); // release ids have second resolution
    deploy(2).success();
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&flag, "").unwrap();
    deploy(3).failure(1);
    assert_eq!(page(), "build 2\n");
    std::fs::remove_file(&flag).unwrap();
    ci(&[&host], "release-1", &format!("{:040}", 2), "4")
        .arg("rollback")
        .arg(&p)
        .args(["--env", "test"])
        .run()
        .success();
    assert_eq!(page(), "build 1\n");
}

/// A host that stops answering mid-step (its sshd frozen: a network gone silent) is given up once
/// no lock renewal got through for a lease and half another, not waited on for ever.
#[test]
fn a_host_gone_silent_mid_step_is_given_up() {
    let host = Sshd::start();
    let dir = TempDir::new("silent");
    let root = open_root(&dir);
    let p = pb(
        &dir,
        &[host.address()],
        &root,
        "      - run: { command: [sleep, \"300\"], timeout: 10m }\n",
        "",
    );
    let (child, _home) = ci(&[&host], "release-1", SHA, "901")
        .env("FERRY_LOCK_LEASE", "6s")
        .arg("deploy")
        .arg(&p)
        .spawn();
    // Once the step runs (its `sleep` is up), freeze every process of the connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    let frozen = loop {
        let pids = pids_of_children(host.pid());
        let ps = std::process::Command::new("ps")
            .args(["-o", "args=", "--ppid"])
            .arg(
                pids.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .output()
            .unwrap();
        if !pids.is_empty() && String::from_utf8_lossy(&ps.stdout).contains("sleep 300") {
            break pids;
        }
        assert!(Instant::now() < deadline, "the step never started");
        std::thread::sleep(Duration::from_millis(100));
    };
    for pid in &frozen {
        let _ = std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status();
    }
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    for pid in &frozen {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(started.elapsed() < Duration::from_secs(30), "{all}");
    assert!(all.contains("the host has not answered"), "{all}");
}
