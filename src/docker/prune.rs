//! Which image tags of a repository to remove: the pure decision behind `docker_prune`.
//!
//! Works on image ids, not names, so an image tagged several times counts once, `<none>` entries
//! are never touched, and an image any container uses (running or stopped, the kept rollback
//! container included) is never removed. Removal is by `repo:tag` reference, so an image that also
//! carries a tag of another repository only loses this repository's tag.

use std::collections::{BTreeMap, BTreeSet};

/// One row of `docker images`: an image id under one `repository:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub id: String,
    pub repository: String,
    pub tag: String,
}

/// What to do with the images of one repository.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `repo:tag` references to untag (the image goes when its last tag does).
    pub remove: Vec<String>,
    /// Image ids kept because they are among the newest `keep`.
    pub kept_newest: Vec<String>,
    /// Image ids beyond `keep` that stay because a container uses them.
    pub kept_in_use: Vec<String>,
}

/// Parse `docker images --no-trunc --format '{{.ID}}\t{{.Repository}}\t{{.Tag}}'` output.
pub fn parse_rows(text: &str) -> Vec<ImageRow> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (id, repository, tag) = (f.next()?, f.next()?, f.next()?);
            Some(ImageRow {
                id: id.trim().into(),
                repository: repository.into(),
                tag: tag.trim().into(),
            })
        })
        .collect()
}

/// Keep the newest `keep` images of `repository` (by `created`, an RFC 3339 time per id) and any
/// image in `in_use`; untag the rest.
pub fn plan(
    rows: &[ImageRow],
    repository: &str,
    keep: usize,
    created: &BTreeMap<String, String>,
    in_use: &BTreeSet<String>,
) -> Plan {
    let mut tags: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in rows {
        if r.repository == repository && r.tag != "<none>" && !r.tag.is_empty() {
            tags.entry(&r.id)
                .or_default()
                .push(format!("{}:{}", r.repository, r.tag));
        }
    }
    let mut ids: Vec<&str> = tags.keys().copied().collect();
    // Newest first; an unknown creation time sorts as oldest. Ties break on id for determinism.
    ids.sort_by(|a, b| {
        let ca = created.get(*a).map(|s| normalize_time(s));
        let cb = created.get(*b).map(|s| normalize_time(s));
        cb.cmp(&ca).then_with(|| a.cmp(b))
    });
    let mut plan = Plan::default();
    for (i, id) in ids.iter().enumerate() {
        if i < keep {
            plan.kept_newest.push(id.to_string());
        } else if in_use.contains(*id) {
            plan.kept_in_use.push(id.to_string());
        } else {
            plan.remove.extend(tags[id].iter().cloned());
        }
    }
    plan
}

/// RFC 3339 times sort as text only with equal fraction lengths: pad the fraction to nanoseconds.
fn normalize_time(s: &str) -> String {
    let (main, zone) = match s
        .find(['Z', '+'])
        .or_else(|| s.rfind('-').filter(|&i| i > 10))
    {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let (secs, frac) = main.split_once('.').unwrap_or((main, ""));
    format!("{secs}.{frac:0<9}{zone}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, repo: &str, tag: &str) -> ImageRow {
        ImageRow {
            id: id.into(),
            repository: repo.into(),
            tag: tag.into(),
        }
    }

    fn created(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn keeps_newest_and_in_use_and_untags_the_rest() {
        let rows = vec![
            row("i1", "reg/shop", "v1"),
            row("i2", "reg/shop", "v2"),
            row("i3", "reg/shop", "v3"),
            row("i3", "reg/shop", "latest"),
            row("i4", "reg/shop", "v4"),
            row("i0", "reg/other", "x"),
            row("i9", "<none>", "<none>"),
        ];
        let c = created(&[
            ("i1", "2026-01-01T00:00:01Z"),
            ("i2", "2026-01-01T00:00:02.5Z"),
            ("i3", "2026-01-01T00:00:02.25Z"),
            ("i4", "2026-01-01T00:00:04Z"),
        ]);
        let in_use: BTreeSet<String> = ["i1".to_string()].into();
        let p = plan(&rows, "reg/shop", 2, &c, &in_use);
        assert_eq!(p.kept_newest, ["i4", "i2"]);
        assert_eq!(p.kept_in_use, ["i1"]);
        assert_eq!(p.remove, ["reg/shop:v3", "reg/shop:latest"]);
    }

    #[test]
    fn other_repos_tags_and_none_are_never_removed() {
        let rows = vec![
            row("a", "reg/shop", "old"),
            row("a", "reg/mirror", "old"),
            row("b", "reg/shop", "<none>"),
            row("c", "reg/shop", "new"),
        ];
        let c = created(&[("a", "2026-01-01T00:00:00Z"), ("c", "2026-02-01T00:00:00Z")]);
        let p = plan(&rows, "reg/shop", 1, &c, &BTreeSet::new());
        assert_eq!(p.remove, ["reg/shop:old"], "only this repository's tag");
        assert_eq!(p.kept_newest, ["c"]);
    }

    #[test]
    fn keep_zero_still_spares_in_use() {
        let rows = vec![row("a", "r", "1")];
        let in_use: BTreeSet<String> = ["a".to_string()].into();
        let p = plan(&rows, "r", 0, &BTreeMap::new(), &in_use);
        assert!(p.remove.is_empty());
        assert_eq!(p.kept_in_use, ["a"]);
    }

    #[test]
    fn parses_docker_images_output() {
        let rows = parse_rows("sha256:1\treg:5000/shop\tv1\nsha256:2\t<none>\t<none>\n\n");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], row("sha256:1", "reg:5000/shop", "v1"));
    }

    #[test]
    fn fractions_sort_numerically() {
        assert!(
            normalize_time("2026-01-01T00:00:02.5Z") > normalize_time("2026-01-01T00:00:02.25Z")
        );
        assert!(normalize_time("2026-01-01T00:00:02Z") < normalize_time("2026-01-01T00:00:02.1Z"));
    }
}
