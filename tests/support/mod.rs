//! Test harness: real OpenSSH `sshd` target hosts on loopback ports, client keys of every kind, and
//! a wrapper that runs the real `ferry` binary with a clean environment.

#![allow(dead_code)]

pub mod gitlab_stub;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A fresh temp directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("ferry-test-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("FERRY_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A client key pair made with ssh-keygen.
pub struct ClientKey {
    pub private: PathBuf,
    pub public: String,
}

/// Generate a client key: `kind` is ed25519, ecdsa or rsa; `pem` picks the PEM format.
pub fn client_key(dir: &Path, kind: &str, pem: bool, passphrase: &str) -> ClientKey {
    let name = format!(
        "id_{kind}{}{}",
        if pem { "_pem" } else { "" },
        if passphrase.is_empty() { "" } else { "_enc" }
    );
    let private = dir.join(&name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", "ferry-test", "-f"])
        .arg(&private);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    if pem {
        cmd.args(["-m", "PEM"]);
    }
    run_ok(&mut cmd);
    let public = std::fs::read_to_string(private.with_extension("pub"))
        .unwrap_or_else(|_| std::fs::read_to_string(format!("{}.pub", private.display())).unwrap());
    ClientKey { private, public }
}

/// The default client key shared by most tests (ed25519, OpenSSH format).
pub fn default_key() -> &'static ClientKey {
    static KEY: OnceLock<(TempDirStatic, ClientKey)> = OnceLock::new();
    &KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("ferry-test-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = client_key(&dir, "ed25519", false, "");
        (TempDirStatic(dir), key)
    })
    .1
}

pub struct TempDirStatic(PathBuf);

pub fn free_port() -> u16 {
    // From 20000-29999, below Linux's ephemeral range (32768-60999): a port the kernel hands out
    // to an outgoing connection, or to another bind to port 0, cannot be one of these.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % 10_000;
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + ((start + n) % 10_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Options for a test sshd.
#[derive(Default, Clone)]
pub struct SshdOptions {
    /// Extra authorized public keys (the default key is always authorized).
    pub authorized: Vec<String>,
    /// Run commands under BusyBox `sh` with only BusyBox applets on PATH.
    pub busybox: bool,
    /// Extra sshd_config lines.
    pub extra_config: Vec<String>,
    /// Directories this host sees as its own empty tmpfs (a private mount namespace), so that two
    /// test hosts on one machine can both deploy to `/var/www/shop` like two real servers.
    pub private_dirs: Vec<&'static str>,
}

/// For a host that writes down every command line it runs (sshd logs none) into the returned log:
/// the `ForceCommand` line for [`SshdOptions::extra_config`] and its wrapper, made under `dir`
/// (which the host's login must be able to read).
pub fn logging_commands(dir: &Path) -> (String, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let log = dir.join("commands.log");
    let wrapper = dir.join("log-commands");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$SSH_ORIGINAL_COMMAND\" >> '{}'\nexec sh -c \"$SSH_ORIGINAL_COMMAND\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666)).unwrap();
    (format!("ForceCommand {}", wrapper.display()), log)
}

/// BusyBox applets only, as on a minimal host: the busybox test user's shell and PATH.
pub const BUSYBOX_DIR: &str = "/usr/local/lib/ferry-test-busybox";
/// A user whose login shell is BusyBox `sh` and whose PATH has only BusyBox applets.
pub const BUSYBOX_USER: &str = "ferrybb";

/// Create the BusyBox applet directory and the BusyBox user (idempotent; tests run as root).
pub fn busybox_user() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        std::fs::create_dir_all(BUSYBOX_DIR).unwrap();
        let list = run_ok(Command::new("busybox").arg("--list"));
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let _ = std::os::unix::fs::symlink("/bin/busybox", Path::new(BUSYBOX_DIR).join(applet));
        }
        ensure_user(
            BUSYBOX_USER,
            &["-d", "/tmp", "-s", &format!("{BUSYBOX_DIR}/sh")],
        );
    });
}

/// The login of ordinary test hosts: a second uid-0 user whose shell is `/bin/sh` with no rc
/// files, so that the test machine's own root dotfiles (a `.bashrc` that runs `pyenv rehash` under
/// a lock, say) neither slow down nor hang the hosts' sessions.
pub const ROOT_USER: &str = "ferryroot";
/// [`ROOT_USER`]'s home: its `docker` CLI keeps its registry logins there.
pub const ROOT_HOME: &str = "/var/lib/ferry-test-root";

/// Create [`ROOT_USER`] (idempotent; tests run as root).
pub fn root_user() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        std::fs::create_dir_all(ROOT_HOME).unwrap();
        ensure_user(
            ROOT_USER,
            &["-o", "-u", "0", "-g", "0", "-d", ROOT_HOME, "-s", "/bin/sh"],
        );
    });
}

/// Create a login user with `useradd ARGS` unless it exists, and let it log in with keys only.
fn ensure_user(name: &str, useradd: &[&str]) {
    let exists = Command::new("id")
        .arg(name)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    if !exists {
        run_ok(Command::new("useradd").arg("-M").args(useradd).arg(name));
    }
    // A `!` password means "locked" to sshd without PAM; `*` means "no password, keys only".
    run_ok(Command::new("usermod").args(["-p", "*", name]));
}

/// A real OpenSSH server on a loopback port.
pub struct Sshd {
    pub port: u16,
    /// The login user: [`ROOT_USER`], or [`BUSYBOX_USER`].
    pub user: &'static str,
    pub dir: TempDir,
    pub host_pub: String,
    child: Child,
}

impl Sshd {
    pub fn start() -> Sshd {
        Sshd::start_with(SshdOptions::default())
    }

    pub fn start_with(opts: SshdOptions) -> Sshd {
        std::fs::create_dir_all("/run/sshd").ok();
        let dir = TempDir::new("sshd");
        let hostkey = dir.join("host_ed25519");
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&hostkey),
        );
        let host_pub = std::fs::read_to_string(dir.join("host_ed25519.pub"))
            .unwrap()
            .trim()
            .to_string();
        let mut authorized = vec![default_key().public.trim().to_string()];
        authorized.extend(opts.authorized.iter().map(|s| s.trim().to_string()));
        std::fs::write(dir.join("authorized_keys"), authorized.join("\n") + "\n").unwrap();
        let mut extra = opts.extra_config.clone();
        root_user();
        if opts.busybox {
            busybox_user();
            extra.push(format!("SetEnv PATH={BUSYBOX_DIR}"));
        }
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port();
            let config = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile {pid}\n\
                 StrictModes no\nUsePAM no\nPermitRootLogin yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nAllowTcpForwarding yes\nMaxStartups 100\nLogLevel DEBUG1\n{extra}\n",
                hk = hostkey.display(),
                ak = dir.join("authorized_keys").display(),
                pid = dir.join("sshd.pid").display(),
                extra = extra.join("\n"),
            );
            std::fs::write(dir.join("sshd_config"), config).unwrap();
            let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
            // `unshare` and `sh` exec, so the child's pid is sshd's and /proc/PID/root its view.
            let mut cmd = Command::new("/usr/sbin/sshd");
            if !opts.private_dirs.is_empty() {
                cmd = Command::new("unshare");
                cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"for d in $FERRY_PRIVATE_DIRS; do mkdir -p "$d" && mount -t tmpfs ferry-test "$d" || exit 1; done; exec /usr/sbin/sshd "$@""#)
                    .arg("sh")
                    .env("FERRY_PRIVATE_DIRS", opts.private_dirs.join(" "));
            }
            cmd.arg("-D");
            let child = cmd
                .arg("-f")
                .arg(dir.join("sshd_config"))
                .arg("-E")
                .arg(dir.join("sshd.log"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start /usr/sbin/sshd (apt-get install openssh-server)");
            let mut child = child;
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                // Ours is listening (not some other process that took the port meanwhile).
                let listening = std::fs::read_to_string(dir.join("sshd.log")).is_ok_and(|l| {
                    l.contains(&format!("Server listening on 127.0.0.1 port {port}"))
                });
                if listening
                    && matches!(child.try_wait(), Ok(None))
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    return Sshd {
                        port,
                        user: if opts.busybox {
                            BUSYBOX_USER
                        } else {
                            ROOT_USER
                        },
                        dir,
                        host_pub,
                        child,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            last_err = std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
        }
        panic!("sshd did not start: {last_err}");
    }

    /// The known_hosts line for this server.
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}\n", self.port, self.host_pub)
    }

    pub fn address(&self) -> String {
        format!("{}@127.0.0.1:{}", self.user, self.port)
    }

    /// `path` as this host sees it (through its mount namespace when it has private dirs).
    pub fn fs(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.child.id()))
    }

    /// The sshd listener's process id (tests cut connections by killing its descendants).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port that accepts connections and never speaks: a host that hangs.
pub struct Silent {
    pub port: u16,
    _listener: TcpListener,
}

impl Silent {
    pub fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Silent {
            port: listener.local_addr().unwrap().port(),
            _listener: listener,
        }
    }
}

/// The real ferry binary with a clean, controlled environment.
pub struct Ferry {
    cmd: Command,
    pub home: TempDir,
}

impl Ferry {
    pub fn new() -> Ferry {
        let home = TempDir::new("home");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().to_string();
            if k.starts_with("SSH_")
                || k.starts_with("CI_")
                || k.starts_with("GITLAB")
                || k.starts_with("FERRY_")
            {
                cmd.env_remove(&k);
            }
        }
        cmd.env("HOME", home.path())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        Ferry { cmd, home }
    }

    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Ferry {
        self.cmd.arg(a);
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(mut self, a: I) -> Ferry {
        self.cmd.args(a);
        self
    }

    pub fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Ferry {
        self.cmd.env(k, v);
        self
    }

    pub fn current_dir(mut self, d: &Path) -> Ferry {
        self.cmd.current_dir(d);
        self
    }

    /// Use the default test key via SSH_PRIVATE_KEY and trust `hosts` via SSH_KNOWN_HOSTS.
    pub fn trusting(self, hosts: &[&Sshd]) -> Ferry {
        let kh: String = hosts.iter().map(|h| h.known_hosts_line()).collect();
        self.env(
            "SSH_PRIVATE_KEY",
            std::fs::read_to_string(&default_key().private).unwrap(),
        )
        .env("SSH_KNOWN_HOSTS", kh)
    }

    /// Start ferry without waiting, output piped: for tests that interrupt a run.
    pub fn spawn(self) -> (Child, TempDir) {
        let Ferry { mut cmd, home } = self;
        let child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferry");
        (child, home)
    }

    pub fn run(mut self) -> Run {
        let out = self.cmd.output().expect("run ferry");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout_bytes: out.stdout,
        }
    }
}

/// A finished ferry run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub stdout_bytes: Vec<u8>,
}

impl Run {
    pub fn success(self) -> Run {
        assert_eq!(
            self.code, 0,
            "ferry failed\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    pub fn failure(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// stdout and stderr together, for "appears nowhere" checks.
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Write a playbook with one environment `test` over `hosts`, plus `extra` YAML appended under the
/// environment (indented by 4) — e.g. steps.
pub fn playbook(dir: &TempDir, name: &str, hosts: &[String], env_extra: &str) -> PathBuf {
    let hosts_yaml: String = hosts.iter().map(|h| format!("      - \"{h}\"\n")).collect();
    let text = format!(
        "app: testapp\nenvironments:\n  test:\n    root: {root}\n    hosts:\n{hosts_yaml}{env_extra}",
        root = dir.join("root").display()
    );
    dir.write(name, text)
}
pub mod docker;

/// Whether process `pid` is gone (or only a zombie waiting to be reaped).
pub fn gone(pid: &str) -> bool {
    assert!(pid.parse::<u32>().is_ok(), "not a pid: {pid:?}");
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z')),
    }
}

/// Every process below `parent` (sshd's monitor, session and shell processes of each connection).
pub fn pids_of_children(parent: u32) -> Vec<u32> {
    let out = std::process::Command::new("ps")
        .args(["-o", "pid=", "--ppid", &parent.to_string()])
        .output()
        .unwrap();
    let direct: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    let mut all = direct.clone();
    for p in direct {
        all.extend(pids_of_children(p));
    }
    all
}
