//! The foundation: keys, host keys, connections, `ferry check` and `ferry exec` against real sshd.

use std::os::unix::ffi::OsStrExt;

use base64::Engine;

use crate::support::*;

fn env_pb(dir: &TempDir, hosts: &[String]) -> std::path::PathBuf {
    playbook(dir, "ferry.yml", hosts, "")
}

/// `--limit` over every environment (check, status) covers those it keeps a host of; one that
/// keeps none anywhere is a usage error.
#[test]
fn limit_across_environments_skips_those_without_the_host() {
    let (a, b) = (Sshd::start(), Sshd::start());
    let dir = TempDir::new("limitenvs");
    let root = dir.join("root").display().to_string();
    let pb = dir.write(
        "ferry.yml",
        format!(
            "app: testapp\nenvironments:\n  one:\n    root: {root}/one\n    hosts: [\"{}\"]\n  \
             two:\n    root: {root}/two\n    hosts: [\"{}\"]\n",
            a.address(),
            b.address()
        ),
    );
    for cmd in ["check", "status"] {
        let run = Ferry::new()
            .trusting(&[&a, &b])
            .args([cmd, "--limit", &b.address()])
            .arg(&pb)
            .run();
        assert_eq!(run.code, 0, "{cmd}: {}", run.all());
        if cmd == "check" {
            assert!(run.stdout.contains(&b.address()), "{}", run.all());
            assert!(!run.stdout.contains(&a.address()), "{}", run.all());
        }
    }
    let run = Ferry::new()
        .trusting(&[&a, &b])
        .args(["check", "--limit", "nohost"])
        .arg(&pb)
        .run()
        .failure(2);
    assert!(
        run.all()
            .contains("no host of any environment matches --limit nohost"),
        "{}",
        run.all()
    );
}

#[test]
fn check_shows_table_for_a_reachable_host() {
    let host = Sshd::start();
    let dir = TempDir::new("check");
    let pb = env_pb(&dir, &[host.address()]);
    let run = Ferry::new()
        .trusting(&[&host])
        .arg("check")
        .arg(&pb)
        .args(["--env", "test"])
        .run()
        .success();
    assert!(run.stdout.starts_with("HOST"), "{}", run.stdout);
    let row = columns(
        run.stdout
            .lines()
            .find(|l| l.starts_with(&host.address()))
            .expect(&run.stdout),
    );
    assert_eq!(&row[1..4], ["yes", "yes", "known"], "{row:?}");
    assert!(row[4].starts_with("Linux"), "{row:?}");
    assert!(row[6].contains(" at "), "free disk column: {row:?}");
}

#[test]
fn check_json_has_the_same_facts() {
    let host = Sshd::start();
    let dir = TempDir::new("checkjson");
    let pb = env_pb(&dir, &[host.address()]);
    let run = Ferry::new()
        .trusting(&[&host])
        .arg("check")
        .arg(&pb)
        .args(["--env", "test", "--json"])
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect(&run.stdout);
    assert_eq!(v[0]["reachable"], true);
    assert_eq!(v[0]["authenticated"], true);
    assert_eq!(v[0]["host_key"], "known");
    assert!(v[0]["free_bytes"].as_u64().unwrap() > 0);
    assert!(v[0]["os"].as_str().unwrap().contains("Linux"));
}

/// Every key format and source authenticates: ed25519, ECDSA and RSA, OpenSSH and PEM, from the
/// variable (plain, CRLF, base64) and from --identity.
#[test]
fn every_key_kind_format_and_source() {
    let keys_dir = TempDir::new("keys");
    let mut keys = Vec::new();
    for (kind, pem) in [
        ("ed25519", false),
        ("ecdsa", false),
        ("ecdsa", true),
        ("rsa", false),
        ("rsa", true),
    ] {
        keys.push(client_key(keys_dir.path(), kind, pem, ""));
    }
    let host = Sshd::start_with(SshdOptions {
        authorized: keys.iter().map(|k| k.public.clone()).collect(),
        ..Default::default()
    });
    let dir = TempDir::new("keykinds");
    let pb = env_pb(&dir, &[host.address()]);
    for key in &keys {
        let text = std::fs::read_to_string(&key.private).unwrap();
        let variants = [
            ("plain", text.clone()),
            (
                "crlf-no-final-newline",
                text.trim_end().replace('\n', "\r\n"),
            ),
            (
                "base64",
                base64::engine::general_purpose::STANDARD.encode(&text),
            ),
        ];
        for (label, value) in variants {
            let run = Ferry::new()
                .env("SSH_PRIVATE_KEY", &value)
                .env("SSH_KNOWN_HOSTS", host.known_hosts_line())
                .args(["exec", "--env", "test"])
                .arg(&pb)
                .args(["--", "echo", "ok"])
                .run();
            assert_eq!(
                run.code,
                0,
                "{} {label}: {}",
                key.private.display(),
                run.stderr
            );
            assert!(
                !run.all().contains(text.lines().nth(1).unwrap()),
                "key text leaked"
            );
        }
        Ferry::new()
            .env("SSH_KNOWN_HOSTS", host.known_hosts_line())
            .args(["exec", "--env", "test", "--identity"])
            .arg(&key.private)
            .arg(&pb)
            .args(["--", "true"])
            .run()
            .success();
    }
}

/// An encrypted PKCS#8 key (`ssh-keygen -m PKCS8`) without its passphrase says so, as the other
/// formats do.
#[test]
fn an_encrypted_pkcs8_key_asks_for_its_passphrase() {
    let dir = TempDir::new("pkcs8");
    let key = dir.join("id_pkcs8");
    run_ok(
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ecdsa", "-m", "PKCS8", "-N", "pw pw", "-f"])
            .arg(&key),
    );
    let pb = env_pb(&dir, &["root@127.0.0.1:1".to_string()]);
    let run = Ferry::new()
        .env("SSH_PRIVATE_KEY", std::fs::read_to_string(&key).unwrap())
        .args(["check", "--env", "test"])
        .arg(&pb)
        .run()
        .failure(2);
    assert!(
        run.stderr
            .contains("is encrypted: set SSH_PRIVATE_KEY_PASSPHRASE"),
        "{}",
        run.stderr
    );
}

#[test]
fn passphrase_protected_key() {
    let keys_dir = TempDir::new("enc");
    let key = client_key(keys_dir.path(), "ed25519", false, "s3cret pass");
    let host = Sshd::start_with(SshdOptions {
        authorized: vec![key.public.clone()],
        ..Default::default()
    });
    let dir = TempDir::new("encpb");
    let pb = env_pb(&dir, &[host.address()]);
    let text = std::fs::read_to_string(&key.private).unwrap();
    let base = || {
        Ferry::new()
            .env("SSH_PRIVATE_KEY", &text)
            .env("SSH_KNOWN_HOSTS", host.known_hosts_line())
            .args(["exec", "--env", "test"])
            .arg(&pb)
            .args(["--", "true"])
    };
    let run = base().run().failure(2);
    assert!(
        run.stderr.contains("SSH_PRIVATE_KEY_PASSPHRASE"),
        "{}",
        run.stderr
    );
    let run = base()
        .env("SSH_PRIVATE_KEY_PASSPHRASE", "hunter2-bad")
        .run()
        .failure(2);
    assert!(run.stderr.contains("passphrase"), "{}", run.stderr);
    assert!(
        !run.all().contains("hunter2-bad"),
        "passphrase leaked: {}",
        run.all()
    );
    base()
        .env("SSH_PRIVATE_KEY_PASSPHRASE", "s3cret pass")
        .run()
        .success();
}

#[test]
fn wrong_key_is_an_auth_error_naming_host_and_user() {
    let host = Sshd::start();
    let keys_dir = TempDir::new("wrong");
    let other = client_key(keys_dir.path(), "ed25519", false, "");
    let dir = TempDir::new("wrongpb");
    let pb = env_pb(&dir, &[host.address()]);
    let run = Ferry::new()
        .env("SSH_KNOWN_HOSTS", host.known_hosts_line())
        .args(["check", "--env", "test", "--identity"])
        .arg(&other.private)
        .arg(&pb)
        .run()
        .failure(1);
    assert!(
        run.stdout
            .contains(&format!("authentication as `{}` failed", host.user)),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("127.0.0.1"), "{}", run.stdout);
}

#[test]
fn host_key_mismatch_is_a_hard_error_with_both_fingerprints() {
    let host = Sshd::start();
    let impostor = Sshd::start();
    let dir = TempDir::new("mismatch");
    let pb = env_pb(&dir, &[host.address()]);
    // known_hosts says the host has the impostor's key.
    let kh = format!("[127.0.0.1]:{} {}\n", host.port, impostor.host_pub);
    let run = Ferry::new()
        .trusting(&[])
        .env("SSH_KNOWN_HOSTS", kh)
        .args(["exec", "--env", "test", "--accept-new"])
        .arg(&pb)
        .args(["--", "touch", "/tmp/ferry-should-not-run"])
        .run()
        .failure(1);
    let fp = |line: &str| {
        let out = run_ok(
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("echo '{line}' | ssh-keygen -lf -")),
        );
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert!(run.stderr.contains("HOST KEY MISMATCH"), "{}", run.stderr);
    assert!(
        run.stderr.contains(&fp(&host.host_pub)),
        "presented fingerprint: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains(&fp(&impostor.host_pub)),
        "expected fingerprint: {}",
        run.stderr
    );
}

/// A host known by its ECDSA or RSA key only (`ssh-keyscan -t rsa`, say) is asked for that key, as
/// OpenSSH does, though it also has an Ed25519 one: no false mismatch.
#[test]
fn a_host_known_by_another_key_type_is_asked_for_that_one() {
    let dir = TempDir::new("keytypes");
    let mut keys = Vec::new();
    for t in ["ecdsa", "rsa"] {
        let path = dir.join(format!("host_{t}"));
        run_ok(
            std::process::Command::new("ssh-keygen")
                .args(["-q", "-t", t, "-N", "", "-f"])
                .arg(&path),
        );
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        keys.push((path, public.trim().to_string()));
    }
    let host = Sshd::start_with(SshdOptions {
        extra_config: keys
            .iter()
            .map(|(p, _)| format!("HostKey {}", p.display()))
            .collect(),
        ..Default::default()
    });
    let pb = env_pb(&dir, &[host.address()]);
    for (_, public) in &keys {
        let kh = format!("[127.0.0.1]:{} {public}\n", host.port);
        let run = Ferry::new()
            .trusting(&[])
            .env("SSH_KNOWN_HOSTS", kh)
            .args(["exec", "--env", "test"])
            .arg(&pb)
            .args(["--", "true"])
            .run();
        assert_eq!(run.code, 0, "{public}: {}", run.all());
    }
}

/// A host with a certificate signed by an authority known_hosts trusts (`@cert-authority`) is
/// accepted without a line of its own; a certificate for another name, or an expired one, is
/// refused with the reason; one from an authority not trusted is judged by its key, as OpenSSH does.
#[test]
fn host_certificates_from_a_trusted_authority_are_accepted() {
    let dir = TempDir::new("hostcert");
    let keygen = |args: &[&str]| {
        run_ok(std::process::Command::new("ssh-keygen").args(args));
    };
    for (ca, kind) in [
        ("ca", "ed25519"),
        ("other-ca", "ed25519"),
        ("rsa-ca", "rsa"),
    ] {
        keygen(&[
            "-q",
            "-t",
            kind,
            "-N",
            "",
            "-f",
            &dir.join(ca).display().to_string(),
        ]);
    }
    let ca_line = |ca: &str| {
        let public = std::fs::read_to_string(dir.join(format!("{ca}.pub"))).unwrap();
        format!("@cert-authority [127.0.0.1]:* {}", public.trim())
    };
    // (principal, validity, signing options): a host with an ECDSA key certified so, beside its
    // plain Ed25519 key.
    let start_signed = |name: &str, principal: &str, validity: &str, ca: &str, sign: &[&str]| {
        let key = dir.join(name).display().to_string();
        keygen(&["-q", "-t", "ecdsa", "-N", "", "-f", &key]);
        let ca = dir.join(ca).display().to_string();
        let public = format!("{key}.pub");
        let mut args = vec!["-q", "-s", &ca];
        args.extend_from_slice(sign);
        args.extend_from_slice(&["-I", name, "-h", "-n", principal, "-V", validity, &public]);
        keygen(&args);
        Sshd::start_with(SshdOptions {
            extra_config: vec![
                format!("HostKey {key}"),
                format!("HostCertificate {key}-cert.pub"),
            ],
            ..Default::default()
        })
    };
    let start = |name: &str, principal: &str, validity: &str| {
        start_signed(name, principal, validity, "ca", &[])
    };
    let good = start("good", "127.0.0.1", "-5m:+1h");
    let sha1 = start_signed("sha1", "127.0.0.1", "-5m:+1h", "rsa-ca", &["-t", "ssh-rsa"]);
    let other_name = start("other", "db.example.com", "-5m:+1h");
    let expired = start("expired", "127.0.0.1", "20200101:20200102");
    let exec = |host: &Sshd, known_hosts: String| {
        let pb = playbook(
            &dir,
            &format!("ferry-{}.yml", host.port),
            &[host.address()],
            "",
        );
        Ferry::new()
            .trusting(&[])
            .env("SSH_KNOWN_HOSTS", known_hosts)
            .args(["exec", "--env", "test"])
            .arg(&pb)
            .args(["--", "true"])
            .run()
    };
    exec(&good, ca_line("ca")).success();
    let pb = playbook(&dir, "ferry-check.yml", &[good.address()], "");
    let run = Ferry::new()
        .trusting(&[])
        .env("SSH_KNOWN_HOSTS", ca_line("ca"))
        .args(["--json", "check", "--env", "test"])
        .arg(&pb)
        .run()
        .success();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v[0]["host_key"], "certified", "{}", run.all());

    let run = exec(&other_name, ca_line("ca")).failure(1);
    assert!(
        run.stderr.contains("is for db.example.com, not 127.0.0.1"),
        "{}",
        run.all()
    );
    let run = exec(&expired, ca_line("ca")).failure(1);
    assert!(
        run.stderr.contains("expired at 2020-01-02"),
        "{}",
        run.all()
    );
    // As in OpenSSH, a certificate that is not valid is dropped, and its key may still be known.
    let public = std::fs::read_to_string(dir.join("expired.pub")).unwrap();
    let line = format!(
        "{}\n[127.0.0.1]:{} {}",
        ca_line("ca"),
        expired.port,
        public.trim()
    );
    exec(&expired, line).success();
    // A certificate signed with SHA-1 (`ssh-rsa`) is refused, as OpenSSH refuses it.
    let run = exec(&sha1, ca_line("rsa-ca")).failure(1);
    assert!(run.stderr.contains("ssh-rsa (SHA-1)"), "{}", run.all());
    // Another authority: the certified key is unknown, and so is the host.
    let run = exec(&good, ca_line("other-ca")).failure(1);
    assert!(run.stderr.contains("unknown host key"), "{}", run.all());
    // ... unless known_hosts lists that key itself.
    let public = std::fs::read_to_string(dir.join("good.pub")).unwrap();
    let line = format!(
        "{}\n[127.0.0.1]:{} {}",
        ca_line("other-ca"),
        good.port,
        public.trim()
    );
    exec(&good, line).success();
}

/// GitLab variables of type File hold the path of a file with the value: SSH_PRIVATE_KEY and
/// SSH_KNOWN_HOSTS may be either kind.
#[test]
fn ci_variables_of_type_file_are_read() {
    let host = Sshd::start();
    let dir = TempDir::new("filevars");
    let pb = env_pb(&dir, &[host.address()]);
    let kh = dir.write("known_hosts", host.known_hosts_line());
    let run = Ferry::new()
        .trusting(&[&host])
        .env("SSH_PRIVATE_KEY", &default_key().private)
        .env("SSH_KNOWN_HOSTS", &kh)
        .args(["exec", "--env", "test"])
        .arg(&pb)
        .args(["--", "true"])
        .run();
    assert_eq!(run.code, 0, "{}", run.all());
    // A path whose file is not there is named as such, not read as the text.
    let missing = dir.join("gone");
    for (var, good) in [
        ("SSH_PRIVATE_KEY", ("SSH_KNOWN_HOSTS", &kh)),
        (
            "SSH_KNOWN_HOSTS",
            ("SSH_PRIVATE_KEY", &default_key().private),
        ),
    ] {
        let run = Ferry::new()
            .trusting(&[&host])
            .env(good.0, good.1)
            .env(var, &missing)
            .args(["exec", "--env", "test"])
            .arg(&pb)
            .args(["--", "true"])
            .run()
            .failure(2);
        assert!(
            run.stderr
                .contains(&format!("{var} holds the path {}", missing.display())),
            "{var}: {}",
            run.stderr
        );
    }
}

#[test]
fn unknown_host_fails_unless_accept_new_records_it() {
    let host = Sshd::start();
    let dir = TempDir::new("unknown");
    let pb = env_pb(&dir, &[host.address()]);
    let kh = dir.join("known_hosts");
    let base = |flag: &str| {
        Ferry::new()
            .trusting(&[])
            .env_remove_known_hosts()
            .arg("--known-hosts")
            .arg(&kh)
            .args(["exec", "--env", "test", flag])
            .arg(&pb)
            .args(["--", "true"])
    };
    // A known_hosts file named on purpose must exist (a typo is not an empty file).
    let run = base("-v").run().failure(2);
    assert!(run.stderr.contains("does not exist"), "{}", run.stderr);
    assert!(run.stderr.contains("--accept-new"), "{}", run.stderr);
    std::fs::write(&kh, "").unwrap();
    let run = base("-v").run().failure(1);
    assert!(run.stderr.contains("unknown host key"), "{}", run.stderr);
    assert!(run.stderr.contains("--accept-new"), "{}", run.stderr);
    assert!(std::fs::read_to_string(&kh).unwrap().is_empty());
    std::fs::remove_file(&kh).unwrap();
    base("--accept-new").run().success();
    let recorded = std::fs::read_to_string(&kh).unwrap();
    assert!(
        recorded.contains(&format!("[127.0.0.1]:{}", host.port)),
        "{recorded}"
    );
    // Now known: no flag needed.
    base("-v").run().success();
}

#[test]
fn hashed_known_hosts_entries_are_honoured() {
    let host = Sshd::start();
    let dir = TempDir::new("hashed");
    let pb = env_pb(&dir, &[host.address()]);
    let kh = dir.write("known_hosts", host.known_hosts_line());
    run_ok(
        std::process::Command::new("ssh-keygen")
            .arg("-H")
            .arg("-f")
            .arg(&kh),
    );
    assert!(std::fs::read_to_string(&kh).unwrap().starts_with("|1|"));
    Ferry::new()
        .trusting(&[])
        .env_remove_known_hosts()
        .arg("--known-hosts")
        .arg(&kh)
        .args(["exec", "--env", "test"])
        .arg(&pb)
        .args(["--", "true"])
        .run()
        .success();
}

#[test]
fn a_down_host_and_a_slow_host_do_not_stop_the_others() {
    let good = Sshd::start();
    let silent = Silent::start();
    let down = free_port();
    let dir = TempDir::new("down");
    let pb = env_pb(
        &dir,
        &[
            good.address(),
            format!("root@127.0.0.1:{}", silent.port),
            format!("root@127.0.0.1:{down}"),
        ],
    );
    let start = std::time::Instant::now();
    let run = Ferry::new()
        .trusting(&[&good])
        .args(["check", "--env", "test", "--connect-timeout", "2s"])
        .arg(&pb)
        .run()
        .failure(1);
    let row = |port: u16| {
        columns(
            run.stdout
                .lines()
                .find(|l| {
                    l.starts_with(&format!("127.0.0.1:{port} "))
                        || l.contains(&format!("@127.0.0.1:{port} "))
                })
                .unwrap_or_else(|| panic!("no row for {port}: {}", run.stdout)),
        )
    };
    assert_eq!(row(good.port)[1..3], ["yes", "yes"], "{}", run.stdout);
    assert_eq!(row(silent.port)[1..3], ["NO", "-"], "{}", run.stdout);
    assert_eq!(row(down)[1..3], ["NO", "-"], "{}", run.stdout);
    assert!(run.stdout.contains("no answer within 2s"), "{}", run.stdout);
    assert!(run.stdout.contains("cannot connect"), "{}", run.stdout);
    // Three attempts with backoff at most; not an unbounded hang.
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn exec_arguments_arrive_byte_for_byte() {
    let host = Sshd::start();
    let dir = TempDir::new("exec");
    let pb = env_pb(&dir, &[host.address()]);
    let out = dir.join("args.out");
    let hostile: Vec<&[u8]> = vec![
        b"with space",
        b"it's \"quoted\"",
        b"$(touch /tmp/ferry-pwned-exec)",
        b"`id`;rm -rf /nonexistent",
        b"line1\nline2",
        b"\xff\xfe\x80 not utf-8",
        b"",
    ];
    let script = format!(
        "for a in \"$@\"; do printf '%s\\0' \"$a\"; done > {}",
        out.display()
    );
    let mut ferry = Ferry::new()
        .trusting(&[&host])
        .args(["exec", "--env", "test"])
        .arg(&pb)
        .args(["--", "sh", "-c", &script, "sh"]);
    for a in &hostile {
        ferry = ferry.arg(std::ffi::OsStr::from_bytes(a));
    }
    ferry.run().success();
    let got = std::fs::read(&out).unwrap();
    let expected: Vec<u8> = hostile
        .iter()
        .flat_map(|a| a.iter().copied().chain([0u8]))
        .collect();
    assert_eq!(got, expected);
    assert!(!std::path::Path::new("/tmp/ferry-pwned-exec").exists());
}

#[test]
fn exec_streams_output_prefixed_and_reports_exit_codes() {
    let a = Sshd::start();
    let b = Sshd::start();
    let dir = TempDir::new("exec2");
    let pb = env_pb(&dir, &[a.address(), b.address()]);
    let run = Ferry::new()
        .trusting(&[&a, &b])
        .args(["exec", "--env", "test"])
        .arg(&pb)
        .args(["--", "sh", "-c", "echo hello; echo oops >&2; exit 3"])
        .run()
        .failure(1);
    assert!(
        run.stdout.contains(&format!("{} | hello", a.address())),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!("{} | hello", b.address())),
        "{}",
        run.stdout
    );
    assert!(
        run.stderr.contains(&format!("{} ! oops", a.address())),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with(&a.address()) && l.contains(" 3 ")),
        "{}",
        run.stderr
    );
}

/// `exec --timeout` gives up on the command and stops it on the host.
#[test]
fn exec_timeout_is_enforced() {
    let host = Sshd::start();
    let dir = TempDir::new("timeout");
    let pb = env_pb(&dir, &[host.address()]);
    let pidfile = dir.join("pid");
    let run = Ferry::new()
        .trusting(&[&host])
        .args(["exec", "--env", "test", "--timeout", "3s"])
        .arg(&pb)
        .args(["--", "sh", "-c", "echo $$ > \"$0\"; exec sleep 30"])
        .arg(&pidfile)
        .run()
        .failure(1);
    assert!(run.stderr.contains("timed out after 3s"), "{}", run.stderr);
    assert!(run.stderr.contains("exec sleep 30"), "{}", run.stderr);
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !gone(pid.trim()) {
        assert!(std::time::Instant::now() < deadline, "pid {pid} still runs");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn proxy_jump_reaches_the_target_through_the_bastion_and_checks_both_keys() {
    let bastion = Sshd::start();
    let target = Sshd::start();
    let dir = TempDir::new("jump");
    let pb = dir.write(
        "ferry.yml",
        format!(
            "app: testapp\nenvironments:\n  test:\n    root: /tmp\n    ssh: {{ proxy_jump: 'root@127.0.0.1:{}' }}\n    hosts: ['{}']\n",
            bastion.port,
            target.address()
        ),
    );
    let run = Ferry::new()
        .trusting(&[&bastion, &target])
        .args(["exec", "--env", "test"])
        .arg(&pb)
        .args(["--", "echo", "via-jump"])
        .run()
        .success();
    assert!(run.stdout.contains("via-jump"), "{}", run.stdout);
    assert!(
        bastion.log().contains("direct-tcpip"),
        "bastion did not forward: {}",
        bastion.log()
    );
    // The bastion's key is verified too: without it, the run fails.
    let run = Ferry::new()
        .trusting(&[&target])
        .args(["exec", "--env", "test"])
        .arg(&pb)
        .args(["--", "true"])
        .run()
        .failure(1);
    assert!(run.stderr.contains("unknown host key"), "{}", run.stderr);
}

#[test]
fn busybox_host_runs_commands() {
    let host = Sshd::start_with(SshdOptions {
        busybox: true,
        ..Default::default()
    });
    let dir = TempDir::new("bb");
    let pb = env_pb(&dir, &[host.address()]);
    let run = Ferry::new()
        .trusting(&[&host])
        .args(["exec", "--env", "test"])
        .arg(&pb)
        .args([
            "--",
            "sh",
            "-c",
            "readlink /proc/$$/exe; tar 2>&1 | head -1",
        ])
        .run()
        .success();
    assert!(run.stdout.contains("/bin/busybox"), "{}", run.stdout);
    assert!(
        run.stdout.contains("BusyBox"),
        "tar is BusyBox tar: {}",
        run.stdout
    );
}

#[test]
fn malformed_playbook_reports_file_line_and_column() {
    let dir = TempDir::new("badpb");
    let pb = dir.write(
        "ferry.yml",
        "app: x\nenvironments:\n  test:\n    hosts: [a]\n    stepz: []\n",
    );
    let run = Ferry::new()
        .args(["check", "--env", "test"])
        .arg(&pb)
        .run()
        .failure(2);
    assert!(run.stderr.contains("ferry.yml:5:5"), "{}", run.stderr);
    assert!(run.stderr.contains("stepz"), "{}", run.stderr);
    // A check across fields points at the node it is about: here the second host `a`.
    let pb = dir.write(
        "twice.yml",
        "app: x\nenvironments:\n  test:\n    hosts:\n      - a\n      - a\n",
    );
    let run = Ferry::new()
        .args(["check", "--env", "test"])
        .arg(&pb)
        .run()
        .failure(2);
    assert!(
        run.stderr
            .contains("twice.yml:6:9: environment `test` lists host `a` twice"),
        "{}",
        run.stderr
    );
}

/// Templates worked out as hosts are resolved (vars, root, addresses) and the environment's
/// `url:` are pointed at in the file too.
#[test]
fn environment_templates_are_located() {
    let dir = TempDir::new("envloc");
    for (extra, env_extra, want) in [
        ("vars:\n  site: \"${nope}\"\n", "", ":3:10: variable `site`"),
        (
            "",
            "    url: \"http://${nope}/\"\n",
            ":4:18: environment `test`: url",
        ),
        (
            "",
            "    root: \"/srv/${env.FERRY_UNSET_X}\"\n",
            ":4:17: environment `test`: root",
        ),
    ] {
        let path = dir.join("pb.yml");
        std::fs::write(
            &path,
            format!(
                "app: shop\n{extra}environments:\n  test:\n{env_extra}    hosts: [\"root@127.0.0.1:1\"]\n    steps:\n      - run: {{ command: [\"true\"] }}\n"
            ),
        )
        .unwrap();
        let run = Ferry::new()
            .trusting(&[])
            .args([
                "deploy", "--env", "test", "--sha", "abc123", "--ref", "main",
            ])
            .arg(&path)
            .run()
            .failure(2);
        let at = format!("{}{want}", path.display());
        assert!(run.stderr.contains(&at), "{at}: {}", run.stderr);
    }
}

#[test]
fn no_key_is_a_usage_error_with_the_fix() {
    let dir = TempDir::new("nokey");
    let pb = env_pb(&dir, &["root@127.0.0.1:1".into()]);
    let run = Ferry::new()
        .args(["check", "--env", "test"])
        .arg(&pb)
        .run()
        .failure(2);
    assert!(run.stderr.contains("SSH_PRIVATE_KEY"), "{}", run.stderr);
}

/// Values worked out per host (paths, container names, templates) are checked before any
/// connection: the host here does not even listen.
#[test]
fn per_host_values_are_checked_before_any_host_is_touched() {
    let dir = TempDir::new("preflight");
    let cases = [
        (
            "      - sync: { from: dist, to: \".\" }\n",
            "would hold or be part of ferry's own state",
        ),
        (
            "      - sync: { from: dist, to: \"../web\" }\n",
            "has a `..` component",
        ),
        (
            "      - sync: { from: dist, to: \"web/${nope}\" }\n",
            "nope",
        ),
        (
            "      - sync: { from: dist, to: web }\n",
            "sync from `dist`: no such directory here",
        ),
        (
            "      - sync: { from: /tmp, to: web }\n      - sync: { from: /tmp, to: web/x }\n",
            "overlap (one is or lies inside the other)",
        ),
        (
            "      - sync: { from: /etc/passwd, to: web }\n",
            "sync from `/etc/passwd`: that is a file, not a directory",
        ),
        (
            "      - container: { name: \"web;reboot\", image: i }\n",
            "container name `web;reboot`",
        ),
        (
            "      - container: { name: web, image: i, restart: sometimes }\n",
            "container `web`: `restart` `sometimes` is not no, always",
        ),
        (
            "      - container: { name: web, image: \"img:${nosuch}\" }\n",
            "container `web`: unknown variable `${nosuch}`",
        ),
        (
            "      - docker_push: { image: \"shop:${env.FERRY_TEST_TAG}\" }\n",
            "docker_push `shop:v1.0.0+build`: tag `v1.0.0+build` is not one docker takes",
        ),
    ];
    for (step, want) in cases {
        let pb = playbook(
            &dir,
            "ferry.yml",
            &["root@127.0.0.1:1".into()],
            &format!("    steps:\n{step}"),
        );
        let run = Ferry::new()
            .trusting(&[])
            .args([
                "deploy", "--env", "test", "--sha", "abc123", "--ref", "main",
            ])
            .arg(&pb)
            .env("FERRY_TEST_TAG", "v1.0.0+build")
            .run()
            .failure(2);
        assert!(run.stderr.contains(want), "{step}: {}", run.stderr);
        // A template error points at its place in the file (the step is the file's last line).
        if let Some(col) = step
            .find("${")
            .filter(|_| want.contains("unknown variable"))
        {
            let text = std::fs::read_to_string(&pb).unwrap();
            let at = format!("ferry.yml:{}:{}: ", text.lines().count(), col + 1);
            assert!(run.stderr.contains(&at), "{at}: {}", run.stderr);
            assert_eq!(run.stderr.matches("unknown variable").count(), 1);
            assert!(!run.stderr.contains("container `web`: container"));
        }
        // A container value with no template is refused as the playbook is read, at its place;
        // the others name the host they were worked out for.
        // (So is the second of two overlapping sync targets.)
        // (And a sync step's `from:` or `to:` at fault, at that key.)
        let literal = step.contains("container") && !step.contains("${");
        if literal || step.contains("sync") {
            let line = std::fs::read_to_string(&pb).unwrap().lines().count();
            let at = format!("ferry.yml:{line}:");
            assert!(run.stderr.contains(&at), "{at}: {}", run.stderr);
        }
        if !literal {
            assert!(
                run.stderr.contains("127.0.0.1:1"),
                "names the host: {}",
                run.stderr
            );
        }
        assert!(!run.stderr.contains("cannot connect"), "{}", run.stderr);
    }
}

#[test]
fn a_ref_git_would_refuse_is_refused() {
    let dir = TempDir::new("ctlref");
    let pb = env_pb(&dir, &["root@127.0.0.1:1".into()]);
    for (r, why) in [
        ("release-\u{1b}[31mred", "control characters"),
        ("release-1\nrelease-2", "control characters"),
        ("", "it is empty"),
        ("--version", "starts with `-`"),
        ("../../etc", "`..`"),
        ("feature/with space", "a space"),
    ] {
        let run = Ferry::new()
            .args(["deploy", "--env", "test", "--sha", "abc123"])
            .arg(format!("--ref={r}"))
            .arg(&pb)
            .run()
            .failure(2);
        assert!(
            run.stderr.contains("not a name git gives a branch or tag"),
            "{}",
            run.stderr
        );
        assert!(run.stderr.contains(why), "{}", run.stderr);
        assert!(!run.stderr.contains('\u{1b}'), "{}", run.stderr);
    }
}

/// Split a table row into its columns (separated by two or more spaces).
fn columns(line: &str) -> Vec<String> {
    line.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

trait FerryExt {
    fn env_remove_known_hosts(self) -> Self;
}

impl FerryExt for Ferry {
    /// Drop SSH_KNOWN_HOSTS so that --known-hosts is the only source.
    fn env_remove_known_hosts(self) -> Self {
        self.env("SSH_KNOWN_HOSTS", "")
    }
}

/// About one P-256 key in 256 stores a 31-byte private scalar, which russh's key parser rejects;
/// ferry re-encodes it. The fixture is such a key (a throwaway made for this test).
#[test]
fn ecdsa_key_with_a_short_scalar_authenticates() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let public = std::fs::read_to_string(fixtures.join("ecdsa_short_scalar.pub")).unwrap();
    let host = Sshd::start_with(SshdOptions {
        authorized: vec![public],
        ..Default::default()
    });
    let dir = TempDir::new("shortscalar");
    let pb = env_pb(&dir, &[host.address()]);
    let key = std::fs::read_to_string(fixtures.join("ecdsa_short_scalar")).unwrap();
    for value in [
        key.clone(),
        base64::engine::general_purpose::STANDARD.encode(&key),
    ] {
        let run = Ferry::new()
            .env("SSH_PRIVATE_KEY", value)
            .env("SSH_KNOWN_HOSTS", host.known_hosts_line())
            .args(["exec", "--env", "test"])
            .arg(&pb)
            .args(["--", "echo", "ok"])
            .run()
            .success();
        assert!(run.stdout.contains("| ok"), "{}", run.stdout);
    }
}

/// ssh-agent: a key it holds authenticates; an empty agent, and one holding more wrong keys
/// than sshd's MaxAuthTries (6) before the right one, each say so with the fix.
#[test]
fn ssh_agent_authenticates_and_its_failures_say_why() {
    let host = Sshd::start();
    let dir = TempDir::new("agent");
    let sock = dir.join("agent.sock");
    let out = std::process::Command::new("ssh-agent")
        .arg("-a")
        .arg(&sock)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let pid: u32 = text
        .split("SSH_AGENT_PID=")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .and_then(|p| p.parse().ok())
        .expect("ssh-agent prints its pid");
    struct Agent(u32);
    impl Drop for Agent {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .arg(self.0.to_string())
                .status();
        }
    }
    let _agent = Agent(pid);
    let ssh_add = |args: &[&std::ffi::OsStr]| {
        let st = std::process::Command::new("ssh-add")
            .args(args)
            .env("SSH_AUTH_SOCK", &sock)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "ssh-add {args:?}");
    };
    let pb = env_pb(&dir, &[host.address()]);
    let exec = || {
        Ferry::new()
            .env("SSH_AUTH_SOCK", &sock)
            .env("SSH_KNOWN_HOSTS", host.known_hosts_line())
            .args(["exec", "--env", "test"])
            .arg(&pb)
            .args(["--", "true"])
            .run()
    };
    let run = exec();
    assert_ne!(run.code, 0);
    assert!(
        run.all().contains("ssh-agent: it holds no keys: add one"),
        "{}",
        run.all()
    );
    for i in 0..7 {
        let keys = dir.join(format!("wrong{i}"));
        std::fs::create_dir_all(&keys).unwrap();
        ssh_add(&[client_key(&keys, "ed25519", false, "").private.as_os_str()]);
    }
    ssh_add(&[default_key().private.as_os_str()]);
    let run = exec();
    assert_ne!(run.code, 0);
    assert!(run.all().contains("(sshd's MaxAuthTries)"), "{}", run.all());
    ssh_add(&["-D".as_ref()]);
    ssh_add(&[default_key().private.as_os_str()]);
    exec().success();
}

/// SIGTERM (a cancelled job) while a host does not answer its connection (a stalled sshd): ferry
/// stops trying at once, not after its retries.
#[test]
fn sigterm_stops_a_connect_that_hangs() {
    let host = Sshd::start();
    let dir = TempDir::new("stalled");
    let pb = playbook(
        &dir,
        "ferry.yml",
        &[host.address()],
        "    steps:\n      - run: { command: [\"true\"] }\n",
    );
    let signal = |sig: &str, pid: u32| {
        let st = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    };
    signal("-STOP", host.pid());
    let (child, _home) = Ferry::new()
        .trusting(&[&host])
        .args([
            "deploy", "--env", "test", "--sha", "abc123", "--ref", "main",
        ])
        .arg(&pb)
        .spawn();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let sent = std::time::Instant::now();
    signal("-TERM", child.id());
    let out = child.wait_with_output().unwrap();
    signal("-CONT", host.pid());
    let stopped = sent.elapsed();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stopped < std::time::Duration::from_secs(5),
        "took {stopped:?}: {all}"
    );
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("before it was reached"), "{all}");
}
