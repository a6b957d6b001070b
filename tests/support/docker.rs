//! Docker harness: a real dockerd and docker-registry (started once per test run by
//! tests/env/docker.sh if they are not already running), and small test images made with
//! `docker import` from a rootfs of Debian's busybox-static, since nothing can be pulled from the
//! internet. Test hosts are real sshd on this machine, so their `docker` is this engine.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::{TempDir, run_ok};

pub const REGISTRY: &str = "127.0.0.1:5000";
pub const REGISTRY_USER: &str = "ferry";
/// Test-only credentials, set by tests/env/docker.sh.
pub const REGISTRY_PASSWORD: &str = "ferry-registry-secret";

/// Start (once) the engine and the registry, and log the local CLI in for the harness's pushes,
/// and the test hosts' login user ([`super::ROOT_USER`]) for their pulls, as an admin would have
/// done once on a deploy host. (Tests of `docker_login` log in again themselves; without this,
/// the pulls of tests without that step depended on another test having run first.)
pub fn engine() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/env/docker.sh");
        run_ok(Command::new("bash").arg(script));
        login(None);
        login(Some(&Path::new(super::ROOT_HOME).join(".docker")));
    });
}

/// `docker login` to the test registry, into the CLI config directory `config` (default: ours).
fn login(config: Option<&Path>) {
    use std::io::Write;
    let mut cmd = Command::new("docker");
    if let Some(dir) = config {
        std::fs::create_dir_all(dir).unwrap();
        cmd.env("DOCKER_CONFIG", dir);
    }
    let mut child = cmd
        .args([
            "login",
            "--username",
            REGISTRY_USER,
            "--password-stdin",
            REGISTRY,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker CLI");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(REGISTRY_PASSWORD.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "docker login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `docker ARGS` on the local engine; stdout.
pub fn docker(args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok(Command::new("docker").args(args)).stdout)
        .trim()
        .to_string()
}

/// `docker ARGS`, success or not: (ok, stdout+stderr).
pub fn docker_try(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A name unique to this call, for repositories and containers: `ferry-t<pid>x<n>-<tag>`. No
/// result contains another (the counter ends at `-`), so cleanup by name never reaches another
/// test's things, whatever the tags.
pub fn unique(tag: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}{n}-{tag}", process_marker())
}

/// What every [`unique`] name of this process starts with.
fn process_marker() -> String {
    format!("ferry-t{}x", std::process::id())
}

/// Import an image from a busybox-static rootfs whose `httpd` serves `/www` on port 8080.
/// `version` is served at `/version`; `healthy` decides whether `/health` exists (404 otherwise).
/// Returns the image id.
pub fn app_image(name: &str, version: &str, healthy: bool) -> String {
    engine();
    let dir = TempDir::new("rootfs");
    let root = dir.join("root");
    for d in ["bin", "www", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static at /bin/busybox");
    for applet in ["sh", "httpd", "sleep", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("www/version"), format!("{version}\n")).unwrap();
    if healthy {
        std::fs::write(root.join("www/health"), "ok\n").unwrap();
    }
    // A marker file makes every import a distinct image, even for equal content.
    std::fs::write(
        root.join("www/image"),
        format!("{name} {version} {healthy}\n"),
    )
    .unwrap();
    let tar = dir.join("rootfs.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    // sh as PID 1 with a TERM trap, so `docker stop` is quick (PID 1 ignores default signals).
    let id = docker(&[
        "import",
        "--change",
        r#"CMD ["/bin/sh", "-c", "echo serving $(cat /www/version); trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait"]"#,
        tar.to_str().unwrap(),
        name,
    ]);
    MADE.lock().unwrap().push((name.to_string(), id.clone()));
    id
}

/// [`app_image`] pushed to the test registry as `REGISTRY/<repo>:<tag>`; returns that reference.
pub fn pushed_image(repo: &str, tag: &str, version: &str, healthy: bool) -> String {
    let reference = format!("{REGISTRY}/{repo}:{tag}");
    app_image(&reference, version, healthy);
    let (ok, out) = docker_try(&["push", &reference]);
    assert!(ok, "push {reference}: {out}");
    reference
}

/// Remove every container whose name starts with `prefix` (test cleanup).
pub fn remove_containers(prefix: &str) {
    let names = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("name={prefix}"),
        "--format",
        "{{.Names}}",
    ]);
    for n in names.lines().filter(|n| n.starts_with(prefix)) {
        let _ = docker_try(&["rm", "-f", n]);
    }
}

/// GET http://127.0.0.1:PORT/PATH from the test machine: the body of a 200 answer, or None after
/// 15 s without one. (A container ferry put back is started, not waited for: its server may take
/// a moment to listen.)
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(body) = http_get_once(port, path) {
            return Some(body);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn http_get_once(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    if !buf.starts_with("HTTP/1.0 200") && !buf.starts_with("HTTP/1.1 200") {
        return None;
    }
    buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Image ids made by [`app_image`], with the name they were made under (for cleanup by id, since a
/// moved tag leaves a `<none>` image behind).
static MADE: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Remove every local image whose repository contains `prefix`, and every image [`app_image`] made
/// under such a name (test cleanup).
pub fn remove_images(prefix: &str) {
    let rows = docker(&[
        "images",
        "--no-trunc",
        "--format",
        "{{.ID}} {{.Repository}}",
    ]);
    let mut mine: Vec<String> = rows
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, repo)| repo.contains(prefix))
        .map(|(id, _)| id.to_string())
        .collect();
    mine.extend(
        MADE.lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| name.contains(prefix))
            .map(|(_, id)| id.clone()),
    );
    mine.sort();
    mine.dedup();
    if !mine.is_empty() {
        let mut args = vec!["rmi", "--force"];
        args.extend(mine.iter().map(String::as_str));
        let _ = docker_try(&args);
    }
}

/// Removes the containers named with these prefixes when a test ends, pass or fail, and the images
/// too for prefixes made by [`unique`] (other images may be shared by concurrent tests).
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            remove_containers(p);
            if p.starts_with(&process_marker()) {
                remove_images(p);
            }
        }
    }
}

/// The docker CLI's absolute path (a BusyBox host's PATH has only BusyBox applets).
pub fn docker_path() -> String {
    let out = run_ok(Command::new("sh").args(["-c", "command -v docker"]));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Let the BusyBox test user use the engine (the socket's group), as a deploy user would be.
pub fn busybox_docker_user() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        engine();
        super::busybox_user();
        run_ok(Command::new("usermod").args(["-aG", "docker", super::BUSYBOX_USER]));
    });
}
