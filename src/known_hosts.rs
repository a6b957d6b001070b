//! Host key verification against OpenSSH known_hosts content.
//!
//! russh's own checker ignores wildcards and `@revoked`, so ferry parses known_hosts itself: plain,
//! `[host]:port`, hashed `|1|salt|hash`, `*`/`?` wildcards, `!` negation, `@revoked` and
//! `@cert-authority` lines (host certificates are judged as OpenSSH judges them).
//! The check is never skipped: an unknown host fails unless the user passes `--accept-new`.

use std::path::{Path, PathBuf};

use base64::Engine;
use hmac::{KeyInit, Mac};
use russh::keys::{HashAlg, PublicKey};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A matching line trusts this key.
    Known,
    /// Lines exist for this host, with other keys.
    Mismatch { expected: Vec<String> },
    /// The key is listed under `@revoked`.
    Revoked,
    /// Nothing is known about this host.
    Unknown,
}

/// How a host certificate checks out against the `@cert-authority` lines for its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertVerdict {
    /// Signed by an authority trusted for this host, valid now, and for this host.
    Trusted,
    /// No authority trusted for this host signed it: its key is judged as a plain host key (as
    /// OpenSSH does).
    NoAuthority,
    /// Its key, or the key that signed it, is listed under `@revoked`.
    Revoked,
    /// Signed by a trusted authority, but not valid here: why. (As in OpenSSH, its key may still
    /// be known as a plain host key.)
    Invalid(String),
}

/// Trusted host keys, with where they came from (for messages and for recording new keys).
#[derive(Debug, Clone)]
pub struct KnownHosts {
    entries: Vec<Entry>,
    /// Human description of the source: `SSH_KNOWN_HOSTS` or a file path.
    pub source: String,
    /// Where `--accept-new` records keys.
    pub record_to: PathBuf,
}

#[derive(Debug, Clone)]
struct Entry {
    marker: Marker,
    patterns: Vec<Pattern>,
    key: PublicKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
enum Pattern {
    Glob { negated: bool, glob: String },
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

impl KnownHosts {
    pub fn parse(text: &str, source: String, record_to: PathBuf) -> KnownHosts {
        let entries = text.lines().filter_map(parse_line).collect();
        KnownHosts {
            entries,
            source,
            record_to,
        }
    }

    pub fn from_file(path: &Path) -> std::io::Result<KnownHosts> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok(KnownHosts::parse(
            &text,
            path.display().to_string(),
            path.to_path_buf(),
        ))
    }

    /// Also trust what `--accept-new` recorded before in [`KnownHosts::record_to`] (when the
    /// keys came from `SSH_KNOWN_HOSTS`): a key recorded there that changed is a mismatch, not a
    /// new host. A missing file adds nothing.
    pub fn with_recorded(mut self) -> std::io::Result<KnownHosts> {
        let recorded = KnownHosts::from_file(&self.record_to)?;
        if !recorded.entries.is_empty() {
            self.entries.extend(recorded.entries);
            self.source = format!("{} and {}", self.source, recorded.source);
        }
        Ok(self)
    }

    /// Check `key` for `host` on `port`. OpenSSH writes `[host]:port` for ports other than 22.
    pub fn check(&self, host: &str, port: u16, key: &PublicKey) -> Verdict {
        let name = host_key_name(host, port);
        let mut expected = Vec::new();
        let mut known = false;
        for e in &self.entries {
            if !matches(&e.patterns, &name) {
                continue;
            }
            let same = e.key.key_data() == key.key_data();
            match e.marker {
                Marker::Revoked if same => return Verdict::Revoked,
                Marker::None if same => known = true,
                Marker::None => expected.push(fingerprint(&e.key)),
                _ => {}
            }
        }
        if known {
            Verdict::Known
        } else if !expected.is_empty() {
            Verdict::Mismatch { expected }
        } else {
            Verdict::Unknown
        }
    }

    /// Judge a host certificate for `host` on `port` at `now` (Unix seconds). A certificate is
    /// valid when a `@cert-authority` line for the host names its signer, its signature holds,
    /// `now` is in its validity period, it is a host certificate, it lists `host` among its
    /// principals (or lists none), and it has no critical options (OpenSSH knows none for hosts).
    pub fn check_certificate(
        &self,
        host: &str,
        port: u16,
        cert: &russh::keys::Certificate,
        now: u64,
    ) -> CertVerdict {
        let name = host_key_name(host, port);
        let signer = cert.signature_key();
        let mut trusted = false;
        for e in &self.entries {
            if !matches(&e.patterns, &name) {
                continue;
            }
            match e.marker {
                Marker::Revoked
                    if e.key.key_data() == cert.public_key() || e.key.key_data() == signer =>
                {
                    return CertVerdict::Revoked;
                }
                Marker::CertAuthority if e.key.key_data() == signer => trusted = true,
                _ => {}
            }
        }
        if !trusted {
            return CertVerdict::NoAuthority;
        }
        // (OpenSSH compares principals with the host name lowercased.)
        let host = host.to_lowercase();
        let sha1 = russh::keys::Algorithm::Rsa { hash: None };
        let why = if cert.signature().algorithm() == sha1 {
            "it is signed with ssh-rsa (SHA-1), which OpenSSH no longer accepts".to_string()
        } else if cert.verify_signature().is_err() {
            "its signature does not verify".to_string()
        } else if now < cert.valid_after() {
            format!(
                "it is not valid before {}",
                crate::report::utc_time(cert.valid_after())
            )
        } else if now >= cert.valid_before() {
            format!(
                "it expired at {}",
                crate::report::utc_time(cert.valid_before())
            )
        } else if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::Host {
            "it is a user certificate, not a host certificate".to_string()
        } else if !cert.valid_principals().is_empty() && !cert.valid_principals().contains(&host) {
            format!(
                "it is for {}, not {host}",
                cert.valid_principals().join(", ")
            )
        } else if let Some(option) = cert.critical_options().keys().next() {
            format!("it has critical option `{option}`, which ferry does not know")
        } else {
            return CertVerdict::Trusted;
        };
        CertVerdict::Invalid(why)
    }

    /// Whether a `@cert-authority` line applies to `host` on `port` (ferry then asks the host
    /// for a certificate).
    pub fn has_authority(&self, host: &str, port: u16) -> bool {
        let name = host_key_name(host, port);
        self.entries
            .iter()
            .any(|e| e.marker == Marker::CertAuthority && matches(&e.patterns, &name))
    }

    /// The host key algorithms of the keys known for `host` on `port` (revoked ones aside), in
    /// the order they appear.
    pub fn algorithms(&self, host: &str, port: u16) -> Vec<russh::keys::Algorithm> {
        let name = host_key_name(host, port);
        let mut found = Vec::new();
        for e in &self.entries {
            if e.marker == Marker::None && matches(&e.patterns, &name) {
                let a = e.key.algorithm();
                if !found.contains(&a) {
                    found.push(a);
                }
            }
        }
        found
    }

    /// Append `key` for `host:port` to [`KnownHosts::record_to`] (for `--accept-new`).
    pub fn record(&mut self, host: &str, port: u16, key: &PublicKey) -> std::io::Result<()> {
        use std::io::Write;
        let name = host_key_name(host, port);
        let line = format!(
            "{name} {}\n",
            key.to_openssh().map_err(std::io::Error::other)?
        );
        if let Some(dir) = self.record_to.parent()
            && !dir.exists()
        {
            // (As OpenSSH makes `~/.ssh`: private.)
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.record_to)?;
        // A file whose last line has no newline would swallow ours into it.
        if ends_without_newline(&mut f)? {
            f.write_all(b"\n")?;
        }
        f.write_all(line.as_bytes())?;
        f.sync_all()?;
        self.entries.extend(parse_line(&line));
        Ok(())
    }
}

fn ends_without_newline(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

fn host_key_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = fields.next()?;
    }
    let kind = fields.next()?;
    let data = fields.next()?;
    let key = PublicKey::from_openssh(&format!("{kind} {data}")).ok()?;
    let patterns = first.split(',').filter_map(parse_pattern).collect();
    Some(Entry {
        marker,
        patterns,
        key,
    })
}

fn parse_pattern(p: &str) -> Option<Pattern> {
    if let Some(rest) = p.strip_prefix("|1|") {
        let (salt, hash) = rest.split_once('|')?;
        let b64 = base64::engine::general_purpose::STANDARD;
        return Some(Pattern::Hashed {
            salt: b64.decode(salt).ok()?,
            hash: b64.decode(hash).ok()?,
        });
    }
    let (negated, glob) = match p.strip_prefix('!') {
        Some(g) => (true, g),
        None => (false, p),
    };
    Some(Pattern::Glob {
        negated,
        glob: glob.to_lowercase(),
    })
}

/// OpenSSH semantics: any negated match rejects the line; otherwise any positive match accepts it.
fn matches(patterns: &[Pattern], name: &str) -> bool {
    let lower = name.to_lowercase();
    let mut hit = false;
    for p in patterns {
        match p {
            Pattern::Glob { negated, glob } => {
                if glob_match(glob.as_bytes(), lower.as_bytes()) {
                    if *negated {
                        return false;
                    }
                    hit = true;
                }
            }
            Pattern::Hashed { salt, hash } => {
                let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                    continue;
                };
                // (OpenSSH hashes the name lowercased, as it matches plain patterns.)
                mac.update(lower.as_bytes());
                if mac.verify_slice(hash).is_ok() {
                    hit = true;
                }
            }
        }
    }
    hit
}

/// `*` and `?` glob over bytes.
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            p += 1;
            mark = i;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOYttQ4Dt49lNVnReEmMoWZ9zj0XHjQkwFjGQHr7pBEY";
    const K2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBB6JyuHgtsVVTo9XmUNxAJc/bnYTwnKmZ6kzA4Ezlx5";

    fn key(s: &str) -> PublicKey {
        PublicKey::from_openssh(s).unwrap()
    }

    fn kh(text: &str) -> KnownHosts {
        KnownHosts::parse(text, "test".into(), "/nonexistent".into())
    }

    #[test]
    fn plain_port_and_wildcards() {
        let k = kh(&format!(
            "web1.example.com {K1}\n[10.0.0.5]:2222 {K1}\n*.internal,!db.internal {K1}\n"
        ));
        assert_eq!(k.check("web1.example.com", 22, &key(K1)), Verdict::Known);
        assert_eq!(k.check("10.0.0.5", 2222, &key(K1)), Verdict::Known);
        assert_eq!(k.check("10.0.0.5", 22, &key(K1)), Verdict::Unknown);
        assert_eq!(k.check("app.internal", 22, &key(K1)), Verdict::Known);
        assert_eq!(k.check("db.internal", 22, &key(K1)), Verdict::Unknown);
    }

    #[test]
    fn mismatch_lists_expected_fingerprints() {
        let k = kh(&format!("web1 {K1}\n"));
        match k.check("web1", 22, &key(K2)) {
            Verdict::Mismatch { expected } => assert_eq!(expected, vec![fingerprint(&key(K1))]),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn hashed_entries() {
        // Made with `ssh-keygen -H` for host `[127.0.0.1]:2222`.
        let salt = base64::engine::general_purpose::STANDARD.encode(b"0123456789abcdefghij");
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"0123456789abcdefghij").unwrap();
        mac.update(b"[127.0.0.1]:2222");
        let hash = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let k = kh(&format!("|1|{salt}|{hash} {K1}\n"));
        assert_eq!(k.check("127.0.0.1", 2222, &key(K1)), Verdict::Known);
        assert_eq!(k.check("127.0.0.1", 2223, &key(K1)), Verdict::Unknown);
        // OpenSSH hashes the name lowercased (`ssh-keyscan -H localhost`, then `ssh LocalHost`).
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"0123456789abcdefghij").unwrap();
        mac.update(b"[localhost]:2222");
        let hash = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        let k = kh(&format!("|1|{salt}|{hash} {K1}\n"));
        assert_eq!(k.check("LocalHost", 2222, &key(K1)), Verdict::Known);
    }

    #[test]
    fn recorded_keys_go_on_their_own_line_and_count_next_time() {
        let dir = std::env::temp_dir().join(format!("ferry-kh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let file = dir.join(".ssh/known_hosts");
        // (Made by --accept-new: private, as OpenSSH makes it.)
        let mut k = KnownHosts::parse("", "SSH_KNOWN_HOSTS".into(), file.clone());
        k.record("web1", 22, &key(K1)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(".ssh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // A last line without its newline (written by hand, or by `printf '%s'`).
        std::fs::write(&file, format!("web1 {K1} a comment")).unwrap();
        k.record("web2", 2222, &key(K2)).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        let read = KnownHosts::from_file(&file).unwrap();
        assert_eq!(read.check("web1", 22, &key(K1)), Verdict::Known);
        assert_eq!(read.check("web2", 2222, &key(K2)), Verdict::Known);
        // Keys from SSH_KNOWN_HOSTS, with --accept-new: what it recorded is trusted, and a
        // changed key there is a mismatch, not a new host.
        let env = KnownHosts::parse(&format!("web3 {K1}\n"), "SSH_KNOWN_HOSTS".into(), file);
        let both = env.with_recorded().unwrap();
        assert_eq!(both.check("web3", 22, &key(K1)), Verdict::Known);
        assert_eq!(both.check("web2", 2222, &key(K2)), Verdict::Known);
        assert!(matches!(
            both.check("web2", 2222, &key(K1)),
            Verdict::Mismatch { .. }
        ));
        assert!(both.source.starts_with("SSH_KNOWN_HOSTS and "));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn revoked_wins() {
        let k = kh(&format!("web1 {K1}\n@revoked * {K1}\n"));
        assert_eq!(k.check("web1", 22, &key(K1)), Verdict::Revoked);
    }

    /// A certificate for the Ed25519 key from `seed`, signed by the one from `ca_seed`.
    fn cert(
        ca_seed: u8,
        kind: russh::keys::ssh_key::certificate::CertType,
        principals: &[&str],
        valid: std::ops::Range<u64>,
    ) -> russh::keys::Certificate {
        use russh::keys::ssh_key::{PrivateKey, certificate::Builder, private::Ed25519Keypair};
        let ca = PrivateKey::from(Ed25519Keypair::from_seed(&[ca_seed; 32]));
        let host = Ed25519Keypair::from_seed(&[7; 32]).public;
        let mut b = Builder::new([0u8; 16], host, valid.start, valid.end).unwrap();
        b.cert_type(kind).unwrap().key_id("web").unwrap();
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        if principals.is_empty() {
            b.all_principals_valid().unwrap();
        }
        b.sign(&ca).unwrap()
    }

    fn ca_line(pattern: &str, marker: &str, seed: u8) -> String {
        use russh::keys::ssh_key::private::Ed25519Keypair;
        let public = PublicKey::from(Ed25519Keypair::from_seed(&[seed; 32]).public);
        format!("{marker} {pattern} {}\n", public.to_openssh().unwrap())
    }

    #[test]
    fn host_certificates_are_judged_as_openssh_does() {
        use russh::keys::ssh_key::certificate::CertType::{Host, User};
        let now = 1_800_000_000;
        let k = kh(&ca_line(
            "*.example.com,[*.example.com]:*",
            "@cert-authority",
            1,
        ));
        let web1 = ["web1.example.com"];
        let good = cert(1, Host, &web1, now - 60..now + 60);
        assert!(k.has_authority("web1.example.com", 2222));
        assert!(!k.has_authority("web1.example.org", 22));
        for port in [22, 2222] {
            let v = k.check_certificate("web1.example.com", port, &good, now);
            assert_eq!(v, CertVerdict::Trusted);
        }
        // No principals: valid for any host the authority is trusted for (as in OpenSSH).
        let any = cert(1, Host, &[], now - 60..now + 60);
        let v = k.check_certificate("web2.example.com", 22, &any, now);
        assert_eq!(v, CertVerdict::Trusted);
        // An authority not trusted for the host, or another authority: the key is judged plain.
        let v = k.check_certificate("web1.example.org", 22, &good, now);
        assert_eq!(v, CertVerdict::NoAuthority);
        let other = cert(2, Host, &web1, now - 60..now + 60);
        let v = k.check_certificate("web1.example.com", 22, &other, now);
        assert_eq!(v, CertVerdict::NoAuthority);
        let invalid = |c: &russh::keys::Certificate, host: &str| match k
            .check_certificate(host, 22, c, now)
        {
            CertVerdict::Invalid(why) => why,
            v => panic!("{v:?}"),
        };
        assert!(invalid(&good, "web2.example.com").contains("for web1.example.com, not web2"));
        let v = k.check_certificate("WEB1.example.com", 22, &good, now);
        assert_eq!(v, CertVerdict::Trusted);
        let expired = cert(1, Host, &web1, now - 120..now - 60);
        assert!(invalid(&expired, "web1.example.com").starts_with("it expired at 2027-01-15"));
        let early = cert(1, Host, &web1, now + 60..now + 120);
        assert!(invalid(&early, "web1.example.com").contains("not valid before"));
        let user = cert(1, User, &web1, now - 60..now + 60);
        assert!(invalid(&user, "web1.example.com").contains("user certificate"));
        // A revoked authority (or certified key) wins over the `@cert-authority` line.
        let k = kh(&format!(
            "{}{}",
            ca_line("*", "@cert-authority", 1),
            ca_line("*", "@revoked", 1)
        ));
        let v = k.check_certificate("web1.example.com", 22, &good, now);
        assert_eq!(v, CertVerdict::Revoked);
    }

    #[test]
    fn comments_and_garbage_are_skipped() {
        let k = kh(&format!(
            "# comment\n\nnot a line\nweb1 {K1} comment here\n"
        ));
        assert_eq!(k.check("web1", 22, &key(K1)), Verdict::Known);
    }
}
