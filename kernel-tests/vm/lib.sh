# Helpers for the in-VM tests (sourced). Results go to $RESULTS, one line each:
# "PASS name" or "FAIL name: why"; the host prints them and counts.
export PATH=/tests:$PATH
RESULTS=${RESULTS:-/out/results}
ROOT=/data/root            # the daemon's root: store, layers/, cache/, run/
DATA=/data                 # the data disk made on the host (manifests, exports, ext4 copy)
SCRATCH=/data/scratch      # ext4 scratch space for tests (cache dirs must not be tmpfs)

pass() { echo "PASS $1" >>"$RESULTS"; echo "kt: PASS $1"; }
fail() {
  local name=$1
  shift
  echo "FAIL $name: $*" >>"$RESULTS"
  echo "kt: FAIL $name: $*"
}
# check NAME CMD...: PASS if CMD succeeds, else FAIL with its last output line.
check() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$(echo "$out" | tail -n 3 | tr '\n' ' ')"; fi
}
note() { echo "kt: $*"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Mounts made through these are unmounted by cleanup_mounts (call it from an EXIT trap).
MOUNTS=""
mnt() { # mnt DIR mount-args...
  local dir=$1
  shift
  mkdir -p "$dir"
  mount "$@" "$dir" && MOUNTS="$dir $MOUNTS"
}
cleanup_mounts() {
  local m
  for m in $MOUNTS; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  MOUNTS=""
}
# mount_layer DIR NAME [DOMAIN]: EROFS over fscache for layer NAME of $DATA/layers.list.
mount_layer() {
  local dir=$1 name=$2 domain=${3:-} id opts
  id=$(layer_id "$name") || return 1
  opts="fsid=$id"
  [ -n "$domain" ] && opts="$opts,domain_id=$domain"
  mnt "$dir" -t erofs none -o "$opts"
}
# layers.list (written on the host): name diff_id_hex blob_id chunks
layer_id() { awk -v n="$1" '$1 == n {print $2; f=1} END {exit !f}' "$DATA/layers.list"; }
layer_blob() { awk -v n="$1" '$1 == n {print $3; f=1} END {exit !f}' "$DATA/layers.list"; }
layer_chunks() { awk -v n="$1" '$1 == n {print $4; f=1} END {exit !f}' "$DATA/layers.list"; }

# The daemon's counters, current when `dedupd status` returns (else stats.json).
stats_json() { dedupd status --json --root "$ROOT" 2>/dev/null || cat "$ROOT/run/stats.json"; }
# stat_get KEY: a top-level integer counter.
# stat_get KEY: a top-level counter. (The lazy-pull fetcher's own object, "fetch", has
# keys of the same names, chunks_fetched among them: it is cut out first. It holds no
# nested object.)
stat_get() {
  stats_json | tr -d '\n' | sed 's/"fetch": *{[^}]*}//' | tr ',{}' '\n\n\n' |
    sed -n 's/^ *"'"$1"'" *: *\([0-9][0-9]*\).*/\1/p' | head -n 1
}
daemon_pid() { cat /run/dedupd.pid 2>/dev/null; }
daemon_alive() { local p; p=$(daemon_pid) && [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
# The daemon rewrites stats.json every 200 ms: wait past one period before reading it.
stats_settle() { sleep 0.6; }
# read_all DIR: read every regular file below DIR (fails if any read fails).
read_all() { find "$1" -type f -exec cat {} + >/dev/null; }
# check_manifest NAME LAYER MOUNT: the mounted tree matches the layer's host manifest.
check_manifest() {
  local name=$1 layer=$2 dir=$3 got=/tmp/got-$2-$$
  if ! timeout -s KILL "${MANIFEST_TIMEOUT_S:-600}" manifest "$dir" >"$got" 2>/tmp/manifest-err-$$; then
    fail "$name" "reading $dir failed or took over ${MANIFEST_TIMEOUT_S:-600} s: $(tail -n 2 /tmp/manifest-err-$$ | tr '\n' ' ')"
  elif diff "$DATA/manifests/$layer" "$got" >/tmp/diff-$$; then
    pass "$name"
  else
    fail "$name" "$(grep -c '^[-+][^-+]' /tmp/diff-$$) lines differ, first: $(grep '^[-+][^-+]' /tmp/diff-$$ | head -n 4 | tr '\n' ' ')"
    chunk_digests "$layer" "$dir" /tmp/diff-$$
  fi
  rm -f "$got" /tmp/diff-$$ /tmp/manifest-err-$$
}
# loop_dev FILE: sets LOOP to a new read-only loop device for FILE (busybox mount loops
# regular files itself, and EROFS in block mode takes extra devices only as block devices).
LOOPS=""
LOOP=""
loop_dev() {
  LOOP=$(losetup -f) && losetup -r "$LOOP" "$1" && LOOPS="$LOOP $LOOPS"
}
cleanup_loops() { local l; for l in $LOOPS; do losetup -d "$l" 2>/dev/null; done; LOOPS=""; }
# chunk_digests LAYER DIR DIFF: for up to 3 regular files whose content differs, write the
# sha256 of each 64 KiB piece as read to /out/diag/LAYER/ (compare on the host with the
# same pieces of the layer's tar to find the wrong ranges).
chunk_digests() {
  local layer=$1 dir=$2 diff=$3 f n size i
  mkdir -p "/out/diag/$layer"
  grep '^+\./' "$diff" | awk -F'|' '$2 == "regular file" {print substr($1, 2)}' | head -n 3 |
    while read -r f; do
      size=$(stat -c %s "$dir/$f")
      n=$(( (size + 65535) / 65536 ))
      i=0
      while [ $i -lt $n ]; do
        echo "$i $(dd if="$dir/$f" bs=65536 skip=$i count=1 2>/dev/null | sha256sum | cut -c1-64)"
        i=$((i + 1))
      done >"/out/diag/$layer/$(echo "$f" | tr / _).chunks"
      note "wrote 64 KiB piece digests of $f to diag/$layer/"
    done
}
