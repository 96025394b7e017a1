# Acceptance 6: the fio jobs of bench/fio, all cold, on the same data three ways, side by
# side in this one VM run: EROFS over fscache served by dedupd (a fresh domain per run, so
# fresh cache files), a local EROFS mount of the exported image and blob (loop devices on
# the same ext4 disk), and an ext4 copy. Then fscache again with the daemon restarted with
# the other fill-size choice (--no-read-around or --read-around, whichever this dedupd
# has). Results go to /out/fio.tsv (job, setup, KiB read, KiB/s, IOPS, runtime ms); the host makes the table.
# Only fio's success is tested; the ratios are measurements, not assertions.
. /tests/lib.sh
trap "cleanup_mounts; cleanup_loops" EXIT
out=/out/fio.tsv
: >"$out"
exp=$DATA/export/bench
image=$exp/$(cat "$exp/image-name")
blob=$exp/$(layer_blob bench).blob
run=0

# fio_run JOB SETUP DIR
fio_run() {
  local job=$1 setup=$2 dir=$3 line
  drop_caches
  if line=$(FIO_DIR=$dir fio --readonly --output-format=terse --terse-version=3 "/bench/fio/$job.fio" 2>/tmp/fio-err); then
    line=$(echo "$line" | grep "^3;" | tail -n 1)
    echo "$line" | awk -F';' -v s="$setup" -v j="$job" '{print j "\t" s "\t" $6 "\t" $7 "\t" $8 "\t" $9}' >>"$out"
    note "fio $job on $setup: $(echo "$line" | cut -d';' -f7) KiB/s"
    if [ "$(echo "$line" | cut -d';' -f6)" -gt 0 ] 2>/dev/null; then pass "fio-$job-$setup"; else fail "fio-$job-$setup" "read nothing: $line"; fi
  else
    fail "fio-$job-$setup" "$(tail -n 2 /tmp/fio-err | tr '\n' ' ')"
  fi
}
fscache_run() { # JOB SETUP
  run=$((run + 1))
  if mount_layer /mnt/fio-fs bench "fio-$1-$2-$run"; then
    fio_run "$1" "$2" /mnt/fio-fs
  else
    fail "fio-$1-$2" "mount of bench over fscache failed"
  fi
  cleanup_mounts
}

for job in seq-128k rand-4k small-files; do
  fscache_run "$job" fscache
  if loop_dev "$blob" && mnt /mnt/fio-local -t erofs -o "device=$LOOP" "$image"; then
    fio_run "$job" erofs-local /mnt/fio-local
  else
    fail "fio-$job-erofs-local" "mount -t erofs -o device=(loop of $blob) $image failed"
  fi
  cleanup_mounts
  cleanup_loops
  fio_run "$job" ext4 "$DATA/ext4copy/bench"
done

# The fill-size choice: the same fscache runs with the daemon's other read-around setting.
help=$(dedupd run --help 2>/dev/null)
flag=""
for f in --no-read-around --read-around; do
  echo "$help" | grep -q -- "$f\b" && { flag=$f; break; }
done
if [ -n "$flag" ]; then
  echo "$flag" >/out/fio-alt-flag
  pid=$(daemon_pid)
  kill "$pid"
  i=0; while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
  rm -f "$ROOT/run/stats.json"
  dedupd run --root "$ROOT" --front-end cachefiles --threads "$(nproc)" "$flag" >>/out/dedupd.log 2>&1 &
  echo $! >/run/dedupd.pid
  # Serving once stats.json is back (a start first walks the root and loads the
  # registry: seconds under emulation, so a fixed sleep raced it).
  i=0; while ! stats_json >/dev/null 2>&1 && daemon_alive && [ $i -lt 120 ]; do sleep 0.5; i=$((i + 1)); done
  if daemon_alive; then
    for job in seq-128k rand-4k small-files; do fscache_run "$job" fscache-alt; done
  else
    fail fio-alt-daemon "dedupd run $flag did not stay up: $(tail -n 2 /out/dedupd.log | tr '\n' ' ')"
  fi
fi

# The daemon's own ceiling in this VM: the same layer's chunks read, verified, decompressed
# and written out by `dedupd export` on one thread, with no kernel round trips. Under TCG
# this CPU work is emulated, so it bounds what any fill strategy can reach here.
# The store is one process's at a time: the daemon stops for the export and starts again
# (with the suite's flags) for the tests after this one.
pid=$(daemon_pid)
if [ -n "$pid" ]; then
  kill "$pid" 2>/dev/null
  i=0; while [ -e "/proc/$pid" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$pid/stat" 2>/dev/null &&
    [ $i -lt 100 ]; do sleep 0.2; i=$((i + 1)); done
fi
drop_caches
rm -rf "$SCRATCH/ceiling"
t0=$(cut -d' ' -f1 /proc/uptime)
if dedupd export --root "$ROOT" "$(layer_id bench)" "$SCRATCH/ceiling" >/dev/null 2>/tmp/export-err; then
  t1=$(cut -d' ' -f1 /proc/uptime)
  kib=$(cat "$SCRATCH"/ceiling/*.blob | wc -c | awk '{print int($1 / 1024)}')
  ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print int((b - a) * 1000)}')
  [ "$ms" -gt 0 ] || ms=1
  printf 'decode-ceiling\tdedupd-export\t%s\t%s\t0\t%s\n' "$kib" "$((kib * 1000 / ms))" "$ms" >>"$out"
  note "dedupd export of bench (decode path alone, 1 thread): $((kib * 1000 / ms)) KiB/s"
  pass fio-decode-ceiling
else
  fail fio-decode-ceiling "dedupd export failed: $(tail -n 2 /tmp/export-err | tr '\n' ' ')"
fi
rm -rf "$SCRATCH/ceiling"
rm -f "$ROOT/run/stats.json"
dedupd run --root "$ROOT" --front-end cachefiles --threads "$(nproc)" >>/out/dedupd.log 2>&1 &
echo $! >/run/dedupd.pid
i=0; while ! stats_json >/dev/null 2>&1 && daemon_alive && [ $i -lt 120 ]; do sleep 0.5; i=$((i + 1)); done
daemon_alive || fail fio-daemon-restart "dedupd run did not come back after the export: $(tail -n 2 /out/dedupd.log | tr '\n' ' ')"
