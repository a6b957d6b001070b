//! The local side of a sync: walk the build directory (gitignore-style excludes, no symlink is
//! followed), hash files with blake3 in parallel, and reuse hashes of unchanged files from a cache
//! keyed on path, size, mtime, ctime and inode. Also the manifest's byte format, which the host
//! stores next to each release (paths are bytes: spaces, newlines and non-UTF-8 are fine).

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rayon::prelude::*;
use rustc_hash::FxHashMap as HashMap;

/// What one path of the tree is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File {
        size: u64,
        mode: u32,
        hash: [u8; 32],
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: Vec<u8>,
    },
}

/// One path of the tree, relative to its root, `/`-separated, never empty, `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: Kind,
}

impl Entry {
    /// A file's content-store object (hard links share the mode).
    pub fn object(&self) -> Option<ObjectId> {
        match &self.kind {
            Kind::File { mode, hash, .. } => Some(ObjectId::new(*hash, *mode)),
            _ => None,
        }
    }

    pub fn display(&self) -> String {
        display_path(&self.path)
    }
}

/// A path (or link target) as text for people: bytes that are not UTF-8 as `\xNN`, control
/// characters escaped (`\n`), and `\` as `\\`, so that two different names never look alike
/// and none writes to the terminal.
pub fn display_path(path: &[u8]) -> String {
    let mut out = String::with_capacity(path.len());
    for chunk in path.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' || c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A content-store object: a blake3 hash and a mode, named `<hash hex>.<octal mode>` on the host
/// (formatted only when a name is written: planning compares these by value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub hash: [u8; 32],
    pub mode: u32,
}

impl ObjectId {
    pub fn new(hash: [u8; 32], mode: u32) -> ObjectId {
        ObjectId {
            hash,
            mode: mode & 0o7777,
        }
    }

    /// Parse an object's name as ferry spells it (lowercase hex, the mode without a leading
    /// zero); `None` for any other name.
    pub fn parse(name: &[u8]) -> Option<ObjectId> {
        let (hex, mode) = (name.get(..64)?, name.get(65..)?);
        let lower = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
        let octal = |b: &u8| (b'0'..=b'7').contains(b);
        if name[64] != b'.'
            || !hex.iter().all(lower)
            || mode.is_empty()
            || mode.len() > 4
            || !mode.iter().all(octal)
            || (mode[0] == b'0' && mode.len() > 1)
        {
            return None;
        }
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hex, &mut hash).ok()?;
        Some(ObjectId::new(hash, parse_mode(mode)?))
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 64];
        for (i, &b) in self.hash.iter().enumerate() {
            hex[2 * i] = HEX[usize::from(b >> 4)];
            hex[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        let hex = std::str::from_utf8(&hex).expect("hex digits");
        write!(f, "{hex}.{:o}", self.mode)
    }
}

/// A whole tree: entries sorted by path (a directory precedes its contents), plus the root's mode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    pub root_mode: u32,
    pub entries: Vec<Entry>,
}

const MAGIC: &[u8] = b"ferry-manifest 1\n";

impl Manifest {
    /// Files and their total size.
    pub fn file_stats(&self) -> (u64, u64) {
        self.entries.iter().fold((0, 0), |(n, b), e| match e.kind {
            Kind::File { size, .. } => (n + 1, b + size),
            _ => (n, b),
        })
    }

    /// The stored form: a header line, then one NUL-terminated record per entry:
    /// `F <object> <size>\t<path>`, `D <mode>\t<path>`, `L\t<path>\0<target>`.
    pub fn encode(&self) -> Vec<u8> {
        use std::io::Write;
        // (Written in place, not formatted per record: this runs twice per deploy on big trees.)
        let mut out = Vec::with_capacity(self.entries.len() * 110);
        out.extend_from_slice(MAGIC);
        let _ = write!(out, "R {:o}\0", self.root_mode);
        for e in &self.entries {
            let _ = match &e.kind {
                Kind::File { size, mode, hash } => {
                    let mut hex = [0; 64];
                    hex::encode_to_slice(hash, &mut hex).expect("64 digits for 32 bytes");
                    out.extend_from_slice(b"F ");
                    out.extend_from_slice(&hex);
                    write!(out, ".{:o} {size}\t", mode & 0o7777)
                }
                Kind::Dir { mode } => write!(out, "D {mode:o}\t"),
                Kind::Symlink { .. } => out.write_all(b"L\t"),
            };
            out.extend_from_slice(&e.path);
            out.push(0);
            if let Kind::Symlink { target } = &e.kind {
                out.extend_from_slice(target);
                out.push(0);
            }
        }
        out
    }

    pub fn decode(data: &[u8]) -> anyhow::Result<Manifest> {
        let rest = data
            .strip_prefix(MAGIC)
            .context("not a ferry manifest (version 1)")?;
        let mut fields = rest.split(|&b| b == 0);
        let mut m = Manifest::default();
        while let Some(rec) = fields.next() {
            if rec.is_empty() {
                continue;
            }
            let bad = || anyhow::anyhow!("bad manifest record {:?}", String::from_utf8_lossy(rec));
            if let Some(mode) = rec.strip_prefix(b"R ") {
                m.root_mode = parse_mode(mode).ok_or_else(bad)?;
                continue;
            }
            let tab = rec.iter().position(|&b| b == b'\t').ok_or_else(bad)?;
            let (head, path) = (&rec[..tab], rec[tab + 1..].to_vec());
            let head = std::str::from_utf8(head).map_err(|_| bad())?;
            let mut f = head.split(' ');
            let kind = match [f.next(), f.next(), f.next(), f.next()] {
                [Some("F"), Some(obj), Some(size), None] => {
                    let (hex_hash, mode) = obj.split_once('.').ok_or_else(bad)?;
                    let mut hash = [0u8; 32];
                    hex::decode_to_slice(hex_hash, &mut hash).map_err(|_| bad())?;
                    Kind::File {
                        size: size.parse().map_err(|_| bad())?,
                        mode: parse_mode(mode.as_bytes()).ok_or_else(bad)?,
                        hash,
                    }
                }
                [Some("D"), Some(mode), None, None] => Kind::Dir {
                    mode: parse_mode(mode.as_bytes()).ok_or_else(bad)?,
                },
                [Some("L"), None, None, None] => Kind::Symlink {
                    target: fields.next().ok_or_else(bad)?.to_vec(),
                },
                _ => return Err(bad()),
            };
            m.entries.push(Entry { path, kind });
        }
        Ok(m)
    }

    /// A digest of the content: equal digests mean identical trees (paths, modes, bytes, links).
    pub fn digest(&self) -> String {
        digest_of(&self.encode())
    }

    /// The encoding and its digest, made once (the digest goes to the host first, the bytes in
    /// the trailer and to [`super::sent`]).
    pub fn seal(&self) -> Sealed {
        let bytes = self.encode();
        Sealed {
            digest: digest_of(&bytes),
            bytes: Arc::new(bytes),
        }
    }
}

/// A manifest's encoding (see [`Manifest::encode`]) and its digest.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub digest: String,
    pub bytes: Arc<Vec<u8>>,
}

/// The digest of an encoded manifest: the first 128 bits of its blake3, in hex.
pub fn digest_of(encoded: &[u8]) -> String {
    blake3::hash(encoded).to_hex()[..32].to_string()
}

fn parse_mode(s: &[u8]) -> Option<u32> {
    u32::from_str_radix(std::str::from_utf8(s).ok()?, 8).ok()
}

/// Refuse a symlink that is absolute or climbs out of the tree (judged lexically from its directory).
pub fn check_symlink(path: &[u8], target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("has an empty target".into());
    }
    if target.starts_with(b"/") {
        return Err(format!(
            "points to the absolute path {}",
            display_path(target)
        ));
    }
    let mut depth: i64 = path.split(|&b| b == b'/').count() as i64 - 1;
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!(
                        "points outside the tree ({})",
                        display_path(target)
                    ));
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Refuse a link that leaves the tree once the links it passes through are followed, as the host
/// will: each link may stay inside by its text alone, yet `..` after another link climbs from
/// wherever that one points (`up -> d/l/..` with `d/l -> ../u`, chained, reaches `/`). Resolves
/// every link's target through the tree's links, like `realpath`, and fails on the first that
/// climbs above the root or follows more than 40 links. The error names the link under `root`.
pub fn check_link_chains(m: &Manifest, root: &Path) -> Result<(), String> {
    let links: HashMap<&[u8], &[u8]> = m
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            Kind::Symlink { target } => Some((e.path.as_slice(), target.as_slice())),
            _ => None,
        })
        .collect();
    for (path, target) in &links {
        let mut dir: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        dir.pop();
        let mut hops = 0;
        if let Err(why) = resolve(&links, &mut dir, target, &mut hops) {
            return Err(format!(
                "symlink {}/{} -> {} {why}",
                root.display().to_string().trim_end_matches('/'),
                display_path(path),
                display_path(target)
            ));
        }
    }
    Ok(())
}

/// Walk `target` from the directory `dir` (components), following the tree's links.
fn resolve<'a>(
    links: &HashMap<&'a [u8], &'a [u8]>,
    dir: &mut Vec<&'a [u8]>,
    target: &'a [u8],
    hops: &mut usize,
) -> Result<(), String> {
    if target.starts_with(b"/") {
        return Err("leads to an absolute path".into());
    }
    for part in target.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                if dir.pop().is_none() {
                    return Err("leads outside the tree through the links it passes".into());
                }
            }
            _ => {
                dir.push(part);
                if let Some(next) = links.get(dir.join(&b'/').as_slice()) {
                    *hops += 1;
                    if *hops > 40 {
                        return Err("is part of a loop of links".into());
                    }
                    dir.pop();
                    resolve(links, dir, next, hops)?;
                }
            }
        }
    }
    Ok(())
}

/// Walk `root` and hash it. `cache_file`, if given, is read and rewritten. (For tests: a deploy
/// walks and hashes in steps, see `sync::Source`.)
#[cfg(test)]
pub fn scan(
    root: &Path,
    exclude: &[String],
    cache_file: Option<&Path>,
) -> anyhow::Result<Manifest> {
    walk(root, exclude, cache_file)?.hash()
}

/// A walked tree: every entry stat'ed, files' hashes taken from the cache where it still knows
/// them. The rest are hashed by [`Walked::hash`], or by the stream that sends them
/// ([`Walked::remember`] then keeps what it learned).
pub struct Walked {
    /// The tree; the files of `unhashed` carry a zero hash.
    pub manifest: Manifest,
    /// Indices of the files the cache did not know.
    pub unhashed: Vec<usize>,
    root: PathBuf,
    /// Each file's stat facts (its cache row without the hash), by entry index.
    keys: Vec<(usize, CacheRow)>,
    cache_file: Option<PathBuf>,
    /// Rows the cache held when it was read.
    cached: usize,
}

/// The matcher of a sync step's `exclude` patterns (gitignore's syntax), for paths relative to
/// the tree (the matcher's root, `/`, never prefixes them).
pub fn excludes(patterns: &[String]) -> anyhow::Result<ignore::gitignore::Gitignore> {
    let mut gi = ignore::gitignore::GitignoreBuilder::new("/");
    for pat in patterns {
        gi.add_line(None, pat)
            .with_context(|| format!("bad exclude pattern `{pat}`"))?;
    }
    gi.build().context("building exclude patterns")
}

/// Walk `root` (excludes, no symlink followed) and stat every entry in parallel, reading the
/// hash cache `cache_file` meanwhile. Hashes nothing the cache does not know.
pub fn walk(root: &Path, exclude: &[String], cache_file: Option<&Path>) -> anyhow::Result<Walked> {
    let root_meta = std::fs::metadata(root)
        .with_context(|| format!("cannot read the sync source {}", root.display()))?;
    if !root_meta.is_dir() {
        bail!(
            "the sync source {} is not a directory (check `from:` in the playbook)",
            root.display()
        );
    }
    let gi = excludes(exclude)?;
    let started = std::time::Instant::now();
    // The cache loads while the tree is walked.
    let (entries, cache) = std::thread::scope(|s| {
        let cache = s.spawn(|| cache_file.map(load_cache).unwrap_or_default());
        let entries = walk_dir(root, b"", &gi);
        (entries, cache.join().unwrap_or_default())
    });
    let mut entries = entries?;
    let walked = started.elapsed();
    entries.par_sort_unstable_by(|a, b| a.0.path.cmp(&b.0.path));
    let mut out = Walked {
        manifest: Manifest {
            root_mode: root_meta.mode() & 0o7777,
            entries: Vec::with_capacity(entries.len()),
        },
        unhashed: Vec::new(),
        root: root.to_path_buf(),
        keys: Vec::new(),
        cache_file: cache_file.map(Path::to_path_buf),
        cached: cache.len(),
    };
    for (i, (mut entry, key)) in entries.into_iter().enumerate() {
        if let (Some(k), Kind::File { hash, .. }) = (key, &mut entry.kind) {
            out.keys.push((i, k));
            match cache.get(&entry.path).filter(|row| row.same_file(&k)) {
                Some(row) => *hash = row.hash,
                None => out.unhashed.push(i),
            }
        }
        out.manifest.entries.push(entry);
    }
    check_link_chains(&out.manifest, root).map_err(|why| {
        anyhow::anyhow!(
            "{why}: ferry ships only links that stay inside the tree; replace it with a \
             relative link inside the tree, or exclude it"
        )
    })?;
    tracing::debug!(?walked, stated = ?started.elapsed(), unhashed = out.unhashed.len(), "walked {}", root.display());
    Ok(out)
}

/// The hash of a file not hashed yet.
pub const UNHASHED: [u8; 32] = [0; 32];

impl Walked {
    /// The manifest, hashing in parallel what the cache did not know; the cache learns it.
    #[cfg(test)]
    pub fn hash(&self) -> anyhow::Result<Manifest> {
        let never = std::sync::atomic::AtomicBool::new(false);
        Ok(self.hash_some(|_| true, &never)?.expect("not stopped"))
    }

    /// [`Walked::hash`] that gives up (`None`) once `stop` is set.
    pub fn hash_unless(
        &self,
        stop: &std::sync::atomic::AtomicBool,
    ) -> anyhow::Result<Option<Manifest>> {
        self.hash_some(|_| true, stop)
    }

    /// The manifest for a stream that hashes files as it sends them: only files of `min` bytes
    /// or more that share their size with another are hashed now (so copies of big content are
    /// found before sending); the other files the cache did not know are [`UNHASHED`].
    pub fn hash_copies(&self, min: u64) -> anyhow::Result<Manifest> {
        let size = |i: usize| match self.manifest.entries[i].kind {
            Kind::File { size, .. } if size >= min => Some(size),
            _ => None,
        };
        let mut sizes: HashMap<u64, u32> = HashMap::default();
        for (i, _) in &self.keys {
            if let Some(n) = size(*i) {
                *sizes.entry(n).or_default() += 1;
            }
        }
        let never = std::sync::atomic::AtomicBool::new(false);
        let pick = |i| size(i).is_some_and(|n| sizes[&n] > 1);
        Ok(self.hash_some(pick, &never)?.expect("not stopped"))
    }

    /// The manifest with the unhashed files that `pick` picks hashed (in parallel); `None` if
    /// `stop` was set meanwhile.
    fn hash_some(
        &self,
        pick: impl Fn(usize) -> bool + Sync,
        stop: &std::sync::atomic::AtomicBool,
    ) -> anyhow::Result<Option<Manifest>> {
        use std::sync::atomic::Ordering::Relaxed;
        let started = std::time::Instant::now();
        let hashes = self
            .unhashed
            .par_iter()
            .filter(|&&i| pick(i))
            .map(|&i| {
                if stop.load(Relaxed) {
                    return Ok(None);
                }
                let path = OsStr::from_bytes(&self.manifest.entries[i].path);
                Ok(Some((i, hash_file(&self.root.join(path))?)))
            })
            .collect::<anyhow::Result<Option<Vec<_>>>>()?;
        let Some(hashes) = hashes else {
            tracing::debug!(elapsed = ?started.elapsed(), "stopped hashing {}", self.root.display());
            return Ok(None);
        };
        let mut m = self.manifest.clone();
        let n = hashes.len();
        for (i, h) in hashes {
            if let Kind::File { hash, .. } = &mut m.entries[i].kind {
                *hash = h;
            }
        }
        tracing::debug!(elapsed = ?started.elapsed(), hashed = n, "hashed {}", self.root.display());
        if n == self.unhashed.len() {
            self.remember(&m);
        }
        Ok(Some(m))
    }

    /// Write the hashes of `m` (this tree, hashed) to the cache, if it learned or forgot any.
    pub fn remember(&self, m: &Manifest) {
        let Some(file) = &self.cache_file else {
            return;
        };
        if self.unhashed.is_empty() && self.keys.len() == self.cached {
            return;
        }
        let rows: Vec<(&[u8], CacheRow)> = self
            .keys
            .iter()
            .filter_map(|&(i, k)| match m.entries.get(i)?.kind {
                Kind::File { hash, .. } => {
                    Some((m.entries[i].path.as_slice(), CacheRow { hash, ..k }))
                }
                _ => None,
            })
            .collect();
        if let Err(e) = save_cache(file, &rows) {
            tracing::debug!("cannot write the hash cache {}: {e:#}", file.display());
        }
    }
}

/// The entries under `dir` (at `rel` in the tree; excludes left out), each stat'ed through its
/// directory's descriptor (no path lookup per entry), subdirectories walked in parallel. Files
/// carry their stat facts (a cache row without the hash) and a zero hash.
fn walk_dir(
    dir: &Path,
    rel: &[u8],
    gi: &ignore::gitignore::Gitignore,
) -> anyhow::Result<Vec<(Entry, Option<CacheRow>)>> {
    let mut found = Vec::new();
    let read = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for de in read {
        let de = de.with_context(|| format!("cannot read {}", dir.display()))?;
        let name = de.file_name();
        let mut path = Vec::with_capacity(rel.len() + 1 + name.len());
        if !rel.is_empty() {
            path.extend_from_slice(rel);
            path.push(b'/');
        }
        path.extend_from_slice(name.as_bytes());
        let is_dir = de.file_type().is_ok_and(|t| t.is_dir());
        if !gi
            .matched(Path::new(OsStr::from_bytes(&path)), is_dir)
            .is_ignore()
        {
            found.push((de, path));
        }
    }
    // (The entries, and with them the directory's descriptor, go before the subdirectories are
    // walked: a deep tree holds no descriptor per level.)
    let stated = found
        .into_par_iter()
        .map(|(de, path)| {
            let (entry, key) = stat_entry(&de, path)?;
            let sub = matches!(entry.kind, Kind::Dir { .. }).then(|| de.path());
            Ok((entry, key, sub))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let below = stated
        .par_iter()
        .map(|(entry, _, sub)| match sub {
            Some(sub) => walk_dir(sub, &entry.path, gi),
            None => Ok(Vec::new()),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(stated.len() + below.iter().map(Vec::len).sum::<usize>());
    for ((entry, key, _), below) in stated.into_iter().zip(below) {
        out.push((entry, key));
        out.extend(below);
    }
    Ok(out)
}

/// The entry for one directory entry (a file's hash zero), and for a file its stat facts.
fn stat_entry(de: &std::fs::DirEntry, path: Vec<u8>) -> anyhow::Result<(Entry, Option<CacheRow>)> {
    // (On Linux this is `statx` relative to the directory's descriptor, not following links.)
    let meta = de
        .metadata()
        .with_context(|| format!("cannot stat {}", de.path().display()))?;
    let t = meta.file_type();
    let kind = if t.is_symlink() {
        let full = de.path();
        let target = std::fs::read_link(&full)
            .with_context(|| format!("cannot read symlink {}", full.display()))?;
        let target = target.as_os_str().as_bytes().to_vec();
        if let Err(why) = check_symlink(&path, &target) {
            bail!(
                "symlink {} {why}: ferry ships only links that stay inside the tree; \
                 replace it with a relative link inside the tree, or exclude it",
                full.display()
            );
        }
        Kind::Symlink { target }
    } else if t.is_dir() {
        Kind::Dir {
            mode: meta.mode() & 0o7777,
        }
    } else if t.is_file() {
        let kind = Kind::File {
            size: meta.len(),
            mode: meta.mode() & 0o7777,
            hash: UNHASHED,
        };
        return Ok((Entry { path, kind }, Some(CacheRow::key(&meta))));
    } else {
        bail!(
            "{} is not a regular file, directory or symlink (a socket, fifo or device): exclude it",
            de.path().display()
        );
    };
    Ok((Entry { path, kind }, None))
}

pub fn hash_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new();
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    // One buffer per thread: a fresh zeroed one per file cost more than hashing small files.
    thread_local!(static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 256 * 1024]));
    BUF.with_borrow_mut(|buf| {
        loop {
            let n = f
                .read(buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                return Ok(*h.finalize().as_bytes());
            }
            h.update(&buf[..n]);
        }
    })
}

/// One cached hash and the stat facts it is valid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CacheRow {
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_ns: i64,
    ctime: i64,
    ctime_ns: i64,
    hash: [u8; 32],
}

impl CacheRow {
    fn key(m: &std::fs::Metadata) -> CacheRow {
        CacheRow {
            ino: m.ino(),
            size: m.len(),
            mtime: m.mtime(),
            mtime_ns: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_ns: m.ctime_nsec(),
            hash: [0; 32],
        }
    }

    fn same_file(&self, other: &CacheRow) -> bool {
        CacheRow {
            hash: [0; 32],
            ..*self
        } == *other
    }
}

/// ferry's cache directory: `$XDG_CACHE_HOME/ferry` or `~/.cache/ferry`.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("ferry"))
}

/// Where the hash cache of a source directory lives (in [`cache_dir`]).
pub fn cache_path(root: &Path) -> Option<PathBuf> {
    let abs = std::fs::canonicalize(root).ok()?;
    let key = blake3::hash(abs.as_os_str().as_bytes()).to_hex();
    Some(cache_dir()?.join(format!("hashes-{}", &key[..16])))
}

const CACHE_MAGIC: &[u8; 8] = b"ferryhc1";

fn load_cache(file: &Path) -> HashMap<Vec<u8>, CacheRow> {
    let Ok(data) = std::fs::read(file) else {
        return HashMap::default();
    };
    let Some(mut rest) = data.strip_prefix(CACHE_MAGIC.as_slice()) else {
        return HashMap::default();
    };
    // (Rows are 88 bytes and a path: sized once, not grown row by row.)
    let mut map = HashMap::with_capacity_and_hasher(rest.len() / 128, Default::default());
    let take8 = |r: &mut &[u8]| -> Option<u64> {
        let (a, b) = r.split_at_checked(8)?;
        *r = b;
        Some(u64::from_le_bytes(a.try_into().ok()?))
    };
    while !rest.is_empty() {
        let row = (|| {
            let ino = take8(&mut rest)?;
            let size = take8(&mut rest)?;
            let mtime = take8(&mut rest)? as i64;
            let mtime_ns = take8(&mut rest)? as i64;
            let ctime = take8(&mut rest)? as i64;
            let ctime_ns = take8(&mut rest)? as i64;
            let (h, r) = rest.split_at_checked(32)?;
            rest = r;
            let len = take8(&mut rest)? as usize;
            let (p, r) = rest.split_at_checked(len)?;
            rest = r;
            Some((
                p.to_vec(),
                CacheRow {
                    ino,
                    size,
                    mtime,
                    mtime_ns,
                    ctime,
                    ctime_ns,
                    hash: h.try_into().ok()?,
                },
            ))
        })();
        match row {
            Some((p, r)) => {
                map.insert(p, r);
            }
            None => break,
        }
    }
    map
}

fn save_cache(file: &Path, rows: &[(&[u8], CacheRow)]) -> anyhow::Result<()> {
    let mut out = CACHE_MAGIC.to_vec();
    for (p, r) in rows {
        for v in [
            r.ino,
            r.size,
            r.mtime as u64,
            r.mtime_ns as u64,
            r.ctime as u64,
            r.ctime_ns as u64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&r.hash);
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    replace_file(file, &out)?;
    sweep_temps(file.parent().context("cache path has a parent")?);
    Ok(())
}

/// Remove temp files of [`replace_file`] (names starting with `.`) an hour old or more from
/// `dir`: a run killed while writing left them, and no later write reuses their names.
pub fn sweep_temps(dir: &Path) {
    const STALE: std::time::Duration = std::time::Duration::from_secs(3600);
    let Ok(read) = std::fs::read_dir(dir) else {
        return;
    };
    for e in read.flatten() {
        let stale = || {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE))
        };
        if e.file_name().as_encoded_bytes().starts_with(b".") && stale() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Write `file` whole or not at all (a temp file renamed over it); makes its directory.
pub fn replace_file(file: &Path, data: &[u8]) -> anyhow::Result<()> {
    // (One name per writer: hosts of one run may write the same file at once.)
    static WRITER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = file.parent().context("cache path has a parent")?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.{}",
        file.file_name()
            .unwrap_or(OsStr::new("c"))
            .to_string_lossy(),
        std::process::id(),
        WRITER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, file)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_display_distinctly_and_without_control_characters() {
        assert_eq!(display_path(b"dist/app.js"), "dist/app.js");
        assert_eq!(display_path("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(display_path(b"\xffa"), "\\xffa");
        assert_eq!(display_path(b"\xfea"), "\\xfea");
        assert_eq!(display_path(b"a\nb\x1b[0m"), "a\\nb\\u{1b}[0m");
        // A name that holds the text `\xff` is not the byte 0xff.
        assert_eq!(display_path(b"\\xff"), "\\\\xff");
    }

    fn tmp(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ferry-manifest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn object_names_round_trip_and_others_are_refused() {
        let o = ObjectId::new([0xab; 32], 0o100644);
        assert_eq!(o.mode, 0o644, "only permission bits name an object");
        let name = o.to_string();
        assert_eq!(name, format!("{}.644", "ab".repeat(32)));
        assert_eq!(ObjectId::parse(name.as_bytes()), Some(o));
        let exec = ObjectId::new([1; 32], 0o4755).to_string();
        assert_eq!(ObjectId::parse(exec.as_bytes()).unwrap().mode, 0o4755);
        for bad in [
            name.to_uppercase(),
            format!("{}.0644", "ab".repeat(32)),
            format!("{}.648", "ab".repeat(32)),
            format!("{}.", "ab".repeat(32)),
            format!("{}.644", "ab".repeat(31)),
            format!("{}.644.tmp", "ab".repeat(32)),
            "cc.755".into(),
        ] {
            assert_eq!(ObjectId::parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn symlinks_inside_pass_and_escapes_fail() {
        assert!(check_symlink(b"a/link", b"../b").is_ok());
        assert!(check_symlink(b"a/link", b"./c/../d").is_ok());
        assert!(check_symlink(b"link", b"../x").is_err());
        assert!(check_symlink(b"a/link", b"../../x").is_err());
        assert!(check_symlink(b"a/link", b"/etc/passwd").is_err());
        assert!(check_symlink(b"a/link", b"").is_err());
    }

    #[test]
    fn link_chains_are_followed() {
        let link = |p: &str, t: &str| Entry {
            path: p.as_bytes().to_vec(),
            kind: Kind::Symlink {
                target: t.as_bytes().to_vec(),
            },
        };
        let dir = |p: &str| Entry {
            path: p.as_bytes().to_vec(),
            kind: Kind::Dir { mode: 0o755 },
        };
        let tree = |entries: Vec<Entry>| Manifest {
            root_mode: 0o755,
            entries,
        };
        // Each stays inside by its text; followed, `up` is the parent of the tree.
        let climb = tree(vec![dir("d"), link("d/l", ".."), link("up", "d/l/..")]);
        let err = check_link_chains(&climb, Path::new("/b/dist")).unwrap_err();
        assert!(
            err.starts_with("symlink /b/dist/up -> d/l/.. leads outside"),
            "{err}"
        );
        // Through a link to the root, then one more `..`.
        let deep = tree(vec![
            dir("a"),
            link("a/x", ".."),
            link("d", "a"),
            link("e", "d/x/.."),
        ]);
        assert!(check_link_chains(&deep, Path::new("dist")).is_err());
        let looped = tree(vec![link("a", "b"), link("b", "a")]);
        let err = check_link_chains(&looped, Path::new("dist")).unwrap_err();
        assert!(err.contains("loop"), "{err}");
        // Links into links that stay inside are fine, dangling ones too.
        let ok = tree(vec![
            dir("d"),
            dir("d/e"),
            link("d/l", "e"),
            link("m", "d/l/.."),
            link("n", "d/l/gone"),
            link("top", "d/.."),
        ]);
        check_link_chains(&ok, Path::new("dist")).unwrap();
    }

    #[test]
    fn encode_decode_round_trips_hostile_names() {
        let m = Manifest {
            root_mode: 0o755,
            entries: vec![
                Entry {
                    path: b"a dir".to_vec(),
                    kind: Kind::Dir { mode: 0o750 },
                },
                Entry {
                    path: b"a dir/x\ny\t\xff".to_vec(),
                    kind: Kind::File {
                        size: 3,
                        mode: 0o755,
                        hash: [7; 32],
                    },
                },
                Entry {
                    path: b"l".to_vec(),
                    kind: Kind::Symlink {
                        target: b"a dir/x\ny\t\xff".to_vec(),
                    },
                },
            ],
        };
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        // The host reads a file's record as `F <object> <size>\t<path>` (remote::collect_unnamed).
        let file = format!("F {} 3\ta dir/x\ny\t", m.entries[1].object().unwrap());
        let encoded = m.encode();
        let at = encoded
            .windows(file.len())
            .position(|w| w == file.as_bytes());
        assert!(at.is_some(), "{}", String::from_utf8_lossy(&encoded));
    }

    #[test]
    fn scan_hashes_excludes_and_uses_the_cache() {
        let d = tmp("scan");
        let root = d.join("src");
        std::fs::create_dir_all(root.join("js")).unwrap();
        std::fs::write(root.join("js/app.js"), b"hello").unwrap();
        std::fs::write(root.join("js/app.js.map"), b"map").unwrap();
        std::os::unix::fs::symlink("js/app.js", root.join("latest.js")).unwrap();
        let cache = d.join("cache");
        let m = scan(&root, &["*.map".into()], Some(&cache)).unwrap();
        let paths: Vec<String> = m.entries.iter().map(Entry::display).collect();
        assert_eq!(paths, ["js", "js/app.js", "latest.js"]);
        let Kind::File { hash, size, .. } = &m.entries[1].kind else {
            panic!()
        };
        assert_eq!(hash, blake3::hash(b"hello").as_bytes());
        assert_eq!(*size, 5);
        // The cache answers for unchanged files; a changed file is hashed again.
        assert_eq!(load_cache(&cache).len(), 1);
        std::fs::write(root.join("js/app.js"), b"HELLO").unwrap();
        let m2 = scan(&root, &["*.map".into()], Some(&cache)).unwrap();
        let Kind::File { hash, .. } = &m2.entries[1].kind else {
            panic!()
        };
        assert_eq!(hash, blake3::hash(b"HELLO").as_bytes());
        assert_ne!(m.digest(), m2.digest());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Patterns match paths relative to the tree, as in a `.gitignore` at its top.
    #[test]
    fn excludes_are_anchored_at_the_tree() {
        let d = tmp("anchored");
        let root = d.join("src");
        for dir in ["src", "cache", "js"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for f in [
            "keep.txt",
            "src/keep.txt",
            "cache/x",
            "js/cache",
            "a.log",
            "b.log",
        ] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let exclude = ["/keep.txt", "cache/", "*.log", "!b.log"].map(String::from);
        let m = scan(&root, &exclude, None).unwrap();
        let paths: Vec<String> = m.entries.iter().map(Entry::display).collect();
        assert_eq!(paths, ["b.log", "js", "js/cache", "src", "src/keep.txt"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn scan_refuses_escaping_symlink_naming_it() {
        let d = tmp("escape");
        std::os::unix::fs::symlink("/etc/passwd", d.join("pw")).unwrap();
        let err = format!("{:#}", scan(&d, &[], None).unwrap_err());
        assert!(err.contains("pw") && err.contains("absolute"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
