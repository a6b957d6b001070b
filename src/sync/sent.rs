//! Manifests this controller sent to hosts, kept by digest in the cache directory. A host names
//! its live release's digest first; when we hold that manifest, it need not send it back (at
//! 50,000 files: 5.4 MB gzip'd on the host, sent and decoded, about 0.2 s of a redeploy). A
//! controller without it (a fresh CI job) is sent the manifest as before.

use std::path::{Path, PathBuf};

use super::manifest::{self, Manifest, Sealed};

/// Manifests kept; older ones go (each is about 110 bytes per file of its tree).
const KEEP: usize = 16;

fn dir() -> Option<PathBuf> {
    Some(manifest::cache_dir()?.join("manifests"))
}

/// A digest as the host reported it: 32 lowercase hex digits (anything else is no file name).
fn valid(digest: &str) -> bool {
    digest.len() == 32
        && digest
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Keep a manifest sent (best effort: a cache that cannot be written only costs a later deploy
/// the round trip), and drop the oldest beyond the 16 newest.
pub fn keep(sealed: &Sealed) {
    if let Some(dir) = dir() {
        keep_in(&dir, sealed);
    }
}

fn keep_in(dir: &Path, sealed: &Sealed) {
    let file = dir.join(&sealed.digest);
    // Kept already (another host, a redeploy): it only becomes the newest.
    if std::fs::read(&file).is_ok_and(|b| b == *sealed.bytes)
        && let Ok(f) = std::fs::File::options().append(true).open(&file)
        && f.set_modified(std::time::SystemTime::now()).is_ok()
    {
        return;
    }
    if let Err(e) = manifest::replace_file(&file, &sealed.bytes) {
        tracing::debug!("cannot keep the manifest sent in {}: {e:#}", dir.display());
        return;
    }
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    let mut kept: Vec<_> = read
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(valid))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    manifest::sweep_temps(dir);
    if kept.len() > KEEP {
        kept.sort();
        for (_, p) in &kept[..kept.len() - KEEP] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The manifest with this digest, if we kept it and it still has that digest.
pub fn recall(digest: &str) -> Option<Manifest> {
    recall_in(&dir()?, digest)
}

fn recall_in(dir: &Path, digest: &str) -> Option<Manifest> {
    if !valid(digest) {
        return None;
    }
    let file = dir.join(digest);
    let bytes = std::fs::read(&file).ok()?;
    if manifest::digest_of(&bytes) != digest {
        tracing::debug!(
            "{} does not hold what its name says; ignored",
            file.display()
        );
        return None;
    }
    // (Used again: the newest stay.)
    if let Ok(f) = std::fs::File::options().append(true).open(&file) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
    Manifest::decode(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::manifest::{Entry, Kind};

    fn tree(n: u8) -> Manifest {
        Manifest {
            root_mode: 0o755,
            entries: vec![Entry {
                path: format!("f{n}").into_bytes(),
                kind: Kind::File {
                    size: 1,
                    mode: 0o644,
                    hash: [n; 32],
                },
            }],
        }
    }

    /// Kept manifests come back by digest; a damaged file or a malformed digest gives none, and
    /// only the newest [`KEEP`] stay.
    #[test]
    fn keeps_recalls_and_prunes() {
        let dir = std::env::temp_dir().join(format!("ferry-sent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let m = tree(1);
        let s = m.seal();
        assert!(recall_in(&dir, &s.digest).is_none());
        keep_in(&dir, &s);
        assert_eq!(recall_in(&dir, &s.digest), Some(m.clone()));
        assert!(recall_in(&dir, "../../etc/passwd").is_none());
        std::fs::write(dir.join(&s.digest), tree(2).encode()).unwrap();
        assert!(
            recall_in(&dir, &s.digest).is_none(),
            "content that does not match its name"
        );
        keep_in(&dir, &s);
        assert_eq!(recall_in(&dir, &s.digest), Some(m), "kept again: repaired");
        // A temp file a killed run left: it goes once it is old, a fresh one stays.
        let (old, fresh) = (dir.join(".x.1.0"), dir.join(".x.2.0"));
        std::fs::write(&old, b"partial").unwrap();
        std::fs::write(&fresh, b"partial").unwrap();
        let hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let f = std::fs::File::options().append(true).open(&old).unwrap();
        f.set_modified(hours_ago).unwrap();
        for n in 0..(KEEP as u8 + 4) {
            keep_in(&dir, &tree(n + 10).seal());
        }
        assert!(!old.exists() && fresh.exists());
        std::fs::remove_file(&fresh).unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), KEEP);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
