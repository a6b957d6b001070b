//! The one stream a deploy sends: tar, mostly gzip'd, that the host's own `tar` (GNU or BusyBox)
//! unpacks. Release mode ([`write()`], unpacked in the store): each missing object once as a regular
//! file `objects/<name>`, then the whole new release tree under `incoming/r/` as directory, symlink
//! and hard-link entries (links point at objects, so no content is sent twice). Mode in-place
//! ([`write_in_place`], unpacked beside `to`): the staged files `to` gets, and links that keep
//! leaving content in the store. Both end with the release's manifest and metadata and an
//! `incoming/COMPLETE` trailer the host checks before anything goes live.
//!
//! Files of 512 bytes or more whose content does not compress (images, fonts, archives: judged by
//! the byte entropy of their first block) go in a plain tar sent ahead of the gzip'd one, so
//! neither end spends CPU on them (the host's `gzip -d` is its costliest process). In a bulk
//! transfer ([`BULK`], unless `compress: all`) all files of 8 KiB or more go plain, as rsync sends
//! them: there compression costs more CPU than a fast link saves. So do as many smaller ones as
//! the bytes deflating the rest saves can pay for (see [`Budget`]): a plain file costs a 512-byte
//! tar header and padding, which gzip squeezes to a few bytes, and the stream stays below
//! rsync's bytes. (The host's `gzip -d`, at 240 MB/s here, spent 0.4 s on the 93 MB of files of
//! 4-8 KiB in the 50,000-file benchmark tree.)
//!
//! On the wire: a line with the plain tar's length as whole 64 KiB blocks and 512-byte records
//! after them (`0 0`: none), that plain tar (zero-padded to a record; the host reads it with two
//! `dd iflag=fullblock`), then the gzip'd tar.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use tar::{EntryType, Header};

use super::diff::{Apply, Plan, Source};
use super::manifest::{Entry, Kind, Manifest, UNHASHED};

/// Small files that travel with the tree, made from its manifest (the trailer).
pub struct Extras {
    pub manifest: Arc<Vec<u8>>,
    pub digest: String,
    pub meta_json: Vec<u8>,
    /// Release mode: `incoming/modes-used` (see [`super::remote::object_modes`]).
    pub object_modes: Option<String>,
}

/// Makes the trailer from the manifest sent (`None` when re-applying a release the host has).
pub type Trailer<'a> = Option<&'a dyn Fn(&Manifest) -> anyhow::Result<Extras>>;

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h
}

fn rel(prefix: &str, path: &[u8]) -> std::path::PathBuf {
    let mut p = prefix.as_bytes().to_vec();
    p.extend_from_slice(path);
    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(&p))
}

/// Where a stream goes, and what the host can take.
pub struct Sink<'a, W> {
    pub out: W,
    /// Called as content bytes are read.
    pub sent: &'a dyn Fn(u64),
    /// The host's `dd` reads exact blocks (`iflag=fullblock`), so a plain part can go first.
    pub plain: bool,
    /// Gzip every file whose content compresses, not only the small ones.
    pub compress_all: bool,
    /// The local files' hashes are not known yet (a first deploy, where every file is sent):
    /// the stream hashes each file as it reads it, and the writer returns the whole manifest.
    pub learn: bool,
}

impl<W> Sink<'_, W> {
    /// The files of `send` for the plain part (none when the host cannot take one).
    fn pick(&self, root: &Path, local: &Manifest, send: impl Iterator<Item = usize>) -> Vec<usize> {
        match self.plain {
            true => Plain::pick(root, local, send, self.compress_all),
            false => Vec::new(),
        }
    }
}

/// Content to send from which `compress: auto` sends files of 8 KiB (`PLAIN_MIN`) or more as
/// they are, and smaller ones as the byte budget allows.
pub const BULK: u64 = 64 << 20;

/// Without `compress_all`, files at least this big travel in the plain part whether or not their
/// content compresses.
const PLAIN_MIN: u64 = 8 * 1024;
/// Content shorter than this is never judged incompressible: too short a sample to tell.
const SAMPLE_MIN: u64 = 512;
/// Mode bits a directory needs for its owner to put entries in it (write and search).
const FILL: u32 = 0o300;
/// The plain part's length goes as whole blocks of this size and then whole records of
/// [`PLAIN_RECORD`] (the `dd bs` of `remote::DEPLOY`: big reads, and at most a record's padding).
const PLAIN_BLOCK: u64 = 64 * 1024;
const PLAIN_RECORD: u64 = 512;

/// What goes in the plain tar ahead of the gzip member: directories (made first), then files
/// (local entry index, name in the archive).
#[derive(Default)]
struct Plain {
    dirs: Vec<(std::path::PathBuf, u32)>,
    files: Vec<(usize, std::path::PathBuf)>,
}

impl Plain {
    /// The files of `send` that go in the plain part, in order: those whose first block does not
    /// compress (read in parallel), whatever their size (deflating images and fonts costs both
    /// ends CPU for nothing), and without `all`, every file of [`PLAIN_MIN`] or more, then as
    /// many of the smaller ones as [`Budget`] allows.
    fn pick(
        root: &Path,
        local: &Manifest,
        send: impl Iterator<Item = usize>,
        all: bool,
    ) -> Vec<usize> {
        use rayon::prelude::*;
        // (Content, and the files too short to judge: deflated, at most their size.)
        let (mut content, mut unjudged) = (0, 0);
        let files: Vec<(usize, u64)> = send
            .filter_map(|i| match local.entries[i].kind {
                Kind::File { size, .. } => {
                    content += size;
                    if size < SAMPLE_MIN {
                        unjudged += size + Budget::DEFLATED_HEADER;
                    }
                    (size >= SAMPLE_MIN).then_some((i, size))
                }
                _ => None,
            })
            .collect();
        // Without `all`, every `every`-th small file's sample is deflated too: the ratio.
        let small = files.iter().filter(|(_, n)| *n < PLAIN_MIN).count();
        let every = (small / RATIO_SAMPLES).max(1);
        let judged: Vec<(usize, u64, Judged)> = files
            .into_par_iter()
            .enumerate()
            .map(|(k, (i, size))| {
                if size >= PLAIN_MIN && !all {
                    return (i, size, Judged::Plain);
                }
                let path = root.join(OsStr::from_bytes(&local.entries[i].path));
                let mut sample = vec![0; 8192];
                let n = std::fs::File::open(path)
                    .and_then(|f| f.take(8192).read(&mut sample))
                    .unwrap_or(0);
                let sample = &sample[..n];
                let judged = match incompressible(sample) {
                    true => Judged::Plain,
                    false if !all && k % every == 0 => {
                        Judged::Sampled(sample.len(), deflated(sample))
                    }
                    false => Judged::Compresses,
                };
                (i, size, judged)
            })
            .collect();
        let mut picked: Vec<usize> = judged
            .iter()
            .filter(|(_, _, j)| matches!(j, Judged::Plain))
            .map(|(i, _, _)| *i)
            .collect();
        if !all {
            picked.extend(Budget::new(content, unjudged, &judged).fill(&judged));
            picked.sort_unstable();
        }
        picked
    }

    /// Append the directories, then each file through `file` (its content, or for [`Plain::len`]
    /// only its header), so the length and the part itself come from the same entries.
    fn append<W: Write>(
        &self,
        tar: &mut tar::Builder<W>,
        mut file: impl FnMut(&mut tar::Builder<W>, usize, &Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        for (path, mode) in &self.dirs {
            let mut h = header(EntryType::Directory, *mode, 0);
            tar.append_data(&mut h, path, std::io::empty())?;
        }
        for (i, path) in &self.files {
            file(tar, *i, path)?;
        }
        Ok(())
    }

    /// Its length on the wire before padding.
    fn len(&self, local: &Manifest) -> anyhow::Result<u64> {
        let mut tar = tar::Builder::new(Counted {
            inner: std::io::sink(),
            n: 0,
        });
        let mut data = 0;
        self.append(&mut tar, |tar, i, path| {
            if let Kind::File { size, mode, .. } = local.entries[i].kind {
                let mut h = header(EntryType::Regular, mode, size);
                tar.append_data(&mut h, path, std::io::empty())?;
                data += size.div_ceil(512) * 512;
            }
            Ok(())
        })?;
        Ok(tar.into_inner()?.n + data)
    }
}

/// How [`Plain::pick`] judged a file (its first 8 KiB).
enum Judged {
    /// Plain whatever the budget: big, or does not compress.
    Plain,
    Compresses,
    /// Compresses: sample length and its length deflated.
    Sampled(usize, usize),
}

/// Samples deflated to estimate how well the small files of a bulk transfer compress.
const RATIO_SAMPLES: usize = 256;

/// The bytes a bulk transfer may spend to send small files plain: the stream stays within
/// [`Budget::SHARE`] of the content it carries, so below what `rsync -a` sends (the content and
/// a record per file). A plain file costs its size rounded up to 512 bytes and a 512-byte header;
/// a deflated one its size times the ratio the samples got, and a few bytes of header.
struct Budget {
    ratio: f64,
    room: f64,
}

impl Budget {
    /// The share of the content the files may take on the wire. The rest is a margin for what
    /// travels deflated beside them (the manifest, the store's links: about a hundredth of a tree
    /// of small files) and for the sampled ratio's error.
    const SHARE: f64 = 0.97;
    /// About what a deflated file's tar header and padding take.
    const DEFLATED_HEADER: u64 = 32;

    /// `unjudged`: the bytes of the files [`Plain::pick`] did not judge, in the stream.
    fn new(content: u64, unjudged: u64, judged: &[(usize, u64, Judged)]) -> Budget {
        let (raw, packed) = judged.iter().fold((0, 0), |(r, p), (_, _, j)| match j {
            Judged::Sampled(r1, p1) => (r + r1, p + p1),
            _ => (r, p),
        });
        let ratio = if raw == 0 {
            1.0
        } else {
            packed as f64 / raw as f64
        };
        let deflated = |n: u64| n as f64 * ratio + Self::DEFLATED_HEADER as f64;
        let spent: f64 = unjudged as f64
            + judged
                .iter()
                .map(|(_, n, j)| match j {
                    Judged::Plain => plain_cost(*n) as f64,
                    _ => deflated(*n),
                })
                .sum::<f64>();
        Budget {
            ratio,
            room: content as f64 * Self::SHARE - spent,
        }
    }

    /// The compressible small files that go plain: the biggest first (the least overhead per
    /// byte spared from deflating), while the room lasts.
    fn fill(mut self, judged: &[(usize, u64, Judged)]) -> Vec<usize> {
        let mut small: Vec<(usize, u64)> = judged
            .iter()
            .filter(|(_, _, j)| !matches!(j, Judged::Plain))
            .map(|(i, n, _)| (*i, *n))
            .collect();
        small.sort_unstable_by_key(|&(_, n)| std::cmp::Reverse(n));
        let mut plain = Vec::new();
        for (i, n) in small {
            let extra =
                plain_cost(n) as f64 - (n as f64 * self.ratio + Self::DEFLATED_HEADER as f64);
            if extra > self.room {
                break;
            }
            self.room -= extra;
            plain.push(i);
        }
        plain
    }
}

/// A file's bytes in a plain tar: a header and its content padded to whole 512-byte blocks.
fn plain_cost(size: u64) -> u64 {
    512 + size.div_ceil(512) * 512
}

/// The length of `data` deflated at the stream's level.
fn deflated(data: &[u8]) -> usize {
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(LEVEL));
    let _ = z.write_all(data);
    z.finish().map_or(data.len(), |v| v.len())
}

/// A writer that counts what passes through.
struct Counted<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(data)?;
        self.n += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Append `e`'s content under `name`, checked against the hash it was planned with (unless that is
/// [`UNHASHED`]: the stream learns it); returns the hash of what was read.
fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    root: &Path,
    e: &Entry,
    name: &Path,
    sent: &dyn Fn(u64),
) -> anyhow::Result<[u8; 32]> {
    let Kind::File { size, mode, hash } = &e.kind else {
        bail!("not a file");
    };
    let full = root.join(std::ffi::OsStr::from_bytes(&e.path));
    let f =
        std::fs::File::open(&full).with_context(|| format!("cannot read {}", full.display()))?;
    let mut reader = Verify {
        inner: f.take(*size),
        hasher: blake3::Hasher::new(),
        n: 0,
        sent,
    };
    let mut h = header(EntryType::Regular, *mode, *size);
    tar.append_data(&mut h, name, &mut reader)
        .with_context(|| format!("sending {}", full.display()))?;
    let read = *reader.hasher.finalize().as_bytes();
    if reader.n != *size || (*hash != UNHASHED && read != *hash) {
        bail!(
            "{} changed while ferry was sending it; rebuild or re-run the deploy",
            full.display()
        );
    }
    Ok(read)
}

/// The tar builder over the gzip member, and what reading a file needs.
struct Stream<'a, W: Write> {
    tar: tar::Builder<flate2::write::GzEncoder<W>>,
    root: &'a Path,
    local: &'a Manifest,
    sent: &'a dyn Fn(u64),
    /// With [`Sink::learn`]: each file's hash as it was read (by entry index; zero until sent).
    learned: Option<Vec<[u8; 32]>>,
    /// Directories of the tree the owner may not write to: made writable, their modes listed for
    /// the host to set once the tree is complete (`finish`).
    read_only: Vec<(std::path::PathBuf, u32)>,
    /// The tree's top directory's mode, if the owner may not write to it: the host sets it after
    /// renaming the tree into place (a directory one may not write to cannot move to another).
    root_mode: Option<u32>,
}

impl<'a, W: Write> Stream<'a, W> {
    /// Write the plain part's length and the plain part, then open the gzip member.
    fn new(
        mut out: W,
        root: &'a Path,
        local: &'a Manifest,
        plain: &Plain,
        sent: &'a dyn Fn(u64),
        learn: bool,
    ) -> anyhow::Result<Self> {
        let mut learned = learn.then(|| vec![[0; 32]; local.entries.len()]);
        let len = if plain.files.is_empty() {
            0
        } else {
            plain.len(local)?.next_multiple_of(PLAIN_RECORD)
        };
        writeln!(
            out,
            "{} {}",
            len / PLAIN_BLOCK,
            len % PLAIN_BLOCK / PLAIN_RECORD
        )?;
        if len > 0 {
            let mut tar = tar::Builder::new(Counted { inner: out, n: 0 });
            plain.append(&mut tar, |tar, i, path| {
                let hash = append_file(tar, root, &local.entries[i], path, sent)?;
                if let Some(l) = &mut learned {
                    l[i] = hash;
                }
                Ok(())
            })?;
            let mut c = tar.into_inner().context("finishing the plain part")?;
            let pad = len
                .checked_sub(c.n)
                .context("the plain part outgrew its announced length")?;
            std::io::copy(&mut std::io::repeat(0).take(pad), &mut c)?;
            out = c.inner;
        }
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(LEVEL));
        Ok(Stream {
            tar: tar::Builder::new(gz),
            root,
            local,
            sent,
            learned,
            read_only: Vec::new(),
            root_mode: None,
        })
    }

    fn dir(&mut self, path: impl AsRef<Path>, mode: u32) -> std::io::Result<()> {
        let mut h = header(EntryType::Directory, mode, 0);
        self.tar.append_data(&mut h, path, std::io::empty())
    }

    /// A directory of the deployed tree: writable by the owner while the stream fills it (`tar`
    /// sets a directory's mode when it makes it, and BusyBox's, run by another user than root,
    /// never changes it after), its own mode set by the host at the end (`finish`).
    fn tree_dir(&mut self, path: std::path::PathBuf, mode: u32) -> std::io::Result<()> {
        if mode & FILL != FILL {
            self.read_only.push((path.clone(), mode));
        }
        self.dir(path, mode | FILL)
    }

    /// The top directory of the deployed tree (see [`Stream::tree_dir`]; its mode is set last).
    fn tree_root(&mut self, path: std::path::PathBuf, mode: u32) -> std::io::Result<()> {
        if mode & FILL != FILL {
            self.root_mode = Some(mode);
        }
        self.dir(path, mode | FILL)
    }

    fn link(&mut self, kind: EntryType, mode: u32, path: &Path, to: &Path) -> std::io::Result<()> {
        self.tar.append_link(&mut header(kind, mode, 0), path, to)
    }

    fn symlink(&mut self, path: &Path, target: &[u8]) -> std::io::Result<()> {
        let target = Path::new(OsStr::from_bytes(target));
        self.link(EntryType::Symlink, 0o777, path, target)
    }

    /// Entry `e` of a release tree under `path` if it is a directory or a symlink; `false` for a
    /// file (the caller's to send or link).
    fn tree_entry(&mut self, path: &Path, e: &Entry) -> std::io::Result<bool> {
        match &e.kind {
            Kind::Dir { mode } => self.tree_dir(path.to_path_buf(), *mode)?,
            Kind::Symlink { target } => self.symlink(path, target)?,
            Kind::File { .. } => return Ok(false),
        }
        Ok(true)
    }

    fn small(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let mut h = header(EntryType::Regular, 0o644, data.len() as u64);
        self.tar.append_data(&mut h, name, data)
    }

    /// Local entry `i`'s content under `name`: checked against the hash it was planned with, or
    /// (learning, not hashed yet) hashed as it is read. Returns that hash.
    fn file(&mut self, i: usize, name: &Path) -> anyhow::Result<[u8; 32]> {
        let e = &self.local.entries[i];
        let hash = append_file(&mut self.tar, self.root, e, name, self.sent)?;
        if let Some(l) = &mut self.learned {
            l[i] = hash;
        }
        Ok(hash)
    }

    /// The small files and the trailer, then the end of the stream. Returns the manifest sent
    /// when the stream learned its hashes.
    fn finish(mut self, dir: &str, trailer: Trailer<'_>) -> anyhow::Result<Option<Manifest>> {
        // `incoming/modes`: `<mode>/./<path under incoming/>`, deepest first (a parent that loses
        // its search bit would hide its children).
        let mut modes = Vec::new();
        for (path, mode) in self.read_only.iter().rev() {
            let path = path.as_os_str().as_bytes();
            let path = path.strip_prefix(dir.as_bytes()).unwrap_or(path);
            modes.extend_from_slice(format!("{mode:o}/./").as_bytes());
            modes.extend_from_slice(path);
            modes.push(0);
        }
        if !modes.is_empty() {
            self.small(&format!("{dir}modes"), &modes)?;
        }
        if let Some(mode) = self.root_mode {
            self.small(&format!("{dir}rootmode"), format!("{mode:o}\n").as_bytes())?;
        }
        let learned = self.learned.take().map(|hashes| {
            let mut m = self.local.clone();
            for (e, h) in m.entries.iter_mut().zip(hashes) {
                if let Kind::File { hash, .. } = &mut e.kind
                    && h != UNHASHED
                {
                    *hash = h;
                }
            }
            m
        });
        if let Some(trailer) = trailer {
            let x = trailer(learned.as_ref().unwrap_or(self.local))?;
            self.small(&format!("{dir}manifest"), &x.manifest)?;
            self.small(&format!("{dir}digest"), x.digest.as_bytes())?;
            self.small(&format!("{dir}meta.json"), &x.meta_json)?;
            if let Some(m) = &x.object_modes {
                self.small(&format!("{dir}modes-used"), m.as_bytes())?;
            }
        }
        self.small(&format!("{dir}COMPLETE"), b"ok\n")?;
        let gz = self.tar.into_inner().context("finishing the stream")?;
        let mut out = gz.finish().context("finishing the stream")?;
        out.flush().context("finishing the stream")?;
        Ok(learned)
    }
}

/// Release mode: the stream for `plan` (unpacked in the store): each missing object, then the new
/// release tree under `incoming/r/` as links. `sent(n)` is called as content bytes are read.
pub fn write(
    root: &Path,
    local: &Manifest,
    plan: &Plan,
    trailer: Trailer<'_>,
    sink: Sink<'_, impl Write>,
) -> anyhow::Result<Option<Manifest>> {
    if sink.learn {
        return write_learning(root, local, plan, trailer, sink);
    }
    let object = |i: usize| local.entries[i].object().map(|o| format!("objects/{o}"));
    let picked = sink.pick(root, local, plan.send.iter().copied());
    let plain = Plain {
        dirs: Vec::new(),
        files: picked
            .iter()
            .filter_map(|&i| Some((i, object(i)?.into())))
            .collect(),
    };
    let mut s = Stream::new(sink.out, root, local, &plain, sink.sent, false)?;
    s.dir("objects", 0o755)?;
    let picked: rustc_hash::FxHashSet<usize> = picked.into_iter().collect();
    for &i in plan.send.iter().filter(|i| !picked.contains(i)) {
        if let Some(obj) = object(i) {
            s.file(i, Path::new(&obj))?;
        }
    }
    s.tree_root("incoming/r".into(), local.root_mode)?;
    for e in &local.entries {
        let path = rel("incoming/r/", &e.path);
        if let (Kind::File { mode, .. }, false) = (&e.kind, s.tree_entry(&path, e)?) {
            let obj = format!("objects/{}", e.object().expect("file"));
            s.link(EntryType::Link, *mode, &path, Path::new(&obj))?
        }
    }
    s.finish("incoming/", trailer)
}

/// Release mode when most hashes are not known yet (a first deploy: `plan.send` is every file
/// but known copies). An object's name is known only once its content is read, so each file
/// goes to its path in the tree and its object follows as a hard link to it; a later path with
/// the same content is linked to that object (if not known as a copy before, its content
/// travelled once more: only small files, see `COPY_MIN` in [`super`]).
fn write_learning(
    root: &Path,
    local: &Manifest,
    plan: &Plan,
    trailer: Trailer<'_>,
    sink: Sink<'_, impl Write>,
) -> anyhow::Result<Option<Manifest>> {
    let tree = |p: &[u8]| rel("incoming/r/", p);
    let picked = sink.pick(root, local, plan.send.iter().copied());
    // The plain part makes the tree's directories (writable while filled) before its files.
    let mut plain = Plain::default();
    if !picked.is_empty() {
        plain
            .dirs
            .push(("incoming/r".into(), local.root_mode | FILL));
        plain
            .dirs
            .extend(local.entries.iter().filter_map(|e| match e.kind {
                Kind::Dir { mode } => Some((tree(&e.path), mode | FILL)),
                _ => None,
            }));
        plain.files = picked
            .iter()
            .map(|&i| (i, tree(&local.entries[i].path)))
            .collect();
    }
    let mut s = Stream::new(sink.out, root, local, &plain, sink.sent, true)?;
    s.dir("objects", 0o755)?;
    let in_plain: rustc_hash::FxHashSet<usize> = picked.into_iter().collect();
    let send: rustc_hash::FxHashSet<usize> = plan.send.iter().copied().collect();
    s.tree_root("incoming/r".into(), local.root_mode)?;
    let mut objects = rustc_hash::FxHashSet::default();
    for (i, e) in local.entries.iter().enumerate() {
        let path = tree(&e.path);
        let (Kind::File { mode, hash, .. }, false) = (&e.kind, s.tree_entry(&path, e)?) else {
            continue;
        };
        let hash = if in_plain.contains(&i) {
            s.learned.as_ref().expect("learning")[i]
        } else if send.contains(&i) {
            s.file(i, &path)?
        } else {
            *hash
        };
        let obj = std::path::PathBuf::from(format!(
            "objects/{}",
            super::manifest::ObjectId::new(hash, *mode)
        ));
        if objects.insert(obj.clone()) {
            s.link(EntryType::Link, *mode, &obj, &path)?
        } else {
            s.link(EntryType::Link, *mode, &path, &obj)?
        }
    }
    s.finish("incoming/", trailer)
}

/// The staging directory inside `to` (same filesystem, so staged files rename into place).
pub const STAGING: &str = ".ferry-incoming";

/// Mode `in-place`: the stream for `apply`, unpacked in the directory that holds both `to`
/// (`<name>`) and its store (`.<name>.ferry`). It links each live file whose content leaves `to`
/// into the store's objects, stages every path `to` gets under `<name>/.ferry-incoming/` (content
/// from the stream, or a hard link to where the host has it, which the host then copies so no two
/// paths share an inode), and leaves the lists the host applies in `.<name>.ferry/incoming/`:
/// `dirs` (`<mode>/<path>`, NUL-separated) and `gone`.
pub fn write_in_place(
    root: &Path,
    name: &str,
    local: &Manifest,
    apply: &Apply,
    trailer: Trailer<'_>,
    sink: Sink<'_, impl Write>,
) -> anyhow::Result<Option<Manifest>> {
    // (Learning, nothing can come from the host: `to` and the store are missing.)
    if sink.learn && !apply.fresh {
        bail!("hashes are learned only for a missing `to`");
    }
    let store = format!(".{name}.ferry/");
    // A missing `to` is staged whole (with its directories' modes) in the store, renamed in later.
    let (staging, staging_mode) = if apply.fresh {
        (format!("{store}incoming/t/"), local.root_mode)
    } else {
        (format!("{name}/{STAGING}/"), 0o700)
    };
    // Files of the plain part land where they are staged; its directories come first: private in
    // staging, with their own modes when `to` is missing (filled, then set like the tree's).
    let picked = sink.pick(
        root,
        local,
        apply.write.iter().filter_map(|(i, from)| match from {
            Source::Sent => Some(*i),
            _ => None,
        }),
    );
    let mut plain = Plain::default();
    if !picked.is_empty() {
        plain
            .dirs
            .push((staging.clone().into(), staging_mode | FILL));
        // A missing `to`'s directories get their own modes (writable while filled: BusyBox `tar`
        // under a login other than root never changes a directory's mode once made).
        let modes: rustc_hash::FxHashMap<&[u8], u32> = match apply.fresh {
            true => local
                .entries
                .iter()
                .filter_map(|e| match e.kind {
                    Kind::Dir { mode } => Some((e.path.as_slice(), mode | FILL)),
                    _ => None,
                })
                .collect(),
            false => Default::default(),
        };
        let mut made = rustc_hash::FxHashSet::default();
        for &i in &picked {
            let path = &local.entries[i].path;
            for (j, &b) in path.iter().enumerate() {
                if b == b'/' && made.insert(&path[..j]) {
                    let mode = modes.get(&path[..j]).copied().unwrap_or(0o700);
                    plain.dirs.push((rel(&staging, &path[..j]), mode));
                }
            }
        }
        plain.files = picked
            .into_iter()
            .map(|i| (i, rel(&staging, &local.entries[i].path)))
            .collect();
    }
    let mut s = Stream::new(sink.out, root, local, &plain, sink.sent, sink.learn)?;
    let in_plain: rustc_hash::FxHashSet<usize> = plain.files.iter().map(|(i, _)| *i).collect();
    // Records `<object>/<path>` for the host to copy when `to` is on another filesystem.
    let (mut keep, mut fetch) = (Vec::new(), Vec::new());
    // The live files in `to` that content is linked or copied from (`./<path>`): the host checks
    // that none was edited while the stream ran.
    let mut linked = Vec::new();
    let mut source = |path: &[u8]| {
        linked.extend_from_slice(b"./");
        linked.extend_from_slice(path);
        linked.push(0);
    };
    let record = |list: &mut Vec<u8>, obj: &super::manifest::ObjectId, path: &[u8]| {
        list.extend_from_slice(obj.to_string().as_bytes());
        list.push(b'/');
        list.extend_from_slice(path);
        list.push(0);
    };
    for (obj, path) in &apply.preserve {
        source(path);
        if apply.xdev || apply.copy_kept.contains(path) {
            record(&mut keep, obj, path);
            continue;
        }
        let (at, live) = (
            format!("{store}objects/{obj}"),
            rel(&format!("{name}/"), path),
        );
        s.link(EntryType::Link, 0o644, Path::new(&at), &live)?;
    }
    if apply.fresh {
        s.tree_root(staging.clone().into(), staging_mode)?;
        for e in &local.entries {
            if let Kind::Dir { mode } = e.kind {
                s.tree_dir(rel(&staging, &e.path), mode)?;
            }
        }
    } else {
        s.dir(&staging, staging_mode)?;
    }
    // Content the host has is staged as a hard link to it: the first link to each source under
    // `.ferry-incoming.links/` (the host copies that subtree with one tar pipe), further ones in
    // place (copied one by one).
    let links = format!("{staging}{STAGING}.links/");
    let mut made = std::collections::HashSet::new();
    // Where each staged path's content came from: (source key, prefix, copied by `fetch`).
    let mut origin: std::collections::HashMap<&[u8], (String, &str, bool)> = Default::default();
    let mut copied_once = std::collections::HashSet::new();
    // Whether any staged path outside `.ferry-incoming.links/` is a hard link (the host then
    // gives each its own copy).
    let mut shared = false;
    for (i, from) in &apply.write {
        let e = &local.entries[*i];
        if let Source::Live(p) = from {
            source(p);
        }
        // Across filesystems a store object is copied by the host (`fetch`), straight to staging,
        // and so is each further path of that content.
        let (key, target, fetched) = match from {
            Source::Sent => (format!("s:{}", e.display()), None, false),
            Source::Object(o) if apply.xdev => (format!("o:{o}"), None, true),
            Source::Object(o) => (
                format!("o:{o}"),
                Some(rel(&format!("{store}objects/"), o.to_string().as_bytes())),
                false,
            ),
            Source::Live(p) => (
                format!("l:{}", String::from_utf8_lossy(p)),
                Some(rel(&format!("{name}/"), p)),
                false,
            ),
            Source::Staged(p) => {
                let (key, prefix, fetched) = origin.get(p.as_slice()).cloned().unwrap_or_default();
                let target = (!fetched).then(|| rel(prefix, p));
                (key, target, fetched)
            }
        };
        let prefix: &str = match (&e.kind, &target) {
            (Kind::File { .. }, Some(_)) if !apply.fresh && copied_once.insert(key.clone()) => {
                &links
            }
            _ => &staging,
        };
        origin.insert(&e.path, (key, prefix, fetched));
        for (j, &b) in e.path.iter().enumerate() {
            if !apply.fresh && b == b'/' && made.insert((prefix, &e.path[..j])) {
                s.dir(rel(prefix, &e.path[..j]), 0o700)?;
            }
        }
        let path = rel(prefix, &e.path);
        if fetched {
            record(&mut fetch, &e.object().expect("file"), &e.path);
            continue;
        }
        match (&e.kind, target) {
            (Kind::Symlink { target }, _) => s.symlink(&path, target)?,
            (Kind::File { mode, .. }, Some(to)) => {
                shared |= prefix != links.as_str();
                s.link(EntryType::Link, *mode, &path, &to)?
            }
            // (Already staged by the plain part.)
            (Kind::File { .. }, None) if in_plain.contains(i) => {}
            _ => {
                s.file(*i, &path)?;
            }
        }
    }
    let list = |items: &mut dyn Iterator<Item = Vec<u8>>| -> Vec<u8> {
        items
            .flat_map(|mut p| {
                p.push(0);
                p
            })
            .collect()
    };
    // `<mode>/./<path>`: the host's `mkdir` and `chmod` never take a path for an option. A
    // directory the owner may not write to is made writable and stays so while the apply fills
    // it (`open`: the tree's such directories that exist, parents first); `close` gives them
    // their modes at the end, deepest first. (A missing `to` was filled in staging: `modes`.)
    let dirs = list(
        &mut apply
            .dirs
            .iter()
            .map(|(mode, p)| [format!("{:o}/./", mode | FILL).as_bytes(), p].concat()),
    );
    let locked: Vec<(u32, &[u8])> = match apply.fresh {
        true => Vec::new(),
        false => std::iter::once((local.root_mode, &b"."[..]))
            .chain(local.entries.iter().filter_map(|e| match e.kind {
                Kind::Dir { mode } => Some((mode, e.path.as_slice())),
                _ => None,
            }))
            .filter(|(mode, _)| mode & FILL != FILL)
            .collect(),
    };
    let open = list(&mut locked.iter().map(|(_, p)| [b"./", *p].concat()));
    let close = list(
        &mut locked
            .iter()
            .rev()
            .map(|(mode, p)| [format!("{mode:o}/./").as_bytes(), p].concat()),
    );
    let gone = list(&mut apply.gone.iter().cloned());
    s.small(&format!("{store}incoming/dirs"), &dirs)?;
    s.small(&format!("{store}incoming/gone"), &gone)?;
    s.small(&format!("{store}incoming/open"), &open)?;
    s.small(&format!("{store}incoming/close"), &close)?;
    s.small(&format!("{store}incoming/keep"), &keep)?;
    s.small(&format!("{store}incoming/fetch"), &fetch)?;
    s.small(&format!("{store}incoming/linked"), &linked)?;
    if shared {
        s.small(&format!("{store}incoming/shared"), b"")?;
    }
    s.finish(&format!("{store}incoming/"), trailer)
}

/// Reads a file while hashing it, so that what is sent is exactly what was hashed.
struct Verify<'a, R> {
    inner: R,
    hasher: blake3::Hasher,
    n: u64,
    sent: &'a dyn Fn(u64),
}

impl<R: Read> Read for Verify<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        (self.sent)(n as u64);
        Ok(n)
    }
}

/// Shannon entropy of the bytes above 7.2 bits per byte: already compressed or random.
fn incompressible(sample: &[u8]) -> bool {
    if (sample.len() as u64) < SAMPLE_MIN {
        return false;
    }
    let mut counts = [0u32; 256];
    for &b in sample {
        counts[b as usize] += 1;
    }
    let n = sample.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    bits > 7.2
}

/// zlib level 2: level 1 (zlib-rs's "quick") leaves a sixth more bytes for little less CPU.
const LEVEL: u32 = 2;

/// A `Write` that hands chunks to the async side; fails once the receiver is gone.
pub struct ChannelWriter {
    pub tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    pub buf: Vec<u8>,
}

const CHUNK: usize = 256 * 1024;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::take(&mut self.buf);
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "connection closed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::diff;
    use crate::sync::manifest::scan;

    /// The stream unpacks with the system's GNU tar and BusyBox tar into the expected layout.
    #[test]
    fn unpacks_with_gnu_and_busybox_tar() {
        let base = std::env::temp_dir().join(format!("ferry-archive-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let src = base.join("src");
        std::fs::create_dir_all(src.join("a b/c\nd")).unwrap();
        std::fs::write(src.join("a b/c\nd/x\u{e9}.js"), b"one").unwrap();
        std::fs::write(src.join(format!("{}.txt", "long".repeat(40))), b"two").unwrap();
        std::fs::write(src.join("dup"), b"one").unwrap();
        let noise = noise(100_000);
        std::fs::write(src.join("noise.png"), &noise).unwrap();
        std::fs::write(src.join("text.js"), "const x = 1;\n".repeat(5000)).unwrap();
        let big: String = (0..60_000)
            .map(|i| format!("let v{} = {i};\n", i % 977))
            .collect();
        std::fs::write(src.join("big.js"), &big).unwrap();
        std::os::unix::fs::symlink("dup", src.join("link")).unwrap();
        let m = scan(&src, &[], None).unwrap();
        let p = diff::plan(&m, None, &Default::default());
        let trailer = |m: &Manifest| {
            Ok(Extras {
                manifest: Arc::new(m.encode()),
                digest: m.digest(),
                meta_json: b"{}".to_vec(),
                object_modes: None,
            })
        };
        assert!(incompressible(&noise[..8192]) && !incompressible(&[b'a'; 8192]));
        // (compress_all, learn): learning, the stream hashes the files it sends.
        for (all, learn) in [(true, false), (false, false), (false, true), (true, true)] {
            let mut out = Vec::new();
            let mut sink = sink(&mut out, all);
            sink.learn = learn;
            let learned = if learn {
                let unhashed = crate::sync::manifest::walk(&src, &[], None).unwrap();
                assert_eq!(unhashed.unhashed.len(), 6);
                let all_files = diff::plan_all(&unhashed.manifest);
                write(&src, &unhashed.manifest, &all_files, Some(&trailer), sink).unwrap()
            } else {
                write(&src, &m, &p, Some(&trailer), sink).unwrap()
            };
            assert_eq!(learned.as_ref(), learn.then_some(&m));
            if all {
                // Only the noise goes plain, padded to a 512-byte record at most.
                let line = out.split(|&b| b == b'\n').next().unwrap();
                let (blocks, records) = std::str::from_utf8(line).unwrap().split_once(' ').unwrap();
                let plain = blocks.parse::<usize>().unwrap() * 65536
                    + records.parse::<usize>().unwrap() * 512;
                assert!(plain > noise.len() && plain < noise.len() + 4096, "{plain}");
                assert!(out.len() < plain + big.len() / 4, "{}", out.len());
            } else {
                assert!(out.len() > big.len() + 100_000, "the big files go plain");
            }
            for tar in ["tar", "busybox tar"] {
                let dst = base.join(format!("{}-{all}-{learn}", tar.replace(' ', "_")));
                std::fs::create_dir_all(&dst).unwrap();
                untar(tar, &dst, &out);
                let r = dst.join("incoming/r");
                assert_eq!(
                    std::fs::read(r.join("a b/c\nd/x\u{e9}.js")).unwrap(),
                    b"one"
                );
                assert_eq!(std::fs::read(r.join("link")).unwrap(), b"one");
                assert_eq!(std::fs::read(r.join("noise.png")).unwrap(), noise);
                assert_eq!(std::fs::read(r.join("text.js")).unwrap().len(), 65000);
                assert_eq!(std::fs::read(r.join("big.js")).unwrap(), big.as_bytes());
                assert_eq!(
                    std::fs::read(r.join(format!("{}.txt", "long".repeat(40)))).unwrap(),
                    b"two"
                );
                assert!(dst.join("incoming/COMPLETE").exists());
                assert_eq!(std::fs::read_dir(dst.join("objects")).unwrap().count(), 5);
                // Every file is a link to its object; the copy of `one` too.
                for e in &m.entries {
                    if let Some(o) = e.object() {
                        let f = r.join(OsStr::from_bytes(&e.path));
                        assert_eq!(
                            inode(&f),
                            inode(&dst.join("objects").join(o.to_string())),
                            "{tar} {f:?}"
                        );
                    }
                }
                let sent = std::fs::read(dst.join("incoming/manifest")).unwrap();
                assert_eq!(Manifest::decode(&sent).unwrap(), m);
            }
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// In place: the stream unpacks beside `to`, staging new content, links to content the host
    /// has, and links keeping content that leaves `to` in the store.
    #[test]
    fn in_place_stream_stages_beside_to() {
        let base = std::env::temp_dir().join(format!("ferry-archive-ip-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let src = base.join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/new.js"), b"new").unwrap();
        std::fs::write(src.join("d/copy.js"), b"new").unwrap();
        std::fs::write(src.join("renamed.js"), b"old").unwrap();
        let noise = noise(70_000);
        std::fs::write(src.join("d/noise.png"), &noise).unwrap();
        std::fs::write(src.join("noise copy.png"), &noise).unwrap();
        let m = scan(&src, &[], None).unwrap();
        let live = Manifest {
            root_mode: m.root_mode,
            entries: vec![Entry {
                path: b"old.js".to_vec(),
                kind: Kind::File {
                    size: 3,
                    mode: 0o644,
                    hash: *blake3::hash(b"old").as_bytes(),
                },
            }],
        };
        let target = diff::Target {
            live: Some(&live),
            ..Default::default()
        };
        let have: rustc_hash::FxHashSet<_> = target.contents().keys().copied().collect();
        let p = diff::plan(&m, Some(&live), &have);
        let apply = diff::in_place(&m, &target, &Default::default(), &p.send, true);
        let mut out = Vec::new();
        write_in_place(&src, "app", &m, &apply, None, sink(&mut out, false)).unwrap();
        assert!(!out.starts_with(b"0 0\n"), "the noise goes in a plain part");
        let old_obj = live.entries[0].object().unwrap();
        for tar in ["tar", "busybox tar"] {
            let dst = base.join(tar.replace(' ', "_"));
            std::fs::create_dir_all(dst.join(".app.ferry/objects")).unwrap();
            std::fs::create_dir_all(dst.join(".app.ferry/incoming")).unwrap();
            std::fs::create_dir_all(dst.join("app")).unwrap();
            std::fs::write(dst.join("app/old.js"), b"old").unwrap();
            untar(tar, &dst, &out);
            let staged = dst.join("app/.ferry-incoming");
            assert_eq!(std::fs::read(staged.join("d/noise.png")).unwrap(), noise);
            let mode = |p: &Path| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::metadata(p).unwrap().permissions().mode() & 0o777
            };
            assert_eq!(mode(&staged), 0o700, "staging stays private");
            assert_eq!(mode(&staged.join("d")), 0o700);
            let copy = staged.join(".ferry-incoming.links/noise copy.png");
            assert_eq!(std::fs::read(copy).unwrap(), noise);
            assert_eq!(std::fs::read(staged.join("d/copy.js")).unwrap(), b"new");
            let links = staged.join(".ferry-incoming.links");
            assert_eq!(std::fs::read(links.join("d/new.js")).unwrap(), b"new");
            assert_eq!(
                inode(&links.join("d/new.js")),
                inode(&staged.join("d/copy.js"))
            );
            assert_eq!(std::fs::read(links.join("renamed.js")).unwrap(), b"old");
            let kept = dst.join(".app.ferry/objects").join(old_obj.to_string());
            assert_eq!(
                inode(&kept),
                inode(&dst.join("app/old.js")),
                "kept by a link"
            );
            assert_eq!(inode(&links.join("renamed.js")), inode(&kept));
            assert!(dst.join(".app.ferry/incoming/COMPLETE").exists());
            assert_eq!(
                std::fs::read(dst.join(".app.ferry/incoming/gone")).unwrap(),
                b"old.js\0"
            );
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    /// Content that does not compress goes plain whatever its size (but for samples too short to
    /// judge); outside `compress_all`, so does every big file.
    #[test]
    fn plain_part_takes_what_does_not_compress() {
        let src = std::env::temp_dir().join(format!("ferry-pick-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(&src).unwrap();
        let text = |n: usize| "let a = b;\n".repeat(n / 11 + 1).into_bytes()[..n].to_vec();
        for (name, data) in [
            ("icon.png", noise(2048)),
            ("tiny.png", noise(300)),
            ("small.js", text(2048)),
            ("photo.jpg", noise(20_000)),
            ("big.js", text(20_000)),
        ] {
            std::fs::write(src.join(name), data).unwrap();
        }
        let m = scan(&src, &[], None).unwrap();
        let picked = |all| {
            let mut names: Vec<String> = Plain::pick(&src, &m, 0..m.entries.len(), all)
                .into_iter()
                .map(|i| String::from_utf8_lossy(&m.entries[i].path).into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(picked(true), ["icon.png", "photo.jpg"]);
        // (No budget here: big.js alone is more than its share of the content.)
        assert_eq!(picked(false), ["big.js", "icon.png", "photo.jpg"]);
        std::fs::remove_dir_all(&src).unwrap();
    }

    /// A bulk transfer sends small files plain, the biggest first, while the stream stays within
    /// its share of the content; without a sample that compresses, none.
    #[test]
    fn the_byte_budget_pays_for_small_plain_files() {
        use Judged::*;
        let judged = [
            (0, 20_000, Plain),
            (1, 6000, Sampled(6000, 2000)),
            (2, 5000, Compresses),
            (3, 3000, Compresses),
            (4, 600, Compresses),
        ];
        // Spent: 20,992 plain and a third of the rest (and 32 bytes a file) deflated, of 34,600
        // bytes' 97%: room for 7,575 more. Plain, 6000 costs 4,624 more, 5000 then 3,933: too much.
        assert_eq!(Budget::new(34_600, 0, &judged).fill(&judged), [1]);
        let ratio = Budget::new(34_600, 0, &judged).ratio;
        assert!((ratio - 1.0 / 3.0).abs() < 1e-9);
        // Files too short to judge count as deflated to their size: 3,000 bytes of them leave 4,575.
        assert!(Budget::new(34_600, 3000, &judged).fill(&judged).is_empty());
        let unsampled = judged.map(|(i, n, j)| match j {
            Sampled(..) => (i, n, Compresses),
            j => (i, n, j),
        });
        assert!(
            Budget::new(34_600, 0, &unsampled)
                .fill(&unsampled)
                .is_empty()
        );
    }

    fn sink(out: &mut Vec<u8>, compress_all: bool) -> Sink<'_, &mut Vec<u8>> {
        Sink {
            out,
            sent: &|_| {},
            plain: true,
            compress_all,
            learn: false,
        }
    }

    /// Bytes that do not compress.
    fn noise(n: u32) -> Vec<u8> {
        (0..n)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    }

    /// Unpack `stream` in `dir` with the host script's `unpack`, run by `sh` and GNU tools
    /// (`tar`) or by BusyBox's (`busybox tar`).
    fn untar(tar: &str, dir: &Path, stream: &[u8]) {
        std::fs::write(dir.join("t.stream"), stream).unwrap();
        let script = format!("{}\nunpack < t.stream", super::super::remote::UNPACK);
        let mut cmd = if tar == "busybox tar" {
            let bin = dir.join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            for tool in ["sh", "dd", "tar", "cat", "gzip"] {
                std::os::unix::fs::symlink("/usr/bin/busybox", bin.join(tool)).unwrap();
            }
            let mut c = std::process::Command::new(bin.join("sh"));
            c.env("PATH", &bin);
            c
        } else {
            std::process::Command::new("sh")
        };
        let st = cmd.arg("-c").arg(script).current_dir(dir).status().unwrap();
        assert!(st.success(), "{tar}");
    }

    fn inode(p: &Path) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
    }
}
