//! The pure core of a sync: given the local manifest, the live release's manifest and the objects the
//! host's store holds (minus those edited by hand), decide what to send and what the change is.
//! No IO here; tested with data.

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use super::manifest::{Entry, Kind, Manifest, ObjectId, UNHASHED};

/// What a deploy changes on one host, and what it must send.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    /// Paths (files and symlinks) new, changed or gone relative to the live release.
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub deleted: Vec<String>,
    pub unchanged: u64,
    /// Bytes of added + changed files.
    pub changed_bytes: u64,
    /// Indices into the local manifest of the files whose content the host lacks (one per object).
    #[serde(skip)]
    pub send: Vec<usize>,
    /// Content bytes to send (before compression).
    pub send_bytes: u64,
}

impl Plan {
    /// True when the host already serves exactly this tree and nothing needs sending.
    pub fn is_noop(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.deleted.is_empty()
    }
}

/// Compare. `live` is `None` on a first deploy; `have` holds object names present and trusted.
pub fn plan(local: &Manifest, live: Option<&Manifest>, have: &HashSet<ObjectId>) -> Plan {
    let mut p = Plan::default();
    let live_files = || {
        live.into_iter()
            .flat_map(|m| &m.entries)
            .filter(|e| !matches!(e.kind, Kind::Dir { .. }))
    };
    let before: HashMap<&[u8], &Entry> = live_files().map(|e| (e.path.as_slice(), e)).collect();
    let mut seen_paths = HashSet::default();
    let mut queued = HashSet::default();
    for (i, e) in local.entries.iter().enumerate() {
        if matches!(e.kind, Kind::Dir { .. }) {
            continue;
        }
        seen_paths.insert(e.path.as_slice());
        let size = match e.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        };
        match before.get(e.path.as_slice()) {
            None => {
                p.added.push(e.display());
                p.changed_bytes += size;
            }
            Some(old) if same(old, e) => p.unchanged += 1,
            Some(_) => {
                p.changed.push(e.display());
                p.changed_bytes += size;
            }
        }
        if let Some(obj) = e.object()
            && !have.contains(&obj)
            && queued.insert(obj)
        {
            p.send.push(i);
            p.send_bytes += size;
        }
    }
    for e in live_files() {
        if !seen_paths.contains(e.path.as_slice()) {
            p.deleted.push(e.display());
        }
    }
    p
}

/// A first deploy whose hashes are mostly not known yet (the stream learns them): every path is
/// added, every file sent but copies of content already queued (as far as hashes are known).
pub fn plan_all(local: &Manifest) -> Plan {
    let mut p = Plan::default();
    let mut queued = HashSet::default();
    for (i, e) in local.entries.iter().enumerate() {
        match e.kind {
            Kind::Dir { .. } => continue,
            Kind::File { size, hash, mode } => {
                p.changed_bytes += size;
                if hash == UNHASHED || queued.insert((hash, mode)) {
                    p.send.push(i);
                    p.send_bytes += size;
                }
            }
            Kind::Symlink { .. } => {}
        }
        p.added.push(e.display());
    }
    p
}

/// In-place mode: what the directory `to` holds now, as far as the host could tell.
#[derive(Debug, Default)]
pub struct Target<'a> {
    /// The manifest of the release last applied into `to` (`None`: none yet).
    pub live: Option<&'a Manifest>,
    /// Paths (not directories) written, added or replaced by hand since that apply.
    pub changed: HashSet<&'a [u8]>,
    /// Every path in `to`, when the host listed them (a directory changed, none was applied, or
    /// extras kept before are now to go).
    pub listing: Option<HashSet<&'a [u8]>>,
    /// The listed paths that are directories.
    pub dirs: HashSet<&'a [u8]>,
    /// `to` does not exist yet.
    pub missing: bool,
    /// `to` is on another filesystem than the store.
    pub xdev: bool,
    /// Paths in `to` that the step's `exclude` matches: never deleted, never a hand change (as
    /// `rsync --delete` leaves excluded files alone: uploads, say).
    pub keep: HashSet<&'a [u8]>,
    /// `to` itself no longer has the mode the live release gave it (a `chmod` by hand).
    pub root_changed: bool,
    /// [`Target::contents`], once asked for.
    pub(super) contents: std::cell::OnceCell<HashMap<ObjectId, &'a [u8]>>,
}

impl<'a> Target<'a> {
    /// The entry's path still holds what the live release put there (a file or link is still no
    /// directory, a directory still one). A path `exclude` matches now is not ferry's any more:
    /// never a source of content, whatever it holds.
    fn intact(&self, e: &Entry) -> bool {
        let p = e.path.as_slice();
        !self.changed.contains(p)
            && !self.keep.contains(p)
            && self.listing.as_ref().is_none_or(|l| {
                l.contains(p) && self.dirs.contains(p) == matches!(e.kind, Kind::Dir { .. })
            })
    }

    /// Objects the host holds in `to`, each at one intact path (worked out once).
    pub fn contents(&self) -> &HashMap<ObjectId, &'a [u8]> {
        self.contents.get_or_init(|| {
            let mut out = HashMap::default();
            for e in self.live.map(|m| m.entries.as_slice()).unwrap_or_default() {
                if let Some(o) = e.object()
                    && self.intact(e)
                {
                    out.entry(o).or_insert(e.path.as_slice());
                }
            }
            out
        })
    }
}

/// Where a file `to` must get comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The stream (the local file; symlinks too).
    Sent,
    /// The store's object of that name.
    Object(ObjectId),
    /// A file in `to` that holds this content now.
    Live(Vec<u8>),
    /// An earlier path of this apply that gets the same content.
    Staged(Vec<u8>),
}

/// In-place mode: the work that turns `to` into the local tree.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Apply {
    /// Local entries (files, symlinks) `to` must get, and where each comes from.
    pub write: Vec<(usize, Source)>,
    /// Live files whose content goes into the store (object, path) before they are replaced or
    /// removed, so that earlier releases can be applied again.
    pub preserve: Vec<(ObjectId, Vec<u8>)>,
    /// Of those, the ones that stay in `to` as extras (`delete: false`): kept by copying, since a
    /// link would share the inode with a file ferry no longer watches.
    pub copy_kept: HashSet<Vec<u8>>,
    /// Directories to make or chmod (mode, path; `.` is `to` itself), parents first.
    pub dirs: Vec<(u32, Vec<u8>)>,
    /// Paths removed at the end (extras; a directory once, not what is under it).
    pub gone: Vec<Vec<u8>>,
    /// Paths in `to` added, edited or removed by hand since the last apply that this one repairs.
    pub handmade: u64,
    /// `to` does not exist: the whole tree is staged beside it and renamed into place at once.
    pub fresh: bool,
    /// `to` is on another filesystem than the store: content moves between them by copying.
    pub xdev: bool,
    /// A directory in `to` where the build now has a file or link, and a path under it that stays
    /// (`exclude` matches it, or `delete: false` keeps it): the apply cannot put the file there.
    pub in_the_way: Option<(Vec<u8>, Vec<u8>)>,
}

/// In-place mode: compare `local` with what `to` holds. `objects` are the store's trusted objects;
/// `sent` the entries the stream carries (one per missing content, from [`plan`]); with `delete`,
/// extras go. Unchanged paths are not touched.
pub fn in_place(
    local: &Manifest,
    target: &Target<'_>,
    objects: &HashSet<ObjectId>,
    sent: &[usize],
    delete: bool,
) -> Apply {
    let mut a = Apply {
        fresh: target.missing,
        xdev: target.xdev,
        ..Default::default()
    };
    let live: HashMap<&[u8], &Entry> = target
        .live
        .map(|m| m.entries.iter().map(|e| (e.path.as_slice(), e)).collect())
        .unwrap_or_default();
    let sent: HashSet<usize> = sent.iter().copied().collect();
    let mut staged: HashMap<ObjectId, &[u8]> = HashMap::default();
    if target.root_changed || target.live.map(|m| m.root_mode) != Some(local.root_mode) {
        a.dirs.push((local.root_mode, b".".to_vec()));
    }
    for (i, e) in local.entries.iter().enumerate() {
        let old = live.get(e.path.as_slice());
        if old.is_some_and(|o| (o.kind == e.kind || same(o, e)) && target.intact(o)) {
            continue;
        }
        match &e.kind {
            Kind::Dir { mode } => a.dirs.push((*mode, e.path.clone())),
            Kind::Symlink { .. } => a.write.push((i, Source::Sent)),
            Kind::File { .. } => {
                let o = e.object().expect("file");
                let from = if sent.contains(&i) {
                    Source::Sent
                } else if let Some(p) = staged.get(&o) {
                    Source::Staged(p.to_vec())
                } else if objects.contains(&o) {
                    Source::Object(o)
                } else if let Some(p) = target.contents().get(&o) {
                    Source::Live(p.to_vec())
                } else {
                    Source::Sent
                };
                staged.entry(o).or_insert(e.path.as_slice());
                a.write.push((i, from));
            }
        }
    }
    // Live content about to leave `to` goes into the store first.
    let now: HashMap<&[u8], &Entry> = local
        .entries
        .iter()
        .map(|e| (e.path.as_slice(), e))
        .collect();
    let mut preserved = HashSet::default();
    for e in target
        .live
        .map(|m| m.entries.as_slice())
        .unwrap_or_default()
    {
        let path = e.path.as_slice();
        if matches!(e.kind, Kind::File { .. })
            && !now.get(path).is_some_and(|n| same(n, e))
            && target.intact(e)
            && let Some(o) = e.object()
            && !objects.contains(&o)
            && preserved.insert(o)
        {
            if !delete && !now.contains_key(path) {
                a.copy_kept.insert(path.to_vec());
            }
            a.preserve.push((o, path.to_vec()));
        }
    }
    if target.live.is_some() {
        a.handmade += u64::from(target.root_changed);
        for p in &target.changed {
            if live.contains_key(p) || (delete && !now.contains_key(p)) {
                a.handmade += 1;
            }
        }
        if let Some(listing) = &target.listing {
            // Removed, or turned into another kind of entry.
            a.handmade += live
                .iter()
                .filter(|(p, e)| {
                    !target.changed.contains(*p) && !target.keep.contains(*p) && !target.intact(e)
                })
                .count() as u64;
            if delete {
                a.handmade += listing
                    .iter()
                    .filter(|p| {
                        !live.contains_key(*p)
                            && !target.changed.contains(*p)
                            && !target.keep.contains(*p)
                    })
                    .count() as u64;
            }
        }
    }
    // Sorted: the live manifest already is.
    let mut present: Vec<&[u8]> = match (&target.listing, target.live) {
        (Some(l), _) => l.iter().copied().collect(),
        (None, Some(m)) => m.entries.iter().map(|e| e.path.as_slice()).collect(),
        (None, None) => Vec::new(),
    };
    if target.listing.is_some() || !target.changed.is_empty() {
        present.extend(target.changed.iter().copied());
        present.sort_unstable();
        present.dedup();
    }
    // What stays in `to` whatever the build holds: excluded paths, and with `delete: false`
    // every path the build lacks.
    let stays = |p: &[u8]| target.keep.contains(p) || (!delete && !now.contains_key(p));
    let files: HashSet<&[u8]> = local
        .entries
        .iter()
        .filter(|e| !matches!(e.kind, Kind::Dir { .. }))
        .map(|e| e.path.as_slice())
        .collect();
    a.in_the_way = present.iter().filter(|p| stays(p)).find_map(|p| {
        parents(p)
            .find(|d| files.contains(d))
            .map(|d| (d.to_vec(), p.to_vec()))
    });
    if delete {
        present.retain(|p| !target.keep.contains(p));
        a.gone = extras(&present, &target.keep, |p| now.contains_key(p), &files);
    }
    a
}

/// The directories `p` lies under, outermost first.
fn parents(p: &[u8]) -> impl Iterator<Item = &[u8]> {
    p.iter()
        .enumerate()
        .filter(|&(_, &b)| b == b'/')
        .map(|(i, _)| &p[..i])
}

/// `p` lies under the directory `dir`.
fn is_under(p: &[u8], dir: &[u8]) -> bool {
    p.len() > dir.len() && p.starts_with(dir) && p[dir.len()] == b'/'
}

/// The paths of `present` (sorted) that the build (`in_build`; `files`: its paths that are not
/// directories) lacks, a directory once and not what is under it; a directory that holds a path
/// `keep` keeps stays, and what else is under it goes one by one. Entries whose kind changes are
/// replaced when the new one is put in place, not listed here.
fn extras(
    present: &[&[u8]],
    keep: &HashSet<&[u8]>,
    in_build: impl Fn(&[u8]) -> bool,
    files: &HashSet<&[u8]>,
) -> Vec<Vec<u8>> {
    // Under a directory that became a file or link: gone with it when that is put in place.
    let under_file = |p: &[u8]| parents(p).any(|d| files.contains(d));
    // The directories above a kept path.
    let holds_kept: HashSet<&[u8]> = keep.iter().flat_map(|p| parents(p)).collect();
    let mut out: Vec<Vec<u8>> = Vec::new();
    // Sorted paths put a directory right before what is under it.
    for p in present {
        let under_gone = out.last().is_some_and(|d| is_under(p, d));
        if !in_build(p) && !under_gone && !under_file(p) && !holds_kept.contains(p) {
            out.push(p.to_vec());
        }
    }
    out
}

/// The same content at a path: the same object (hash and mode), or the same link.
fn same(a: &Entry, b: &Entry) -> bool {
    match (&a.kind, &b.kind) {
        (
            Kind::File {
                hash: h1, mode: m1, ..
            },
            Kind::File {
                hash: h2, mode: m2, ..
            },
        ) => h1 == h2 && m1 & 0o7777 == m2 & 0o7777,
        (Kind::Symlink { target: x }, Kind::Symlink { target: y }) => x == y,
        _ => false,
    }
}

/// Which releases `keep: N` removes: at most `keep` releases stay, the `protect`ed ones (the live
/// release and the rollback target) always among them, then the newest. Ids sort by time.
pub fn prune(releases: &[String], keep: usize, protect: &[&str]) -> Vec<String> {
    let mut others: Vec<&String> = releases
        .iter()
        .filter(|r| !protect.contains(&r.as_str()))
        .collect();
    others.sort();
    let kept_protected = releases
        .iter()
        .filter(|r| protect.contains(&r.as_str()))
        .count();
    let room = keep.saturating_sub(kept_protected);
    let excess = others.len().saturating_sub(room);
    others.into_iter().take(excess).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8]) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::File {
                size: content.len() as u64,
                mode: 0o644,
                hash: *blake3::hash(content).as_bytes(),
            },
        }
    }

    fn tree(entries: Vec<Entry>) -> Manifest {
        Manifest {
            root_mode: 0o755,
            entries,
        }
    }

    fn dir(p: &str) -> Entry {
        Entry {
            path: p.as_bytes().to_vec(),
            kind: Kind::Dir { mode: 0o755 },
        }
    }

    fn obj(content: &[u8]) -> ObjectId {
        file("x", content).object().unwrap()
    }

    #[test]
    fn in_place_touches_only_what_changed_and_keeps_what_leaves() {
        let live = tree(vec![
            file("a", b"1"),
            file("b", b"2"),
            dir("d"),
            file("d/gone", b"3"),
        ]);
        let local = tree(vec![
            file("a", b"1"),
            file("b", b"changed"),
            file("b2", b"changed"),
            file("moved", b"3"),
            file("new", b"1"),
        ]);
        let target = Target {
            live: Some(&live),
            ..Default::default()
        };
        let have: HashSet<ObjectId> = target.contents().keys().cloned().collect();
        let p = plan(&local, Some(&live), &have);
        assert_eq!(p.send, vec![1], "only the new content travels");
        let a = in_place(&local, &target, &HashSet::default(), &p.send, true);
        assert_eq!(
            a.write,
            vec![
                (1, Source::Sent),
                (2, Source::Staged(b"b".to_vec())),
                (3, Source::Live(b"d/gone".to_vec())),
                (4, Source::Live(b"a".to_vec())),
            ]
        );
        assert_eq!(
            a.preserve,
            vec![(obj(b"2"), b"b".to_vec()), (obj(b"3"), b"d/gone".to_vec())],
            "what leaves `to` goes to the store first"
        );
        assert!(a.dirs.is_empty());
        assert_eq!(a.gone, [b"d".to_vec()]);
        assert_eq!(a.handmade, 0);
        // Content already in the store is not preserved twice, and is copied from there.
        let stored = [obj(b"2"), obj(b"3")].into_iter().collect();
        let a = in_place(&local, &target, &stored, &p.send, false);
        assert!(a.preserve.is_empty() && a.gone.is_empty());
        assert_eq!(a.write[2], (3, Source::Object(obj(b"3"))));
    }

    #[test]
    fn in_place_repairs_hand_edits_and_lists_extras() {
        let live = tree(vec![dir("d"), file("d/a", b"1"), file("d/b", b"2")]);
        let local = live.clone();
        let listing: HashSet<&[u8]> = [&b"d"[..], b"d/a", b"d/extra", b"d/extra/x"]
            .into_iter()
            .collect();
        let target = Target {
            live: Some(&live),
            changed: [&b"d/a"[..]].into_iter().collect(),
            listing: Some(listing),
            dirs: [&b"d"[..], b"d/extra"].into_iter().collect(),
            ..Default::default()
        };
        assert!(
            target.contents().is_empty(),
            "edited and removed paths hold nothing known"
        );
        let p = plan(&local, Some(&live), &HashSet::default());
        let a = in_place(&local, &target, &HashSet::default(), &p.send, true);
        assert_eq!(a.write, vec![(1, Source::Sent), (2, Source::Sent)]);
        assert!(a.preserve.is_empty(), "edited content is not kept");
        assert_eq!(a.gone, [b"d/extra".to_vec()]);
        assert_eq!(
            a.handmade, 4,
            "one edited, one removed, a directory and its file added"
        );
        let a = in_place(&local, &target, &HashSet::default(), &p.send, false);
        assert!(a.gone.is_empty());
        assert_eq!(a.handmade, 2, "extras are kept: not drift");
        // What `exclude` matches on the host stays, and is no drift.
        let target = Target {
            keep: [&b"d/extra"[..], b"d/extra/x"].into_iter().collect(),
            ..target
        };
        let a = in_place(&local, &target, &HashSet::default(), &p.send, true);
        assert!(a.gone.is_empty(), "{:?}", a.gone);
        assert_eq!(a.handmade, 2, "one edited, one removed");
        // A directory that leaves the build stays while it holds a kept path; the rest goes.
        let only_b = tree(vec![file("b", b"2")]);
        let target = Target {
            changed: HashSet::default(),
            listing: Some(
                [&b"d"[..], b"d/a", b"d/b", b"d/x.log"]
                    .into_iter()
                    .collect(),
            ),
            dirs: [&b"d"[..]].into_iter().collect(),
            keep: [&b"d/x.log"[..]].into_iter().collect(),
            ..Default::default()
        };
        let target = Target {
            live: Some(&live),
            ..target
        };
        let a = in_place(&only_b, &target, &HashSet::default(), &[], true);
        assert_eq!(a.gone, [b"d/a".to_vec(), b"d/b".to_vec()]);
        assert_eq!(a.in_the_way, None);
        // A file where it stands: in the way.
        let d_file = tree(vec![file("d", b"3")]);
        let a = in_place(&d_file, &target, &HashSet::default(), &[], true);
        assert_eq!(a.in_the_way, Some((b"d".to_vec(), b"d/x.log".to_vec())));
        // A path excluded since it was deployed holds nothing ferry may take content from.
        let target = Target {
            live: Some(&live),
            keep: [&b"d/a"[..]].into_iter().collect(),
            ..Default::default()
        };
        assert!(target.contents().values().any(|p| *p == b"d/b"));
        assert!(!target.contents().values().any(|p| *p == b"d/a"));
    }

    #[test]
    fn in_place_a_file_made_a_directory_by_hand_is_not_intact() {
        let live = tree(vec![file("x", b"1"), file("y", b"1")]);
        let target = Target {
            live: Some(&live),
            listing: Some([&b"x"[..], b"x/inner", b"y"].into_iter().collect()),
            dirs: [&b"x"[..]].into_iter().collect(),
            ..Default::default()
        };
        let p = plan(
            &live,
            Some(&live),
            &target.contents().keys().cloned().collect(),
        );
        let a = in_place(&live, &target, &HashSet::default(), &p.send, true);
        assert_eq!(a.write, vec![(0, Source::Live(b"y".to_vec()))]);
        assert_eq!(a.handmade, 2, "x is no file any more, x/inner is new");
    }

    #[test]
    fn in_place_first_apply_writes_everything_and_fixes_kinds() {
        let local = tree(vec![dir("d"), file("d/a", b"1"), file("f", b"2")]);
        // `to` had a file where the build has a directory, and a directory where it has a file.
        let listing: HashSet<&[u8]> = [&b"d"[..], b"f", b"f/old", b"stale"].into_iter().collect();
        let target = Target {
            live: None,
            listing: Some(listing),
            ..Default::default()
        };
        let p = plan(&local, None, &HashSet::default());
        let a = in_place(&local, &target, &HashSet::default(), &p.send, true);
        assert_eq!(a.dirs, [(0o755, b".".to_vec()), (0o755, b"d".to_vec())]);
        assert_eq!(a.write.len(), 2);
        assert_eq!(
            a.gone,
            [b"stale".to_vec()],
            "f/old goes with f, replaced by the file"
        );
        assert_eq!(a.handmade, 0, "nothing was applied: not drift");
    }

    #[test]
    fn first_deploy_sends_each_content_once() {
        let local = tree(vec![
            file("a.js", b"same"),
            file("b.js", b"same"),
            file("c.js", b"other"),
        ]);
        let p = plan(&local, None, &HashSet::default());
        assert_eq!(p.added.len(), 3);
        assert_eq!(p.send, vec![0, 2], "duplicate content goes once");
        assert_eq!(p.send_bytes, 9);
    }

    #[test]
    fn renamed_file_is_not_sent_again_and_changes_are_classified() {
        let live = tree(vec![file("chunk.1.js", b"code"), file("index.html", b"v1")]);
        let have: HashSet<ObjectId> = live.entries.iter().filter_map(Entry::object).collect();
        let local = tree(vec![file("chunk.2.js", b"code"), file("index.html", b"v2")]);
        let p = plan(&local, Some(&live), &have);
        assert_eq!(p.added, ["chunk.2.js"]);
        assert_eq!(p.changed, ["index.html"]);
        assert_eq!(p.deleted, ["chunk.1.js"]);
        assert_eq!(p.send, vec![1], "only the new index.html content");
    }

    #[test]
    fn mode_change_is_a_change_and_a_new_object() {
        let live = tree(vec![file("run.sh", b"#!/bin/sh")]);
        let have: HashSet<ObjectId> = live.entries.iter().filter_map(Entry::object).collect();
        let mut exec = file("run.sh", b"#!/bin/sh");
        if let Kind::File { mode, .. } = &mut exec.kind {
            *mode = 0o755;
        }
        let p = plan(&tree(vec![exec]), Some(&live), &have);
        assert_eq!(p.changed, ["run.sh"]);
        assert_eq!(p.send.len(), 1);
    }

    #[test]
    fn drifted_object_missing_from_have_is_resent() {
        let live = tree(vec![file("a", b"x")]);
        let p = plan(&live, Some(&live), &HashSet::default());
        assert!(p.is_noop());
        assert_eq!(p.send, vec![0]);
    }

    #[test]
    fn prune_keeps_newest_and_protected() {
        let rels: Vec<String> = ["r1", "r2", "r3", "r4", "r5"].map(String::from).into();
        assert_eq!(prune(&rels, 2, &["r5", "r4"]), ["r1", "r2", "r3"]);
        assert_eq!(prune(&rels, 2, &["r5", "r1"]), ["r2", "r3", "r4"]);
        assert_eq!(prune(&rels, 3, &["r5", "r1"]), ["r2", "r3"]);
        assert_eq!(prune(&rels, 1, &["r5", "r4"]), ["r1", "r2", "r3"]);
        assert_eq!(prune(&rels, 10, &[]), Vec::<String>::new());
    }
}
