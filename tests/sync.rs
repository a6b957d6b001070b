//! `ferry sync` / `deploy` / `rollback` / `stop` of sync steps against real sshd hosts (coreutils and
//! BusyBox): content-hash releases, atomic switch, drift, refusals, and interrupted deploys.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::*;

/// A source tree, one or more hosts and a playbook with sync steps.
struct Site {
    dir: TempDir,
    hosts: Vec<Sshd>,
    src: PathBuf,
    pb: PathBuf,
}

impl Site {
    /// `steps(src, root)` returns the YAML of the steps list items.
    fn new(tag: &str, hosts: Vec<Sshd>, steps: impl Fn(&Path, &Path) -> String) -> Site {
        let dir = TempDir::new(tag);
        // BusyBox test user must be able to write under the root.
        std::fs::create_dir_all(dir.join("root")).unwrap();
        for p in [dir.path(), &dir.join("root")] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let src = dir.join("dist");
        std::fs::create_dir_all(&src).unwrap();
        let addrs: Vec<String> = hosts.iter().map(Sshd::address).collect();
        let yaml = format!("    steps:\n{}", steps(&src, &dir.join("root")));
        let pb = playbook(&dir, "ferry.yml", &addrs, &yaml);
        Site {
            dir,
            hosts,
            src,
            pb,
        }
    }

    fn ferry(&self, cmd: &str, sha: &str) -> Ferry {
        let hosts: Vec<&Sshd> = self.hosts.iter().collect();
        Ferry::new()
            .trusting(&hosts)
            .arg(cmd)
            .arg(&self.pb)
            .args(["--env", "test", "--ref", "main", "--sha", sha])
    }

    /// `ferry status --json` of the site's playbook, with `args`.
    fn status(&self, args: &[&str]) -> Run {
        let hosts: Vec<&Sshd> = self.hosts.iter().collect();
        Ferry::new()
            .trusting(&hosts)
            .args(["status", "--json"])
            .arg(&self.pb)
            .args(args)
            .run()
            .success()
    }

    fn deploy(&self, sha: &str) -> Run {
        self.ferry("deploy", sha).arg("--json").run()
    }

    fn write(&self, rel: &[u8], content: &[u8]) {
        let p = self.src.join(OsStr::from_bytes(rel));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
}

fn one_step(to: &str, extra: &str) -> impl Fn(&Path, &Path) -> String {
    let (to, extra) = (to.to_string(), extra.to_string());
    move |src: &Path, _root: &Path| {
        format!(
            "      - sync: {{ from: \"{}\", to: \"{to}\"{extra} }}\n",
            src.display()
        )
    }
}

/// A site with one sync step on one host, BusyBox or coreutils.
fn one_host_site(tag: &str, busybox: bool, to: &str, extra: &str) -> Site {
    let host = Sshd::start_with(SshdOptions {
        busybox,
        ..Default::default()
    });
    Site::new(tag, vec![host], one_step(to, extra))
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

/// The first sync step's report of the first host.
fn step(run: &Run) -> serde_json::Value {
    json(run)[0]["steps"][0].clone()
}

/// The step reported drift, in words containing `what`.
fn assert_drift(s: &serde_json::Value, what: &str) {
    let drift = s["detail"]["drift"].as_str().unwrap_or_default();
    assert!(drift.contains(what), "drift should mention {what:?}: {s}");
}

fn live_release(to: &Path) -> String {
    let t = std::fs::read_link(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    t.file_name().unwrap().to_string_lossy().into_owned()
}

fn sha(n: u8) -> String {
    format!("{n:02x}").repeat(20)
}

/// What pruning moved aside in `store` (`trash-<id>/`) and not yet deleted.
fn trash(store: &Path) -> Vec<String> {
    std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("trash-"))
        .collect()
}

/// What pruning moved aside is deleted after the deploy returns, by a process of its own: wait
/// until it is gone.
fn assert_trash_emptied(store: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = trash(store);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "never deleted: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Names that break naive tools: spaces, quotes, newlines, non-UTF-8, a leading dash.
fn hostile_tree(site: &Site) {
    site.write(b"index.html", b"<h1>v1</h1>");
    site.write(b"assets/app.1.js", b"console.log(1)");
    site.write(b"assets/with space 'q' $(x).css", b"body{}");
    site.write(b"assets/new\nline.txt", b"nl");
    site.write(b"assets/\xff\xfe-latin1.bin", &[0, 1, 2, 255]);
    site.write(b"-dash", b"dash");
    site.write(b"bin/run.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(
        site.src.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("assets/app.1.js", site.src.join("latest.js")).unwrap();
}

fn check_hostile(to: &Path) {
    assert_eq!(
        std::fs::read(to.join("index.html")).unwrap(),
        b"<h1>v1</h1>"
    );
    assert_eq!(
        std::fs::read(to.join("assets/with space 'q' $(x).css")).unwrap(),
        b"body{}"
    );
    assert_eq!(
        std::fs::read(to.join("assets/new\nline.txt")).unwrap(),
        b"nl"
    );
    assert_eq!(
        std::fs::read(to.join(OsStr::from_bytes(b"assets/\xff\xfe-latin1.bin"))).unwrap(),
        [0, 1, 2, 255]
    );
    assert_eq!(std::fs::read(to.join("-dash")).unwrap(), b"dash");
    let mode = std::fs::metadata(to.join("bin/run.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    assert_eq!(
        std::fs::read_link(to.join("latest.js")).unwrap(),
        Path::new("assets/app.1.js")
    );
}

/// Deploy, no-change redeploy, a change with a renamed chunk, rollback: on one host flavour.
fn lifecycle(busybox: bool) {
    let site = one_host_site("lifecycle", busybox, "web/app", ", keep: 5");
    hostile_tree(&site);
    let to = site.root().join("web/app");

    let run = site.deploy(&sha(1)).success();
    let s = step(&run);
    assert_eq!(s["files_sent"], 7, "{s}");
    assert!(s["bytes_sent"].as_u64().unwrap() > 0);
    let first = live_release(&to);
    assert_eq!(s["detail"]["release"], first.as_str());
    check_hostile(&to);
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            site.root()
                .join(format!("web/.app.ferry/meta/{first}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(meta["sha"], sha(1));
    assert_eq!(meta["ref"], "main");
    assert_eq!(meta["files"], 7);

    // Nothing changed: nothing sent, nothing switched.
    let run = site.deploy(&sha(2)).success();
    let s = step(&run);
    assert_eq!(s["changed"], false, "{s}");
    assert_eq!(s["files_sent"], 0);
    assert_eq!(live_release(&to), first);

    // A bundler renames a chunk (same content) and index.html changes: one file's content is sent.
    std::fs::rename(
        site.src.join("assets/app.1.js"),
        site.src.join("assets/app.2.js"),
    )
    .unwrap();
    std::fs::remove_file(site.src.join("latest.js")).unwrap();
    std::os::unix::fs::symlink("assets/app.2.js", site.src.join("latest.js")).unwrap();
    site.write(b"index.html", b"<h1>v2</h1>");
    let run = site.deploy(&sha(3)).success();
    let s = step(&run);
    assert_eq!(s["files_sent"], 1, "{s}");
    assert_eq!(s["detail"]["added"], 1);
    assert_eq!(s["detail"]["changed"], 2, "index.html and the symlink");
    assert_eq!(s["detail"]["deleted"], 1);
    let second = live_release(&to);
    assert_ne!(second, first);
    assert_eq!(
        std::fs::read(to.join("index.html")).unwrap(),
        b"<h1>v2</h1>"
    );
    assert_eq!(
        std::fs::read(to.join("assets/app.2.js")).unwrap(),
        b"console.log(1)"
    );
    // The first release was not touched.
    let old = site.root().join(format!("web/.app.ferry/releases/{first}"));
    assert_eq!(
        std::fs::read(old.join("index.html")).unwrap(),
        b"<h1>v1</h1>"
    );

    // Rollback: one rename back to the first release.
    site.ferry("rollback", &sha(3)).run().success();
    assert_eq!(live_release(&to), first);
    check_hostile(&to);
    // And forward again to a named release.
    site.ferry("rollback", &sha(3))
        .args(["--to", &second])
        .run()
        .success();
    assert_eq!(live_release(&to), second);
}

#[test]
fn sync_lifecycle_on_coreutils_host() {
    lifecycle(false);
}

#[test]
fn sync_lifecycle_on_busybox_host() {
    lifecycle(true);
}

/// The frontend-dist job: one build to two hosts and two paths (one with excludes), then rollback.
#[test]
fn sync_two_hosts_two_paths_and_rollback() {
    // One login on both: the hosts share this machine's filesystem, so they share the deploy lock
    // as hosts on NFS do, which needs one user (BusyBox hosts have their own lifecycle test).
    let hosts = vec![Sshd::start(), Sshd::start()];
    // Both hosts share this machine: give each its own paths through a per-host variable.
    let site = Site::new("twohosts", hosts, |src, _| {
        format!(
            "      - sync: {{ from: \"{s}\", to: \"site-${{host}}\", exclude: [\"*.map\"], keep: 2 }}\n      - sync: {{ from: \"{s}\", to: \"origin-${{host}}\", keep: 2 }}\n",
            s = src.display()
        )
    });
    site.write(b"index.html", b"one");
    site.write(b"js/app.js", b"app");
    site.write(b"js/app.js.map", b"map");
    let run = site.deploy(&sha(1)).success();
    let v = json(&run);
    assert_eq!(v.as_array().unwrap().len(), 2);
    let names: Vec<String> = site
        .hosts
        .iter()
        .map(|h| format!("127.0.0.1:{}", h.port))
        .collect();
    let hostnames: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(hostnames.len(), names.len());
    let mut firsts = Vec::new();
    for h in &hostnames {
        let site_dir = site.root().join(format!("site-{h}"));
        let origin = site.root().join(format!("origin-{h}"));
        assert_eq!(std::fs::read(site_dir.join("index.html")).unwrap(), b"one");
        assert!(!site_dir.join("js/app.js.map").exists(), "excluded");
        assert_eq!(std::fs::read(origin.join("js/app.js.map")).unwrap(), b"map");
        firsts.push((
            site_dir,
            origin,
            live_release(&site.root().join(format!("site-{h}"))),
        ));
    }
    site.write(b"index.html", b"two");
    site.deploy(&sha(2)).success();
    for (s, o, _) in &firsts {
        assert_eq!(std::fs::read(s.join("index.html")).unwrap(), b"two");
        assert_eq!(std::fs::read(o.join("index.html")).unwrap(), b"two");
    }
    site.ferry("rollback", &sha(2)).run().success();
    for (s, o, first) in &firsts {
        assert_eq!(std::fs::read(s.join("index.html")).unwrap(), b"one");
        assert_eq!(std::fs::read(o.join("index.html")).unwrap(), b"one");
        assert_eq!(&live_release(s), first);
    }
}

/// A deploy to several hosts at once switches none when one fails before its switch (here, its
/// target turned into a plain directory): the others wait for it, then stay as they were.
#[test]
fn a_host_that_fails_before_its_switch_keeps_every_host_as_it_was() {
    let hosts = vec![Sshd::start(), Sshd::start()];
    let site = Site::new("gate", hosts, |src, _| {
        format!(
            "      - sync: {{ from: \"{}\", to: \"site-${{host}}\" }}\n",
            src.display()
        )
    });
    site.write(b"index.html", b"one");
    let run = site.deploy(&sha(1)).success();
    let names: Vec<String> = json(&run)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap().to_string())
        .collect();
    let to = |h: &str| site.root().join(format!("site-{h}"));
    let (a, b) = (to(&names[0]), to(&names[1]));
    let first = live_release(&a);
    std::fs::remove_file(&b).unwrap();
    std::fs::create_dir(&b).unwrap();
    site.write(b"index.html", b"two");
    let run = site.deploy(&sha(2)).failure(1);
    assert_eq!(std::fs::read(a.join("index.html")).unwrap(), b"one");
    assert_eq!(live_release(&a), first);
    let a_error = json(&run)[0]["error"].as_str().unwrap().to_string();
    assert!(
        a_error.contains(&format!(
            "not switched: host {} of this deploy failed",
            names[1]
        )),
        "{a_error}"
    );
    let store = site.root().join(format!(".site-{}.ferry", names[0]));
    assert!(!store.join("incoming").exists());
    // With the target back, the next deploy switches both.
    std::fs::remove_dir(&b).unwrap();
    site.deploy(&sha(2)).success();
    for t in [&a, &b] {
        assert_eq!(std::fs::read(t.join("index.html")).unwrap(), b"two");
    }
}

/// SIGTERM while a host waits at the gate for a slower one: it does not switch, and ferry ends
/// at once.
#[test]
fn sigterm_while_hosts_wait_to_switch_switches_none() {
    let hosts = vec![Sshd::start(), Sshd::start()];
    let slow = hosts[1].address();
    let site = Site::new("gateint", hosts, |src, _| {
        format!(
            "      - run: {{ command: [sh, -c, '[ \"$1\" != \"{slow}\" ] || sleep 60', sh, \"${{host}}\"] }}\n      - sync: {{ from: \"{}\", to: \"site-${{host}}\" }}\n",
            src.display()
        )
    });
    site.write(b"index.html", b"one");
    let (child, _home) = site.ferry("deploy", &sha(1)).spawn();
    let fast = site.hosts[0].address();
    let incoming = site.root().join(format!(".site-{fast}.ferry/incoming"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !incoming.exists() {
        assert!(
            Instant::now() < deadline,
            "the fast host never began its sync"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(sent.elapsed() < Duration::from_secs(15), "{all}");
    for h in [&fast, &slow] {
        assert!(
            !site.root().join(format!("site-{h}")).exists(),
            "{h} switched: {all}"
        );
    }
    assert!(!incoming.exists(), "{all}");
}

#[test]
fn sync_plan_lists_changes_and_changes_nothing() {
    let site = Site::new("plan", vec![Sshd::start()], one_step("app", ""));
    site.write(b"a.txt", b"a");
    site.write(b"b.txt", b"b");
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    let live = live_release(&to);
    site.write(b"a.txt", b"A");
    std::fs::remove_file(site.src.join("b.txt")).unwrap();
    site.write(b"c.txt", b"c");
    site.write(b"odd\\name\n.txt", b"odd");
    let run = site
        .ferry("deploy", &sha(2))
        .args(["--plan", "--json"])
        .run()
        .success();
    let d = &step(&run)["detail"];
    // (Paths in their display form, escaped once.)
    assert_eq!(
        d["paths"]["added"],
        serde_json::json!(["c.txt", "odd\\\\name\\n.txt"])
    );
    assert_eq!(d["paths"]["changed"], serde_json::json!(["a.txt"]));
    assert_eq!(d["paths"]["deleted"], serde_json::json!(["b.txt"]));
    assert_eq!(d["files_to_send"], 3);
    assert_eq!(live_release(&to), live);
    let releases = std::fs::read_dir(site.root().join(".app.ferry/releases")).unwrap();
    assert_eq!(releases.count(), 1, "plan made no release");
    let text = site.ferry("sync", &sha(2)).arg("--plan").run().success();
    assert!(text.stdout.contains("+ c.txt"), "{}", text.stdout);
    assert!(
        text.stdout.contains("+ odd\\\\name\\n.txt\n"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains("would deploy"), "{}", text.stdout);
    assert!(
        !text.stderr.contains("would deploy"),
        "the plan is the result: {}",
        text.stderr
    );
}

/// `--plan` also lists what a deploy repairs of what changed by hand on the host (files put back,
/// files on the host only deleted), and in place with `delete: false`, what stays.
#[test]
fn sync_plan_lists_the_repairs_of_hand_changes() {
    for mode in ["", ", mode: in-place"] {
        let site = Site::new("planrepair", vec![Sshd::start()], one_step("app", mode));
        site.write(b"a.txt", b"a");
        site.write(b"b.txt", b"b");
        site.write(b"sub/x.txt", b"x");
        site.deploy(&sha(1)).success();
        let to = site.root().join("app");
        // (A directory the build drops is a plain deletion, not a repair.)
        std::fs::remove_dir_all(site.src.join("sub")).unwrap();
        std::fs::write(to.join("hand.txt"), b"by hand").unwrap();
        std::fs::write(to.join("a.txt"), b"edited").unwrap();
        let run = site
            .ferry("deploy", &sha(1))
            .args(["--plan", "--json"])
            .run()
            .success();
        let d = &step(&run)["detail"];
        assert_eq!(
            d["repair"]["deleted"],
            serde_json::json!(["hand.txt"]),
            "{mode}: {d}"
        );
        assert_eq!(
            d["repair"]["replaced"],
            serde_json::json!(["a.txt"]),
            "{mode}: {d}"
        );
        let text = site.ferry("deploy", &sha(1)).arg("--plan").run().success();
        assert!(
            text.stdout.contains("- hand.txt (on the host only)"),
            "{mode}: {}",
            text.stdout
        );
        assert!(
            text.stdout
                .contains("repairs 2 path(s) changed by hand (1 put back, 1 deleted)"),
            "{mode}: {}",
            text.all()
        );
        site.deploy(&sha(1)).success();
        assert!(!to.join("hand.txt").exists(), "{mode}");
        assert_eq!(std::fs::read(to.join("a.txt")).unwrap(), b"a", "{mode}");
    }
    // In place, `delete: false` keeps what left the build: the plan says so, and deletes nothing.
    let site = Site::new(
        "plankept",
        vec![Sshd::start()],
        one_step("app", ", mode: in-place, delete: false"),
    );
    site.write(b"a.txt", b"a");
    site.write(b"b.txt", b"b");
    site.deploy(&sha(1)).success();
    std::fs::remove_file(site.src.join("b.txt")).unwrap();
    let run = site
        .ferry("deploy", &sha(2))
        .args(["--plan", "--json"])
        .run()
        .success();
    let d = &step(&run)["detail"];
    assert_eq!(d["deleted"], 0, "{d}");
    assert_eq!(d["paths"]["kept"], serde_json::json!(["b.txt"]), "{d}");
}

#[test]
fn sync_refuses_plain_directory_unless_adopted() {
    let site = Site::new("adopt", vec![Sshd::start()], one_step("app", ""));
    site.write(b"index.html", b"new");
    let to = site.root().join("app");
    std::fs::create_dir_all(&to).unwrap();
    std::fs::write(to.join("old.html"), b"old").unwrap();
    let run = site.deploy(&sha(1)).failure(1);
    assert!(
        run.all().contains("plain directory") && run.all().contains("adopt: true"),
        "{}",
        run.all()
    );
    assert_eq!(
        std::fs::read(to.join("old.html")).unwrap(),
        b"old",
        "untouched"
    );
    // Same playbook with adopt: true takes it over, keeping the old tree aside.
    let text = std::fs::read_to_string(&site.pb).unwrap();
    std::fs::write(
        &site.pb,
        text.replace("to: \"app\"", "to: \"app\", adopt: true"),
    )
    .unwrap();
    let plan = site.ferry("deploy", &sha(1)).arg("--plan").run().success();
    assert!(
        plan.all().contains("adopts the plain directory there"),
        "{}",
        plan.all()
    );
    assert!(to.join("old.html").exists());
    site.deploy(&sha(1)).success();
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"new");
    assert!(!to.join("old.html").exists());
    let kept: Vec<_> = std::fs::read_dir(site.root().join(".app.ferry"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("adopted-"))
        .collect();
    assert_eq!(kept.len(), 1);
}

#[test]
fn sync_refuses_symlink_leaving_the_tree() {
    let site = Site::new("escape", vec![Sshd::start()], one_step("app", ""));
    site.write(b"index.html", b"x");
    std::os::unix::fs::symlink("../../etc/passwd", site.src.join("pw")).unwrap();
    let run = site.deploy(&sha(1)).failure(1);
    assert!(
        run.all()
            .contains(&site.src.join("pw").display().to_string())
            && run.all().contains("outside the tree"),
        "{}",
        run.all()
    );
    assert!(!site.root().join("app").exists());
    // A chain of links, each inside the tree by its text, that climbs out once followed.
    std::fs::remove_file(site.src.join("pw")).unwrap();
    std::fs::create_dir(site.src.join("d")).unwrap();
    std::os::unix::fs::symlink("..", site.src.join("d/l")).unwrap();
    std::os::unix::fs::symlink("d/l/..", site.src.join("up")).unwrap();
    let run = site.deploy(&sha(2)).failure(1);
    let link = format!(
        "symlink {} -> d/l/.. leads outside the tree",
        site.src.join("up").display()
    );
    assert!(run.all().contains(&link), "{}", run.all());
    assert!(!site.root().join("app").exists());
}

/// `to` may not hold ferry's own state: adopting the environment's root would move its ledger
/// and lock into a release.
#[test]
fn sync_refuses_a_target_holding_ferrys_state() {
    let site = Site::new(
        "selfstate",
        vec![Sshd::start()],
        one_step("", ", adopt: true"),
    );
    site.write(b"index.html", b"x");
    // Refused before any host is touched (exit 2: the playbook's to fix).
    let run = site.deploy(&sha(1)).failure(2);
    assert!(run.all().contains("ferry's own state"), "{}", run.all());
    assert!(
        !site.root().join(".ferry").exists(),
        "nothing is made on the host"
    );
}

/// A file edited on the host is detected, reported, and replaced by the next deploy; the edit never
/// leaks into the new release. Files removed and added by hand are put right too.
fn hand_edits(busybox: bool) {
    let site = one_host_site("drift", busybox, "app", "");
    site.write(b"index.html", b"original");
    site.write(b"other.html", b"other");
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    let first = live_release(&to);
    // Edit through the live path at once: on BusyBox, whose `find -newer` compares whole
    // seconds, the deploy returns only once the second of its stamp is over.
    std::fs::write(to.join("index.html"), b"hacked on the host").unwrap();
    std::fs::write(to.join("other.html"), b"hacked too").unwrap();
    let run = site.deploy(&sha(2)).success();
    let s = step(&run);
    assert_drift(&s, "2 file(s) modified on the host");
    assert_eq!(s["files_sent"], 2, "the edited content is re-sent: {s}");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"original");
    assert_eq!(std::fs::read(to.join("other.html")).unwrap(), b"other");
    // The next deploy sees no drift.
    let s = step(&site.deploy(&sha(3)).success());
    assert_eq!(s["changed"], false, "{s}");
    assert!(s["detail"]["drift"].is_null(), "{s}");
    // A file removed and one added by hand: the same tree is deployed again, and it is whole.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::remove_file(to.join("other.html")).unwrap();
    std::fs::write(to.join("extra.txt"), b"left by hand").unwrap();
    let s = step(&site.deploy(&sha(4)).success());
    assert_eq!(s["changed"], true, "{s}");
    assert_drift(&s, "added, replaced or removed");
    assert_eq!(s["files_sent"], 0, "nothing new to send: {s}");
    assert_eq!(std::fs::read(to.join("other.html")).unwrap(), b"other");
    assert!(!to.join("extra.txt").exists());
    let s = step(&site.deploy(&sha(5)).success());
    assert_eq!(s["changed"], false, "{s}");
    // The first release shares the files edited by hand (hard links): a rollback to it says so,
    // and so does its plan.
    let run = site
        .ferry("rollback", &sha(5))
        .args(["--to", &first, "--json", "--plan"])
        .run()
        .success();
    let log = step(&run)["log"].to_string();
    assert!(
        log.contains("edited or replaced by hand") && log.contains("index.html"),
        "{log}"
    );
    let run = site
        .ferry("rollback", &sha(5))
        .args(["--to", &first, "--json"])
        .run()
        .success();
    let log = step(&run)["log"].to_string();
    assert!(
        log.contains("edited or replaced by hand")
            && log.contains("index.html")
            && log.contains("other.html"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(to.join("index.html")).unwrap(),
        b"hacked on the host"
    );
    assert_eq!(std::fs::read(to.join("other.html")).unwrap(), b"hacked too");
    // As the warning says, deploying its commit again restores them.
    let s = step(&site.deploy(&sha(1)).success());
    assert_eq!(s["changed"], true, "{s}");
    assert_drift(&s, "found edited by hand before it was rolled back to");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"original");
    assert_eq!(std::fs::read(to.join("other.html")).unwrap(), b"other");
    // A file replaced by hand (a new inode, as `sed -i` writes one): the next deploy repairs it,
    // and a rollback to the release it was replaced in says it serves it as it is now.
    let replaced = live_release(&to);
    std::fs::write(to.join("index.html.tmp"), b"replaced on the host").unwrap();
    std::fs::rename(to.join("index.html.tmp"), to.join("index.html")).unwrap();
    let s = step(&site.deploy(&sha(6)).success());
    assert_drift(&s, "added, replaced or removed");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"original");
    let run = site
        .ferry("rollback", &sha(6))
        .args(["--to", &replaced, "--json"])
        .run()
        .success();
    let log = step(&run)["log"].to_string();
    assert!(
        log.contains("replaced by hand") && log.contains("index.html"),
        "{log}"
    );
}

#[test]
fn sync_detects_and_repairs_hand_edits() {
    hand_edits(false);
}

#[test]
fn sync_detects_and_repairs_hand_edits_on_busybox_host() {
    hand_edits(true);
}

/// Content edited by hand through a release that is no longer live (it was rolled away from), or
/// whose mode was changed (`chmod` leaves the mtime alone), is never linked into a new release.
fn stored_edits(busybox: bool) {
    let site = one_host_site("spoilt", busybox, "app", "");
    let to = site.root().join("app");
    let mode = |p: &str| std::fs::metadata(to.join(p)).unwrap().permissions().mode() & 0o777;
    site.write(b"index.html", b"v1");
    site.write(b"page.html", b"page");
    site.deploy(&sha(1)).success();
    site.write(b"index.html", b"v2");
    site.deploy(&sha(2)).success();
    // Edited in place through v2, then v1 goes live again: the live release is clean.
    std::fs::write(to.join("index.html"), b"v2, hacked").unwrap();
    site.ferry("rollback", &sha(2)).run().success();
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v1");
    // v2's content again: it is sent anew, not linked from the edited copy.
    let s = step(&site.deploy(&sha(3)).success());
    assert_drift(&s, "1 stored file(s) changed by hand");
    assert_eq!(s["files_sent"], 1, "{s}");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
    // A mode changed by hand on a live file: the same commit is deployed anew, with its mode.
    std::fs::set_permissions(to.join("page.html"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let status = site.status(&[]);
    assert!(
        status.stdout.contains("1 stored file(s) changed by hand"),
        "{}",
        status.stdout
    );
    // (As in a store made before deploys listed the modes in use: they are looked for.)
    let modes = site.root().join(".app.ferry/modes-used");
    assert_eq!(std::fs::read_to_string(&modes).unwrap(), "644\n");
    std::fs::remove_file(&modes).unwrap();
    let s = step(&site.deploy(&sha(3)).success());
    assert_eq!(s["changed"], true, "{s}");
    assert_drift(&s, "1 stored file(s) changed by hand (content or mode)");
    assert_eq!(mode("page.html"), 0o644);
    assert_eq!(std::fs::read_to_string(&modes).unwrap(), "644\n");
    assert_eq!(std::fs::read(to.join("page.html")).unwrap(), b"page");
    // And then nothing is left to repair.
    let s = step(&site.deploy(&sha(3)).success());
    assert_eq!(s["changed"], false, "{s}");
    assert!(s["detail"]["drift"].is_null(), "{s}");
    // An edit to a file two releases share; the next deploy finds it, and a rollback brings the
    // edited file back (with a warning). Deploying that release's commit again restores it.
    site.write(b"extra.txt", b"x");
    site.deploy(&sha(4)).success();
    std::fs::write(to.join("index.html"), b"v2, hacked again").unwrap();
    site.write(b"index.html", b"v5");
    assert_drift(&step(&site.deploy(&sha(5)).success()), "1 file(s) modified");
    site.ferry("rollback", &sha(5)).run().success();
    assert_eq!(
        std::fs::read(to.join("index.html")).unwrap(),
        b"v2, hacked again"
    );
    site.write(b"index.html", b"v2");
    let s = step(&site.deploy(&sha(4)).success());
    assert_eq!(s["changed"], true, "{s}");
    assert_drift(
        &s,
        "1 file(s) of the live release were found edited by hand before",
    );
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
}

/// Release mode, GNU host: content written with its old mtime kept (`cp -p`) through `to` is
/// found by its ctime, sent anew and never linked into the new release; ferry's own changes to
/// the stored inodes (links made, a pruned release deleted in the background) are none.
#[test]
fn sync_finds_content_written_with_its_old_mtime() {
    let site = one_host_site("cpp", false, "app", ", keep: 2");
    let to = site.root().join("app");
    let store = site.root().join(".app.ferry");
    site.write(b"page.html", b"page");
    for (n, v) in [(1, "v1"), (2, "v2"), (3, "v3")] {
        site.write(b"index.html", v.as_bytes());
        site.deploy(&sha(n)).success();
    }
    // Right after a prune, and once its deletion is over: no change by hand.
    let s = step(&site.deploy(&sha(3)).success());
    assert!(s["detail"]["drift"].is_null(), "{s}");
    assert_trash_emptied(&store);
    let s = step(&site.deploy(&sha(3)).success());
    assert_eq!(s["changed"], false, "{s}");
    assert!(s["detail"]["drift"].is_null(), "{s}");
    std::thread::sleep(Duration::from_millis(20));
    let defaced = site.dir.join("defaced");
    std::fs::write(&defaced, b"DEFACED BY HAND").unwrap();
    run_ok(
        std::process::Command::new("touch")
            .arg("-r")
            .arg(to.join("page.html"))
            .arg(&defaced),
    );
    run_ok(
        std::process::Command::new("cp")
            .arg("-p")
            .arg(&defaced)
            .arg(to.join("page.html")),
    );
    let s = step(&site.deploy(&sha(3)).success());
    assert_drift(&s, "1 stored file(s) changed by hand");
    assert_eq!(s["files_sent"], 1, "{s}");
    assert_eq!(std::fs::read(to.join("page.html")).unwrap(), b"page");
}

#[test]
fn sync_never_reuses_content_edited_through_any_release() {
    stored_edits(false);
}

#[test]
fn sync_never_reuses_content_edited_through_any_release_on_busybox_host() {
    stored_edits(true);
}

/// A live file edited by hand while a deploy streams (after its scan) would be linked into the new
/// release (release mode), or into staging as the source of a copy (in place), and pass for
/// deployed content: that deploy stops, and the next one repairs the file. In place, an edit to a
/// file the deploy neither writes nor copies from is left for the next deploy to find (as one made
/// just after the deploy would be).
#[test]
fn an_edit_during_a_deploy_is_not_adopted() {
    // (mode, a copy of index.html in the new tree, the deploy stops, drift the next one reports)
    for (mode, copy, stops, drift) in [
        ("", false, true, "1 file(s) modified"),
        (
            ", mode: in-place",
            true,
            true,
            "1 path(s) added, edited or removed",
        ),
        (
            ", mode: in-place",
            false,
            false,
            "1 path(s) added, edited or removed",
        ),
    ] {
        let site = Site::new("during", vec![Sshd::start()], one_step("app", mode));
        site.write(b"index.html", b"v1");
        site.deploy(&sha(1)).success();
        let to = site.root().join("app");
        big_file(&site, "big.bin", 200, 5);
        if copy {
            site.write(b"copy.html", b"v1");
        }
        let run = interrupt_mid_stream(&site, &sha(2), |_| {
            std::fs::write(to.join("index.html"), b"edited during the deploy").unwrap();
        });
        let case = format!("{mode}, copy {copy}");
        if stops {
            assert_eq!(run.code, 1, "{case}: {}", run.all());
            assert!(
                run.all()
                    .contains("changed on the host while this deploy ran"),
                "{case}: {}",
                run.all()
            );
            assert!(!to.join("big.bin").exists(), "{case}");
        } else {
            assert_eq!(run.code, 0, "{case}: {}", run.all());
            assert_eq!(
                std::fs::read(to.join("index.html")).unwrap(),
                b"edited during the deploy"
            );
        }
        let s = step(&site.deploy(&sha(2)).success());
        assert_drift(&s, drift);
        assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v1");
        assert!(to.join("big.bin").exists(), "{case}");
        if copy {
            assert_eq!(std::fs::read(to.join("copy.html")).unwrap(), b"v1");
        }
    }
}

/// In place, a file removed by hand from the top of `to` while a deploy streams changes only `to`
/// itself, which that deploy changes too (its staging directory): the deploy stops, and the next
/// one puts the file back.
#[test]
fn a_removal_at_the_top_of_to_during_an_in_place_deploy_is_not_adopted() {
    let site = Site::new(
        "top",
        vec![Sshd::start()],
        one_step("app", ", mode: in-place"),
    );
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    big_file(&site, "big.bin", 200, 6);
    let run = interrupt_mid_stream(&site, &sha(2), |_| {
        std::fs::remove_file(to.join("index.html")).unwrap();
    });
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.all()
            .contains("changed on the host while this deploy ran"),
        "{}",
        run.all()
    );
    assert!(!to.join("big.bin").exists());
    let s = step(&site.deploy(&sha(2)).success());
    assert_drift(&s, "1 path(s) added, edited or removed");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v1");
    assert!(to.join("big.bin").exists());
}

/// In place, a `chmod` by hand (which leaves the mtime alone) is found by its ctime where `find` is
/// GNU's, reported as drift, and put back by the next deploy of the same tree.
#[test]
fn a_chmod_by_hand_in_place_is_repaired() {
    let site = one_host_site("chmod", false, "app", ", mode: in-place");
    site.write(b"run.sh", b"#!/bin/sh\necho hi\n");
    site.write(b"index.html", b"v1");
    let script = site.src.join("run.sh");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&to.join("run.sh")), 0o755);
    std::fs::set_permissions(to.join("run.sh"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = step(&site.deploy(&sha(1)).success());
    assert_drift(&s, "1 path(s) added, edited or removed");
    assert_eq!(mode(&to.join("run.sh")), 0o755);
    // Then nothing is left to repair.
    let s = step(&site.deploy(&sha(1)).success());
    assert_eq!(s["changed"], false, "{s}");
    // A `chmod` or `chown` that leaves things as they were (a container's entrypoint, say) is
    // no change.
    std::thread::sleep(Duration::from_millis(20));
    let index = to.join("index.html");
    std::fs::set_permissions(&index, std::fs::Permissions::from_mode(mode(&index))).unwrap();
    run_ok(
        std::process::Command::new("chown")
            .arg("-R")
            .arg("0:0")
            .arg(&to),
    );
    let s = step(&site.deploy(&sha(1)).success());
    assert_eq!(s["changed"], false, "{s}");
    assert!(s["detail"]["drift"].is_null(), "{s}");
    // Content written with the old mtime kept (`cp -p`, `rsync -a`, a restore) is an edit: its
    // ctime is new and its size is not the deployed one.
    std::thread::sleep(Duration::from_millis(20));
    let defaced = site.root().join("defaced");
    std::fs::write(&defaced, b"DEFACED BY HAND\n").unwrap();
    run_ok(
        std::process::Command::new("touch")
            .arg("-r")
            .arg(&index)
            .arg(&defaced),
    );
    run_ok(
        std::process::Command::new("cp")
            .arg("-p")
            .arg(&defaced)
            .arg(&index),
    );
    let s = step(&site.deploy(&sha(1)).success());
    assert_drift(&s, "1 path(s) added, edited or removed");
    assert_eq!(std::fs::read(&index).unwrap(), b"v1");
}

/// A rollback to a run that left the live files (a deploy of the same build) says they do not
/// change, in words and in `--json`; both modes.
#[test]
fn a_rollback_to_the_same_files_says_nothing_changes() {
    for mode in ["", ", mode: in-place"] {
        let site = one_host_site("samerb", false, "app", mode);
        site.write(b"v.txt", b"A");
        site.deploy(&sha(1)).success();
        site.write(b"v.txt", b"B");
        site.deploy(&sha(2)).success();
        site.deploy(&sha(3)).success();
        let run = site
            .ferry("rollback", &sha(3))
            .arg("--json")
            .run()
            .success();
        let s = step(&run);
        assert_eq!(s["changed"], false, "{mode}: {s}");
        assert!(
            s["summary"].as_str().unwrap().contains("is live already"),
            "{mode}: {s}"
        );
        assert_eq!(std::fs::read(site.root().join("app/v.txt")).unwrap(), b"B");
    }
}

/// In place, what `exclude` matches in `to` stays, as `rsync --delete` leaves it: files the app
/// writes there (uploads, logs) are no hand change, and no deploy deletes them. Both host kinds.
#[test]
fn in_place_leaves_excluded_paths_on_the_host() {
    for busybox in [false, true] {
        let site = one_host_site(
            "keepexcl",
            busybox,
            "app",
            ", mode: in-place, exclude: [\"uploads/\", \"*.log\"]",
        );
        site.write(b"index.html", b"v1");
        site.write(b"css/app.css", b"body{}");
        site.deploy(&sha(1)).success();
        let to = site.root().join("app");
        for (rel, body) in [
            ("uploads/u1/img.jpg", "jpg"),
            ("app.log", "log"),
            ("css/x.log", "x"),
        ] {
            let p = to.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
        }
        std::fs::write(to.join("stray.txt"), "by hand").unwrap();
        let s = step(&site.deploy(&sha(1)).success());
        assert_drift(&s, "1 path(s) added, edited or removed");
        assert!(
            !to.join("stray.txt").exists(),
            "an extra that is not excluded goes"
        );
        site.write(b"index.html", b"v2");
        let s = step(&site.deploy(&sha(2)).success());
        assert!(s["detail"]["drift"].is_null(), "{s}");
        assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
        for rel in ["uploads/u1/img.jpg", "app.log", "css/x.log"] {
            assert!(
                to.join(rel).exists(),
                "busybox {busybox}: {rel} was deleted"
            );
        }
        // A directory that leaves the build stays while it holds an excluded path (as rsync
        // leaves it): what else was in it goes.
        std::fs::remove_dir_all(site.src.join("css")).unwrap();
        site.deploy(&sha(3)).success();
        assert!(!to.join("css/app.css").exists(), "busybox {busybox}");
        assert_eq!(std::fs::read(to.join("css/x.log")).unwrap(), b"x");
        // A file where `to` has a directory holding excluded paths: refused, nothing changed.
        site.write(b"uploads", b"a file now");
        site.write(b"index.html", b"v4");
        let run = site.deploy(&sha(4));
        assert_eq!(run.code, 1, "busybox {busybox}: {}", run.stdout);
        assert!(
            run.stdout.contains("the tree has a file at `uploads`")
                && run.stdout.contains("holding `uploads/u1"),
            "{}",
            run.stdout
        );
        assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
        assert_eq!(
            std::fs::read(to.join("uploads/u1/img.jpg")).unwrap(),
            b"jpg"
        );
    }
}

/// In place with `delete: false`, a file where `to` has a directory holding what the build
/// lacks is refused (the directory would go, and what it holds with it).
#[test]
fn in_place_keep_extras_refuses_a_file_over_their_directory() {
    let site = one_host_site("keepdir", false, "app", ", mode: in-place, delete: false");
    site.write(b"d/x", b"x");
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    std::fs::write(to.join("d/user"), "by the app").unwrap();
    std::fs::remove_dir_all(site.src.join("d")).unwrap();
    site.write(b"d", b"a file now");
    let run = site.deploy(&sha(2));
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains("`delete: false` keeps"),
        "{}",
        run.stdout
    );
    assert_eq!(std::fs::read(to.join("d/user")).unwrap(), b"by the app");
    assert_eq!(std::fs::read(to.join("d/x")).unwrap(), b"x");
    // Also when a deploy since (which saw the extra and applied) left nothing changed by hand:
    // `to` is listed again once the tree changes.
    std::fs::remove_file(site.src.join("d")).unwrap();
    std::fs::create_dir(site.src.join("d")).unwrap();
    site.write(b"other", b"a change");
    std::thread::sleep(Duration::from_millis(2100)); // (the hand-made file is older than its scan)
    site.deploy(&sha(3)).success();
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::remove_dir_all(site.src.join("d")).unwrap();
    site.write(b"d", b"a file now");
    let run = site.deploy(&sha(4));
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(run.stdout.contains("holding `d/"), "{}", run.stdout);
    assert_eq!(std::fs::read(to.join("d/user")).unwrap(), b"by the app");
}

/// In place, a deployed path that `exclude` matches later is the app's: content the app wrote
/// there is never taken for what the manifest said it held, nor linked into the store.
#[test]
fn in_place_never_takes_content_from_a_path_excluded_since() {
    let site = one_host_site("exclsrc", false, "app", ", mode: in-place");
    site.write(b"a", b"a");
    site.write(b"data/seed.json", b"SEED-ORIGINAL");
    site.deploy(&sha(1)).success();
    let yml = std::fs::read_to_string(&site.pb).unwrap();
    std::fs::write(
        &site.pb,
        yml.replace("mode: in-place", "mode: in-place, exclude: [\"data/\"]"),
    )
    .unwrap();
    let to = site.root().join("app");
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(to.join("data/seed.json"), "APP-WROTE-THIS").unwrap();
    site.write(b"other/seed.json", b"SEED-ORIGINAL");
    let s = step(&site.deploy(&sha(2)).success());
    assert_eq!(
        s["detail"]["deleted"], 0,
        "an excluded path is no deletion: {s}"
    );
    assert_eq!(
        std::fs::read(to.join("other/seed.json")).unwrap(),
        b"SEED-ORIGINAL"
    );
    assert_eq!(
        std::fs::read(to.join("data/seed.json")).unwrap(),
        b"APP-WROTE-THIS"
    );
    let links = std::os::unix::fs::MetadataExt::nlink(
        &std::fs::metadata(to.join("data/seed.json")).unwrap(),
    );
    assert_eq!(links, 1, "the app's file shares its inode with the store");
}

/// In place on a GNU host, a `chmod` by hand of a directory, or of `to` itself (world-writable,
/// say), is drift that the next deploy puts right (BusyBox find has no `-cnewer`: not seen there).
#[test]
fn in_place_repairs_a_directory_chmod_by_hand() {
    use std::os::unix::fs::PermissionsExt;
    let site = one_host_site("dirchmod", false, "app", ", mode: in-place");
    site.write(b"sub/x", b"x");
    std::fs::set_permissions(site.src.join("sub"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&site.src, std::fs::Permissions::from_mode(0o755)).unwrap();
    site.deploy(&sha(1)).success();
    let s = step(&site.deploy(&sha(1)).success());
    assert!(s["detail"]["drift"].is_null(), "{s}");
    let to = site.root().join("app");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::set_permissions(to.join("sub"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o777)).unwrap();
    let s = step(&site.deploy(&sha(1)).success());
    assert_drift(&s, "2 path(s)");
    assert_eq!(mode(&to.join("sub")), 0o755);
    assert_eq!(mode(&to), 0o755);
    let s = step(&site.deploy(&sha(1)).success());
    assert!(s["detail"]["drift"].is_null(), "repaired for good: {s}");
    // Only the permission bits count: a setgid directory (whose subdirectories inherit the bit,
    // and which `chmod 755` leaves setgid on GNU) is no drift.
    std::thread::sleep(Duration::from_millis(1100));
    for p in [to.clone(), to.join("sub")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o2755)).unwrap();
    }
    let s = step(&site.deploy(&sha(1)).success());
    assert!(s["detail"]["drift"].is_null(), "{s}");
}

/// In place, a rollback that would put a file where `to` now has a directory holding an excluded
/// path is refused, as a deploy of that tree is.
#[test]
fn in_place_rollback_refuses_a_file_over_excluded_paths() {
    let site = one_host_site(
        "rbexcl",
        false,
        "app",
        ", mode: in-place, exclude: [\"*.log\"]",
    );
    site.write(b"logs", b"a file");
    let run = site.deploy(&sha(1)).success();
    let first = step(&run)["detail"]["release"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::remove_file(site.src.join("logs")).unwrap();
    site.write(b"logs/README", b"a directory now");
    site.deploy(&sha(2)).success();
    let to = site.root().join("app");
    std::fs::write(to.join("logs/app.log"), "the app's").unwrap();
    let run = site.ferry("rollback", &sha(2)).args(["--to", &first]).run();
    assert_eq!(run.code, 1, "{}", run.stdout);
    assert!(
        run.stdout.contains("holding `logs/app.log`"),
        "{}",
        run.stdout
    );
    assert_eq!(
        std::fs::read(to.join("logs/app.log")).unwrap(),
        b"the app's"
    );
}

/// In place, a symlink replaced by hand (`ln -sfn`) is found and put back, on both shells.
#[test]
fn a_symlink_changed_by_hand_in_place_is_repaired() {
    for busybox in [false, true] {
        let site = one_host_site("symlink", busybox, "app", ", mode: in-place");
        site.write(b"a.js", b"a");
        site.write(b"b.js", b"b");
        std::os::unix::fs::symlink("a.js", site.src.join("latest.js")).unwrap();
        site.deploy(&sha(1)).success();
        let to = site.root().join("app");
        std::thread::sleep(Duration::from_millis(1100));
        std::fs::remove_file(to.join("latest.js")).unwrap();
        std::os::unix::fs::symlink("b.js", to.join("latest.js")).unwrap();
        let s = step(&site.deploy(&sha(1)).success());
        assert_drift(&s, "1 path(s) added, edited or removed");
        assert_eq!(
            std::fs::read_link(to.join("latest.js")).unwrap(),
            Path::new("a.js"),
            "busybox {busybox}"
        );
    }
}

#[test]
fn sync_keep_prunes_but_never_live_or_rollback_target() {
    let site = Site::new("keep", vec![Sshd::start()], one_step("app", ", keep: 2"));
    let to = site.root().join("app");
    let mut ids = Vec::new();
    for i in 1..=4u8 {
        site.write(b"index.html", format!("v{i}").as_bytes());
        site.write(
            format!("only-{i}.txt").as_bytes(),
            format!("unique {i}").as_bytes(),
        );
        site.deploy(&sha(i)).success();
        ids.push(live_release(&to));
        std::fs::remove_file(site.src.join(format!("only-{i}.txt"))).unwrap();
    }
    // Roll back to v3, then deploy v5: v5 is live, v3 is the rollback target, v4 is newest besides.
    site.ferry("rollback", &sha(4)).run().success();
    assert_eq!(live_release(&to), ids[2]);
    site.write(b"index.html", b"v5");
    site.deploy(&sha(5)).success();
    let mut left: Vec<String> = std::fs::read_dir(site.root().join(".app.ferry/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    let v5 = live_release(&to);
    assert!(left.contains(&v5) && left.contains(&ids[2]), "{left:?}");
    assert_eq!(left.len(), 2, "{left:?}");
    // Unreferenced objects were collected: only v3's and v5's contents remain.
    let objects = std::fs::read_dir(site.root().join(".app.ferry/objects"))
        .unwrap()
        .count();
    assert_eq!(objects, 3, "index v3, index v5, only-3");
    assert_trash_emptied(&site.root().join(".app.ferry"));
    site.ferry("rollback", &sha(5)).run().success();
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v3");
}

/// `status` checks every sync target against the release the last good deploy left there, not
/// only the first.
#[test]
fn status_checks_every_sync_target() {
    let site = Site::new("statusall", vec![Sshd::start()], |src: &Path, _: &Path| {
        format!(
            "      - sync: {{ from: \"{0}\", to: web }}\n      - sync: {{ from: \"{0}\", to: conf }}\n",
            src.display()
        )
    });
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    let conf = site.root().join("conf");
    let first = std::fs::read_link(&conf).unwrap();
    site.write(b"index.html", b"v2");
    site.deploy(&sha(2)).success();
    // By hand: conf goes back to the first release.
    let tmp = site.root().join("conf.tmp");
    std::os::unix::fs::symlink(&first, &tmp).unwrap();
    std::fs::rename(&tmp, &conf).unwrap();
    let status = site.status(&["--env", "test"]);
    let want = format!(
        "files at {}: release {} is live, but the ledger's last good run left",
        conf.display(),
        first.file_name().unwrap().to_string_lossy()
    );
    assert!(status.stdout.contains(&want), "{want}: {}", status.stdout);
}

/// Failed deploys leave their releases, which count toward `keep`; two in a row still leave the
/// release a rollback goes to (the one before the live one).
#[test]
fn failed_deploys_in_a_row_keep_the_rollback_target() {
    let site = Site::new(
        "failkeep",
        vec![Sshd::start()],
        |src: &Path, root: &Path| {
            format!(
                "      - sync: {{ from: \"{}\", to: app, keep: 3 }}\n      - run: {{ command: [test, \"!\", -e, \"{}/fail\"] }}\n",
                src.display(),
                root.display()
            )
        },
    );
    let to = site.root().join("app");
    let mut ids = Vec::new();
    for i in 1..=5u8 {
        if i == 4 {
            std::fs::write(site.root().join("fail"), b"").unwrap();
        }
        site.write(b"index.html", format!("v{i}").as_bytes());
        let run = site.deploy(&sha(i));
        assert_eq!(run.code, if i < 4 { 0 } else { 1 }, "{}", run.all());
        ids.push(live_release(&to));
    }
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v3");
    std::fs::remove_file(site.root().join("fail")).unwrap();
    site.ferry("rollback", &sha(5)).run().success();
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
    assert_eq!(live_release(&to), ids[1]);
}

/// A first deploy whose later step fails takes its release off `to` again: `to` is what it was
/// before (missing; the directory it adopted; in place, missing), and nothing is live. The next
/// deploy, once the step passes, goes live.
#[test]
fn a_failed_first_deploy_leaves_nothing_live() {
    // (`./app`: the step's path is matched however it is spelled.)
    for (mode, adopt, to) in [
        ("", false, "app"),
        ("", true, "app"),
        (", mode: in-place", false, "app"),
        ("", false, "./app"),
    ] {
        let case = format!("{mode} adopt {adopt} to {to}");
        let extra = format!("{mode}{}", if adopt { ", adopt: true" } else { "" });
        let site = Site::new(
            "firstfail",
            vec![Sshd::start()],
            move |src: &Path, root: &Path| {
                format!(
                    "      - sync: {{ from: \"{}\", to: \"{to}\"{extra} }}\n      - run: {{ command: [test, \"!\", -e, \"{}/fail\"] }}\n",
                    src.display(),
                    root.display()
                )
            },
        );
        let to = site.root().join("app");
        if adopt {
            std::fs::create_dir_all(&to).unwrap();
            std::fs::write(to.join("old.html"), b"old").unwrap();
        }
        std::fs::write(site.root().join("fail"), b"").unwrap();
        site.write(b"index.html", b"v1");
        let run = site.deploy(&sha(1));
        assert_eq!(run.code, 1, "{case}: {}", run.all());
        assert!(
            run.all().contains("took the first release off"),
            "{case}: {}",
            run.all()
        );
        if adopt {
            assert!(!to.is_symlink(), "{case}");
            assert_eq!(
                std::fs::read(to.join("old.html")).unwrap(),
                b"old",
                "{case}"
            );
        } else {
            assert!(!to.exists() && !to.is_symlink(), "{case}");
        }
        let status = site.status(&[]);
        let v = json(&status);
        assert_eq!(v[0]["rows"][0]["live"], false, "{case}: {v}");
        std::fs::remove_file(site.root().join("fail")).unwrap();
        site.deploy(&sha(1)).success();
        assert_eq!(
            std::fs::read(to.join("index.html")).unwrap(),
            b"v1",
            "{case}"
        );
        assert!(!to.join("old.html").exists(), "{case}");
        assert_trash_emptied(&site.root().join(".app.ferry"));
    }
}

/// A release deleted by hand leaves its manifest behind: that keeps none of its content, and the
/// next deploy that prunes removes it with the release's other metadata.
#[test]
fn sync_prune_collects_the_content_of_a_release_deleted_by_hand() {
    let site = Site::new("orphan", vec![Sshd::start()], one_step("app", ", keep: 2"));
    let to = site.root().join("app");
    let store = site.root().join(".app.ferry");
    let mut first = String::new();
    for i in 1..=4u8 {
        site.write(b"index.html", format!("v{i}").as_bytes());
        site.deploy(&sha(i)).success();
        if i == 1 {
            first = live_release(&to);
        }
        if i == 2 {
            std::fs::remove_dir_all(store.join("releases").join(&first)).unwrap();
        }
    }
    let mut objects: Vec<Vec<u8>> = std::fs::read_dir(store.join("objects"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    objects.sort();
    assert_eq!(objects, [b"v3".to_vec(), b"v4".to_vec()]);
    let mut meta: Vec<String> = std::fs::read_dir(store.join("meta"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&first))
        .collect();
    meta.sort();
    assert_eq!(meta, Vec::<String>::new());
}

/// Pruning's deletion runs in the background, also on a host whose `sh` is bash (which keeps the
/// session's output open in a background list with redirections of its own): the deploy returns
/// while a slow `rm` still works on `trash-<id>/`, which goes once it is done.
#[test]
fn sync_prune_deletes_in_the_background_where_sh_is_bash() {
    let dir = TempDir::new("bash-host");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink("/bin/bash", bin.join("sh")).unwrap();
    let rm = bin.join("rm");
    std::fs::write(
        &rm,
        "#!/bin/bash\nfor a; do case $a in trash-*) sleep 8; break ;; esac; done\nexec /bin/rm \"$@\"\n",
    )
    .unwrap();
    let wrapper = dir.path().join("login");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nPATH='{}':$PATH; export PATH\nexec bash -c \"$SSH_ORIGINAL_COMMAND\"\n",
            bin.display()
        ),
    )
    .unwrap();
    for (f, mode) in [
        (dir.path(), 0o755),
        (&bin, 0o755),
        (&rm, 0o755),
        (&wrapper, 0o755),
    ] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let host = Sshd::start_with(SshdOptions {
        extra_config: vec![format!("ForceCommand {}", wrapper.display())],
        ..Default::default()
    });
    let site = Site::new("bash-prune", vec![host], one_step("app", ", keep: 2"));
    for i in 1..=3u8 {
        site.write(b"index.html", format!("v{i}").as_bytes());
        site.deploy(&sha(i)).success();
    }
    let store = site.root().join(".app.ferry");
    assert_eq!(
        trash(&store).len(),
        1,
        "the pruned release is still being deleted"
    );
    assert_eq!(
        std::fs::read_dir(store.join("releases")).unwrap().count(),
        2
    );
    assert_trash_emptied(&store);
}

#[test]
fn sync_stop_removes_path_and_store() {
    let host = Sshd::start();
    let site = Site::new("stop", vec![host], |src, _| {
        format!(
            "      - sync: {{ from: \"{}\", to: app }}\n    on_stop:\n      - sync_remove: {{ to: app }}\n",
            src.display()
        )
    });
    site.write(b"index.html", b"x");
    site.deploy(&sha(1)).success();
    assert!(site.root().join("app/index.html").exists());
    site.ferry("stop", &sha(1)).run().success();
    assert!(!site.root().join("app").exists());
    assert!(!site.root().join(".app.ferry").exists());
}

#[test]
fn sync_stop_leaves_what_ferry_does_not_own() {
    let host = Sshd::start();
    let site = Site::new("stop-foreign", vec![host], |src, _| {
        format!(
            "      - sync: {{ from: \"{}\", to: app, mode: in-place }}\n      - sync: {{ from: \"{0}\", to: rel }}\n      - sync: {{ from: \"{0}\", to: gone }}\n    on_stop:\n      - sync_remove: {{ to: app }}\n      - sync_remove: {{ to: rel }}\n      - sync_remove: {{ to: gone }}\n",
            src.display()
        )
    });
    site.write(b"index.html", b"x");
    site.deploy(&sha(1)).success();
    // `rel` now links somewhere else by hand: not ferry's to remove.
    let rel = site.root().join("rel");
    std::fs::remove_file(&rel).unwrap();
    std::os::unix::fs::symlink("app", &rel).unwrap();
    // `gone` was removed by hand: only its releases are left to remove.
    std::fs::remove_file(site.root().join("gone")).unwrap();
    let run = site.ferry("stop", &sha(1)).arg("--json").run().success();
    let steps = &json(&run)[0]["steps"];
    // A directory applied in place keeps its files; its store goes.
    assert_eq!(
        std::fs::read(site.root().join("app/index.html")).unwrap(),
        b"x"
    );
    assert!(!site.root().join(".app.ferry").exists());
    let s0 = steps[0]["summary"].as_str().unwrap();
    assert!(s0.contains("left as it is"), "{s0}");
    assert_eq!(std::fs::read_link(&rel).unwrap(), Path::new("app"));
    assert!(!site.root().join(".rel.ferry").exists());
    let s1 = &steps[1];
    assert!(
        s1["log"]
            .to_string()
            .contains("links outside its release store"),
        "{s1}"
    );
    let s2 = steps[2]["summary"].as_str().unwrap();
    assert!(s2.contains("already gone"), "{s2}");
    assert!(!site.root().join(".gone.ferry").exists());
}

#[test]
fn sync_remakes_a_live_release_deleted_by_hand() {
    let site = Site::new("remake", vec![Sshd::start()], one_step("app", ""));
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    let live = live_release(&to);
    std::fs::remove_dir_all(site.root().join(".app.ferry/releases").join(&live)).unwrap();
    let run = site.deploy(&sha(1)).success();
    assert_eq!(step(&run)["changed"], true, "{}", run.stdout);
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v1");
}

/// What a cut apply leaves (no `applied`; objects sharing an inode with files of `to`): an object
/// written since that deploy began may have been edited through `to`, and goes; the others get an
/// inode of their own and stay (a rollback may need them).
#[test]
fn sync_in_place_drops_objects_an_unfinished_apply_left_shared() {
    let site = Site::new(
        "inplace-shared",
        vec![Sshd::start()],
        one_step("app", ", mode: in-place"),
    );
    site.write(b"index.html", b"v1");
    site.write(b"other.txt", b"o1");
    site.deploy(&sha(1)).success();
    let store = site.root().join(".app.ferry");
    // (The cut deploy began later: its stamp is newer than the files it found.)
    std::thread::sleep(Duration::from_millis(2100));
    std::fs::write(store.join("stamp"), "").unwrap();
    std::fs::remove_file(store.join("applied")).unwrap();
    let intact = store.join("objects/intact.644");
    let edited = store.join("objects/edited.644");
    std::fs::hard_link(site.root().join("app/index.html"), &intact).unwrap();
    std::fs::hard_link(site.root().join("app/other.txt"), &edited).unwrap();
    std::fs::write(site.root().join("app/other.txt"), "edited by hand").unwrap();
    site.write(b"index.html", b"v2");
    site.deploy(&sha(2)).success();
    assert!(
        !edited.exists(),
        "an object edited through `to` stays trusted"
    );
    assert_eq!(std::fs::read(&intact).unwrap(), b"v1");
    let links = std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(&intact).unwrap());
    assert_eq!(links, 1, "a kept object still shares a file of `to`");
    assert_eq!(
        std::fs::read(site.root().join("app/index.html")).unwrap(),
        b"v2"
    );
    assert_eq!(
        std::fs::read(site.root().join("app/other.txt")).unwrap(),
        b"o1"
    );
    assert!(store.join("applied").exists());
}

/// An apply that fails half-way (a directory the login may not write) leaves files of two
/// releases: `ferry status` says so, and a rollback to the last good release restores it
/// whole (the content that left `to` is still in the store). BusyBox host, non-root login.
#[test]
fn sync_in_place_rollback_after_a_failed_apply_restores_the_last_good_release() {
    let site = one_host_site("inplace-failed-apply", true, "app", ", mode: in-place");
    for (p, c) in [("a", "a1"), ("m", "m1"), ("z/x", "x1")] {
        site.write(p.as_bytes(), c.as_bytes());
    }
    let run = site.deploy(&sha(1)).success();
    let first = step(&run)["detail"]["release"]
        .as_str()
        .unwrap()
        .to_string();
    let to = site.root().join("app");
    let chown = |who: &str| {
        run_ok(
            std::process::Command::new("chown")
                .arg(who)
                .arg(to.join("z")),
        );
    };
    chown("root:root");
    for (p, c) in [("a", "a2"), ("m", "m2"), ("z/x", "x2")] {
        site.write(p.as_bytes(), c.as_bytes());
    }
    let run = site.deploy(&sha(2));
    chown(&format!("{BUSYBOX_USER}:{BUSYBOX_USER}"));
    assert_eq!(run.code, 1, "{}", run.stdout);
    let status = site.status(&["--env", "test"]);
    assert!(
        status.stdout.contains("the last apply did not finish"),
        "{}",
        status.stdout
    );
    site.ferry("rollback", &sha(2))
        .args(["--to", &first])
        .run()
        .success();
    for (p, c) in [("a", "a1"), ("m", "m1"), ("z/x", "x1")] {
        assert_eq!(std::fs::read_to_string(to.join(p)).unwrap(), c, "{p}");
    }
}

#[test]
fn sync_in_place_first_deploy_cut_leaves_no_target() {
    let site = Site::new(
        "inplace-first-cut",
        vec![Sshd::start()],
        one_step("app", ", mode: in-place"),
    );
    big_file(&site, "big.bin", 200, 3);
    site.write(b"index.html", b"v1");
    let run = interrupt_mid_stream(&site, &sha(1), |c| c.kill().unwrap());
    assert_ne!(run.code, 0);
    assert!(
        !site.root().join("app").exists(),
        "a cut first deploy left `to` behind"
    );
    site.ferry("deploy", &sha(1))
        .args(["--lock-wait", "30s"])
        .run()
        .success();
    assert_eq!(
        std::fs::read(site.root().join("app/index.html")).unwrap(),
        b"v1"
    );
}

/// A build with a read-only directory, deployed by a non-root login whose `tar` (BusyBox) sets a
/// directory's mode when it makes it: shipped with its mode, and pruned later.
#[test]
fn sync_ships_read_only_directories_on_busybox_host() {
    let host = Sshd::start_with(SshdOptions {
        busybox: true,
        ..Default::default()
    });
    let site = Site::new("read-only", vec![host], |src, _| {
        format!(
            "      - sync: {{ from: \"{0}\", to: app, keep: 2 }}\n      - sync: {{ from: \"{0}\", to: web, mode: in-place }}\n",
            src.display()
        )
    });
    site.write(b"ro/f.txt", b"locked");
    std::fs::set_permissions(site.src.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
    // A big file that does not compress travels in the plain part, which makes its directory.
    big_file(&site, "assets/noise.bin", 1, 9);
    // (A step follows `app`: its deploy keeps the live release's rollback target too, 3 in all.)
    for i in 1..=4u8 {
        site.write(b"index.html", format!("v{i}").as_bytes());
        let run = site.deploy(&sha(i)).success();
        for s in json(&run)[0]["steps"].as_array().unwrap() {
            assert_eq!(s["log"].as_array().map_or(0, Vec::len), 0, "{s}");
        }
    }
    for to in ["app", "web"] {
        let ro = site.root().join(to).join("ro");
        let mode = std::fs::metadata(&ro).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o555, "{to}");
        assert_eq!(std::fs::read(ro.join("f.txt")).unwrap(), b"locked");
        assert_eq!(
            std::fs::read(site.root().join(to).join("index.html")).unwrap(),
            b"v4"
        );
    }
    let releases = std::fs::read_dir(site.root().join(".app.ferry/releases"))
        .unwrap()
        .count();
    assert_eq!(
        releases, 3,
        "the oldest release, read-only directory and all, was pruned"
    );
    assert_trash_emptied(&site.root().join(".app.ferry"));
    let assets = std::fs::metadata(site.root().join("web/assets")).unwrap();
    assert_eq!(
        assets.permissions().mode() & 0o777,
        0o755,
        "the plain part's directory"
    );
}

/// In place, by a non-root login: files replaced, added and removed inside read-only directories
/// (and a read-only `to`), a new read-only directory, and a read-only directory that leaves the
/// build. Each keeps its mode; nothing stops half-way.
#[test]
fn sync_in_place_updates_read_only_directories_on_busybox_host() {
    let site = one_host_site("ro-inplace", true, "app", ", mode: in-place");
    let lock = |rel: &str, mode: u32| {
        let p = if rel.is_empty() {
            site.src.clone()
        } else {
            site.src.join(rel)
        };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    site.write(b"index.html", b"v1");
    site.write(b"ro/a.txt", b"a1");
    site.write(b"ro/old.txt", b"old");
    site.write(b"gone/x.txt", b"x");
    lock("ro", 0o555);
    lock("gone", 0o555);
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    let mode = |rel: &str| {
        std::fs::metadata(to.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!((mode("ro"), mode("gone")), (0o555, 0o555));

    for rel in ["ro", "gone", ""] {
        lock(rel, 0o755);
    }
    site.write(b"index.html", b"v2");
    site.write(b"ro/a.txt", b"a2");
    site.write(b"ro/new.txt", b"new");
    std::fs::remove_file(site.src.join("ro/old.txt")).unwrap();
    std::fs::remove_dir_all(site.src.join("gone")).unwrap();
    site.write(b"ro2/b.txt", b"b");
    for (rel, m) in [("ro", 0o555), ("ro2", 0o500), ("", 0o555)] {
        lock(rel, m);
    }
    let run = site.deploy(&sha(2)).success();
    assert_eq!(step(&run)["changed"], true, "{}", run.stdout);
    for (rel, want) in [
        ("index.html", &b"v2"[..]),
        ("ro/a.txt", b"a2"),
        ("ro/new.txt", b"new"),
        ("ro2/b.txt", b"b"),
    ] {
        assert_eq!(std::fs::read(to.join(rel)).unwrap(), want, "{rel}");
    }
    assert!(!to.join("ro/old.txt").exists() && !to.join("gone").exists());
    assert_eq!((mode("ro"), mode("ro2"), mode("")), (0o555, 0o500, 0o555));
    assert!(!to.join(".ferry-incoming").exists());
    let s = step(&site.deploy(&sha(3)).success());
    assert_eq!(
        s["changed"], false,
        "no drift from opening and closing: {s}"
    );
    // A directory holding a read-only one, replaced by a file in the next build.
    lock("", 0o755);
    site.write(b"docs/locked/x", b"x");
    lock("docs/locked", 0o555);
    site.deploy(&sha(4)).success();
    lock("docs/locked", 0o755);
    std::fs::remove_dir_all(site.src.join("docs")).unwrap();
    site.write(b"docs", b"now a file");
    site.deploy(&sha(5)).success();
    assert_eq!(std::fs::read(to.join("docs")).unwrap(), b"now a file");
}

/// A build whose top directory is read-only (a Nix output, `chmod -R a-w dist`): each release gets
/// its mode once it is in place (a directory one may not write to cannot be moved), and pruning
/// takes it.
#[test]
fn sync_ships_a_read_only_top_directory_on_busybox_host() {
    let site = one_host_site("read-only-top", true, "app", ", keep: 2");
    for i in 1..=3u8 {
        std::fs::set_permissions(&site.src, std::fs::Permissions::from_mode(0o755)).unwrap();
        site.write(b"index.html", format!("v{i}").as_bytes());
        std::fs::set_permissions(&site.src, std::fs::Permissions::from_mode(0o555)).unwrap();
        let run = site.deploy(&sha(i)).success();
        assert_eq!(
            step(&run)["log"].as_array().map_or(0, Vec::len),
            0,
            "{}",
            run.stdout
        );
    }
    let to = site.root().join("app");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v3");
    let mode = std::fs::metadata(&to).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o555);
    let releases = std::fs::read_dir(site.root().join(".app.ferry/releases"))
        .unwrap()
        .count();
    assert_eq!(releases, 2);
    assert_trash_emptied(&site.root().join(".app.ferry"));
    std::fs::set_permissions(&site.src, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Random (incompressible) bytes, so a transfer takes a while.
fn big_file(site: &Site, name: &str, mb: usize, seed: u8) {
    let mut data = vec![0u8; mb << 20];
    let mut x: u64 = 0x9e3779b97f4a7c15 ^ seed as u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    site.write(name.as_bytes(), &data);
}

/// Wait until the host has started unpacking a deploy, then call `cut`. The run's deploy lock has
/// a 2 s lease, so the lock a killed run leaves behind expires soon and the next deploy (with
/// `--lock-wait`) takes it over, as it would after a CI job was killed.
fn interrupt_mid_stream(site: &Site, sha: &str, cut: impl FnOnce(&mut std::process::Child)) -> Run {
    let (mut child, _home) = site
        .ferry("deploy", sha)
        .env("FERRY_LOCK_LEASE", "2s")
        .args(["--lock-wait", "30s"])
        .spawn();
    let incoming = site.root().join(".app.ferry/incoming");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !incoming.exists() {
        assert!(
            Instant::now() < deadline,
            "the deploy never started streaming"
        );
        if let Ok(Some(_)) = child.try_wait() {
            panic!("ferry finished before it could be interrupted");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(200));
    cut(&mut child);
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout_bytes: out.stdout,
    }
}

fn assert_live_intact(site: &Site, release: &str) {
    let to = site.root().join("app");
    assert_eq!(live_release(&to), release);
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v1");
}

#[test]
fn sync_survives_controller_killed_and_connection_cut() {
    let site = Site::new("interrupt", vec![Sshd::start()], one_step("app", ""));
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    let live = live_release(&site.root().join("app"));
    big_file(&site, "big.bin", 200, 1);

    // The controller is killed mid-stream. The host cleans up by itself (its messages have no
    // reader), and what the cut stream left is no hand edit to `ferry status`.
    let run = interrupt_mid_stream(&site, &sha(2), |c| c.kill().unwrap());
    assert_ne!(run.code, 0);
    assert_live_intact(&site, &live);
    let incoming = site.root().join(".app.ferry/incoming");
    for _ in 0..100 {
        if !incoming.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !incoming.exists(),
        "the host cleaned up after the controller was killed"
    );
    let status = site.status(&[]);
    assert!(
        !status.stdout.contains("changed by hand"),
        "{}",
        status.stdout
    );

    // The connection is cut mid-stream: kill sshd's per-connection processes.
    let sshd_pid = site.hosts[0].pid();
    let run = interrupt_mid_stream(&site, &sha(3), |_| {
        for pid in pids_of_children(sshd_pid) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    });
    assert_eq!(run.code, 1, "{}", run.all());
    assert_live_intact(&site, &live);

    // The next deploy takes over the expired lock, succeeds and cleans up what the broken ones left.
    site.write(b"index.html", b"v2");
    site.ferry("deploy", &sha(4))
        .args(["--lock-wait", "30s"])
        .run()
        .success();
    let to = site.root().join("app");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
    assert!(!site.root().join(".app.ferry/incoming").exists());
    // The object a cut stream left truncated was not reused.
    assert!(
        std::fs::read(to.join("big.bin")).unwrap()
            == std::fs::read(site.src.join("big.bin")).unwrap(),
        "big.bin arrived whole"
    );
}

/// A run whose lock was taken over while its stream ran (its lease ran out unrenewed, and another
/// run took the lock) does not switch: the host checks the lock is still the run's first.
#[test]
fn sync_does_not_switch_once_its_lock_was_taken_over() {
    let site = Site::new("takenover", vec![Sshd::start()], one_step("app", ""));
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    let live = live_release(&site.root().join("app"));
    big_file(&site, "big.bin", 200, 1);
    let locks = site.root().join(".ferry/locks");
    let run = interrupt_mid_stream(&site, &sha(2), |_| {
        for e in std::fs::read_dir(&locks).unwrap() {
            let p = e.unwrap().path();
            if p.join("token").exists() {
                std::fs::write(p.join("token"), "another-run\n").unwrap();
            }
        }
    });
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(
        run.all().contains("is no longer this run's") && run.all().contains("nothing was switched"),
        "{}",
        run.all()
    );
    assert_live_intact(&site, &live);
}

/// The last record of the site's ledger.
fn last_ledger_record(site: &Site) -> serde_json::Value {
    let text = std::fs::read_to_string(site.root().join(".ferry/ledger.jsonl")).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

/// Send SIGINT (Ctrl-C) to a running ferry.
fn ctrl_c(child: &std::process::Child) {
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Ctrl-C mid-stream: the stream ends without its trailer, the host cleans up, and only then is
/// the attempt recorded and the lock released (the next deploy needs no --lock-wait).
#[test]
fn sync_ctrl_c_mid_stream_cleans_up_before_the_lock_goes() {
    let site = Site::new("ctrlc", vec![Sshd::start()], one_step("app", ""));
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    let live = live_release(&site.root().join("app"));
    big_file(&site, "big.bin", 200, 2);
    let run = interrupt_mid_stream(&site, &sha(2), |c| ctrl_c(c));
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.all().contains("interrupted"), "{}", run.all());
    assert_live_intact(&site, &live);
    assert!(
        !site.root().join(".app.ferry/incoming").exists(),
        "the host cleaned up before ferry exited"
    );
    let last = last_ledger_record(&site);
    assert_eq!(last["ok"], false, "{last}");
    assert!(
        last["error"].as_str().unwrap().contains("interrupted"),
        "{last}"
    );
    site.write(b"index.html", b"v2");
    site.deploy(&sha(3)).success();
    assert_eq!(
        std::fs::read(site.root().join("app/index.html")).unwrap(),
        b"v2"
    );
}

/// Ctrl-C once the host has the whole stream (it is applying it in place): the sync finishes, the
/// run stops before its next step and puts the files back, and the ledger says so. (Before, the
/// step was cut off on the controller while the host went on to switch: the ledger said
/// "interrupted" with the new files live.)
#[test]
fn sync_ctrl_c_after_the_stream_was_sent_switches_back() {
    let site = Site::new("ctrlc-sent", vec![Sshd::start()], |src: &Path, _: &Path| {
        format!(
            "      - sync: {{ from: \"{}\", to: app, mode: in-place }}\n      - run: {{ command: [sleep, \"3\"] }}\n",
            src.display()
        )
    });
    let files = 3000;
    for i in 0..files {
        site.write(format!("d{}/f{i}.txt", i % 30).as_bytes(), b"v1");
    }
    site.deploy(&sha(1)).success();
    for i in 0..files {
        site.write(
            format!("d{}/f{i}.txt", i % 30).as_bytes(),
            format!("v2 {i}").as_bytes(),
        );
    }
    let (mut child, _home) = site.ferry("deploy", &sha(2)).spawn();
    let complete = site.root().join(".app.ferry/incoming/COMPLETE");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !complete.exists() {
        assert!(Instant::now() < deadline, "the stream never arrived whole");
        if let Ok(Some(_)) = child.try_wait() {
            panic!("ferry finished before it could be interrupted");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    ctrl_c(&child);
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    let to = site.root().join("app");
    for i in (0..files).step_by(97) {
        let f = to.join(format!("d{}/f{i}.txt", i % 30));
        assert_eq!(std::fs::read(&f).unwrap(), b"v1", "{}: {all}", f.display());
    }
    let last = last_ledger_record(&site);
    assert_eq!(last["ok"], false, "{last}");
    assert!(
        last["error"].as_str().unwrap().contains("interrupted"),
        "{last}"
    );
}

/// Unmounts when dropped.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A 20 MB tmpfs (anyone may write) mounted on `dir` until the guard is dropped.
fn tmpfs(dir: &Path) -> Unmount {
    run_ok(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=20m,mode=0777", "ferry-test"])
            .arg(dir),
    );
    Unmount(dir.to_path_buf())
}

/// A small tmpfs as the environment root: a deploy that does not fit fails cleanly.
#[test]
fn sync_disk_full_leaves_live_release_and_recovers() {
    let site = Site::new("diskfull", vec![Sshd::start()], one_step("app", ""));
    let root = site.root();
    let _guard = tmpfs(&root);
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    let live = live_release(&root.join("app"));
    big_file(&site, "big.bin", 30, 2);
    let run = site.deploy(&sha(2)).failure(1);
    assert!(
        run.all().contains("live release is unchanged")
            && run.all().contains("the host's disk looks full where"),
        "{}",
        run.all()
    );
    assert_live_intact(&site, &live);
    assert!(!root.join(".app.ferry/incoming").exists(), "cleaned up");
    std::fs::remove_file(site.src.join("big.bin")).unwrap();
    big_file(&site, "medium.bin", 5, 3);
    site.write(b"index.html", b"v2");
    site.deploy(&sha(3)).success();
    assert_eq!(std::fs::read(root.join("app/index.html")).unwrap(), b"v2");
}

/// The disk under ferry's state fills during the run (its last step fills it): the run fails,
/// saying its record could not be added, and leaves no lock or guard behind; the next deploy,
/// once there is room, runs at once and is recorded.
#[test]
fn state_disk_full_at_the_end_fails_and_leaves_no_lock() {
    let fill = |_src: &Path, root: &Path| {
        format!(
            "      - run: {{ command: [sh, -c, 'dd if=/dev/zero of=\"$0/fill\" bs=1M 2>/dev/null; true', \"{}\"] }}\n",
            root.display()
        )
    };
    let site = Site::new("statefull", vec![Sshd::start()], fill);
    let root = site.root();
    let _guard = tmpfs(&root);
    let run = site.deploy(&sha(1)).failure(1);
    assert!(
        run.all().contains("ledger.jsonl") && run.all().contains("ERROR"),
        "{}",
        run.all()
    );
    let locks: Vec<_> = std::fs::read_dir(root.join(".ferry/locks"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(locks.is_empty(), "no lock or guard stays: {locks:?}");
    std::fs::remove_file(root.join("fill")).unwrap();
    let text = std::fs::read_to_string(&site.pb).unwrap();
    std::fs::write(&site.pb, text.replace("of=", "if=/dev/null of=")).unwrap();
    let started = std::time::Instant::now();
    site.deploy(&sha(2)).success();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "waited on a guard"
    );
    let ledger = std::fs::read_to_string(root.join(".ferry/ledger.jsonl")).unwrap();
    assert!(ledger.contains(&sha(2)), "{ledger}");
}

fn inode(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(p).unwrap())
}

/// `mode: in-place` on one host flavour: adopt a plain directory, no-change redeploy, an update
/// (each changed file a new inode, unchanged ones untouched), plan, hand edits repaired, rollback.
fn in_place_lifecycle(busybox: bool) {
    let site = one_host_site("inplace", busybox, "web/app", ", mode: in-place, keep: 5");
    hostile_tree(&site);
    let to = site.root().join("web/app");
    std::fs::create_dir_all(to.join("old")).unwrap();
    open_up(&[&site.root().join("web"), &to, &to.join("old")]);
    std::fs::write(to.join("old/stale.html"), b"stale").unwrap();
    std::fs::write(to.join("index.html"), b"hand made").unwrap();

    // A directory ferry did not fill is taken over (extras deleted) only when asked.
    let refused = site.deploy(&sha(1)).failure(1);
    assert!(refused.all().contains("adopt: true"), "{}", refused.all());
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"hand made");
    let text = std::fs::read_to_string(&site.pb).unwrap();
    std::fs::write(&site.pb, text.replace("keep: 5", "keep: 5, adopt: true")).unwrap();

    let s = step(&site.deploy(&sha(1)).success());
    assert_eq!(s["files_sent"], 7, "{s}");
    assert_eq!(
        s["detail"]["replaced_in_place"], 8,
        "7 files and a symlink: {s}"
    );
    check_hostile(&to);
    let md = std::fs::symlink_metadata(&to).unwrap();
    assert!(
        md.is_dir() && !md.file_type().is_symlink(),
        "a real directory"
    );
    assert!(!to.join("old").exists(), "extras deleted");
    let nlink = |p: &Path| std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(p).unwrap());
    assert_eq!(
        nlink(&to.join("index.html")),
        1,
        "copied, not linked to the store"
    );
    let first = std::fs::read_to_string(site.root().join("web/.app.ferry/inplace")).unwrap();
    assert_eq!(s["detail"]["release"], first.trim());
    let st = Ferry::new()
        .trusting(&site.hosts.iter().collect::<Vec<_>>())
        .arg("status")
        .arg(&site.pb)
        .args(["--env", "test", "--json"])
        .run();
    assert!(st.stdout.contains(first.trim()), "{}", st.all());

    // Nothing changed: nothing sent, nothing written.
    let before = inode(&to.join("index.html"));
    let s = step(&site.deploy(&sha(2)).success());
    assert_eq!(s["changed"], false, "{s}");
    assert_eq!(s["files_sent"], 0);
    assert_eq!(inode(&to.join("index.html")), before);

    // Update: one changed, one added, one deleted; --plan first changes nothing.
    site.write(b"index.html", b"<h1>v2</h1>");
    site.write(b"assets/new file.txt", b"new");
    site.write(
        b"-new dir/f",
        b"in a directory whose name starts with a dash",
    );
    std::fs::remove_file(site.src.join("-dash")).unwrap();
    let plan = step(
        &site
            .ferry("deploy", &sha(3))
            .args(["--plan", "--json"])
            .run()
            .success(),
    );
    let d = &plan["detail"];
    assert_eq!(
        d["paths"]["added"],
        serde_json::json!(["-new dir/f", "assets/new file.txt"])
    );
    assert_eq!(d["paths"]["changed"], serde_json::json!(["index.html"]));
    assert_eq!(d["paths"]["deleted"], serde_json::json!(["-dash"]));
    assert_eq!(
        std::fs::read(to.join("index.html")).unwrap(),
        b"<h1>v1</h1>"
    );
    assert!(to.join("-dash").exists());
    let unchanged = inode(&to.join("bin/run.sh"));
    // Same content at three paths: one object, but three files (no shared inode) in `to`.
    site.write(b"copy.html", b"<h1>v2</h1>");
    site.write(b"copy 2.html", b"<h1>v2</h1>");
    let s = step(&site.deploy(&sha(3)).success());
    assert_eq!(s["files_sent"], 3, "{s}");
    assert_eq!(
        s["detail"]["replaced_in_place"], 5,
        "only changed files are written: {s}"
    );
    for copy in ["copy.html", "copy 2.html"] {
        assert_eq!(std::fs::read(to.join(copy)).unwrap(), b"<h1>v2</h1>");
        assert_ne!(inode(&to.join(copy)), inode(&to.join("index.html")));
        assert_eq!(nlink(&to.join(copy)), 1, "{copy}");
    }
    assert_eq!(nlink(&to.join("index.html")), 1);
    assert_eq!(
        std::fs::read(to.join("index.html")).unwrap(),
        b"<h1>v2</h1>"
    );
    assert_ne!(
        inode(&to.join("index.html")),
        before,
        "a changed file is a new inode"
    );
    assert_eq!(
        inode(&to.join("bin/run.sh")),
        unchanged,
        "unchanged files untouched"
    );
    assert_eq!(
        std::fs::read(to.join("assets/new file.txt")).unwrap(),
        b"new"
    );
    assert!(!to.join("-dash").exists());
    let leftovers: Vec<_> = walk(&to)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains("ferry-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Hand edits (a changed file, a removed file) are detected and repaired: content the host
    // still has elsewhere (copy.html) is copied there, the removed file's content is sent again.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(to.join("index.html"), b"hacked").unwrap();
    std::fs::remove_file(to.join("assets/app.1.js")).unwrap();
    let s = step(&site.deploy(&sha(4)).success());
    assert_drift(&s, "2 path(s) added, edited or removed");
    assert_eq!(s["files_sent"], 1, "only what the host lost: {s}");
    assert_eq!(s["detail"]["replaced_in_place"], 2, "{s}");
    assert_eq!(
        std::fs::read(to.join("index.html")).unwrap(),
        b"<h1>v2</h1>"
    );
    assert_eq!(
        std::fs::read(to.join("assets/app.1.js")).unwrap(),
        b"console.log(1)"
    );
    let s = step(&site.deploy(&sha(5)).success());
    assert_eq!(s["changed"], false, "repaired: {s}");
    assert_eq!(
        std::fs::read(to.join("-new dir/f")).unwrap(),
        b"in a directory whose name starts with a dash"
    );

    // A file turned into a directory by hand is put back as a file.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::remove_file(to.join("bin/run.sh")).unwrap();
    std::fs::create_dir_all(to.join("bin/run.sh/inner")).unwrap();
    open_up(&[&to.join("bin/run.sh")]);
    let s = step(&site.deploy(&sha(5)).success());
    assert!(s["detail"]["drift"].is_string(), "{s}");
    assert!(std::fs::metadata(to.join("bin/run.sh")).unwrap().is_file());
    let s = step(&site.deploy(&sha(5)).success());
    assert_eq!(s["changed"], false, "repaired: {s}");

    // Rollback re-applies an earlier release from the store.
    site.ferry("rollback", &sha(5))
        .args(["--to", first.trim()])
        .run()
        .success();
    check_hostile(&to);
    assert!(!to.join("assets/new file.txt").exists() && !to.join("copy.html").exists());
    assert_eq!(
        nlink(&to.join("index.html")),
        1,
        "re-applied from the store as a copy"
    );
    assert_eq!(
        std::fs::read_to_string(site.root().join("web/.app.ferry/inplace")).unwrap(),
        first
    );
}

/// `rollback --plan` goes to the deploy the real rollback goes to (the ledger's previous one):
/// after a deploy of a new commit that changed no files, both keep the files where they are.
#[test]
fn rollback_plan_picks_the_target_the_rollback_picks() {
    let site = Site::new("rbplan", vec![Sshd::start()], one_step("app", ""));
    let to = site.root().join("app");
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    site.write(b"index.html", b"v2");
    site.deploy(&sha(2)).success();
    let v2 = live_release(&to);
    site.deploy(&sha(3)).success();
    assert_eq!(live_release(&to), v2, "no files changed");
    let plan = site
        .ferry("rollback", &sha(3))
        .args(["--plan", "--json"])
        .run()
        .success();
    assert_eq!(step(&plan)["detail"]["to"], v2.as_str(), "{}", plan.stdout);
    site.ferry("rollback", &sha(3)).run().success();
    assert_eq!(live_release(&to), v2);
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
}

/// In place, a release whose content was lost to a hand edit cannot come back: the rollback, and
/// its plan, say so and change nothing.
#[test]
fn sync_in_place_rollback_plan_knows_what_was_lost() {
    let site = Site::new(
        "lost",
        vec![Sshd::start()],
        one_step("app", ", mode: in-place"),
    );
    site.write(b"a.txt", b"a1");
    site.write(b"b.txt", b"b");
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    std::fs::write(to.join("a.txt"), b"HACKED").unwrap();
    site.write(b"a.txt", b"a2");
    site.deploy(&sha(2)).success();
    for plan in [true, false] {
        let mut cmd = site.ferry("rollback", &sha(2));
        if plan {
            cmd = cmd.arg("--plan");
        }
        let run = cmd.run().failure(1);
        assert!(
            run.all().contains("1 file(s) of release")
                && run.all().contains(
                    "no longer on the host (edited or removed by hand after it was applied): a.txt;"
                ),
            "plan {plan}: {}",
            run.all()
        );
        assert_eq!(std::fs::read(to.join("a.txt")).unwrap(), b"a2");
    }
}

/// Let the BusyBox host's own user write in directories the test made.
fn open_up(dirs: &[&Path]) {
    for d in dirs {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn sync_in_place_on_coreutils_host() {
    in_place_lifecycle(false);
}

#[test]
fn sync_in_place_on_busybox_host() {
    in_place_lifecycle(true);
}

/// `delete: false` keeps files the host has that the build does not; a symlinked target is refused.
#[test]
fn sync_in_place_keeps_extras_and_refuses_a_link() {
    let site = one_host_site(
        "inplace-keep",
        true,
        "app",
        ", mode: in-place, delete: false",
    );
    site.write(b"index.html", b"v1");
    site.write(b"dropped.txt", b"release one");
    let to = site.root().join("app");
    std::fs::create_dir_all(to.join("uploads")).unwrap();
    std::fs::write(to.join("uploads/user.png"), b"png").unwrap();
    open_up(&[&to, &to.join("uploads")]);
    let first = step(&site.deploy(&sha(1)).success());
    site.write(b"index.html", b"v2");
    std::fs::remove_file(site.src.join("dropped.txt")).unwrap();
    site.deploy(&sha(2)).success();
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
    assert_eq!(std::fs::read(to.join("uploads/user.png")).unwrap(), b"png");
    // A file the build dropped stays (extras are kept); writing into it does not reach the
    // store's copy of release one.
    std::fs::OpenOptions::new()
        .write(true)
        .open(to.join("dropped.txt"))
        .unwrap()
        .write_all(b"HAND")
        .unwrap();
    site.ferry("rollback", &sha(2))
        .args(["--to", first["detail"]["release"].as_str().unwrap()])
        .run()
        .success();
    assert_eq!(
        std::fs::read(to.join("dropped.txt")).unwrap(),
        b"release one"
    );
    site.deploy(&sha(2)).success();
    // A file added by hand later is not drift when extras are kept: a redeploy is a no-op.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(to.join("uploads/later.png"), b"png2").unwrap();
    let s = step(&site.deploy(&sha(2)).success());
    assert_eq!(s["changed"], false, "{s}");
    assert!(s["detail"]["drift"].is_null(), "{s}");
    assert!(to.join("uploads/later.png").exists());

    // Switching to `delete: true` removes the extras on the next deploy, with nothing else new.
    let text = std::fs::read_to_string(&site.pb).unwrap();
    std::fs::write(&site.pb, text.replace("delete: false", "delete: true")).unwrap();
    let s = step(&site.deploy(&sha(2)).success());
    assert!(
        !to.join("uploads").exists() && !to.join("dropped.txt").exists(),
        "{s}"
    );
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");

    let linked = site.root().join("linked");
    std::fs::create_dir_all(site.root().join("elsewhere")).unwrap();
    std::os::unix::fs::symlink("elsewhere", &linked).unwrap();
    let text = std::fs::read_to_string(&site.pb).unwrap();
    std::fs::write(&site.pb, text.replace("to: \"app\"", "to: \"linked\"")).unwrap();
    let run = site.deploy(&sha(3)).failure(1);
    assert!(
        run.all().contains("is a symlink") && run.all().contains("mode: release"),
        "{}",
        run.all()
    );
    assert!(
        std::fs::read_dir(site.root().join("elsewhere"))
            .unwrap()
            .next()
            .is_none()
    );
}

/// In place, `keep: 2` prunes the oldest release and the store drops the content only it named;
/// what the kept releases need stays, and a rollback to one of them sends nothing. `to` is missing
/// at first: the whole tree goes in with one rename.
fn in_place_prunes(busybox: bool) {
    let site = one_host_site("inplace-prune", busybox, "app", ", mode: in-place, keep: 2");
    let objects = || -> Vec<Vec<u8>> {
        let dir = site.root().join(".app.ferry/objects");
        let mut v: Vec<Vec<u8>> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        v.sort();
        v
    };
    let mut releases = Vec::new();
    for (n, content) in [b"v1", b"v2", b"v3"].iter().enumerate() {
        site.write(b"index.html", *content);
        site.write(b"same.txt", b"unchanged");
        let s = step(&site.deploy(&sha(n as u8 + 1)).success());
        releases.push(s["detail"]["release"].as_str().unwrap().to_string());
    }
    assert_eq!(
        objects(),
        [b"v2".to_vec()],
        "v1 left with its release; v3 and same.txt live only in `to`"
    );
    assert_trash_emptied(&site.root().join(".app.ferry"));
    let left: Vec<_> = std::fs::read_dir(site.root().join(".app.ferry/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    let r = site
        .ferry("rollback", &sha(3))
        .args(["--json"])
        .run()
        .success();
    assert!(r.stdout.contains(&releases[1]), "{}", r.all());
    let to = site.root().join("app");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
    assert_eq!(
        objects(),
        [b"v2".to_vec(), b"v3".to_vec()],
        "v3 kept for a redeploy"
    );
    let s = step(&site.deploy(&sha(3)).success());
    assert_eq!(s["files_sent"], 0, "v3 is back from the store: {s}");
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v3");
}

#[test]
fn sync_in_place_prunes_the_store() {
    in_place_prunes(false);
}

#[test]
fn sync_in_place_prunes_the_store_on_busybox_host() {
    in_place_prunes(true);
}

/// In place, `to` a mount point (another filesystem than its store beside it): content that leaves
/// it is copied into the store, and a rollback copies it back; nothing is linked across.
#[test]
fn sync_in_place_to_on_another_filesystem() {
    let site = Site::new(
        "inplace-xdev",
        vec![Sshd::start()],
        one_step("app", ", mode: in-place"),
    );
    let to = site.root().join("app");
    std::fs::create_dir_all(&to).unwrap();
    let _guard = tmpfs(&to);
    site.write(b"index.html", b"v1");
    site.write(b"old.js", b"old");
    site.write(b"dup.js", b"old");
    let first = step(&site.deploy(&sha(1)).success());
    site.write(b"index.html", b"v2");
    std::fs::remove_file(site.src.join("old.js")).unwrap();
    std::fs::remove_file(site.src.join("dup.js")).unwrap();
    site.write(b"new.js", b"old");
    let s = step(&site.deploy(&sha(2)).success());
    assert_eq!(
        s["files_sent"], 1,
        "new.js is old.js's content, copied on the host: {s}"
    );
    assert_eq!(std::fs::read(to.join("new.js")).unwrap(), b"old");
    assert!(!to.join("old.js").exists());
    site.ferry("rollback", &sha(2))
        .args(["--to", first["detail"]["release"].as_str().unwrap()])
        .run()
        .success();
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v1");
    assert_eq!(std::fs::read(to.join("old.js")).unwrap(), b"old");
    assert_eq!(std::fs::read(to.join("dup.js")).unwrap(), b"old");
    assert!(!to.join("new.js").exists());
}

/// In-place: a controller killed mid-stream leaves the directory as it was (nothing is applied
/// before the whole stream has arrived); the next deploy completes it.
#[test]
fn sync_in_place_survives_controller_killed() {
    let site = Site::new(
        "inplace-cut",
        vec![Sshd::start()],
        one_step("app", ", mode: in-place"),
    );
    site.write(b"index.html", b"v1");
    site.deploy(&sha(1)).success();
    let to = site.root().join("app");
    big_file(&site, "big.bin", 200, 2);
    site.write(b"index.html", b"v2");
    let run = interrupt_mid_stream(&site, &sha(2), |c| c.kill().unwrap());
    assert_ne!(run.code, 0);
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v1");
    assert!(!to.join("big.bin").exists());
    site.ferry("deploy", &sha(3))
        .args(["--lock-wait", "30s"])
        .run()
        .success();
    assert_eq!(std::fs::read(to.join("index.html")).unwrap(), b"v2");
    assert!(
        std::fs::read(to.join("big.bin")).unwrap()
            == std::fs::read(site.src.join("big.bin")).unwrap(),
        "big.bin arrived whole"
    );
    assert!(!site.root().join(".app.ferry/incoming").exists());
}

/// A first deploy (no store on the host) sends files without hashing them first and hashes them
/// on the way: copies end up as one content (links to one object in release mode, each path
/// its own file in place), big copies are found before sending and sent once, and the next
/// deploy of the same tree is a no-op without drift. Both modes, both host kinds.
fn first_deploy_learns(busybox: bool) {
    for mode in ["", ", mode: in-place"] {
        let site = one_host_site("learn", busybox, "app", mode);
        site.write(b"a.txt", b"same");
        site.write(b"d/b.txt", b"same");
        big_file(&site, "x.bin", 1, 1);
        big_file(&site, "y/x copy.bin", 1, 1);
        big_file(&site, "z.bin", 1, 2);
        // (A tree this small would be hashed before the host answers: hash only when needed.)
        let run = site
            .ferry("deploy", &sha(1))
            .arg("--json")
            .env("FERRY_HASH_AHEAD", "0")
            .run()
            .success();
        let s = step(&run);
        assert_eq!(s["files_sent"], 4, "the big copy once: {s}");
        let wire = s["bytes_sent"].as_u64().unwrap();
        assert!(wire < (2 << 20) + (128 << 10), "{mode}: {wire} bytes");
        let to = site.root().join("app");
        for rel in ["a.txt", "d/b.txt", "x.bin", "y/x copy.bin", "z.bin"] {
            assert_eq!(
                std::fs::read(to.join(rel)).unwrap(),
                std::fs::read(site.src.join(rel)).unwrap(),
                "{mode}: {rel}"
            );
        }
        let shared = |a: &str, b: &str| inode(&to.join(a)) == inode(&to.join(b));
        if mode.is_empty() {
            assert!(shared("a.txt", "d/b.txt") && shared("x.bin", "y/x copy.bin"));
            let objects = std::fs::read_dir(site.root().join(".app.ferry/objects")).unwrap();
            assert_eq!(objects.count(), 3, "one object per content");
        } else {
            assert!(!shared("a.txt", "d/b.txt") && !shared("x.bin", "y/x copy.bin"));
        }
        let s = step(&site.deploy(&sha(2)).success());
        assert_eq!(s["changed"], false, "{mode}: {s}");
        assert_eq!(s["files_sent"], 0);
        assert!(s["detail"]["drift"].is_null(), "{mode}: {s}");
    }
}

#[test]
fn sync_first_deploy_learns_hashes_on_coreutils_host() {
    first_deploy_learns(false);
}

#[test]
fn sync_first_deploy_learns_hashes_on_busybox_host() {
    first_deploy_learns(true);
}

/// Big files that do not compress travel in the stream's plain part, ahead of the gzip'd tar,
/// and in a bulk transfer (64 MiB or more) all big files do, unless `compress: all`: both modes on
/// both host kinds, into a missing `to` and then as an update, with a duplicate and an odd name.
fn plain_part(busybox: bool) {
    for mode in ["", ", mode: in-place, compress: all"] {
        let site = one_host_site("plain", busybox, "web/app", mode);
        let to = site.root().join("web/app");
        let same = |rel: &str| {
            std::fs::read(to.join(rel)).unwrap() == std::fs::read(site.src.join(rel)).unwrap()
        };
        big_file(&site, "img/a b\nc.png", 1, 1);
        big_file(&site, "copy.png", 1, 1);
        site.write(b"index.html", b"<h1>v1</h1>");
        site.write(b"app.js", "let x = 1;\n".repeat(20_000).as_bytes());
        let s = step(&site.deploy(&sha(1)).success());
        assert_eq!(
            s["files_sent"], 3,
            "the noise once, app.js, index.html: {s}"
        );
        let wire = s["bytes_sent"].as_u64().unwrap();
        assert!(
            wire < (1 << 20) + (72 << 10),
            "app.js compressed: {wire} bytes"
        );
        for rel in ["img/a b\nc.png", "copy.png", "index.html", "app.js"] {
            assert!(same(rel), "{mode}: {rel}");
        }

        // A bulk transfer: text goes as it is unless `compress: all`.
        big_file(&site, "img/a b\nc.png", 1, 2);
        site.write(b"bulk.js", "let y = 2;\n".repeat(7_000_000).as_bytes());
        let s = step(&site.deploy(&sha(2)).success());
        assert_eq!(s["files_sent"], 2, "{s}");
        let wire = s["bytes_sent"].as_u64().unwrap();
        if mode.contains("compress: all") {
            assert!(wire < 3 << 20, "bulk.js compressed: {wire} bytes");
        } else {
            assert!(wire > 77_000_000, "bulk.js as it is: {wire} bytes");
        }
        for rel in ["img/a b\nc.png", "copy.png", "bulk.js"] {
            assert!(same(rel), "{mode}: {rel}");
        }

        // One small file that does not compress costs about its size, not a 64 KiB block.
        let mut x = 0x9e37_79b9_u32;
        let noise: Vec<u8> = (0..600)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        site.write(b"favicon.ico", &noise);
        let s = step(&site.deploy(&sha(3)).success());
        assert_eq!(s["files_sent"], 1, "{s}");
        let wire = s["bytes_sent"].as_u64().unwrap();
        assert!(wire < 16 << 10, "{mode}: one favicon in {wire} bytes");
        assert!(same("favicon.ico"), "{mode}");
        if !mode.is_empty() {
            for rel in ["img/a b\nc.png", "copy.png"] {
                let md = std::fs::metadata(to.join(rel)).unwrap();
                assert_eq!(std::os::unix::fs::MetadataExt::nlink(&md), 1, "{rel}");
            }
            assert!(!to.join(".ferry-incoming").exists());
        }
        assert!(!site.root().join("web/.app.ferry/incoming").exists());
    }
}

#[test]
fn sync_sends_big_files_plain_on_coreutils_host() {
    plain_part(false);
}

#[test]
fn sync_sends_big_files_plain_on_busybox_host() {
    plain_part(true);
}

/// The same files (paths and content) under `a` and `b`; in-place staging left nothing behind.
fn assert_same_tree(a: &Path, b: &Path) {
    let rel = |d: &Path| {
        let mut v: Vec<PathBuf> = walk(d)
            .into_iter()
            .map(|p| p.strip_prefix(d).unwrap().to_path_buf())
            .collect();
        v.sort();
        v
    };
    assert_eq!(rel(a), rel(b));
    for p in rel(a) {
        if std::fs::symlink_metadata(a.join(&p)).unwrap().is_file() {
            assert_eq!(
                std::fs::read(a.join(&p)).unwrap(),
                std::fs::read(b.join(&p)).unwrap(),
                "{}",
                p.display()
            );
        }
    }
}

/// A controller keeps the manifests it sent: redeploying over a release it made, the host does
/// not send the live manifest back. Another controller's release, or a kept file whose content
/// no longer matches its name, makes the host send it as before. Hand edits are still found
/// (release mode: the edited object is re-sent), and removed files still go.
fn kept_manifests(busybox: bool) {
    for mode in ["", ", mode: in-place"] {
        let site = one_host_site("kept", busybox, "app", mode);
        let to = site.root().join("app");
        let (ours, theirs) = (site.dir.join("ours"), site.dir.join("theirs"));
        let deploy = |home: &Path, n: u8| {
            let run = site
                .ferry("deploy", &sha(n))
                .arg("--json")
                .env("HOME", home)
                .env("FERRY_LOG", "ferry=debug")
                .run()
                .success();
            let kept = run.stderr.contains("the live manifest was kept here");
            (step(&run), kept)
        };
        site.write(b"a.txt", b"one");
        site.write(b"b.txt", b"two");
        site.write(b"c/d.txt", b"three");
        let (_, kept) = deploy(&ours, 1);
        assert!(!kept, "{mode}: a first deploy has nothing live");
        std::fs::remove_file(site.src.join("b.txt")).unwrap();
        site.write(b"a.txt", b"one, changed");
        site.write(b"e.txt", b"new");
        let (s, kept) = deploy(&ours, 2);
        assert!(kept, "{mode}: our own release: {s}");
        assert_eq!(s["files_sent"], 2, "{mode}: {s}");
        assert_same_tree(&site.src, &to);

        // Another controller deploys; ours does not know that release.
        std::fs::remove_dir_all(site.src.join("c")).unwrap();
        let (_, kept) = deploy(&theirs, 3);
        assert!(!kept, "{mode}: a fresh controller");
        site.write(b"f.txt", b"four");
        let (s, kept) = deploy(&ours, 4);
        assert!(!kept, "{mode}: their release: {s}");
        assert_same_tree(&site.src, &to);

        // A kept manifest whose content does not match its name is ignored.
        let dir = ours.join(".cache/ferry/manifests");
        let live: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        for f in &live {
            std::fs::write(f, b"ferry-manifest 1\n").unwrap();
        }
        site.write(b"g.txt", b"five");
        let (s, kept) = deploy(&ours, 5);
        assert!(!kept, "{mode}: a damaged cache: {s}");
        assert_same_tree(&site.src, &to);

        // A hand edit on the host, then a change: the kept manifest names what was edited.
        std::thread::sleep(Duration::from_millis(1100));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(to.join("a.txt"))
            .unwrap();
        f.write_all(b"hacked").unwrap();
        drop(f);
        site.write(b"h.txt", b"six");
        let (s, kept) = deploy(&ours, 6);
        assert!(kept, "{mode}: {s}");
        assert!(!s["detail"]["drift"].is_null(), "{mode}: {s}");
        assert_same_tree(&site.src, &to);
    }
}

#[test]
fn sync_redeploys_with_the_manifest_it_kept() {
    kept_manifests(false);
}

#[test]
fn sync_redeploys_with_the_manifest_it_kept_on_busybox_host() {
    kept_manifests(true);
}

/// A ledger that cannot be appended to fails the deploy (status and rollback would not know it),
/// though its switch stands; the lock (released by the same exec) is gone, so the next deploy runs
/// and is recorded.
#[test]
fn sync_ledger_failure_fails_and_unlocks() {
    let site = Site::new("ledger", vec![Sshd::start()], one_step("app", ""));
    site.write(b"index.html", b"v1");
    let state = site.root().join(".ferry");
    std::fs::create_dir_all(state.join("ledger.jsonl")).unwrap();
    let run = site.deploy(&sha(1)).failure(1);
    assert!(
        run.stderr.contains("cannot record the deploy in") && run.stderr.contains("ledger.jsonl"),
        "{}",
        run.stderr
    );
    assert_eq!(
        std::fs::read_dir(state.join("locks")).unwrap().count(),
        0,
        "the lock is released"
    );
    std::fs::remove_dir(state.join("ledger.jsonl")).unwrap();
    site.write(b"index.html", b"v2");
    let run = site.deploy(&sha(2)).success();
    assert!(!run.stderr.contains("cannot record"), "{}", run.stderr);
    let ledger = std::fs::read_to_string(state.join("ledger.jsonl")).unwrap();
    assert_eq!(ledger.lines().count(), 1, "{ledger}");
    assert!(ledger.contains(&sha(2)), "{ledger}");
}

/// A first in-place deploy onto a filled `to` (adopted) whose apply stops part-way (a directory
/// the login may not write to) stores nothing of `to` (there is no earlier release to apply
/// again), so no object shares an inode with a file in `to`, where a hand edit would change it
/// unseen; the next deploy, which keeps one of those files, finishes the job.
#[test]
fn sync_in_place_cut_first_apply_leaves_no_shared_objects() {
    let site = one_host_site(
        "inplace-first-apply",
        true,
        "app",
        ", mode: in-place, adopt: true",
    );
    let to = site.root().join("app");
    std::fs::create_dir_all(to.join("locked")).unwrap();
    std::fs::write(to.join("old.txt"), b"old").unwrap();
    std::fs::write(to.join("locked/x.txt"), b"x").unwrap();
    open_up(&[&to]);
    std::fs::set_permissions(to.join("locked"), std::fs::Permissions::from_mode(0o555)).unwrap();
    site.write(b"index.html", b"v1");
    site.write(b"locked/x.txt", b"new x");
    let run = site.deploy(&sha(1));
    assert_ne!(
        run.code, 0,
        "the apply cannot write in `locked`: {}",
        run.stderr
    );
    // The build now ships old.txt as it is in `to`, and `locked` is opened up.
    site.write(b"old.txt", b"old");
    std::fs::set_permissions(to.join("locked"), std::fs::Permissions::from_mode(0o777)).unwrap();
    site.deploy(&sha(2)).success();
    assert_same_tree(&site.src, &to);
    for e in std::fs::read_dir(site.root().join(".app.ferry/objects")).unwrap() {
        let md = e.unwrap().metadata().unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::nlink(&md),
            1,
            "an object shares its inode with a file in `to`"
        );
    }
}
