//! The pure core of a sync: given the local manifest, the live release's manifest and the objects the
//! host's store holds (minus those edited by hand), decide what to send and what the change is.
//! No IO here; tested with data.

use std::collections::{BTreeMap, HashSet};

use super::manifest::{Entry, Kind, Manifest};

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
    /// Objects the store holds but that were edited on the host; they are replaced if needed.
    pub drifted: Vec<String>,
}

impl Plan {
    /// True when the host already serves exactly this tree and nothing needs sending.
    pub fn is_noop(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.deleted.is_empty()
    }
}

/// Compare. `live` is `None` on a first deploy; `have` holds object names present and trusted.
pub fn plan(local: &Manifest, live: Option<&Manifest>, have: &HashSet<String>) -> Plan {
    let mut p = Plan::default();
    let before: BTreeMap<&[u8], &Entry> = live
        .map(|m| {
            m.entries
                .iter()
                .filter(|e| !matches!(e.kind, Kind::Dir { .. }))
                .map(|e| (e.path.as_slice(), e))
                .collect()
        })
        .unwrap_or_default();
    let mut seen_paths = HashSet::new();
    let mut queued = HashSet::new();
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
    for path in before.keys() {
        if !seen_paths.contains(path) {
            p.deleted.push(String::from_utf8_lossy(path).into_owned());
        }
    }
    p
}

/// In-place mode: indices of the local files and symlinks that `live` (the tree applied last, `None`
/// on a first deploy) does not already hold as they are, i.e. what `to` must get written.
pub fn to_copy(local: &Manifest, live: Option<&Manifest>) -> Vec<usize> {
    let before: BTreeMap<&[u8], &Entry> = live
        .map(|m| m.entries.iter().map(|e| (e.path.as_slice(), e)).collect())
        .unwrap_or_default();
    local
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| !matches!(e.kind, Kind::Dir { .. }))
        .filter(|(_, e)| !before.get(e.path.as_slice()).is_some_and(|o| same(o, e)))
        .map(|(i, _)| i)
        .collect()
}

/// In-place mode: the paths of `live` (files, links, directories) that `local` lacks, a directory
/// once and not what is under it, for the host to remove. Entries whose kind changes are replaced
/// by the copy step, not listed here.
pub fn gone(local: &Manifest, live: &Manifest) -> Vec<Vec<u8>> {
    let now: HashSet<&[u8]> = local.entries.iter().map(|e| e.path.as_slice()).collect();
    let files: HashSet<&[u8]> = local
        .entries
        .iter()
        .filter(|e| !matches!(e.kind, Kind::Dir { .. }))
        .map(|e| e.path.as_slice())
        .collect();
    // Under a directory that became a file or link: gone with it when that is put in place.
    let under_file = |p: &[u8]| {
        p.iter()
            .enumerate()
            .any(|(i, &b)| b == b'/' && files.contains(&p[..i]))
    };
    let mut out: Vec<Vec<u8>> = Vec::new();
    // Sorted paths put a directory right before what is under it.
    for e in &live.entries {
        let under_gone = out.last().is_some_and(|d| {
            e.path.len() > d.len() && e.path.starts_with(d) && e.path[d.len()] == b'/'
        });
        if !now.contains(e.path.as_slice()) && !under_gone && !under_file(&e.path) {
            out.push(e.path.clone());
        }
    }
    out
}

fn same(a: &Entry, b: &Entry) -> bool {
    match (&a.kind, &b.kind) {
        (Kind::File { .. }, Kind::File { .. }) => a.object() == b.object(),
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

    #[test]
    fn in_place_copies_what_the_applied_tree_lacks() {
        let live = tree(vec![file("a", b"1"), file("b", b"2"), file("gone", b"3")]);
        let local = tree(vec![
            file("a", b"1"),
            file("b", b"changed"),
            file("new", b"1"),
        ]);
        assert_eq!(to_copy(&local, Some(&live)), vec![1, 2]);
        assert_eq!(
            to_copy(&local, None),
            vec![0, 1, 2],
            "first deploy: everything"
        );
    }

    #[test]
    fn gone_lists_each_removed_path_once() {
        let dir = |p: &str| Entry {
            path: p.as_bytes().to_vec(),
            kind: Kind::Dir { mode: 0o755 },
        };
        let live = tree(vec![
            file("a", b"1"),
            dir("d"),
            file("d/x", b"2"),
            dir("d/sub"),
            file("d/sub/y", b"3"),
            file("d2", b"4"),
            file("keep", b"5"),
        ]);
        let local = tree(vec![file("keep", b"changed"), file("new", b"6")]);
        assert_eq!(
            gone(&local, &live),
            [b"a".to_vec(), b"d".to_vec(), b"d2".to_vec()]
        );
        assert!(gone(&live, &live).is_empty());
        let now_a_file = tree(vec![file("d", b"was a directory")]);
        assert_eq!(
            gone(&now_a_file, &live),
            [b"a".to_vec(), b"d2".to_vec(), b"keep".to_vec()]
        );
    }

    #[test]
    fn first_deploy_sends_each_content_once() {
        let local = tree(vec![
            file("a.js", b"same"),
            file("b.js", b"same"),
            file("c.js", b"other"),
        ]);
        let p = plan(&local, None, &HashSet::new());
        assert_eq!(p.added.len(), 3);
        assert_eq!(p.send, vec![0, 2], "duplicate content goes once");
        assert_eq!(p.send_bytes, 9);
    }

    #[test]
    fn renamed_file_is_not_sent_again_and_changes_are_classified() {
        let live = tree(vec![file("chunk.1.js", b"code"), file("index.html", b"v1")]);
        let have: HashSet<String> = live.entries.iter().filter_map(Entry::object).collect();
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
        let have: HashSet<String> = live.entries.iter().filter_map(Entry::object).collect();
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
        let p = plan(&live, Some(&live), &HashSet::new());
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
