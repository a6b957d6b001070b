//! The host side of a sync: constant POSIX `sh` scripts (run with data as positional arguments, so
//! nothing is spliced into a command line) and the parsing of what they print. They use only what
//! both coreutils and BusyBox offer: `tar -xzpmo`, `tar -c`, `dd iflag=fullblock` (else the stream
//! has no plain part), `mv -fT`, `find -newer -links -path -prune -mindepth -maxdepth -print0
//! -exec +` (never `{}` inside a script `find` runs: GNU find refuses that), `xargs -0 -r`,
//! `head -c`, `ls`, `gzip`, `readlink`, `read`, `cp -p`, `stat -c %a %y`, `tr`, `cut`, `awk`,
//! `date -r`, `sleep`; and, where `find` is GNU's, `find -cnewer` (in place: a `chmod` by hand).
//!
//! Layout beside the target `<dir>/<name>`:
//! ```text
//! <dir>/<name> -> .<name>.ferry/releases/<id>     (release mode; renamed over atomically)
//! <dir>/.<name>.ferry/objects/<blake3>.<mode>      content store; files never opened for writing
//! <dir>/.<name>.ferry/releases/<id>/              trees of hard links into objects/ (in place: empty)
//! <dir>/.<name>.ferry/meta/<id>.{json,manifest,digest}
//! <dir>/.<name>.ferry/meta/<id>.edited              paths of that release edited or replaced by hand
//! <dir>/.<name>.ferry/stamp                        live files newer than this were edited by hand
//! <dir>/.<name>.ferry/modes-used                   release mode: the file modes objects/ holds
//! <dir>/.<name>.ferry/scan.start                   when the last deploy's scans began
//! <dir>/.<name>.ferry/incoming/                    a deploy in flight; removed by the next one
//! <dir>/.<name>.ferry/trash-<id>/                  what deploy <id> pruned, deleted in the background
//! <dir>/.<name>.ferry/trash-withdrawn-<id>/        in place: a first release taken off after its run failed
//! <dir>/.<name>.ferry/adopted-<id>/                 the plain directory release <id> took over (`adopt`)
//! <dir>/.<name>.ferry/inplace                      in-place mode: id of the release applied in <dir>/<name>
//! <dir>/.<name>.ferry/applied                      in-place mode: directories in <name> newer than this changed
//!                                                  (missing while an apply runs: if it never finishes, nothing in <name> is trusted)
//! <dir>/.<name>.ferry/edits.since                  in-place mode: files in <name> newer than this were edited (a second
//!                                                  before the last deploy's scans; the files it wrote are older)
//! <dir>/.<name>.ferry/kept-extras                  in-place mode: the last apply kept files not in the build
//! <dir>/.<name>.ferry/kept-excluded                in-place mode: <name> holds paths `exclude` matches (a deploy that changes it lists it)
//! <dir>/<name>/.ferry-incoming/                    in-place mode: the staging directory of a deploy in flight
//! ```
//!
//! Release mode: an object is trusted while it is not newer than `stamp` (touched after each
//! successful deploy) and its mode is the one in its name; pruning keeps the objects a kept
//! release's manifest names. Objects a broken deploy left unlinked (a truncated one from a cut
//! stream, say) are collected before the next deploy lists what the host has, and objects edited
//! by hand (through `to` or any release) are dropped before the stream lands. In place, objects
//! are only ever links to whole files that left `to`, and one that still shares a file edited in
//! `to` is dropped the same way; edits made inside an in-place store itself are not looked for.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::Context;
use rustc_hash::FxHashSet as HashSet;

use super::diff::Target;
use super::manifest::{Manifest, ObjectId};

/// The store directory of a target path, and the pieces scripts need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    /// Absolute target, without a trailing slash.
    pub to: String,
    /// `<dir>/.<name>.ferry`
    pub store: String,
}

impl Paths {
    /// `given` with `.` components and repeated `/` dropped (one spelling per directory, so that
    /// targets compare); a `..` is refused: it would name the directory by a detour the host's
    /// symlinks could change.
    pub fn new(given: &str) -> anyhow::Result<Paths> {
        // (It is named in every line about the step, on terminals and in CI logs.)
        if given.chars().any(char::is_control) {
            anyhow::bail!(
                "sync target {given:?} holds a control character (a newline, a tab, ...); name a \
                 directory without one (check `to:` and `root:`)"
            );
        }
        let parts: Vec<&str> = given
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        if parts.contains(&"..") {
            anyhow::bail!(
                "sync target `{given}` has a `..` component; name the directory without it (check `to:` and `root:`)"
            );
        }
        let to = format!("/{}", parts.join("/"));
        let (dir, name) = to.rsplit_once('/').unwrap_or(("", &to));
        if !given.starts_with('/') || name.is_empty() {
            anyhow::bail!(
                "sync target `{given}` must be an absolute path naming a directory below `/` (check `to:` and `root:`)"
            );
        }
        Ok(Paths {
            to: to.to_string(),
            store: format!("{dir}/.{name}.ferry"),
        })
    }

    /// The last component of `to`.
    pub fn name(&self) -> &str {
        self.to.rsplit('/').next().unwrap_or_default()
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
  if [ -f "$S/inplace" ]; then read -r live < "$S/inplace" || :; inplace=1; rec inplace "$live"; fi
elif [ -e "$T" ]; then rec to other
else rec to missing
fi
"#
    };
}

/// What the store holds (cwd: the store), recorded with `rec`: its releases and their metadata,
/// and in release mode what changed by hand since the last deploy: one pass over the live release
/// prints a record per path ferry did not leave there: a file newer than `stamp` that still shares
/// its inode with an object was edited in place (`edited`: that object is spoilt); a file with one
/// link (added or replaced), or anything else newer than `stamp` (a directory whose entries were
/// added, removed or renamed), was `touched`. One pass over `objects/` finds the objects whose
/// content or mode changed through any release, live or not (`spoilt`: an edit through a release
/// since rolled away from, or a `chmod`, which leaves the mtime alone). The live release's files
/// that an earlier deploy found edited (`meta/<id>.edited`: it was rolled back to since) are
/// `marked`. Sets `dirty` when anything changed. Needs `live` and `M` (`target_state_sh!`).
/// Shared by the inventory and the deploy script.
macro_rules! store_state_sh {
    () => {
        r#"
# (A live release whose directory went missing is never the same: the deploy makes it anew.)
live_digest_is() { ld=; [ -d "releases/$live" ] && read -r ld < "meta/$live.digest" || :; [ "$ld" = "$1" ]; }
for r in releases/*; do [ -d "$r" ] && rec release "${r#releases/}"; done
for m in meta/*.json; do
  [ -f "$m" ] || continue
  # (`read`, not `cat`: the metadata is one line, and a process per release adds up.)
  n=${m#meta/} j=; IFS= read -r j < "$m" || :; printf 'meta\t%s\t%s\0' "${n%.json}" "$j"
done
# An object is named `<hash>.<mode>`: one `-name '*.644' ! -perm 644` per mode in use, as each
# deploy lists them in `modes-used` (a store made before that: as `ls` finds them). Modes with
# special bits are left out: tar may not restore them for a user.
store_scan() {
  set --
  if [ -f modes-used ]; then
    while read -r m; do
      case $m in ''|*[!0-7]*) ;; *) set -- "$@" -o -name "*.$m" ! -perm "$m" ;; esac
    done < modes-used
  else
    for m in $(ls objects | awk -F. 'NF == 2 && $2 ~ /^[0-7][0-7][0-7]$/ && !s[$2]++ { print $2 }'); do
      set -- "$@" -o -name "*.$m" ! -perm "$m"
    done
  fi
  # Content written with its old mtime kept (`cp -p`) shows in the ctime, where `find` is GNU's:
  # newer than ferry's own last change to the objects' inodes (the stamp, or the end of the last
  # trash deletion, whose unlinks change ctimes; none while one runs). A link made or removed by
  # hand changes it too: these go as `size <bytes> <path>`, for the controller to compare.
  cr=stamp; [ ! trash.done -nt stamp ] || cr=trash.done
  for t in trash-*; do [ ! -d "$t" ] || cr=; break; done
  [ -z "$cr" ] || case $(find --version 2>/dev/null) in *GNU*) ;; *) cr= ;; esac
  # What a broken deploy left (`incoming/`) is not looked at: objects no release links to, which
  # the next deploy collects, are no hand edits.
  ol=; [ ! -e incoming ] || ol='! -links 1'
  if [ -n "$cr" ]; then
    find objects -type f $ol \( \( -newer stamp "$@" \) -print -o -cnewer "$cr" -printf 'size %s %p\n' \)
  else
    find objects -type f $ol \( -newer stamp "$@" \) -print
  fi
}
scan_records() {
  while IFS= read -r o; do
    case $o in 'size '*) rec csize "${o#size }" ;; *) rec spoilt "${o#objects/}" ;; esac
  done
}
# (The deploy script, which may write in the store, runs it beside the pass over the live release.)
sp= sp_pid=
if [ "$M" != in-place ] && [ ! -f inplace ] && [ -d objects ] && [ -e stamp ]; then
  if [ -n "$BG" ]; then store_scan > scan.spoilt & sp_pid=$!; else sp=$(store_scan); fi
fi
live_scan() {
  # (BusyBox find runs no `-exec ... +` inside parentheses.)
  find "releases/$live" -type f -newer stamp ! -links 1 -exec printf 'edited\t%s\0' {} + -o \
    \( -type f -links 1 -o -newer stamp \) -exec printf 'touched\t%s\0' {} +
}
if [ "$M" != in-place ] && [ -n "$live" ] && [ -d "releases/$live" ] && [ -e stamp ] &&
   [ -n "$(live_scan | head -c 1)" ]; then
  live_scan; dirty=1 lt=1
fi
if [ -n "$sp_pid" ]; then
  wait "$sp_pid" || :
  [ ! -s scan.spoilt ] || { scan_records < scan.spoilt; dirty=1; }
  rm -f scan.spoilt
elif [ -n "$sp" ]; then
  printf '%s\n' "$sp" | scan_records; dirty=1
fi
if [ "$M" != in-place ] && [ -n "$live" ] && [ -s "meta/$live.edited" ]; then
  xargs -0 printf 'marked\t%s\0' < "meta/$live.edited"; dirty=1
fi
"#
    };
}

/// Shell for `mode: in-place`, shared by [`DEPLOY`] and [`INVENTORY`]. `to` is a real directory
/// that holds the live release's files (never hard-linked to the store, so nothing written there
/// reaches a stored object); the store keeps, as objects, the content that left `to` (so earlier
/// releases can be applied again), and the releases' manifests.
///
/// `inplace_scan` prints what changed in `$T` since `$S/applied` (touched after each apply): files
/// newer than it, `edited` when they share an inode with a store object (spoilt: a deploy that was
/// cut off after preserving it), else `touched`; with GNU find, files whose ctime only is newer,
/// as `perm <mode> <size> <path>` (touched if the mode or the size is not the deployed one: an
/// edit that kept the old mtime, as `cp -p` or `rsync -a` write one; see `Inventory::perms`) and
/// directories whose ctime is newer as `dperm <mode> <path>` (`.` is `to`: a `chmod` by hand);
/// and, when a directory changed (an entry added, removed or renamed), nothing was applied yet,
/// or extras kept before are now to go, `listing` and a record per path (`hdir` for directories,
/// `have` for the rest). Paths are relative (`./x`); the staging directory is left out.
///
/// `apply` runs after the stream is unpacked (it staged every path `to` gets under
/// `$T/.ferry-incoming`): content leaving `to` is copied into the store where it cannot be linked
/// (`keep`) and store content copied in (`fetch`), staged files that share an inode (content the
/// host already had) are copied (one tar pipe for `.ferry-incoming/.ferry-incoming.links/`, where
/// each source is linked once); only then does `to` change: the tree's read-only directories are
/// made writable (`open`), directories made (parents first; anything else in their way goes),
/// one `mv` per directory renaming the staged files over their destinations (each replaced
/// atomically; one `find` and one `sh` for them all), the extras go, and the read-only
/// directories get their modes (`close`). When `to` was missing, the stream staged the whole tree in `incoming/t` instead and one
/// rename puts it in place. Sets `copied` (empty then); returns non-zero at the first failure
/// (files replaced stay replaced).
macro_rules! in_place_sh {
    () => {
        r#"
SG=.ferry-incoming
ST=$T/$SG
# `to` on another filesystem than its store (a mount point): content is copied, never linked.
P=${T%/*}
if [ "$M" = in-place ] && [ -d "$T" ] && [ ! -L "$T" ]; then
  dev=$(stat -c %d "$T" "${P:-/}")
  [ "${dev%%[!0-9]*}" = "${dev##*[!0-9]}" ] || rec xdev 1
fi
# An apply that did not finish leaves `inplace` without `applied`: nothing in `to` is trusted.
if [ "$M" = in-place ] && [ -f "$S/inplace" ] && [ ! -e "$S/applied" ]; then rec unfinished 1; fi
# Files are edited when newer than `edits.since` (a store from before it: `applied`); directories
# (an entry added, removed or renamed) and symlinks (replaced) when newer than `applied`.
FS=$S/edits.since; [ -e "$FS" ] || FS=$S/applied
# A `chmod` leaves the mtime alone: GNU find sees it by the ctime, newer than `applied` (what an
# apply renames into `to` gets its ctime before that). BusyBox find has no `-cnewer`.
CT=; [ "$M" != in-place ] || case $(find --version 2>/dev/null) in *GNU*) CT=1 ;; esac
inplace_scan() {
  [ -d "$T" ] && [ ! -L "$T" ] || return 0
  if [ -e "$S/applied" ]; then
    set --; [ -z "$CT" ] || set -- -o -type f -cnewer "$S/applied" -printf 'perm\t%m\t%s\t%p\0' \
      -o -type d -cnewer "$S/applied" -printf 'dperm\t%m\t%p\0'
    ( cd "$T" && find . -path "./$SG" -prune -o -type f -newer "$FS" ! -links 1 \
        -exec printf 'edited\t%s\0' {} + -o -type f -newer "$FS" -exec printf 'touched\t%s\0' {} + \
        -o -type l -newer "$S/applied" -exec printf 'touched\t%s\0' {} + "$@" )
  fi
  if [ ! -e "$S/applied" ] || extras_owed ||
     [ -n "$(cd "$T" && find . -path "./$SG" -prune -o -type d -newer "$S/applied" -print | head -c 1)" ]; then
    list_target
  fi
}
list_target() {
  rec listing yes; listed=1
  ( cd "$T" && find . -path "./$SG" -prune -o ! -path . -type d -exec printf 'hdir\t%s\0' {} + \
      -o ! -path . -exec printf 'have\t%s\0' {} + )
}
# The last apply kept extras (`delete: false`) and this one deletes them: they must be found.
extras_owed() { [ "$DEL" = 1 ] && [ -e "$S/kept-extras" ]; }
# One pass finds whether anything in $T changed since the last apply; only then the passes above.
changed_since_apply() {
  set -- -type f -newer "$FS" -o ! -type f -newer "$S/applied"
  [ -z "$CT" ] || set -- "$@" -o -cnewer "$S/applied"
  [ -n "$(cd "$T" && find . -path "./$SG" -prune -o \( "$@" \) -print | head -c 1)" ]
}
if [ "$M" = in-place ] && [ -d "$T" ] && [ ! -L "$T" ] && { [ ! -e "$S/applied" ] || extras_owed ||
   changed_since_apply; }; then
  inplace_scan; dirty=1
fi
# Make or fix directories given as `<mode>/./<path>` (cwd: $T).
# A directory that exists keeps its mode if ours may not change it (it may belong to another user).
MKD='for x; do m=${x%%/*} d=${x#*/}
  if [ ! -d "$d" ] || [ -L "$d" ]; then rm -f "$d" && mkdir "$d" && chmod "$m" "$d" || exit 1
  elif [ "$(stat -c %a "$d")" != "$m" ]; then chmod "$m" "$d" 2>/dev/null || :
  fi
done'
OPEN='for d; do [ ! -d "$d" ] || [ -L "$d" ] || chmod u+wx "$d" || exit 1; done'
# Where a link will not do (another filesystem; an extra that stays in `to`): keep content leaving
# `to` as store objects, and stage store objects into `to`, by copying (records
# `<object>/<path>`; object names hold no `/`).
KEEP='for x; do o=${x%%/*} p=${x#*/}
  [ -e "objects/$o" ] || { cp -p "$T/$p" "objects/$o.tmp" && mv -f "objects/$o.tmp" "objects/$o"; } || exit 1
done'
FETCH='for x; do o=${x%%/*} p=${x#*/}; cp -p "objects/$o" "$ST/$p" || exit 1; done'
# Give each staged file its own inode (it is a link to where the host had the content).
UNSHARE='for f; do cp -p "$f" "$ST/$SG.copy" && mv -f "$ST/$SG.copy" "$f" || exit 1; done'
# Rename the staged files given (paths under $ST, not directories) over their places in $T, one
# `mv` per run of files in one directory, replacing a directory in the way; prints how many.
# A directory in the way fails that `mv` (which renames the others): only then is each file of
# the run looked at, the directory removed and what is left renamed. (`eval` sees only `"${N}"`,
# never a path. No `{}` may appear in a script find runs.)
MOVE='n=0
while [ $# -gt 0 ]; do
  d=${1%/*} k=0 list=
  dd=$T${d#"$ST"}
  for e; do
    [ "${e%/*}" = "$d" ] || break
    k=$((k+1)); list="$list \"\${$k}\""
  done
  if ! eval "mv -f $list \"\$dd/\"" 2>/dev/null; then
    i=0
    for e; do
      i=$((i+1)); [ $i -le $k ] || break
      b=$dd/${e##*/}
      if [ ! -e "$e" ] && [ ! -L "$e" ]; then
        { [ -e "$b" ] || [ -L "$b" ]; } && continue || exit 1
      fi
      if [ -d "$b" ] && [ ! -L "$b" ]; then rmtree "$b" || exit 1; fi
      mv -f "$e" "$dd/" || exit 1
    done
  fi
  n=$((n+k)); shift $k
done
echo $n'
apply() {
  if [ -d incoming/t ]; then
    # `to` was missing: the whole tree was staged here; it goes in with one rename.
    [ ! -e incoming/shared ] || ( ST=$PWD/incoming/t && export ST SG && cd "$ST" &&
      find . -type f -links +1 -exec sh -c "$UNSHARE" sh {} + ) || return 1
    [ -z "$MT" ] || find incoming/t -type f -exec touch -d "@$MT" {} + || return 1
    set_modes || return 1
    mv -T incoming/t "$T" && set_root_mode "$T" || return 1
    copied=
    return 0
  fi
  export T ST SG
  # Nothing in $T changes before every copy (the part that needs disk space) is made.
  # (Empty lists and absent markers cost no process.)
  [ ! -s incoming/keep ] || xargs -0 -r sh -c "$KEEP" sh < incoming/keep || return 1
  [ ! -s incoming/fetch ] || xargs -0 -r sh -c "$FETCH" sh < incoming/fetch || return 1
  SL=$ST/$SG.links
  if [ -d "$SL" ]; then
    # One tar pipe copies the first link to each source (a copy of each file, linked to nothing).
    cf=$S/incoming/copy.failed
    # (Unpacked under umask 0, `$SL` came 0777; tar would give `$ST` that mode, letting anyone
    # put files into what is renamed into `to`.)
    chmod 700 "$SL" || return 1
    ( cd "$SL" && tar -cf - . || : > "$cf" ) | ( cd "$ST" && tar -xpf - ) && [ ! -e "$cf" ] || return 1
    rm -rf "$SL" || return 1
  fi
  # `shared`: the stream staged hard links besides the `.links` subtree.
  [ ! -e incoming/shared ] || find "$ST" -type f -links +1 -exec sh -c "$UNSHARE" sh {} + || return 1
  # Read-only directories of the tree are writable while the apply fills them (`close`: modes).
  [ ! -s incoming/open ] || ( cd "$T" && xargs -0 sh -c "$OPEN" sh ) < incoming/open || return 1
  [ ! -s incoming/dirs ] || ( cd "$T" && xargs -0 -r sh -c "$MKD" sh ) < incoming/dirs || return 1
  [ -z "$MT" ] || find "$ST" -type f -exec touch -d "@$MT" {} + || return 1
  copied=$(find "$ST" ! -type d -print0 | xargs -0 -r sh -c "$RMTREE$MOVE" sh || echo x)
  case $copied in *x*) return 1 ;; esac
  copied=$(printf '%s\n' $copied | { s=0; while read -r x; do s=$((s+${x:-0})); done; echo $s; })
  rm -rf "$ST" || return 1
  # The extras (paths relative to $T).
  [ ! -s incoming/gone ] || ( cd "$T" && xargs -0 sh -c "$RMTREE"'rmtree "$@"' sh ) < incoming/gone ||
    return 1
  [ ! -s incoming/close ] || ( cd "$T" && xargs -0 sh -c "$CHMODS" sh ) < incoming/close || return 1
}
"#
    };
}

/// Read-only: the target's state, the store's releases and metadata, what changed by hand since
/// the last deploy, and (unless the live release already has digest `$3`, or `$3` is `-`) a gzip
/// tail with the live manifest and the object list. Args: store, to, digest, delete extras (1/0),
/// mode (`release` or `in-place`).
pub const INVENTORY: &str = concat!(
    r#"
S=$1 T=$2 D=$3 DEL=${4:-1} M=${5:-release} dirty= BG=
"#,
    target_state_sh!(),
    in_place_sh!(),
    r#"[ -d "$S/releases" ] || { rec store no; exit 0; }
rec store yes
cd "$S" || exit 1
"#,
    store_state_sh!(),
    r#"[ "$D" = - ] && exit 0
if [ -z "$dirty" ] && [ -n "$live" ] && [ -f "meta/$live.digest" ] && live_digest_is "$D"; then
  rec same yes; exit 0
fi
rec tail gz
{ printf M; [ -n "$live" ] && [ -f "meta/$live.manifest" ] && cat "meta/$live.manifest"; printf '\0\0'; ls objects; } | gzip -1
"#
);

/// `rmtree`: `rm -rf` that also takes trees with read-only directories (a build may ship some).
/// Only directories are made writable: files share their inodes (and modes) with the store's
/// objects. Defined here and, as `$RMTREE`, for the scripts the apply runs with `sh -c`. Shared by
/// [`DEPLOY`] and [`REMOVE`].
macro_rules! rmtree_sh {
    () => {
        r#"
RMTREE='rmtree() {
  rm -rf -- "$@" 2>/dev/null && return 0
  for p; do
    case $p in /*) ;; *) p=./$p ;; esac
    [ ! -d "$p" ] || [ -L "$p" ] || find "$p" -type d -exec chmod u+wx {} + 2>/dev/null
  done
  rm -rf -- "$@"
}
'
eval "$RMTREE"
"#
    };
}

/// `unpack` reads the stream from stdin (see `archive`) into the working directory: the plain
/// part's length (64 KiB blocks, 512-byte records), the plain tar, the gzip'd tar. `set_modes`
/// and `set_root_mode` give the unpacked tree's read-only directories the modes the stream lists.
macro_rules! unpack_sh {
    () => {
        r#"
unpack() {
  read -r pb pr && case $pb.$pr in *[!0-9.]*|.*|*.) return 1 ;; esac || return 1
  if [ "$pb$pr" != 00 ]; then
    { { [ "$pb" = 0 ] || dd bs=65536 count="$pb" iflag=fullblock 2>/dev/null; } &&
      { [ "$pr" = 0 ] || dd bs=512 count="$pr" iflag=fullblock 2>/dev/null; }; } |
      { tar -xpmof - && cat > /dev/null; } || return 1
  fi
  tar -xzpmof -
}
# Directories of the tree the owner may not write to came writable; they get their modes once the
# tree under `incoming/` is complete (records `<mode>/./<path>`, deepest first; cwd: the store).
CHMODS='for x; do chmod "${x%%/*}" "${x#*/}" || exit 1; done'
set_modes() {
  [ ! -s incoming/modes ] || ( cd incoming && xargs -0 sh -c "$CHMODS" sh ) < incoming/modes
}
# The tree's top directory, once renamed into place ($1).
set_root_mode() { [ ! -s incoming/rootmode ] || { read -r m < incoming/rootmode && chmod "$m" "$1"; }; }
"#
    };
}

/// The host's `unpack` function, for tests that unpack streams with the system's tools.
#[cfg(test)]
pub(super) const UNPACK: &str = unpack_sh!();

/// A whole deploy in one exec. First it cleans up what an interrupted deploy left (`incoming/`,
/// then in release mode objects no release links to) and prints the same records as
/// [`INVENTORY`] up to the digest check, the live release's `digest` first (the `digest` and
/// `store` records end a line: without a store, the controller sends without hashing first). It
/// reads a line from stdin (the controller hashes meanwhile): the local tree's digest (or `-`),
/// then `1` when the controller holds the live manifest (see `sent`); it prints `same` or the tail
/// (with its length; after a `1` without the live manifest, and in place just the `objects`
/// record), then `end`. Then it reads one line:
/// `<release id> <adopt 0|1> <ids to prune> <objects to drop> <again 0|1> <hold 0|1> <kept
/// excluded 0|1>` (lists comma-separated, `-` for none), or EOF to stop there. The rest of stdin
/// is the stream (`unpack`). Release mode: drop the objects edited by hand, unpack the stream in the store
/// (objects straight into `objects/`, the tree under `incoming/r`), check its trailer (with
/// `hold`, print `ready` and wait for the controller's word: see `gate`), name the release
/// (unique), switch `to` with one rename, prune: move the releases dropped and the
/// objects no kept manifest names into `trash-<id>/`, deleted in the background.
/// Mode `in-place`: unpack beside `to` (see `in_place_sh!`), name the release (`again` 1
/// re-applies an existing one: a rollback), `apply`, then `inplace` names the release and `applied`
/// is touched; pruning is the same. Just before the switch (or apply) it checks that this run
/// still holds the deploy lock. Args: store, to, mode (`release` or `in-place`), delete extras
/// (1/0), and the lock's directory and this run's token (none: no check).
pub const DEPLOY: &str = concat!(
    r#"
S=$1 T=$2 M=$3 DEL=$4 LK=${5:-} TK=${6:-} dirty= same= tm= lt= listed= BG=1
P=${T%/*} N=${T##*/}
# A controller gone closes our output: a write then fails instead of ending the script before
# it cleans up.
trap '' PIPE
"#,
    rmtree_sh!(),
    target_state_sh!(),
    r#"
# The live release's digest, ahead of the scans: a controller that kept that manifest reads it
# meanwhile, and is not sent it (`C` below). (The record ends a line, to arrive at once.)
if [ -n "$live" ] && [ -d "$S/releases/$live" ] && [ -f "$S/meta/$live.manifest" ]; then
  lv=; { read -r lv < "$S/meta/$live.digest"; } 2>/dev/null || :
  [ -z "$lv" ] || { rec digest "$lv"; echo; }
fi
# When the scans began (the in-place one of `to` comes next): see the check after the stream.
[ ! -d "$S/releases" ] || : > "$S/scan.start"
# In place, `to` itself changes only by hand from now until the apply, but for its staging
# directory: its mtime, as `stat` prints it (no comparison across filesystems or clocks), is
# taken now and again once this deploy changed it (see `fail` below).
top() { tm=; [ "$M" != in-place ] || [ ! -d "$T" ] || [ -L "$T" ] || tm=$(stat -c %y "$T" 2>/dev/null) || :; }
top_changed() { [ -n "$tm" ] && [ "$(stat -c %y "$T" 2>/dev/null)" != "$tm" ]; }
top
"#,
    in_place_sh!(),
    r#"
# What a deploy in flight left (cwd: the store). incoming/ goes last: it marks the cleanup as owed.
cleanup() {
  if [ "$M" = in-place ] || [ -f inplace ]; then
    [ -L "$T" ] || rmtree "$ST"
  else
    rmtree incoming/r && find objects -type f -links 1 -exec rm -f {} +
  fi && rmtree incoming
}
# Objects the manifest of no kept release names move into directory $1 (cwd: the store; a
# manifest whose release was deleted by hand keeps nothing). A manifest record is
# `F <object> <size>\t<path>`; other lines (names, links) can at worst keep an object longer.
# (One awk pass, the objects in a table: sorting every record, 150,000 lines for three kept
# releases of 50,000 files, took 0.3-0.4 s; this takes 0.08 s.)
collect_unnamed() {
  ls objects > incoming.objects || return 1
  cs=0
  if [ -s incoming.objects ]; then
    for m in meta/*.manifest; do
      r=${m#meta/} && [ -d "releases/${r%.manifest}" ] && tr '\0' '\n' < "$m"
    done | cut -s -d ' ' -f 2 |
      awk 'NR == FNR { o[$0]; next } { delete o[$0] } END { for (k in o) print k }' incoming.objects - |
      ( cd objects && xargs -r sh -c 'mv -f -- "$@" "$0"' "../$1" ) || cs=1
  fi
  rm -f incoming.objects
  return $cs
}
# What pruning moved aside (`trash-<id>/`, below) is deleted by a process of its own, which the
# session does not wait for: no descriptor of its output stays open there. (The redirections go
# inside: a list, or a function, run in the background with its own would keep copies of this
# script's in bash, dash or BusyBox sh.) Nothing else reads the trash; a second deletion of the
# same one, or a `sync_remove`, can run beside it.
empty_trash() {
  for d in trash-*; do
    if [ -d "$d" ]; then ( exec < /dev/null > /dev/null 2>&1; rmtree trash-* && : > trash.done ) & fi
    break
  done
}
# (The store record ends a line: the controller decides on it whether to hash its tree.)
if [ -d "$S/releases" ]; then
  rec store yes; echo
  cd "$S" || exit 1
  if [ -e "$P/.$N.ferry-new" ] || [ -L "$P/.$N.ferry-new" ]; then rm -f "$P/.$N.ferry-new"; fi
  [ -e stamp ] || : > stamp
  [ ! -e incoming ] || { cleanup; top; }
  # (A deletion cut short, by a reboot say, goes on; a prune would start it only after the switch.)
  empty_trash
  # An apply that did not finish can leave objects sharing an inode with files in `to`, where an
  # edit would change them unseen. Those written since a second before that deploy began go
  # (their content is sent again when needed); the others get an inode of their own: earlier
  # releases, a rollback's, may need them. (Only in a store of in-place releases: in release
  # mode every object has links.)
  if [ -f inplace ] && [ ! -e applied ]; then
    if s=$(date -r stamp +%s 2>/dev/null) && touch -d "@$((s - 1))" stamp.before 2>/dev/null &&
       [ "$(date -r stamp.before +%s)" = "$((s - 1))" ]; then
      find objects -type f -links +1 -newer stamp.before -exec rm -f {} +
      find objects -type f -links +1 -exec sh -c \
        'for o; do cp -p "$o" "$o.tmp" && mv -f "$o.tmp" "$o" || rm -f "$o" "$o.tmp"; done' sh {} +
    else
      find objects -type f -links +1 -exec rm -f {} +
    fi
    rm -f stamp.before
  fi
"#,
    store_state_sh!(),
    r#"
  # The digest of the local tree comes once the controller has hashed it (meanwhile, we scanned),
  # and C=1 when it holds the live manifest.
  read -r D C || exit 0
  if [ -z "$dirty" ] && [ -n "$live" ] && [ -f "meta/$live.digest" ] &&
     live_digest_is "$D"; then
    rec same yes; same=1
  else
    # `to` holds paths `exclude` matches, or extras `delete: false` kept: a deploy that changes
    # it must know them (no directory holding one may go; an unchanged tree needs no listing).
    if [ "$M" = in-place ] && [ -z "$listed" ] && { [ -e kept-excluded ] || [ -e kept-extras ]; } &&
       [ -d "$T" ] && [ ! -L "$T" ]; then
      list_target
    fi
  fi
  if [ -n "$same" ]; then :
  elif [ "$C" = 1 ] && [ "$M" = in-place ]; then
    # Only the object list, short in place (what left `to`): one record, no gzip and no file.
    rec objects "$(ls objects)"
  else
    { printf M; [ "$C" = 1 ] || { [ -n "$live" ] && [ -f "meta/$live.manifest" ] && cat "meta/$live.manifest"; }
      printf '\0\0'; ls objects; } |
      gzip -1 > inventory.gz
    rec tail "$(wc -c < inventory.gz)"; cat inventory.gz; rm -f inventory.gz
  fi
else
  rec store no; echo
  read -r D || exit 0
fi
# The stream's plain part needs a `dd` that reads exact blocks from a pipe (an unchanged tree
# gets no stream: no need to look).
[ -n "$same" ] || [ "$(printf xy | dd bs=2 count=1 iflag=fullblock 2>/dev/null)" != xy ] ||
  rec plain yes
printf 'end\t\0\n'
read -r id adopt prune drop again hold kx || exit 0
[ -n "$id" ] || exit 0
set -e
# (Cleanup first: with the controller gone, the message has no reader.)
fail() {
  cd "$S" 2>/dev/null && cleanup
  echo "ferry: $*; the live release is unchanged" >&2 || :
  exit 3
}
if [ "$M" = in-place ] && [ -L "$T" ]; then
  echo "ferry: $T is a symlink; mode in-place writes into a real directory: remove the link or use mode release" >&2; exit 4
fi
if [ "$M" != in-place ] && [ -f "$S/inplace" ]; then
  echo "ferry: $S holds releases applied in place; remove it (and $T) to switch to mode release" >&2; exit 4
fi
if [ "$M" != in-place ] && [ -d "$T" ] && [ ! -L "$T" ] && [ "$adopt" != 1 ]; then
  echo "ferry: $T is a plain directory, not a ferry release link; set adopt: true to take it over" >&2; exit 4
fi
[ -d "$S/objects" ] && [ -d "$S/releases" ] && [ -d "$S/meta" ] || mkdir -p "$S/objects" "$S/releases" "$S/meta"
cd "$S"
[ -e stamp ] || : > stamp
mkdir incoming
# Objects edited in place by hand go before anything can link to them; the stream brings them anew.
# Releases that share the edited file (hard links) are marked in `meta/<id>.edited`: a rollback
# to one says which of its files no longer hold what they were deployed with.
# One `find` looks for all of them; object names hold no blanks or wildcards.
ifs=$IFS IFS=,
edited=
for o in ${drop#-}; do [ ! -f "objects/$o" ] || edited="$edited objects/$o"; done
IFS=$ifs
if [ -n "$edited" ]; then
  inums=
  for i in $(stat -c %i $edited); do inums="$inums${inums:+ -o} -inum $i"; done
  # (A release left unmarked is no reason to stop the deploy that repairs the live one.)
  find releases \( $inums \) -exec sh -c \
    'for f; do r=${f#releases/} && p=${r#*/} && printf "%s\0" "$p" >> "meta/${r%%/*}.edited"; done' sh {} + || :
  rm -f $edited
fi
# So are the live release's files replaced or added by hand (a file of its own: `sed -i`, an
# editor's save): a rollback to it serves them as they are now.
if [ -n "$lt" ]; then
  find "releases/$live" -type f \( -links 1 -o -newer stamp \) -exec sh -c \
    'for f; do r=${f#releases/} && p=${r#*/} && printf "%s\0" "$p" >> "meta/${r%%/*}.edited"; done' sh {} + || :
fi
"#,
    unpack_sh!(),
    r#"
if [ "$M" = in-place ]; then
  # (A missing `to` stays missing until its tree is renamed in whole.)
  # (A read-only `to` is opened for the staging directory; the apply's `close` sets its mode.)
  # (An entry of `to` itself added, removed or renamed by hand since the scans began: `top`.)
  if top_changed; then
    fail "files in $T were changed on the host while this deploy ran; deploy again to repair them"
  fi
  if [ -d "$T" ]; then { [ -w "$T" ] || chmod u+w "$T"; } && { [ ! -e "$ST" ] || rm -rf "$ST"; } &&
    mkdir -m 700 "$ST" && top
  else mkdir -p "${P:-/}"; fi || fail "cannot write in $T"
  ( cd "${P:-/}" && umask 0 && unpack ) || fail "unpacking the stream failed"
else
  ( umask 0; unpack ) || fail "unpacking the stream failed"
fi
[ -f incoming/COMPLETE ] || fail "the stream ended early"
# A file of the live release edited by hand while this deploy ran (after its scan) may be linked
# into the new release, and its mtime would fall before the new stamp: stop instead, and leave it
# for the next deploy to find and repair. In place, files the apply writes get an mtime before the
# scans began (MT) and the next deploy looks for files newer than their start (`edits.since`):
# here, only the live files content is taken from (into the store or staging) and directories
# (an entry removed or renamed by hand; `to` itself, which got the staging directory: `top`).
# (Whole seconds: BusyBox compares no finer. `edits.since` falls a second before the scans began,
# what the apply writes a second before that. A `touch` that cannot set a time: the whole pass.)
# The next `edits.since` (incoming/since) is never before the stamp the scan used: what earlier
# deploys wrote without MT, a first deploy's files, is older than that one only.
MT=
if [ "$M" = in-place ] && [ -e scan.start ]; then
  { MT=$(date -r scan.start +%s) && MT=$((MT - 2)) && touch -d "@$((MT + 1))" incoming/since &&
    [ "$(date -r incoming/since +%s)" = "$((MT + 1))" ]; } 2>/dev/null || MT=
  # (A stamp from after the scans began: the clock went back. Trust it no further.)
  [ -z "$(find "$FS" -newer scan.start 2>/dev/null)" ] || MT=
  [ -z "$MT" ] || [ -z "$(find "$FS" -newer incoming/since 2>/dev/null)" ] || touch -r "$FS" incoming/since
fi
if [ -e scan.start ] && if [ "$M" != in-place ]; then
     [ -n "$live" ] && [ -d "releases/$live" ] &&
       [ -n "$(find "releases/$live" -newer scan.start -print | head -c 1)" ]
   elif top_changed; then :
   elif [ -z "$MT" ]; then
     [ -d "$T" ] && [ -n "$(cd "$T" && find . -path "./$SG" -prune -o ! -path . -newer "$S/scan.start" -print | head -c 1)" ]
   else
     # The live files content is linked or copied from (`linked`: `./<path>`; being intact, none is
     # newer than the next `edits.since`); then directories and symlinks.
     { [ -s incoming/linked ] && [ -n "$(cd "$T" && xargs -0 -r sh -c 'find "$@" -prune -newer "$0" -print' "$S/incoming/since" \
         < "$S/incoming/linked" 2>/dev/null | head -c 1)" ]; } ||
     { [ -d "$T" ] && [ -n "$(cd "$T" && find . -path "./$SG" -prune -o ! -path . ! -type f -newer "$S/scan.start" -print | head -c 1)" ]; }
   fi; then
  fail "files in $T were changed on the host while this deploy ran; deploy again to repair them"
fi
# Several hosts at once (`hold`): this release is checked; switch only once the controller says
# every host's is (`go-<id>` in incoming/), and stop as a failure does on `abort-<id>`. A
# controller gone fails the write of its next dot, and this script cleans up and ends, as it does
# after an hour's wait; a cleanup by a later deploy (incoming/ gone) ends it at once.
if [ "$hold" = 1 ]; then
  printf 'ready\n' || fail "the controller went away before every host was ready"
  w=0
  until [ -e "incoming/go-$id" ]; do
    [ -d incoming ] || exit 3
    [ ! -e "incoming/abort-$id" ] || fail "another host of this deploy failed before every host was ready"
    w=$((w + 1))
    [ "$w" -lt 36000 ] || fail "the controller did not say to switch within an hour"
    [ $((w % 20)) != 0 ] || printf '.\n' || fail "the controller went away before every host was ready"
    sleep 0.1 2>/dev/null || sleep 1
  done
fi
# This run must still hold the deploy lock: one whose lease ran out unrenewed (a link too slow for
# the renewals) may have been taken over by another run, which cleans up and deploys here too.
if [ -n "$LK" ]; then
  t=; read -r t < "$LK/token" 2>/dev/null || :
  [ "$t" = "$TK" ] || fail "the deploy lock $LK is no longer this run's (its lease ran out \
unrenewed, and another run may hold it); nothing was switched here"
fi
if [ "$again" = 1 ]; then
  rid=$id
  [ -d "releases/$rid" ] || fail "release $rid is no longer on the host"
else
  rid=$id n=1
  while [ -e "releases/$rid" ]; do n=$((n+1)); rid=$id-$n; done
  if [ "$M" = in-place ]; then mkdir "releases/$rid"
  else
    set_modes && mv incoming/r "releases/$rid" && set_root_mode "releases/$rid" ||
      fail "cannot move the release in place (or set its read-only directories' modes)"
  fi
  mv incoming/manifest "meta/$rid.manifest"
  mv incoming/meta.json "meta/$rid.json"
  mv incoming/digest "meta/$rid.digest"
  [ ! -f incoming/modes-used ] || mv -f incoming/modes-used modes-used
fi
# (A truncating open sets the mtime, as `touch` would, without a process.)
: > stamp
if [ "$M" = in-place ]; then
  rm -f applied edits.since
  [ -z "$MT" ] || mv -f incoming/since since.new
  apply || { echo "ferry: applying release $rid into $T failed; files already replaced stay new" >&2; exit 5; }
  rm -rf incoming
  printf '%s\n' "$rid" > inplace.new; mv -f inplace.new inplace
  if [ "$DEL" = 1 ]; then [ ! -e kept-extras ] || rm -f kept-extras; else : > kept-extras; fi
  if [ "$kx" = 1 ]; then : > kept-excluded; else [ ! -e kept-excluded ] || rm -f kept-excluded; fi
  # (`edits.since` first: a run cut between the two leaves no `applied`, so nothing is trusted.)
  [ -z "$MT" ] || mv -f since.new edits.since
  : > applied
  [ -z "$copied" ] || printf 'copied %s\n' "$copied"
else
  rm -rf incoming
  ln -s ".$N.ferry/releases/$rid" "$P/.$N.ferry-new"
  if [ -d "$T" ] && [ ! -L "$T" ]; then
    mv "$T" "$S/adopted-$rid"
    # (Without a working `mv -T`, the adopted directory goes back where it was.)
    mv -fT "$P/.$N.ferry-new" "$T" || { mv "$S/adopted-$rid" "$T"; fail "cannot switch $T (mv -T)"; }
  else
    mv -fT "$P/.$N.ferry-new" "$T"
  fi
fi
printf 'release %s\n' "$rid"
# The new release is live: what follows is housekeeping, whose failures are reported, not fatal.
set +e
# Pruning moves the releases it drops, and then the objects no kept release names, into
# `trash-<id>/` (renames: a release of 50,000 files took 0.4 s to delete, its 2,500 objects of its
# own 0.35 s), for `empty_trash`.
if [ "$prune" != - ]; then
  bin=trash-$rid
  mkdir -p "$bin/releases" "$bin/objects"
  ifs=$IFS IFS=,
  for r in $prune; do
    IFS=$ifs
    # (Moving a directory to another parent rewrites its `..`: it must be writable.)
    if [ -d "releases/$r" ]; then
      { [ -w "releases/$r" ] || chmod u+w "releases/$r"; } && mv "releases/$r" "$bin/releases/" ||
        rmtree "releases/$r"
    fi && rmtree "meta/$r.json" "meta/$r.manifest" "meta/$r.digest" "meta/$r.edited" ||
      echo "ferry: could not prune release $r in $S/releases" >&2
  done
  IFS=$ifs
  collect_unnamed "$bin/objects" ||
    echo "ferry: could not remove the content no release uses any more from $S/objects" >&2
fi
empty_trash
# BusyBox `find -newer` compares whole seconds: an edit made in the second `stamp` (in place:
# `applied`) got would pass for ours. There, return only once that second is over.
case $(find --version 2>/dev/null) in *GNU*) ;; *)
  st=stamp; [ "$M" != in-place ] || st=applied
  s=$(date -r "$st" +%s)
  while [ "$(date +%s)" = "$s" ]; do sleep 0.1 2>/dev/null || sleep 1; done ;;
esac
exit 0
"#
);

/// `modes-used` in a release store: the file modes (octal, one per line) of every object it holds
/// after a deploy of `m`, given those it held before; the store scan checks each object's mode
/// against its name with them. Modes with special bits are left out.
pub fn object_modes(store: &std::collections::BTreeSet<u32>, m: &Manifest) -> String {
    let mut modes = store.clone();
    modes.extend(m.entries.iter().filter_map(|e| e.object()).map(|o| o.mode));
    modes
        .iter()
        .filter(|&&m| m & !0o777 == 0)
        .map(|m| format!("{m:o}\n"))
        .collect()
}

/// A release id or prune id safe to pass on the deploy script's parameter line.
pub fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        && !id.starts_with('.')
}

/// Where the deploy script's `store` record ends, once it came (records before it hold no tail).
pub fn store_known(out: &[u8]) -> Option<usize> {
    record_end(out, b"store\t")
}

/// Where the live release's `digest` record ends (it comes before the host's scans), or the
/// `store` record if there is none.
pub fn digest_known(out: &[u8]) -> Option<usize> {
    record_end(out, b"digest\t").or_else(|| store_known(out))
}

/// Just past the first record that starts with `key`, once it came (records before it hold no
/// tail).
fn record_end(out: &[u8], key: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < out.len() {
        let end = i + out[i..].iter().position(|&b| b == 0)?;
        let rec = out[i..end].strip_prefix(b"\n").unwrap_or(&out[i..end]);
        if rec.starts_with(key) {
            return Some(end + 1);
        }
        i = end + 1;
    }
    None
}

/// Where the deploy script's inventory ends (just past its `end` record), once it has all arrived.
pub fn inventory_end(out: &[u8]) -> Option<usize> {
    inventory_scan(out, 0).ok()
}

/// [`inventory_end`] from `from` (a record's start): `Err` holds where to go on once more has
/// come (the first record not complete yet), so a long inventory is scanned once, not once per
/// piece that arrives (a listing of 50,000 paths took 5.7 s).
pub fn inventory_scan(out: &[u8], from: usize) -> Result<usize, usize> {
    let mut i = from;
    while i < out.len() {
        let Some(p) = out[i..].iter().position(|&b| b == 0) else {
            return Err(i);
        };
        let end = i + p;
        let rec = out[i..end].strip_prefix(b"\n").unwrap_or(&out[i..end]);
        if rec == b"end\t" {
            return Ok(end + 1);
        }
        if let Some(n) = rec.strip_prefix(b"tail\t") {
            let n = std::str::from_utf8(n)
                .ok()
                .and_then(|n| n.trim().parse::<usize>().ok());
            match n {
                Some(n) if out.len() >= end + 1 + n => i = end + 1 + n,
                _ => return Err(i),
            }
        } else {
            i = end + 1;
        }
    }
    Err(i)
}

/// Switch `to` to an existing release; prints the paths of it edited by hand since it was made
/// (NUL-terminated). Args: store, to, release id.
pub const SWITCH: &str = r#"
set -e
S=$1 T=$2 rid=$3
P=${T%/*} N=${T##*/}
[ -d "$S/releases/$rid" ] || { echo "ferry: release $rid does not exist in $S/releases" >&2; exit 4; }
if [ -e "$T" ] && [ ! -L "$T" ]; then echo "ferry: $T is not a release link; refusing to replace it" >&2; exit 4; fi
rm -f "$P/.$N.ferry-new"
ln -s ".$N.ferry/releases/$rid" "$P/.$N.ferry-new"
mv -fT "$P/.$N.ferry-new" "$T"
if [ -f "$S/meta/$rid.edited" ]; then cat "$S/meta/$rid.edited"; fi
"#;

/// Take release `rid`, the first one, off `to` after its run failed, while `to` still shows it
/// (see `sync::withdraw`). Release mode puts back what was there (`B`: `missing`; `dir`, the
/// directory the deploy adopted into `adopted-<rid>`; `link`, a link to `L`); in place, the tree
/// that went into a missing `to` moves to the trash (deleted by the next deploy) and the store
/// forgets it was applied. Args: store, to, release id, mode, B, L.
pub const WITHDRAW: &str = r#"
set -e
S=$1 T=$2 rid=$3 M=$4 B=$5 L=$6
P=${T%/*} N=${T##*/}
if [ "$M" = in-place ]; then
  live=; [ ! -f "$S/inplace" ] || read -r live < "$S/inplace" || :
  [ -d "$T" ] && [ ! -L "$T" ] && [ "$live" = "$rid" ] ||
    { echo "ferry: $T no longer holds release $rid; left as it is" >&2; exit 4; }
  mv "$T" "$S/trash-withdrawn-$rid"
  rm -f "$S/applied" "$S/edits.since" "$S/inplace"
  exit 0
fi
[ -L "$T" ] && [ "$(readlink "$T")" = ".$N.ferry/releases/$rid" ] ||
  { echo "ferry: $T no longer points to release $rid; left as it is" >&2; exit 4; }
case $B in
  missing) rm -f "$T" ;;
  dir) rm -f "$T"; mv "$S/adopted-$rid" "$T" ;;
  link) rm -f "$P/.$N.ferry-new"; ln -s "$L" "$P/.$N.ferry-new"; mv -fT "$P/.$N.ferry-new" "$T" ;;
  *) echo "ferry: unknown state $B" >&2; exit 4 ;;
esac
"#;

/// Print the paths of a release edited by hand since it was made (as [`SWITCH`] does), changing
/// nothing. Args: store, release id.
pub const EDITED: &str = r#"
if [ -f "$1/meta/$2.edited" ]; then cat "$1/meta/$2.edited"; fi
"#;

/// Print a release's manifest. Args: store, release id.
pub const MANIFEST: &str = r#"
[ -f "$1/meta/$2.manifest" ] || { echo "ferry: release $2 has no manifest in $1/meta" >&2; exit 4; }
cat "$1/meta/$2.manifest"
"#;

/// Remove the target link (only one into the store) and the store; prints `removed <what>` for
/// each (`no target` when `to` is missing). A directory applied in place stays: it may be mounted
/// or read elsewhere. Args: store, to.
pub const REMOVE: &str = concat!(
    rmtree_sh!(),
    r#"
S=$1 T=$2
P=${T%/*} N=${T##*/}
if [ -L "$T" ]; then
  case $(readlink "$T") in
    ".$N.ferry/releases/"*) rm -f "$T" && echo "removed link" ;;
    *) echo "ferry: $T links outside its release store; left it alone" >&2 ;;
  esac
elif [ -e "$T" ]; then echo "ferry: $T is a directory, not a release link; left it and its files alone" >&2
else echo "no target"
fi
rm -rf "$P/.$N.ferry-new"
# (A background deletion of the store's trash may still run: BusyBox `rm -rf` fails on entries
# that vanish under it. Another pass finishes the job.)
if [ -e "$S" ]; then
  n=0
  until rmtree "$S" 2>/dev/null || [ ! -e "$S" ]; do
    n=$((n+1)); [ $n -lt 5 ] || { rmtree "$S"; break; }; sleep 1
  done
  [ ! -e "$S" ] || exit 1
  echo "removed store"
fi
"#
);

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
    /// Files of the live tree (paths inside it) edited in place by hand, sharing an object's inode.
    pub edited: Vec<Vec<u8>>,
    /// The objects those edits spoilt (known when the live manifest came along), and the
    /// `spoilt` ones.
    pub drifted: Vec<ObjectId>,
    /// In-place mode: paths in `to` the step's `exclude` matches (see [`Inventory::keep_excluded`]).
    pub excluded: HashSet<Vec<u8>>,
    /// Objects whose content or mode changed by hand, through whichever release (release mode).
    pub spoilt: Vec<ObjectId>,
    /// Objects whose ctime only is new (GNU find), with their size: spoilt when the live manifest
    /// gives them another size (content written with the old mtime kept, `cp -p`), not when only
    /// a link to them was made or removed by hand.
    pub resized: Vec<(u64, ObjectId)>,
    /// Files of the live release that an earlier deploy found edited by hand (it was rolled back
    /// to since): a deploy makes the release anew.
    pub marked: Vec<Vec<u8>>,
    /// Other paths of the live tree added, replaced or changed by hand (release mode: also
    /// directories whose entries changed).
    pub touched: Vec<Vec<u8>>,
    /// In-place mode: files whose ctime changed since the last apply, with their mode and size;
    /// those whose mode or size is not the live manifest's join `touched` once that is known.
    pub perms: Vec<(u32, u64, Vec<u8>)>,
    /// In-place mode: directories whose ctime changed since the last apply, with their mode; those
    /// whose mode is not the live manifest's join `touched` (`to` itself: `root_changed`).
    pub dperms: Vec<(u32, Vec<u8>)>,
    /// In-place mode: `to` itself no longer has the mode the live manifest gives it.
    pub root_changed: bool,
    /// In-place mode: every path in `to`, when the host listed them.
    pub listing: Option<Vec<Vec<u8>>>,
    /// In-place mode: the listed paths that are directories.
    pub listed_dirs: Vec<Vec<u8>>,
    /// In-place mode: `to` is on another filesystem than its store (content is copied, not linked).
    pub xdev: bool,
    /// In-place mode: the last apply did not finish, so nothing in `to` is known.
    pub unfinished: bool,
    /// The host can take a plain part ahead of the gzip'd stream.
    pub plain: bool,
    /// Paths changed by hand that the next deploy repairs (in-place mode: set from the apply).
    pub handmade: u64,
    /// The live release already holds exactly the local tree.
    pub same: bool,
    /// In-place mode: the release last applied into the directory `to`.
    pub inplace: Option<String>,
    /// The live release's digest (the deploy script says it before the controller's digest).
    pub live_digest: Option<String>,
    pub live_manifest: Option<Manifest>,
    pub objects: HashSet<ObjectId>,
}

impl Inventory {
    pub fn live(&self) -> Option<&str> {
        match &self.target {
            TargetState::Link { live, .. } => live.as_deref(),
            TargetState::Dir => self.inplace.as_deref(),
            _ => None,
        }
    }

    /// The live manifest, from the host or kept by the controller; finds the objects that hand
    /// edits spoilt (those the manifest names at edited paths, and the `spoilt` ones).
    pub fn set_live_manifest(&mut self, m: Manifest) {
        // In place, a file whose ctime changed was touched when its mode or size is not the
        // deployed one: a `chmod` or `chown` to the same value, or a link made and removed,
        // changes nothing; content written with the old mtime kept (`cp -p`) mostly changes the
        // size. (Same size and mtime, only the content: not seen without reading every file.)
        let deployed: rustc_hash::FxHashMap<&[u8], (u32, u64)> = m
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                super::manifest::Kind::File { mode, size, .. } => {
                    Some((e.path.as_slice(), (mode & 0o7777, size)))
                }
                _ => None,
            })
            .collect();
        for (mode, size, path) in std::mem::take(&mut self.perms) {
            if deployed.get(path.as_slice()) != Some(&(mode, size)) {
                self.touched.push(path);
            }
        }
        let dirs: rustc_hash::FxHashMap<&[u8], u32> = m
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                super::manifest::Kind::Dir { mode } => Some((e.path.as_slice(), mode & 0o777)),
                _ => None,
            })
            .collect();
        // (Permission bits only: a setgid directory's subdirectories inherit the bit.)
        for (mode, path) in std::mem::take(&mut self.dperms) {
            let mode = mode & 0o777;
            if path == b"." {
                self.root_changed |= mode != m.root_mode & 0o777;
            } else if dirs.get(path.as_slice()).is_some_and(|&m| m != mode) {
                self.touched.push(path);
            }
        }
        let resized = std::mem::take(&mut self.resized);
        if !resized.is_empty() {
            let sizes: rustc_hash::FxHashMap<ObjectId, u64> = m
                .entries
                .iter()
                .filter_map(|e| match e.kind {
                    super::manifest::Kind::File { size, .. } => Some((e.object()?, size)),
                    _ => None,
                })
                .collect();
            for (size, o) in resized {
                if sizes.get(&o).is_some_and(|&s| s != size) && !self.spoilt.contains(&o) {
                    self.spoilt.push(o);
                }
            }
        }
        let edited: HashSet<&[u8]> = self.edited.iter().map(Vec::as_slice).collect();
        let mut drifted: Vec<ObjectId> = m
            .entries
            .iter()
            .filter(|e| edited.contains(e.path.as_slice()))
            .filter_map(|e| e.object())
            .chain(self.spoilt.iter().copied())
            .collect();
        drifted.sort();
        drifted.dedup();
        self.drifted = drifted;
        self.live_manifest = Some(m);
    }

    /// Objects present and not edited by hand.
    pub fn trusted_objects(&self) -> HashSet<ObjectId> {
        let mut trusted = self.objects.clone();
        for o in &self.drifted {
            trusted.remove(o);
        }
        trusted
    }

    /// In-place mode: what `to` holds, as the host reported it.
    pub fn in_place_target(&self) -> Target<'_> {
        Target {
            live: self
                .live_manifest
                .as_ref()
                .filter(|_| self.inplace.is_some() && !self.unfinished),
            changed: self
                .edited
                .iter()
                .chain(&self.touched)
                .map(Vec::as_slice)
                .collect(),
            listing: self
                .listing
                .as_ref()
                .map(|l| l.iter().map(Vec::as_slice).collect()),
            dirs: self.listed_dirs.iter().map(Vec::as_slice).collect(),
            missing: self.target == TargetState::Missing,
            xdev: self.xdev,
            keep: self.excluded.iter().map(Vec::as_slice).collect(),
            root_changed: self.root_changed,
            ..Default::default()
        }
    }

    /// In place, the paths of `to` that `exclude` matches (or lie under a directory it does) stay
    /// as they are: not changes by hand, not extras to delete. From the listing, the paths
    /// changed by hand and the live manifest (a path deployed before it was excluded).
    pub fn keep_excluded(&mut self, exclude: &ignore::gitignore::Gitignore) {
        let dirs: HashSet<&[u8]> = self.listed_dirs.iter().map(Vec::as_slice).collect();
        let live = self.live_manifest.iter().flat_map(|m| &m.entries).map(|e| {
            let dir = matches!(e.kind, super::manifest::Kind::Dir { .. });
            (e.path.as_slice(), dir)
        });
        let listed = self
            .listing
            .iter()
            .flatten()
            .map(|p| (p.as_slice(), dirs.contains(p.as_slice())));
        let changed = self
            .edited
            .iter()
            .chain(&self.touched)
            .map(|p| (p.as_slice(), false));
        let excluded: HashSet<Vec<u8>> = listed
            .chain(changed)
            .chain(live)
            .filter(|(p, dir)| {
                exclude
                    .matched_path_or_any_parents(Path::new(OsStr::from_bytes(p)), *dir)
                    .is_ignore()
            })
            .map(|(p, _)| p.to_vec())
            .collect();
        self.edited.retain(|p| !excluded.contains(p));
        self.touched.retain(|p| !excluded.contains(p));
        self.excluded = excluded;
    }

    /// A one-line description of hand edits, if any.
    pub fn drift(&self) -> Option<String> {
        if self.inplace.is_some() && self.unfinished {
            return Some(
                "the last apply did not finish: files of two releases are live; deploy again, or \
                 roll back, to put it right"
                    .into(),
            );
        }
        if self.inplace.is_some() {
            return (self.handmade > 0).then(|| {
                format!(
                    "{} path(s) added, edited or removed on the host since the last deploy",
                    self.handmade
                )
            });
        }
        let mut parts = Vec::new();
        if !self.edited.is_empty() {
            parts.push(format!(
                "{} file(s) modified on the host since deploy",
                self.edited.len()
            ));
        }
        if self.handmade > 0 {
            parts.push(format!(
                "{} path(s) in the live release added, replaced or removed on the host",
                self.handmade
            ));
        }
        if !self.marked.is_empty() {
            parts.push(format!(
                "{} file(s) of the live release were found edited by hand before it was rolled back to",
                self.marked.len()
            ));
        }
        if !self.spoilt.is_empty() {
            parts.push(format!(
                "{} stored file(s) changed by hand (content or mode) since they were deployed; \
                 they are not reused",
                self.spoilt.len()
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
        // (A record may start a line: the deploy script ends one after `store`.)
        let rec = rest[..end].strip_prefix(b"\n").unwrap_or(&rest[..end]);
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
            b"touched" => inv.touched.push(value.to_vec()),
            b"perm" => {
                // `<mode>\t<size>\t<path>`: a file whose ctime changed (GNU find, in place).
                let mut parts = value.splitn(3, |&b| b == b'\t');
                let mode = parts.next().and_then(|f| std::str::from_utf8(f).ok());
                let size = parts.next().and_then(|f| std::str::from_utf8(f).ok());
                if let (Some(mode), Some(size), Some(path)) = (mode, size, parts.next())
                    && let (Ok(mode), Ok(size)) = (u32::from_str_radix(mode, 8), size.parse())
                {
                    let path = path.strip_prefix(b"./").unwrap_or(path).to_vec();
                    inv.perms.push((mode, size, path));
                }
            }
            b"dperm" => {
                // `<mode>\t<path>`: a directory whose ctime changed (GNU find, in place).
                let mut parts = value.splitn(2, |&b| b == b'\t');
                let mode = parts.next().and_then(|f| std::str::from_utf8(f).ok());
                if let (Some(mode), Some(path)) = (mode, parts.next())
                    && let Ok(mode) = u32::from_str_radix(mode, 8)
                {
                    let path = path.strip_prefix(b"./").unwrap_or(path).to_vec();
                    inv.dperms.push((mode, path));
                }
            }
            b"marked" => inv.marked.push(value.to_vec()),
            b"spoilt" => inv.spoilt.extend(object_names(value)),
            b"csize" => {
                // `<size> objects/<name>`
                let text = String::from_utf8_lossy(value);
                if let Some((size, path)) = text.split_once(' ')
                    && let (Ok(size), Some(o)) = (
                        size.parse(),
                        ObjectId::parse(path.strip_prefix("objects/").unwrap_or(path).as_bytes()),
                    )
                {
                    inv.resized.push((size, o));
                }
            }
            b"listing" => inv.listing = Some(Vec::new()),
            b"hdir" => {
                inv.listing.get_or_insert_default().push(value.to_vec());
                inv.listed_dirs.push(value.to_vec());
            }
            b"xdev" => inv.xdev = true,
            b"plain" => inv.plain = true,
            b"unfinished" => inv.unfinished = true,
            b"have" => inv.listing.get_or_insert_default().push(value.to_vec()),
            b"same" => inv.same = true,
            b"inplace" => inv.inplace = Some(text()).filter(|id| safe_id(id)),
            b"digest" => inv.live_digest = Some(text()),
            b"objects" => inv.objects = object_names(value),
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
    // Paths came as `releases/<live>/<path>` (release mode) or `./<path>` (in place); the spoilt
    // objects are those the live manifest names.
    let prefix = format!("releases/{}/", inv.live().unwrap_or_default());
    let lists = [&mut inv.edited, &mut inv.touched, &mut inv.listed_dirs];
    for p in lists
        .into_iter()
        .flatten()
        .chain(inv.listing.iter_mut().flatten())
    {
        // (The live release's own directory, when entries were added or removed at its top: `.`.)
        if p.as_slice() == prefix.trim_end_matches('/').as_bytes() {
            *p = b".".to_vec();
        } else if let Some(rest) = p.strip_prefix(prefix.as_bytes()).or(p.strip_prefix(b"./")) {
            *p = rest.to_vec();
        }
    }
    inv.handmade = inv.touched.len() as u64;
    inv.marked.sort();
    inv.marked.dedup();
    inv.spoilt.sort();
    inv.drifted.clone_from(&inv.spoilt);
    if let Some(m) = inv.live_manifest.take() {
        inv.set_live_manifest(m);
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
    inv.objects = object_names(&data[split..]);
    Ok(())
}

/// The object ids in `ls objects` output (names ferry did not write are no object of any tree).
fn object_names(list: &[u8]) -> HashSet<ObjectId> {
    list.split(|&b| b == b'\n' || b == 0)
        .filter_map(ObjectId::parse)
        .collect()
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
        let e = Paths::new("/").unwrap_err().to_string();
        assert!(e.starts_with("sync target `/` must be"), "{e}");
        let e = Paths::new("/srv/a\nb").unwrap_err().to_string();
        assert!(
            e.starts_with("sync target \"/srv/a\\nb\" holds a control character"),
            "{e}"
        );
        assert!(Paths::new("/.").is_err());
        assert_eq!(Paths::new("/srv//web/./app/.").unwrap(), p);
        let e = Paths::new("/srv/x/../web/app").unwrap_err().to_string();
        assert!(e.contains("has a `..` component"), "{e}");
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
        let cc = ObjectId::new([0xcc; 32], 0o755);
        let upper = cc.to_string().to_uppercase();
        raw.extend_from_slice(format!("\0\0{aa}\n{cc}\ncc.755\n{upper}\n").as_bytes());
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
        assert!(trusted.contains(&cc) && !trusted.contains(&aa));
        assert_eq!(
            inv.objects.len(),
            2,
            "names ferry did not write are not objects"
        );
        let drift = inv.drift().unwrap();
        assert!(
            drift.contains("1 file(s) modified") && drift.contains("2 path(s)"),
            "{drift}"
        );
    }

    /// Objects spoilt through any release are not trusted, whether or not the live manifest came;
    /// files of the live release found edited before it was rolled back to are reported.
    #[test]
    fn spoilt_objects_are_dropped_and_marked_files_reported() {
        let cc = ObjectId::new([0xcc; 32], 0o644);
        let dd = ObjectId::new([0xdd; 32], 0o755);
        let out = format!(
            "to\tlink\0target\t.app.ferry/releases/r1\0store\tyes\0spoilt\t{cc}\0\
             marked\tindex.html\0marked\tindex.html\0objects\t{cc}\n{dd}\0end\t\0"
        );
        let mut inv = parse_inventory(out.as_bytes(), "app").unwrap();
        assert_eq!(inv.drifted, [cc]);
        assert_eq!(inv.marked, [b"index.html".to_vec()]);
        let drift = inv.drift().unwrap();
        assert!(
            drift.contains("1 stored file(s) changed by hand")
                && drift.contains("1 file(s) of the live release were found edited"),
            "{drift}"
        );
        // The kept live manifest arrives later: the spoilt object stays out.
        inv.set_live_manifest(Manifest::default());
        assert_eq!(inv.drifted, [cc]);
        let trusted = inv.trusted_objects();
        assert!(trusted.contains(&dd) && !trusted.contains(&cc));
    }

    #[test]
    fn an_object_whose_ctime_changed_is_spoilt_only_at_another_size() {
        let file = |name: &str, byte: u8, size| super::super::manifest::Entry {
            path: name.as_bytes().to_vec(),
            kind: super::super::manifest::Kind::File {
                size,
                mode: 0o644,
                hash: [byte; 32],
            },
        };
        let m = Manifest {
            root_mode: 0o755,
            entries: vec![file("a", 0xaa, 5), file("b", 0xbb, 7)],
        };
        let (aa, bb) = (
            m.entries[0].object().unwrap(),
            m.entries[1].object().unwrap(),
        );
        // `a` was written with its old mtime kept (another size); `b` got a link by hand.
        let out = format!(
            "to\tlink\0target\t.app.ferry/releases/r1\0store\tyes\0csize\t15 objects/{aa}\0\
             csize\t7 objects/{bb}\0objects\t{aa}\n{bb}\0end\t\0"
        );
        let mut inv = parse_inventory(out.as_bytes(), "app").unwrap();
        inv.set_live_manifest(m);
        assert_eq!(inv.drifted, [aa]);
        assert!(
            inv.drift()
                .unwrap()
                .contains("1 stored file(s) changed by hand")
        );
        let trusted = inv.trusted_objects();
        assert!(trusted.contains(&bb) && !trusted.contains(&aa));
    }

    #[test]
    fn modes_used_cover_the_store_and_the_new_release() {
        let file = |mode| super::super::manifest::Entry {
            path: format!("{mode:o}").into_bytes(),
            kind: super::super::manifest::Kind::File {
                size: 1,
                mode,
                hash: [1; 32],
            },
        };
        let m = Manifest {
            root_mode: 0o755,
            entries: vec![file(0o644), file(0o4755), file(0o600)],
        };
        let store = [0o644, 0o755].into_iter().collect();
        assert_eq!(object_modes(&store, &m), "600\n644\n755\n");
    }

    /// The deploy script's early records: the live digest on its own line ahead of the scans,
    /// then (after them) the store record; in place, a kept manifest gets just the object list.
    #[test]
    fn parses_the_early_digest_and_an_object_list() {
        let digest = b"to\tdir\0inplace\tr2\0digest\t0123456789abcdef0123456789abcdef\0\n";
        assert_eq!(digest_known(digest), Some(digest.len() - 1));
        assert_eq!(store_known(digest), None);
        let mut out = digest.to_vec();
        out.extend_from_slice(b"touched\t./x\0store\tyes\0\n");
        assert_eq!(store_known(&out), Some(out.len() - 1));
        let cc = ObjectId::new([0xcc; 32], 0o644);
        out.extend_from_slice(format!("objects\t{cc}\nnot-an-object\0end\t\0\n").as_bytes());
        assert_eq!(inventory_end(&out), Some(out.len() - 1));
        let inv = parse_inventory(&out, "app").unwrap();
        assert_eq!(
            inv.live_digest.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(inv.live(), Some("r2"));
        assert_eq!(inv.touched, [b"x".to_vec()]);
        assert!(inv.objects.len() == 1 && inv.objects.contains(&cc));
        assert!(inv.live_manifest.is_none() && !inv.same);
        // A host without a live release: the first read waits for the store record.
        let bare = b"to\tmissing\0store\tno\0\n";
        assert_eq!(digest_known(bare), Some(bare.len() - 1));
    }

    #[test]
    fn inventory_end_waits_for_the_whole_tail() {
        let mut out = b"to\tmissing\0tail\t5\0".to_vec();
        assert_eq!(inventory_end(&out), None);
        out.extend_from_slice(b"ab\0\0c");
        assert_eq!(inventory_end(&out), None, "binary tail may hold NULs");
        out.extend_from_slice(b"end\t\0\nrelease x\n");
        assert_eq!(inventory_end(&out), Some(out.len() - 11));
        assert!(safe_id("20261122T101500.250Z-1a2b3c4d-2") && !safe_id("a b") && !safe_id(".."));
    }

    #[test]
    fn a_link_elsewhere_is_not_live() {
        let inv = parse_inventory(b"to\tlink\0target\t/opt/other\0store\tno\0", "app").unwrap();
        assert_eq!(inv.live(), None);
    }
}
