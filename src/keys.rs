//! Client credentials: the private key from `SSH_PRIVATE_KEY`, a key file, or ssh-agent.
//!
//! GitLab CI hands the key over as a variable, often mangled: CRLF line endings, no final newline, or
//! base64 because masked variables cannot span lines. This module undoes all of that in memory. The key
//! is never written to disk and never formatted into a message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use russh::keys::PrivateKey;

use crate::playbook::KeySource;

pub const KEY_VAR: &str = "SSH_PRIVATE_KEY";
pub const PASSPHRASE_VAR: &str = "SSH_PRIVATE_KEY_PASSPHRASE";

/// How ferry authenticates to every host.
#[derive(Clone)]
pub enum Credentials {
    Key(Arc<PrivateKey>),
    Agent,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Print the public half only.
            Credentials::Key(k) => {
                write!(f, "Key({})", k.public_key().fingerprint(Default::default()))
            }
            Credentials::Agent => write!(f, "Agent"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no SSH key: set {KEY_VAR}, pass --identity FILE, or run ssh-agent (SSH_AUTH_SOCK)")]
    NoKey,
    #[error("{what} is empty")]
    Empty { what: String },
    #[error("{what} is encrypted: set {PASSPHRASE_VAR}")]
    NeedPassphrase { what: String },
    #[error("{what}: wrong passphrase in {PASSPHRASE_VAR}")]
    WrongPassphrase { what: String },
    #[error(
        "{what} is not a private key ferry can read ({reason}); expected an OpenSSH or PEM ed25519, ECDSA or RSA key, as text or base64"
    )]
    Unreadable { what: String, reason: String },
    #[error("cannot read key file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ssh-agent requested but SSH_AUTH_SOCK is not set")]
    NoAgent,
    #[error("{0}")]
    Variable(String),
}

/// Resolve the configured key source. `identity` (from `--identity`) wins over the playbook.
pub fn load(source: &KeySource, identity: Option<&Path>) -> Result<Credentials, KeyError> {
    let passphrase = std::env::var(PASSPHRASE_VAR).ok().filter(|p| !p.is_empty());
    if let Some(path) = identity {
        return from_file(path, passphrase.as_deref());
    }
    match source {
        KeySource::File(path) => from_file(path, passphrase.as_deref()),
        KeySource::Env => match crate::ci::text_variable(KEY_VAR).map_err(KeyError::Variable)? {
            Some(text) => from_text(&text, passphrase.as_deref(), KEY_VAR),
            None => Err(KeyError::NoKey),
        },
        KeySource::Agent => agent(),
        KeySource::Auto => match crate::ci::text_variable(KEY_VAR).map_err(KeyError::Variable)? {
            Some(text) => from_text(&text, passphrase.as_deref(), KEY_VAR),
            None => agent().map_err(|_| KeyError::NoKey),
        },
    }
}

fn agent() -> Result<Credentials, KeyError> {
    match std::env::var_os("SSH_AUTH_SOCK") {
        Some(s) if !s.is_empty() => Ok(Credentials::Agent),
        _ => Err(KeyError::NoAgent),
    }
}

fn from_file(path: &Path, passphrase: Option<&str>) -> Result<Credentials, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::File {
        path: path.into(),
        source,
    })?;
    from_text(&text, passphrase, &path.display().to_string())
}

/// Decode key text as GitLab variables deliver it.
pub fn from_text(raw: &str, passphrase: Option<&str>, what: &str) -> Result<Credentials, KeyError> {
    let text = normalize(raw, what)?;
    let encrypted = is_encrypted(&text);
    let decoded = match (encrypted, passphrase) {
        (true, None) => return Err(KeyError::NeedPassphrase { what: what.into() }),
        // (Content that does not parse once decrypted: most likely the wrong passphrase.)
        (true, Some(pass)) if text.starts_with("-----BEGIN EC PRIVATE KEY-----") => {
            decrypt_legacy_pem_ec(&text, pass)
                .and_then(|plain| russh::keys::decode_secret_key(&plain, None).ok())
                .ok_or(russh::keys::Error::KeyIsCorrupt)
        }
        // (A passphrase set for another key is not used on one that has none.)
        (false, _) => russh::keys::decode_secret_key(&text, None),
        (true, pass) => russh::keys::decode_secret_key(&text, pass),
    };
    let decoded = decoded.or_else(|e| match pad_short_ecdsa_scalar(&text, passphrase) {
        Some(fixed) => russh::keys::decode_secret_key(&fixed, None),
        None => Err(e),
    });
    match decoded {
        Ok(k) => Ok(Credentials::Key(Arc::new(k))),
        Err(russh::keys::Error::KeyIsEncrypted) => {
            Err(KeyError::NeedPassphrase { what: what.into() })
        }
        Err(e) if encrypted && is_decrypt_failure(&e) => {
            Err(KeyError::WrongPassphrase { what: what.into() })
        }
        // The error text of the parser never contains key material, only a kind.
        Err(e) => Err(KeyError::Unreadable {
            what: what.into(),
            reason: e.to_string(),
        }),
    }
}

/// Whether the key text is protected by a passphrase: an OpenSSH key with a cipher, an
/// encrypted PKCS#8 key, or a legacy PEM key with `Proc-Type: 4,ENCRYPTED`.
fn is_encrypted(text: &str) -> bool {
    if text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----")
        || text.lines().any(|l| l.trim() == "Proc-Type: 4,ENCRYPTED")
    {
        return true;
    }
    if text.starts_with("PuTTY-User-Key-File-") {
        return text
            .lines()
            .any(|l| l.starts_with("Encryption:") && l.trim() != "Encryption: none");
    }
    openssh_blob(text).is_some_and(|blob| {
        let mut r = Reader(&blob);
        r.bytes(15).is_some() && r.string().is_some_and(|c| c != b"none")
    })
}

/// The PEM text of a legacy-encrypted EC key (`ssh-keygen -m PEM -N ...`: russh decrypts only RSA
/// ones), decrypted (OpenSSL's `DEK-Info: AES-128-CBC`, the key derived from the passphrase and the
/// IV's first 8 bytes with one MD5 round, as OpenSSH writes it). `None`: another cipher, or a wrong passphrase (bad padding).
fn decrypt_legacy_pem_ec(text: &str, pass: &str) -> Option<String> {
    use aes::cipher::{BlockModeDecrypt, KeyIvInit, block_padding::Pkcs7};
    const BEGIN: &str = "-----BEGIN EC PRIVATE KEY-----";
    const END: &str = "-----END EC PRIVATE KEY-----";
    let iv_hex = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("DEK-Info: AES-128-CBC,"))?;
    let iv: [u8; 16] = hex::decode(iv_hex.trim()).ok()?.try_into().ok()?;
    let body: String = text
        .lines()
        .skip(1)
        .filter(|l| !l.contains(':') && !l.starts_with("-----") && !l.trim().is_empty())
        .collect();
    let data = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    let mut c = md5::Context::new();
    c.consume(pass.as_bytes());
    c.consume(&iv[..8]);
    let key = c.finalize();
    let cipher = cbc::Decryptor::<aes::Aes128>::new_from_slices(&key.0, &iv).ok()?;
    let mut buf = data;
    let der = cipher.decrypt_padded::<Pkcs7>(&mut buf).ok()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    Some(format!("{BEGIN}\n{b64}\n{END}\n"))
}

/// The binary content of an OpenSSH private key's armour.
fn openssh_blob(text: &str) -> Option<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    let body: String = text
        .trim()
        .strip_prefix(BEGIN)?
        .strip_suffix(END)?
        .split_whitespace()
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).ok()
}

/// OpenSSH stores an ECDSA private scalar as an mpint, which drops leading zero bytes: about one
/// P-256 key in 256 has a 31-byte scalar, and the key parser russh uses (ssh-key 0.7) rejects scalars
/// shorter than 32 bytes. Re-encode such an OpenSSH key, unencrypted, with the scalar padded to the
/// curve's size (the same number; the parser strips the padding); an encrypted one is decrypted
/// first with `passphrase` (bcrypt KDF, as `ssh-keygen` writes them). `None` when the key is not
/// that case, or the passphrase does not open it. The result stays in memory like the key itself.
fn pad_short_ecdsa_scalar(text: &str, passphrase: Option<&str>) -> Option<String> {
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    let blob = openssh_blob(text)?;
    let mut r = Reader(&blob);
    r.bytes(15).filter(|m| *m == b"openssh-key-v1\0")?;
    let (cipher, kdf, kdf_options) = (r.string()?, r.string()?, r.string()?);
    if r.u32()? != 1 {
        return None;
    }
    let public = r.string()?;
    let mut private = r.string()?.to_vec();
    if cipher != b"none" {
        let cipher = ssh_cipher::Cipher::new(std::str::from_utf8(cipher).ok()?).ok()?;
        let tag = match cipher.has_tag() {
            true => Some(ssh_cipher::Tag::try_from(r.bytes(16)?).ok()?),
            false => None,
        };
        let mut o = Reader(kdf_options);
        let (salt, rounds) = (o.string()?, o.u32()?);
        let (key_len, iv_len) = cipher.key_and_iv_size()?;
        let mut key_iv = vec![0; key_len + iv_len];
        (kdf == b"bcrypt").then_some(())?;
        bcrypt_pbkdf::bcrypt_pbkdf(passphrase?, salt, rounds, &mut key_iv).ok()?;
        let (key, iv) = key_iv.split_at(key_len);
        cipher.decrypt(key, iv, &mut private, tag).ok()?;
    }
    let mut p = Reader(&private);
    let checks = p.bytes(8)?;
    // (Two equal numbers: else a wrong passphrase.)
    (checks[..4] == checks[4..]).then_some(())?;
    let key_type = p.string()?;
    let size = match key_type {
        b"ecdsa-sha2-nistp256" => 32,
        b"ecdsa-sha2-nistp384" => 48,
        b"ecdsa-sha2-nistp521" => 66,
        _ => return None,
    };
    let (curve, point, scalar, comment) = (p.string()?, p.string()?, p.string()?, p.string()?);
    if scalar.len() >= size {
        return None;
    }
    let mut padded = vec![0u8; size - scalar.len()];
    padded.extend_from_slice(scalar);
    let mut section = checks.to_vec();
    for field in [key_type, curve, point, &padded, comment] {
        put_string(&mut section, field);
    }
    let mut pad = 1u8;
    while section.len() % 8 != 0 {
        section.push(pad);
        pad += 1;
    }
    let mut out = b"openssh-key-v1\0".to_vec();
    for field in [&b"none"[..], b"none", b""] {
        put_string(&mut out, field);
    }
    out.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut out, public);
    put_string(&mut out, &section);
    let b64 = base64::engine::general_purpose::STANDARD.encode(out);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(70)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    Some(format!("{BEGIN}\n{}\n{END}\n", lines.join("\n")))
}

/// Reads the length-prefixed fields of OpenSSH's key format.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn is_decrypt_failure(e: &russh::keys::Error) -> bool {
    use russh::keys::Error as E;
    match e {
        E::KeyIsCorrupt | E::Pad(_) | E::CouldNotReadKey => true,
        other => {
            let s = other.to_string().to_lowercase();
            s.contains("decrypt")
                || s.contains("crypto")
                || s.contains("padding")
                || s.contains("checkint")
        }
    }
}

/// Strip CR, trim, add the final newline, and unwrap base64 if the text is not PEM-armoured.
fn normalize(raw: &str, what: &str) -> Result<String, KeyError> {
    let mut text: String = raw
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .trim()
        .to_string();
    if text.is_empty() {
        return Err(KeyError::Empty { what: what.into() });
    }
    if !text.starts_with("-----BEGIN") && !text.starts_with("PuTTY-User-Key-File-") {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .map(|s| s.replace("\r\n", "\n").trim().to_string())
            .filter(|s| s.starts_with("-----BEGIN") || s.starts_with("PuTTY-User-Key-File-"));
        match decoded {
            Some(s) => text = s,
            None => {
                let public = ["ssh-", "ecdsa-", "sk-"]
                    .iter()
                    .any(|p| text.starts_with(p));
                return Err(KeyError::Unreadable {
                    what: what.into(),
                    reason: match public {
                        true => "this is a public key: give the private one".into(),
                        false => "neither PEM text nor base64 of it".into(),
                    },
                });
            }
        }
    }
    text.push('\n');
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A throwaway ed25519 key made for these tests only.
    const ED25519: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACArtYMwtKBOkRvEjTq5jquBCOBx3ULMeIFSRRGZnjfwWgAAAJBt48EmbePB\nJgAAAAtzc2gtZWQyNTUxOQAAACArtYMwtKBOkRvEjTq5jquBCOBx3ULMeIFSRRGZnjfwWg\nAAAECdB1AWFaZrMZLRajXKMLp+3R09hRcupDMxCxy1V1ZK2yu1gzC0oE6RG8SNOrmOq4EI\n4HHdQsx4gVJFEZmeN/BaAAAACnRlc3RAZmVycnkBAgM=\n-----END OPENSSH PRIVATE KEY-----\n";

    fn ok(text: &str) {
        match from_text(text, None, "test") {
            Ok(Credentials::Key(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plain_crlf_and_no_final_newline() {
        ok(ED25519);
        ok(&ED25519.replace('\n', "\r\n"));
        ok(ED25519.trim_end());
    }

    #[test]
    fn base64_of_key_text() {
        ok(&base64::engine::general_purpose::STANDARD.encode(ED25519));
    }

    #[test]
    fn garbage_is_a_clear_error_without_the_text() {
        let err = from_text("not a key at all", None, KEY_VAR)
            .unwrap_err()
            .to_string();
        assert!(err.contains("SSH_PRIVATE_KEY"), "{err}");
        assert!(!err.contains("not a key at all"), "{err}");
        assert!(matches!(
            from_text("  \r\n", None, KEY_VAR),
            Err(KeyError::Empty { .. })
        ));
    }

    /// Keys as `ssh-keygen` writes them (it is at hand wherever the tests run).
    #[test]
    fn passphrases_and_formats_as_ssh_keygen_writes_them() {
        let dir = std::env::temp_dir().join(format!("ferry-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let keygen = |name: &str, args: &[&str]| -> String {
            let path = dir.join(name);
            let st = std::process::Command::new("ssh-keygen")
                .args(args)
                .args(["-q", "-C", "", "-f"])
                .arg(&path)
                .status()
                .unwrap();
            assert!(st.success());
            std::fs::read_to_string(path).unwrap()
        };
        let load = |text: &str, pass: Option<&str>| from_text(text, pass, "the key");
        // An encrypted legacy PEM ECDSA key (russh decrypts only RSA ones).
        let pem_ec = keygen("ec", &["-t", "ecdsa", "-m", "PEM", "-N", "pw123secret"]);
        assert!(matches!(
            load(&pem_ec, Some("pw123secret")),
            Ok(Credentials::Key(_))
        ));
        assert!(matches!(
            load(&pem_ec, Some("nope")),
            Err(KeyError::WrongPassphrase { .. })
        ));
        assert!(matches!(
            load(&pem_ec, None),
            Err(KeyError::NeedPassphrase { .. })
        ));
        let pem_rsa = keygen(
            "rsa",
            &["-t", "rsa", "-b", "2048", "-m", "PEM", "-N", "pw123secret"],
        );
        assert!(matches!(
            load(&pem_rsa, Some("pw123secret")),
            Ok(Credentials::Key(_))
        ));
        // A passphrase set for some other key: an unencrypted key loads, and a broken one is
        // unreadable, not a wrong passphrase.
        let plain = keygen("plain", &["-t", "ed25519", "-N", ""]);
        assert!(matches!(
            load(&plain, Some("pw123secret")),
            Ok(Credentials::Key(_))
        ));
        let broken = plain.replace('\n', " ");
        let err = load(&broken, Some("pw123secret")).unwrap_err();
        assert!(matches!(err, KeyError::Unreadable { .. }), "{err}");
        // A public key where the private one belongs: named as given, and said.
        let public = std::fs::read_to_string(dir.join("plain.pub")).unwrap();
        let err = from_text(&public, None, "id.pub").unwrap_err().to_string();
        assert!(
            err.starts_with("id.pub ") && err.contains("public key"),
            "{err}"
        );
        let err = from_text("", None, "empty.key").unwrap_err().to_string();
        assert_eq!(err, "empty.key is empty");
        // A P-256 key whose scalar is 31 bytes (see `pad_short_ecdsa_scalar`), encrypted, with
        // the default cipher and an AEAD one. (Not with chacha20-poly1305, whose key-file form
        // `ssh-cipher` does not decrypt: such a key stays unreadable, 1 in 256 of them.)
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ecdsa_short_scalar"
        );
        for cipher in ["aes256-ctr", "aes256-gcm@openssh.com"] {
            let path = dir.join("short");
            std::fs::copy(fixture, &path).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            let st = std::process::Command::new("ssh-keygen")
                .args([
                    "-q",
                    "-p",
                    "-P",
                    "",
                    "-N",
                    "pw123secret",
                    "-Z",
                    cipher,
                    "-f",
                ])
                .arg(&path)
                .status()
                .unwrap();
            assert!(st.success());
            let text = std::fs::read_to_string(&path).unwrap();
            let ok = load(&text, Some("pw123secret"));
            assert!(matches!(ok, Ok(Credentials::Key(_))), "{cipher}: {ok:?}");
            let wrong = load(&text, Some("nope"));
            assert!(
                matches!(wrong, Err(KeyError::WrongPassphrase { .. })),
                "{cipher}: {wrong:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
