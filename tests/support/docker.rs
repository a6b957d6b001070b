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

/// Start (once) the engine and the registry, and log the local CLI in for the harness's pushes.
pub fn engine() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/env/docker.sh");
        run_ok(Command::new("bash").arg(script));
        login();
    });
}

fn login() {
    use std::io::Write;
    let mut child = Command::new("docker")
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

/// A name unique to this test run, for repositories and containers: `ferry-t<pid>-<tag>`.
pub fn unique(tag: &str) -> String {
    format!("ferry-t{}-{tag}", std::process::id())
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
    docker(&[
        "import",
        "--change",
        r#"CMD ["/bin/sh", "-c", "echo serving $(cat /www/version); trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait"]"#,
        tar.to_str().unwrap(),
        name,
    ])
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

/// GET http://127.0.0.1:PORT/PATH from the test machine: the body, or None.
pub fn http_get(port: u16, path: &str) -> Option<String> {
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

/// Removes the named containers when a test ends, pass or fail.
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            remove_containers(p);
        }
    }
}
