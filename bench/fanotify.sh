#!/usr/bin/env bash
# fanotify front end vs the same image fully materialized and mounted locally (the
# limit), on this machine's kernel, side by side in one run. As root:
#
#   [ROUNDS=5] [SOURCE=mem|disk] [OLD_BIN=path] bench/fanotify.sh [DATA_MIB]  (default 512)
#
# OLD_BIN: another build of dedupd (e.g. an earlier commit) whose fanotify cold runs are
# measured in the same rounds, as `cold_old`, for a side-by-side comparison.
#
# Builds the release binary, makes one layer of DATA_MIB of random data in 4 files with
# mkfs.erofs --chunksize=65536 --blobdev, imports it into a fresh store, and runs fio
# (buffered; see prep() for what is cached before each run):
#   seq128k  sequential 128 KiB reads of every file
#   rand4k   random 4 KiB reads (io_size DATA_MIB/8)
# for: local (materialized blobs), fanotify cold (empty sparse blobs), fanotify warm
# with marks kept (every read still raises an event), fanotify warm after the blobs were
# unmarked. Prints MiB/s and ratios to local.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/fanotify.sh: needs root" >&2; exit 1; }
kernel-tests/install-host-deps
MIB=${1:-512}
cargo build --release --quiet
BIN=$PWD/target/release/dedupd
W=$(mktemp -d "$PWD/target/fanotify-bench.XXXXXX")
DAEMON=
cleanup() {
  [ -n "$DAEMON" ] && kill -TERM "$DAEMON" 2>/dev/null && wait "$DAEMON" 2>/dev/null || true
  for m in "$W"/mnt/*; do umount -l "$m" 2>/dev/null || true; done
  [ -f "$W/root/fanotify/holder.pid" ] && kill -9 "$(cat "$W/root/fanotify/holder.pid")" 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT
mkdir -p "$W/src" "$W/mnt"
PER=$((MIB / 4))
for i in 0 1 2 3; do head -c "${PER}M" /dev/urandom > "$W/src/f$i"; done
mkfs.erofs --chunksize=65536 --blobdev="$W/blob" "$W/image.erofs" "$W/src" >/dev/null 2>&1
"$BIN" fanotify-import --root "$W/root" "$W/image.erofs" "$W/blob" >/dev/null
rm -f "$W/blob"

start() { # start MODE [flags]: runs serve-MODE in the background, waits for READY
  local mode=$1; shift
  coproc D { exec "${USE_BIN:-$BIN}" "serve-$mode" --root "$W/root" --mount-dir "$W/mnt" "$@" 2>>"$W/daemon.log"; }
  DAEMON=$D_PID
  local line
  while read -r line <&"${D[0]}"; do [ "$line" = READY ] && break; done
  exec {DOUT}<&"${D[0]}"
}
stop() {
  kill -TERM "$DAEMON"; cat <&"$DOUT" >"$W/last-stats" || true; wait "$DAEMON" || true; DAEMON=
}
files() { local d; d=$(ls -d "$W"/mnt/*); echo "$d/f0:$d/f1:$d/f2:$d/f3"; }
# prep FILES...: empties the guest page cache, then (SOURCE=mem, the default) reads the
# source of the next run's bytes -- the local blob, the packs, or the filled fanotify
# blob -- back into it, with no daemon running. Every mount starts with an empty page
# cache of its own. SOURCE=mem measures the front end's own cost against the same bytes
# served from memory. SOURCE=disk leaves the sources uncached; on this VM the disk sits
# on the host's page cache, which the guest cannot drop, so disk numbers mostly measure
# which file the host happened to keep.
SOURCE=${SOURCE:-mem}
prep() { sync; echo 3 >/proc/sys/vm/drop_caches; [ "$SOURCE" = mem ] && cat "$@" >/dev/null; true; }
fio_run() { # fio_run NAME: prints MiB/s
  local args=(--name=b --readonly --ioengine=psync --filename="$(files)" --output-format=json)
  case $1 in
    seq128k) args+=(--rw=read --bs=128k --size="${PER}M" --file_service_type=sequential) ;;
    rand4k) args+=(--rw=randread --bs=4k --size="${PER}M" --io_size="$((MIB / 8))M" --randrepeat=1) ;;
  esac
  fio "${args[@]}" | python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["jobs"][0]["read"]["bw"]/1024))'
}
ROUNDS=${ROUNDS:-3}
RUNS="local cold cold_noprefetch warm_marked warm_unmarked"
[ -n "${OLD_BIN:-}" ] && RUNS="$RUNS cold_old"
declare -A R   # R[run,test] = space-separated MiB/s of every round
start local; stop   # materialize the local blobs once
for round in $(seq "$ROUNDS"); do
  for t in seq128k rand4k; do
    prep "$W"/root/local/*
    start local; R[local,$t]+="$(fio_run $t) "; stop
    rm -rf "$W/root/fanotify/blobs"
    prep "$W"/root/chunks/*.pack
    start fanotify; R[cold,$t]+="$(fio_run $t) "; stop
    if [ -n "${OLD_BIN:-}" ]; then
      rm -rf "$W/root/fanotify/blobs"
      prep "$W"/root/chunks/*.pack
      USE_BIN=$OLD_BIN start fanotify; R[cold_old,$t]+="$(fio_run $t) "; stop
    fi
    rm -rf "$W/root/fanotify/blobs"
    prep "$W"/root/chunks/*.pack
    start fanotify --no-prefetch; R[cold_noprefetch,$t]+="$(fio_run $t) "; stop
    # Warm: blobs complete on disk, page cache dropped; first with marks kept (every
    # read raises an event answered from the page map), then unmarked.
    start fanotify; cat "$W"/mnt/*/f* >/dev/null; stop
    prep "$W"/root/fanotify/blobs/*
    start fanotify --keep-marks; R[warm_marked,$t]+="$(fio_run $t) "; stop
    cp "$W/last-stats" "$W/stats-warm-marked-$t"
    prep "$W"/root/fanotify/blobs/*
    start fanotify; R[warm_unmarked,$t]+="$(fio_run $t) "; stop
  done
done
med() { python3 -c "import statistics,sys; print('%.1f' % statistics.median(map(float, sys.argv[1:])))" $1; }
echo "data: ${MIB} MiB random in 4 files, chunk 64 KiB, $(uname -r), $(nproc) CPUs, SOURCE=$SOURCE, median of $ROUNDS interleaved rounds"
printf '%-30s %16s %16s\n' "run (MiB/s)" "seq128k" "rand4k"
for k in $RUNS; do
  printf '%-30s %16s %16s\n' "$k" "$(med "${R[$k,seq128k]}")" "$(med "${R[$k,rand4k]}")"
done
for k in ${RUNS#local }; do
  printf '%-30s %16s %16s\n' "ratio $k/local" \
    "$(python3 -c "print('%.2f' % ($(med "${R[$k,seq128k]}")/$(med "${R[local,seq128k]}")))")" \
    "$(python3 -c "print('%.2f' % ($(med "${R[$k,rand4k]}")/$(med "${R[local,rand4k]}")))")"
done
for k in $RUNS; do echo "all rounds $k: seq128k ${R[$k,seq128k]}/ rand4k ${R[$k,rand4k]}"; done
echo "warm_marked seq128k daemon counters: $(cat "$W/stats-warm-marked-seq128k")"
