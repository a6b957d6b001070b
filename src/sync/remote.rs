//! The host side of a sync: constant POSIX `sh` scripts (run with data as positional arguments, so
//! nothing is spliced into a command line) and the parsing of what they print. They use only what
//! both coreutils and BusyBox offer: `tar -xzmo`, `tar -c`, `mv -fT`, `find -newer -links -depth
//! -mindepth -maxdepth -print0 -exec +` (never `{}` inside a script `find` runs: GNU find refuses
//! that), `xargs -0 -r`, `head -c`, `ls`, `gzip`, `readlink`, `read`, `cp -p`, `stat -c %a`,
//! `test -ef`.
//!
//! Layout beside the target `<dir>/<name>`:
//! ```text
//! <dir>/<name> -> .<name>.ferry/releases/<id>     (release mode; renamed over atomically)
//! <dir>/.<name>.ferry/objects/<blake3>.<mode>      content store; files never opened for writing
//! <dir>/.<name>.ferry/releases/<id>/              trees of hard links into objects/
//! <dir>/.<name>.ferry/meta/<id>.{json,manifest,digest}
//! <dir>/.<name>.ferry/stamp                        live files newer than this were edited by hand
//! <dir>/.<name>.ferry/incoming/                    a deploy in flight; removed by the next one
//! <dir>/.<name>.ferry/inplace                      in-place mode: id of the release applied in <dir>/<name>
//! <dir>/.<name>.ferry/applied                      in-place mode: files in <name> newer than this were edited
//! ```
//!
//! An object is trusted while some release links to it and the live release's files that share it
//! are not newer than `stamp` (touched after each successful deploy): objects a broken deploy left
//! unlinked (a truncated one from a cut stream, say) are collected before the next deploy lists
//! what the host has, and objects edited by hand through `to` are dropped before the stream lands.
//! Edits made inside the store itself are not looked for.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;

use anyhow::Context;

use super::manifest::Manifest;

/// The store directory of a target path, and the pieces scripts need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Absolute target, without a trailing slash.
    pub to: String,
    /// `<dir>/.<name>.ferry`
    pub store: String,
}

impl Paths {
    pub fn new(to: &str) -> anyhow::Result<Paths> {
        let to = to.trim_end_matches('/');
        let (dir, name) = to.rsplit_once('/').unwrap_or(("", to));
        if !to.starts_with('/') || name.is_empty() || name == "." || name == ".." {
            anyhow::bail!(
                "sync target `{to}` must be an absolute path naming a directory below `/` (check `to:` and `root:`)"
            );
        }
        Ok(Paths {
            to: to.to_string(),
            store: format!("{dir}/.{name}.ferry"),
        })
    }
}

/// What `$T` is (a release link, a directory ferry applies in place, something else, missing),
/// recorded with `rec`; sets `live` and `inplace`. Shared by the inventory and the deploy script.
macro_rules! target_state_sh {
    () => {
        r#"
rec() { printf '%s\t%s\0' "$1" "$2"; }
live= inplace=
if [ -L "$T" ]; then
  t=$(readlink "$T"); rec to link; rec target "$t"
  case $t in ".${T##*/}.ferry/releases/"*) live=${t##*/} ;; esac
elif [ -d "$T" ]; then rec to dir
  if [ -f "$S/inplace" ]; then live=$(cat "$S/inplace") inplace=1; rec inplace "$live"; fi
elif [ -e "$T" ]; then rec to other
else rec to missing
fi
"#
    };
}

/// What the store holds (cwd: the store), recorded with `rec`: its releases, their metadata, and
/// what changed by hand since the last deploy. In-place mode asks `tdrift`; release mode makes one
/// pass over the live release, printing a record per path ferry did not leave there: a file newer
/// than `stamp` that still shares its inode with an object was edited in place (`edited`: that
/// object is spoilt); a file with one link (added or replaced), or anything else newer than `stamp`
/// (a directory whose entries were added, removed or renamed), was `touched`. Sets `dirty` when
/// anything changed. Needs `live` and `inplace` (`target_state_sh!`). Shared by the inventory and
/// the deploy script.
macro_rules! store_state_sh {
    () => {
        r#"
for r in releases/*; do [ -d "$r" ] && rec release "${r#releases/}"; done
for m in meta/*.json; do
  [ -f "$m" ] || continue
  n=${m#meta/}; printf 'meta\t%s\t' "${n%.json}"; cat "$m"; printf '\0'
done
live_scan() {
  # (BusyBox find runs no `-exec ... +` inside parentheses.)
  find "releases/$live" -type f -newer stamp ! -links 1 -exec printf 'edited\t%s\0' {} + -o \
    \( -type f -links 1 -o -newer stamp \) -exec printf 'touched\t%s\0' {} +
}
dirty=
if [ -n "$live" ] && [ -d "releases/$live" ]; then
  if [ -n "$inplace" ]; then
    O=releases/$live; n=$(tdrift); rec handmade "$n"; [ "$n" -eq 0 ] || dirty=1
  elif [ -e stamp ] && [ -n "$(live_scan | head -c 1)" ]; then
    live_scan; dirty=1
  fi
fi
"#
    };
}

/// Shell for `mode: in-place`, shared by [`DEPLOY`] and [`SWITCH_IN_PLACE`] (spliced in with
/// `concat!`). `H` is the body of a `sh -c` that `find -exec ... {} +` runs over many paths at once,
/// so an unchanged file costs no fork. It needs exported `T` (the target), `R` (the release tree to
/// apply, relative to the store, the cwd) and `O` (the release applied before, or empty).
/// `put` copies (never links: the target must not share inodes with the store) to a temp name beside
/// the destination and renames it over, so each file is replaced atomically.
macro_rules! in_place_sh {
    () => {
        r#"
# Rename staged files (not directories) into the directory $1, replacing a directory in the way;
# prints how many. `xargs` hands it many at a time. (No `{}` may appear in $H: find refuses it.)
MV='dd=$1; shift
for e; do b=$dd/${e##*/}; if [ -d "$b" ] && [ ! -L "$b" ]; then rm -rf "$b" || exit 1; fi; done
mv -f "$@" "$dd/" && echo $#'
H='put() {
  tmp="${2%/*}/.${2##*/}.ferry-tmp"
  rm -rf "$tmp" || return 1
  if [ -L "$1" ]; then ln -s "$(readlink "$1")" "$tmp"; else cp -p "$1" "$tmp"; fi || return 1
  if [ -d "$2" ] && [ ! -L "$2" ]; then rm -rf "$2" || return 1; fi
  mv -fT "$tmp" "$2"
}
mvdir() {
  c=$( (find "$1" -mindepth 1 -maxdepth 1 ! -type d -print0 | xargs -0 -r sh -c "$MV" sh "$T${1#"$ST"}") || echo x)
  case $c in *x*) return 1 ;; esac
  for k in $c; do n=$((n+k)); done
}
phase=$1; shift
n=0
for f; do
  case $phase in
  dir) d=$T${f#"$R"}
    [ -d "$d" ] && [ ! -L "$d" ] && continue
    rm -f "$d" && mkdir "$d" && chmod "$(stat -c %a "$f")" "$d" || exit 1 ;;
  fix) s=$R${f#"$T"}
    if [ -e "$s" ] || [ -L "$s" ]; then [ -d "$s" ] && [ ! -L "$s" ] || put "$s" "$f" || exit 1; fi ;;
  move) mvdir "$f" || exit 1 ;;
  put1) put "$f" "$T${f#"$PP"}" || exit 1; n=$((n+1)) ;;
  file) r=${f#"$R"} d=$T${f#"$R"}
    if [ -n "$C" ]; then
      if [ -L "$f" ]; then [ -L "$d" ] && continue
      else [ -f "$d" ] && [ ! -L "$d" ] && continue
      fi
    elif [ -n "$O" ]; then
      if [ -L "$f" ]; then
        [ -L "$d" ] && [ -L "$O$r" ] && [ "$(readlink "$f")" = "$(readlink "$d")" ] && continue
      else
        [ -f "$d" ] && [ ! -L "$d" ] && [ ! -L "$O$r" ] && [ "$f" -ef "$O$r" ] && continue
      fi
    fi
    put "$f" "$d" || exit 1; n=$((n+1)) ;;
  del) [ "$f" = "$T" ] && continue
    s=$R${f#"$T"}
    [ -e "$s" ] || [ -L "$s" ] || rm -rf "$f" || exit 1 ;;
  edited) s=$O${f#"$T"}
    [ "$DEL" = 1 ] || [ -e "$s" ] || [ -L "$s" ] && n=$((n+1)) ;;
  missing) s=$T${f#"$O"}
    [ -e "$s" ] || [ -L "$s" ] || n=$((n+1)) ;;
  esac
done
case $phase in move|put1|file|edited|missing) echo $n ;; esac'
sum() { s=0; while read -r x; do s=$((s+x)); done; echo $s; }
# Files in $T edited since the last apply (newer than `applied`) or gone; needs O and a cwd in the
# store. Files added by hand count only when extras are deleted ($DEL is 1). A removal changes its
# directory's mtime, so $O is checked file by file only when a directory in $T is newer.
tdrift() {
  export T O DEL
  e=0 m=0
  [ -e applied ] && e=$(find "$T" ! -type d -newer applied -exec sh -c "$H" sh edited {} + | sum)
  if [ ! -e applied ] || [ -n "$(find "$T" -type d -newer applied | head -c 1)" ]; then
    m=$(find "$O" ! -type d -exec sh -c "$H" sh missing {} + | sum)
  fi
  echo $((e+m))
}
# Make $T hold exactly release $R: dirs, hand-edited files, changed files; extras go last if $1 is 1.
# With $C (a tree of the changed files, each object once) and $PP (further paths of those objects),
# one tar pipe stages the copies in $T/.ferry-incoming (same filesystem as their destinations) and
# one `mv -f` per directory renames them over; without, each file that differs from release $O is
# copied on its own. Then anything of $R still missing in $T is put there.
# With $KNOWN ($T held exactly $O, and $C and $X, the paths of $O that $R lacks, come from the
# controller), the passes over every file are skipped: only the changes are touched.
# Returns non-zero at the first failure (files replaced so far stay replaced).
apply() {
  ST=$T/.ferry-incoming
  export T R O C PP ST MV
  [ -n "$O" ] && [ -n "$C" ] || KNOWN=
  mkdir -p "$T" || return 1
  rm -rf "$ST" || return 1
  [ -n "$KNOWN" ] || find "$T" -name '.*.ferry-tmp' ! -type d -exec rm -f {} + || return 1
  find "$R" -type d -exec sh -c "$H" sh dir {} + || return 1
  if [ -z "$KNOWN" ] && [ -n "$O" ] && [ -e applied ]; then
    find "$T" ! -type d -newer applied -exec sh -c "$H" sh fix {} + || return 1
  fi
  copied=
  if [ -n "$C" ] && [ -d "$C" ]; then
    # A tar pipe, not `cp -pR`: GNU cp tracks sources with several links (these are) and took
    # 25 s for 50,000 files where this takes a few.
    cf=$PWD/incoming/c.failed
    mkdir "$ST" && rm -f "$cf" || return 1
    ( cd "$C" && tar -cf - . || : > "$cf" ) | ( cd "$ST" && tar -xpf - ) || return 1
    [ ! -e "$cf" ] || return 1
    copied=$(find "$ST" -type d -exec sh -c "$H" sh move {} + || echo x)
    rm -rf "$ST" || return 1
  fi
  if [ -n "$C" ] && [ -d "$PP" ]; then
    copied="$copied $(find "$PP" ! -type d -exec sh -c "$H" sh put1 {} + || echo x)"
  fi
  [ -n "$KNOWN" ] || copied="$copied $(find "$R" ! -type d -exec sh -c "$H" sh file {} + || echo x)"
  case $copied in *x*) return 1 ;; esac
  copied=$(printf '%s\n' $copied | sum)
  [ "$1" = 1 ] || return 0
  if [ -n "$KNOWN" ]; then
    [ ! -s "$X" ] || ( cd "$T" && xargs -0 rm -rf -- ) < "$X" || return 1
  else
    find "$T" -depth -exec sh -c "$H" sh del {} + || return 1
  fi
}
"#
    };
}

/// Read-only: the target's state, the store's releases and metadata, objects (or in-place files;
/// `$4` is 0 when extras are kept) edited since the last deploy, and (unless the live release
/// already has digest `$3`, or `$3` is `-`) a gzip tail with the live manifest and the object list.
pub const INVENTORY: &str = concat!(
    in_place_sh!(),
    r#"
S=$1 T=$2 D=$3 DEL=${4:-1}
"#,
    target_state_sh!(),
    r#"[ -d "$S/releases" ] || { rec store no; exit 0; }
rec store yes
cd "$S" || exit 1
"#,
    store_state_sh!(),
    r#"[ "$D" = - ] && exit 0
if [ -z "$dirty" ] && [ -n "$live" ] && [ -f "meta/$live.digest" ] && [ "$(cat "meta/$live.digest")" = "$D" ]; then
  rec same yes; exit 0
fi
rec tail gz
{ printf M; [ -n "$live" ] && [ -f "meta/$live.manifest" ] && cat "meta/$live.manifest"; printf '\0\0'; ls objects; } | gzip -1
"#
);

/// A whole deploy in one exec. First it cleans up what an interrupted deploy left (`incoming/`,
/// then objects no release links to) and prints the same records as [`INVENTORY`] up to the
/// digest check. It reads the local tree's digest from stdin (the controller scans meanwhile),
/// prints `same` or the tail (with its length), then `end`. Then it reads one line:
/// `<release id> <adopt 0|1> <ids to prune> <objects to drop>` (lists comma-separated, `-` for
/// none), or EOF to stop there. The rest of stdin is the gzip'd tar stream: drop the objects edited
/// by hand, unpack the stream (objects straight into `objects/`, the tree under `incoming/r`), check
/// its trailer, name the release (unique), switch `to` with one rename, prune and collect the
/// objects nothing links to any more. In mode `in-place` the last steps differ: the tree is applied
/// into the directory `to` (`in_place_sh!`: copy to a temp name or a staging dir beside each file,
/// rename over; with `incoming/gone`, only what changed), then `inplace` names the release and
/// `applied` is touched. Args: store, to, mode (`release` or `in-place`), delete extras (1/0).
pub const DEPLOY: &str = concat!(
    in_place_sh!(),
    r#"
S=$1 T=$2 M=$3 DEL=$4
P=${T%/*} N=${T##*/}
"#,
    target_state_sh!(),
    r#"if [ -d "$S/releases" ]; then
  rec store yes
  cd "$S" || exit 1
  rm -f "$P/.$N.ferry-new"
  [ -e stamp ] || : > stamp
  if [ -e incoming ]; then
    # incoming/ goes last: it marks that the collection below is still owed.
    rm -rf incoming/r
    find objects -type f -links 1 -exec rm -f {} +
    rm -rf incoming
  fi
"#,
    store_state_sh!(),
    r#"
  # The digest of the local tree comes once the controller has scanned it (meanwhile, we did).
  read -r D || exit 0
  if [ -z "$dirty" ] && [ -n "$live" ] && [ -f "meta/$live.digest" ] &&
     [ "$(cat "meta/$live.digest")" = "$D" ]; then
    rec same yes
  else
    { printf M; [ -n "$live" ] && [ -f "meta/$live.manifest" ] && cat "meta/$live.manifest"; printf '\0\0'; ls objects; } |
      gzip -1 > inventory.gz
    rec tail "$(wc -c < inventory.gz)"; cat inventory.gz; rm -f inventory.gz
  fi
else
  rec store no
  read -r D || exit 0
fi
printf 'end\t\0\n'
read -r id adopt prune drop || exit 0
[ -n "$id" ] || exit 0
set -e
fail() {
  echo "ferry: $*; the live release is unchanged" >&2
  cd "$S" 2>/dev/null && rm -rf incoming/r && find objects -type f -links 1 -exec rm -f {} + && rm -rf incoming
  exit 3
}
if [ "$M" = in-place ] && [ -L "$T" ]; then
  echo "ferry: $T is a symlink; mode in-place writes into a real directory: remove the link or use mode release" >&2; exit 4
fi
if [ "$M" != in-place ] && [ -d "$T" ] && [ ! -L "$T" ] && [ "$adopt" != 1 ]; then
  echo "ferry: $T is a plain directory, not a ferry release link; set adopt: true to take it over" >&2; exit 4
fi
mkdir -p "$S/objects" "$S/releases" "$S/meta"
cd "$S"
[ -e stamp ] || : > stamp
mkdir incoming
# Objects edited in place by hand go before anything can link to them; the stream brings them anew.
for o in $(printf '%s' "${drop#-}" | tr , ' '); do rm -f "objects/$o"; done
( umask 0; tar -xzmof - ) || fail "unpacking the stream failed"
[ -f incoming/COMPLETE ] || fail "the stream ended early"
rid=$id n=1
while [ -e "releases/$rid" ]; do n=$((n+1)); rid=$id-$n; done
mv incoming/r "releases/$rid"
mv incoming/manifest "meta/$rid.manifest"
mv incoming/meta.json "meta/$rid.json"
mv incoming/digest "meta/$rid.digest"
[ "$M" = in-place ] || rm -rf incoming
touch stamp
if [ "$M" = in-place ]; then
  R=releases/$rid O= C=incoming/c PP=incoming/p X=incoming/gone KNOWN=
  [ -n "$inplace" ] && [ -d "releases/$live" ] && O=releases/$live
  [ -n "$dirty" ] || [ ! -f incoming/gone ] || KNOWN=1
  apply "$DEL" || { echo "ferry: applying release $rid into $T failed; files already replaced stay new" >&2; exit 5; }
  rm -rf incoming
  printf '%s\n' "$rid" > inplace.new; mv -f inplace.new inplace; touch applied
  printf 'copied %s\n' "$copied"
else
  ln -s ".$N.ferry/releases/$rid" "$P/.$N.ferry-new"
  if [ -d "$T" ] && [ ! -L "$T" ]; then mv "$T" "$S/adopted-$rid"; fi
  mv -fT "$P/.$N.ferry-new" "$T"
fi
printf 'release %s\n' "$rid"
if [ "$prune" != - ]; then
  for r in $(printf '%s' "$prune" | tr , ' '); do
    rm -rf "releases/$r" "meta/$r.json" "meta/$r.manifest" "meta/$r.digest"
  done
  find objects -type f -links 1 -exec rm -f {} +
fi
"#
);

/// A release id or prune id safe to pass on the deploy script's parameter line.
pub fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && !id.starts_with('.')
}

/// Where the deploy script's inventory ends (just past its `end` record), once it has all arrived.
pub fn inventory_end(out: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < out.len() {
        let end = i + out[i..].iter().position(|&b| b == 0)?;
        let rec = &out[i..end];
        if rec == b"end\t" {
            return Some(end + 1);
        }
        i = end + 1;
        if let Some(n) = rec.strip_prefix(b"tail\t") {
            let n: usize = std::str::from_utf8(n).ok()?.trim().parse().ok()?;
            if out.len() < i + n {
                return None;
            }
            i += n;
        }
    }
    None
}

/// Switch `to` to an existing release. Args: store, to, release id.
pub const SWITCH: &str = r#"
set -e
S=$1 T=$2 rid=$3
P=${T%/*} N=${T##*/}
[ -d "$S/releases/$rid" ] || { echo "ferry: release $rid does not exist in $S/releases" >&2; exit 4; }
if [ -e "$T" ] && [ ! -L "$T" ]; then echo "ferry: $T is not a release link; refusing to replace it" >&2; exit 4; fi
rm -f "$P/.$N.ferry-new"
ln -s ".$N.ferry/releases/$rid" "$P/.$N.ferry-new"
mv -fT "$P/.$N.ferry-new" "$T"
"#;

/// Re-apply an existing release into an in-place target (rollback). Args: store, to, release id,
/// delete extras (1/0).
pub const SWITCH_IN_PLACE: &str = concat!(
    in_place_sh!(),
    r#"
set -e
S=$1 T=$2 rid=$3
[ -d "$S/releases/$rid" ] || { echo "ferry: release $rid does not exist in $S/releases" >&2; exit 4; }
if [ -L "$T" ]; then echo "ferry: $T is a symlink, not an in-place target; refusing to write through it" >&2; exit 4; fi
cd "$S"
R=releases/$rid O= C= PP=
if [ -f inplace ]; then live=$(cat inplace); [ -d "releases/$live" ] && O=releases/$live; fi
apply "$4" || { echo "ferry: applying release $rid into $T failed; files already replaced stay new" >&2; exit 5; }
printf '%s\n' "$rid" > inplace.new; mv -f inplace.new inplace; touch applied
printf 'copied %s\n' "$copied"
"#
);

/// Remove the target link and its store. Args: store, to.
pub const REMOVE: &str = r#"
S=$1 T=$2
P=${T%/*} N=${T##*/}
if [ -L "$T" ]; then rm -f "$T"
elif [ -e "$T" ]; then echo "ferry: $T is not a release link; left it alone" >&2
fi
rm -rf "$P/.$N.ferry-new" "$S"
"#;

/// Release metadata, stored as `meta/<id>.json` on the host.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    pub version: u32,
    #[serde(rename = "ref")]
    pub ref_name: String,
    pub sha: String,
    pub pipeline: Option<String>,
    pub user: String,
    /// Unix time the release was made.
    pub time: u64,
    pub files: u64,
    pub bytes: u64,
    pub digest: String,
    /// The release that was live before this one (the rollback target).
    pub previous: Option<String>,
}

/// What the target path is on the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TargetState {
    #[default]
    Missing,
    /// A symlink; `live` is set when it points into the store.
    Link {
        target: String,
        live: Option<String>,
    },
    Dir,
    Other,
}

/// Everything one inventory round trip told us.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub target: TargetState,
    pub store: bool,
    pub releases: Vec<String>,
    pub metas: BTreeMap<String, Meta>,
    /// Release mode: files of the live release (paths inside it) edited in place by hand.
    pub edited: Vec<Vec<u8>>,
    /// The objects those edits spoilt (known when the live manifest came along).
    pub drifted: Vec<String>,
    /// Paths in the live release added, replaced or removed by hand (release mode: paths of
    /// changed files and directories), or in-place files edited or removed since the last apply.
    pub handmade: u64,
    /// The live release already holds exactly the local tree.
    pub same: bool,
    /// In-place mode: the release last applied into the directory `to`.
    pub inplace: Option<String>,
    pub live_manifest: Option<Manifest>,
    pub objects: HashSet<String>,
}

impl Inventory {
    pub fn live(&self) -> Option<&str> {
        match &self.target {
            TargetState::Link { live, .. } => live.as_deref(),
            TargetState::Dir => self.inplace.as_deref(),
            _ => None,
        }
    }

    /// Objects present and not edited by hand.
    pub fn trusted_objects(&self) -> HashSet<String> {
        let drifted: HashSet<&str> = self.drifted.iter().map(String::as_str).collect();
        self.objects
            .iter()
            .filter(|o| !drifted.contains(o.as_str()))
            .cloned()
            .collect()
    }

    /// A one-line description of hand edits, if any.
    pub fn drift(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.edited.is_empty() {
            parts.push(format!(
                "{} file(s) modified on the host since deploy",
                self.edited.len()
            ));
        }
        if self.handmade > 0 && self.inplace.is_some() {
            parts.push(format!(
                "{} file(s) edited or removed on the host since the last deploy",
                self.handmade
            ));
        } else if self.handmade > 0 {
            parts.push(format!(
                "{} path(s) in the live release added, replaced or removed on the host",
                self.handmade
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// Parse the inventory script's output.
pub fn parse_inventory(out: &[u8], to_name: &str) -> anyhow::Result<Inventory> {
    let mut inv = Inventory::default();
    let mut rest = out;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let rec = &rest[..end];
        let after = &rest[(end + 1).min(rest.len())..];
        let (key, value) = match rec.iter().position(|&b| b == b'\t') {
            Some(t) => (&rec[..t], &rec[t + 1..]),
            None => (rec, &[][..]),
        };
        let text = || String::from_utf8_lossy(value).into_owned();
        match key {
            b"to" => {
                inv.target = match value {
                    b"link" => TargetState::Link {
                        target: String::new(),
                        live: None,
                    },
                    b"dir" => TargetState::Dir,
                    b"other" => TargetState::Other,
                    _ => TargetState::Missing,
                }
            }
            b"target" => {
                let t = text();
                let prefix = format!(".{to_name}.ferry/releases/");
                let live = t
                    .strip_prefix(&prefix)
                    .filter(|id| !id.is_empty() && !id.contains('/'))
                    .map(str::to_string);
                inv.target = TargetState::Link { target: t, live };
            }
            b"store" => inv.store = value == b"yes",
            b"release" => inv.releases.push(text()),
            b"meta" => {
                let t = text();
                if let Some((id, json)) = t.split_once('\t') {
                    match serde_json::from_str::<Meta>(json) {
                        Ok(m) => {
                            inv.metas.insert(id.to_string(), m);
                        }
                        Err(e) => tracing::warn!("unreadable release metadata for {id}: {e}"),
                    }
                }
            }
            b"edited" => inv.edited.push(value.to_vec()),
            b"touched" => inv.handmade += 1,
            b"handmade" => inv.handmade = text().trim().parse().unwrap_or(0),
            b"same" => inv.same = true,
            b"inplace" => inv.inplace = Some(text()).filter(|id| safe_id(id)),
            b"tail" if value == b"gz" => {
                parse_tail(after, &mut inv)?;
                break;
            }
            b"tail" => {
                let n: usize = text().trim().parse().context("malformed inventory tail")?;
                let gz = after.get(..n).context("the inventory was cut short")?;
                parse_tail(gz, &mut inv)?;
                rest = &after[n..];
                continue;
            }
            b"end" => break,
            _ => {}
        }
        rest = after;
    }
    inv.releases.sort();
    // Paths came as `releases/<live>/<path>`; the spoilt objects are those the live manifest names.
    let prefix = format!("releases/{}/", inv.live().unwrap_or_default());
    for p in &mut inv.edited {
        if let Some(rest) = p.strip_prefix(prefix.as_bytes()) {
            *p = rest.to_vec();
        }
    }
    if let Some(m) = &inv.live_manifest {
        let edited: HashSet<&[u8]> = inv.edited.iter().map(Vec::as_slice).collect();
        inv.drifted = m
            .entries
            .iter()
            .filter(|e| edited.contains(e.path.as_slice()))
            .filter_map(|e| e.object())
            .collect();
    }
    Ok(inv)
}

fn parse_tail(gz: &[u8], inv: &mut Inventory) -> anyhow::Result<()> {
    let mut data = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut data)
        .context("reading the host's object list")?;
    let data = data
        .strip_prefix(b"M")
        .context("malformed inventory tail")?;
    let split = data
        .windows(2)
        .position(|w| w == b"\0\0")
        .context("malformed inventory tail")?;
    let manifest = &data[..split + 1];
    if manifest.len() > 1 {
        inv.live_manifest =
            Some(Manifest::decode(manifest).context("the live release's manifest")?);
    }
    // The manifest ends with a NUL and the separator adds two; skip them all.
    inv.objects = String::from_utf8_lossy(&data[split..])
        .trim_start_matches('\0')
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_put_the_store_beside_the_target() {
        let p = Paths::new("/srv/web/app/").unwrap();
        assert_eq!(p.to, "/srv/web/app");
        assert_eq!(p.store, "/srv/web/.app.ferry");
        assert!(Paths::new("relative/x").is_err());
        assert!(Paths::new("/").is_err());
    }

    #[test]
    fn parses_records_and_tail() {
        let mut out = Vec::new();
        out.extend_from_slice(b"to\tlink\0target\t.app.ferry/releases/r2\0store\tyes\0");
        out.extend_from_slice(b"release\tr2\0release\tr1\0");
        out.extend_from_slice(b"meta\tr2\t{\"version\":1,\"ref\":\"main\",\"sha\":\"abc\",\"pipeline\":null,\"user\":\"u\",\"time\":5,\"files\":1,\"bytes\":2,\"digest\":\"d\",\"previous\":\"r1\"}\0");
        out.extend_from_slice(b"edited\treleases/r2/a\0touched\treleases/r2/new\0");
        out.extend_from_slice(b"touched\treleases/r2\0tail\tgz\0");
        let live = Manifest {
            root_mode: 0o755,
            entries: vec![super::super::manifest::Entry {
                path: b"a".to_vec(),
                kind: super::super::manifest::Kind::File {
                    size: 3,
                    mode: 0o644,
                    hash: [0xaa; 32],
                },
            }],
        };
        let aa = live.entries[0].object().unwrap();
        let m = live.encode();
        let mut raw = b"M".to_vec();
        raw.extend_from_slice(&m);
        raw.extend_from_slice(format!("\0\0{aa}\ncc.755\n").as_bytes());
        assert!(
            m.ends_with(b"\0"),
            "the real case: a record's NUL, then the separator"
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        out.extend_from_slice(&gz.finish().unwrap());
        let inv = parse_inventory(&out, "app").unwrap();
        assert_eq!(inv.live(), Some("r2"));
        assert_eq!(inv.releases, ["r1", "r2"]);
        assert_eq!(inv.metas["r2"].previous.as_deref(), Some("r1"));
        assert_eq!(inv.edited, [b"a".to_vec()]);
        assert_eq!(inv.drifted, std::slice::from_ref(&aa));
        assert_eq!(inv.handmade, 2);
        assert_eq!(inv.live_manifest, Some(live));
        let trusted = inv.trusted_objects();
        assert!(trusted.contains("cc.755") && !trusted.contains(&aa));
        let drift = inv.drift().unwrap();
        assert!(
            drift.contains("1 file(s) modified") && drift.contains("2 path(s)"),
            "{drift}"
        );
    }

    #[test]
    fn inventory_end_waits_for_the_whole_tail() {
        let mut out = b"to\tmissing\0tail\t5\0".to_vec();
        assert_eq!(inventory_end(&out), None);
        out.extend_from_slice(b"ab\0\0c");
        assert_eq!(inventory_end(&out), None, "binary tail may hold NULs");
        out.extend_from_slice(b"end\t\0\nrelease x\n");
        assert_eq!(inventory_end(&out), Some(out.len() - 11));
        assert!(safe_id("20261122T101500Z-1a2b3c4d-2") && !safe_id("a b") && !safe_id(".."));
    }

    #[test]
    fn a_link_elsewhere_is_not_live() {
        let inv = parse_inventory(b"to\tlink\0target\t/opt/other\0store\tno\0", "app").unwrap();
        assert_eq!(inv.live(), None);
    }
}
