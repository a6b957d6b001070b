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
    #[error("{KEY_VAR} is set but empty")]
    EmptyVar,
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
    let text = normalize(raw)?;
    let decoded =
        russh::keys::decode_secret_key(&text, passphrase).or_else(
            |e| match pad_short_ecdsa_scalar(&text) {
                Some(fixed) => russh::keys::decode_secret_key(&fixed, passphrase),
                None => Err(e),
            },
        );
    match decoded {
        Ok(k) => Ok(Credentials::Key(Arc::new(k))),
        Err(russh::keys::Error::KeyIsEncrypted) => {
            Err(KeyError::NeedPassphrase { what: what.into() })
        }
        Err(e) if passphrase.is_some() && is_decrypt_failure(&e) => {
            Err(KeyError::WrongPassphrase { what: what.into() })
        }
        // (An encrypted PKCS#8 key fails to parse without a passphrase, saying nothing of it.)
        Err(_)
            if passphrase.is_none()
                && text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----") =>
        {
            Err(KeyError::NeedPassphrase { what: what.into() })
        }
        // The error text of the parser never contains key material, only a kind.
        Err(e) => Err(KeyError::Unreadable {
            what: what.into(),
            reason: e.to_string(),
        }),
    }
}

/// OpenSSH stores an ECDSA private scalar as an mpint, which drops leading zero bytes: about one
/// P-256 key in 256 has a 31-byte scalar, and the key parser russh uses (ssh-key 0.7) rejects scalars
/// shorter than 32 bytes. Re-encode such an unencrypted OpenSSH key with the scalar padded to the
/// curve's size (the same number; the parser strips the padding). `None` when the key is not that
/// case. The result stays in memory like the key itself.
fn pad_short_ecdsa_scalar(text: &str) -> Option<String> {
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    let body: String = text
        .trim()
        .strip_prefix(BEGIN)?
        .strip_suffix(END)?
        .split_whitespace()
        .collect();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    let mut r = Reader(&blob);
    r.bytes(15).filter(|m| *m == b"openssh-key-v1\0")?;
    let cipher = r.string()?;
    if cipher != b"none" {
        return None;
    }
    let (_kdf, _kdf_options) = (r.string()?, r.string()?);
    let head_len = blob.len() - r.0.len();
    if r.u32()? != 1 {
        return None;
    }
    let public = r.string()?;
    let private = r.string()?;
    let mut p = Reader(private);
    let checks = p.bytes(8)?;
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
    let mut out = blob[..head_len].to_vec();
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
fn normalize(raw: &str) -> Result<String, KeyError> {
    let mut text: String = raw
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .trim()
        .to_string();
    if text.is_empty() {
        return Err(KeyError::EmptyVar);
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
                return Err(KeyError::Unreadable {
                    what: KEY_VAR.into(),
                    reason: "neither PEM text nor base64 of it".into(),
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
            Err(KeyError::EmptyVar)
        ));
    }
}
