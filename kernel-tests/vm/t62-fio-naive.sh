# Issue 17: the fio jobs of bench/fio against dedupd and against a floor, the naive C
# server of bench/naive (one thread: pread + pwrite + READ_COMPLETE, no verification, no
# decompression), both over fscache on the same bench layer, with local EROFS beside them;
# 3 cold runs of each job and setup, interleaved so that a change in the host's load
# falls on all three. For the two servers, their CPU time (utime + stime of the whole
# process, /proc/PID/stat) is read just before and after each fio run, and their peak RSS
# (VmHWM) at its end. Rows go to /out/fio-naive.tsv:
#   job, setup (dedupd | naive | erofs-local), run, KiB read, KiB/s, server CPU ms,
#   server VmHWM KiB (the last two empty for local EROFS);
# dedupd's RSS once it answers, before anything is mounted (idle), goes to
# /out/fio-naive-idle.tsv (KiB, one row per start). vm/run renders the medians into
# fio-naive.md. Only fio's and the mounts' success is
# tested; the numbers are measurements, never asserted.
#
# With `perf` on PATH (vm/run stages it only when DEDUPD_VM_PERF=1), the first run of each
# job on each server is also profiled system-wide (cpu-clock, 499 Hz) and the profile
# written to /out/perf-JOB-SETUP.txt (by command, object and symbol; the kernel's named
# through /proc/kallsyms). Those runs' numbers carry the sampling's cost.
#
# Every run is cold: caches dropped, a fresh server process, and fresh cache files (each
# mount has a domain_id of its own; the naive server also binds a fresh cache dir, while
# dedupd's is ROOT/cache). Both servers are mounted the same way (lib.sh's mount_layer,
# fsid plus domain_id) so the kernel's side is the same and only the server differs.
# The suite's daemon is stopped first (# own-daemon): cachefiles binds one cache at a
# time, and each server here binds its own in turn.
# own-daemon
# timeout-s: 1500
. /tests/lib.sh
out=/out/fio-naive.tsv
: >"$out"
: >/out/fio-naive-idle.tsv
exp=$DATA/export/bench
image=$exp/$(cat "$exp/image-name")
blob=$exp/$(layer_blob bench).blob
fsid=$(layer_id bench)
naive=$(command -v fscache-naive)
src=$SCRATCH/t62-src             # the naive server's SRC_DIR: one symlink per cookie key
ncache=$SCRATCH/t62-naive-cache  # its cache dir (ext4: cachefiles needs tmpfile + xattrs)
# /proc/PID/stat counts CPU time in clock ticks (USER_HZ, 100 on x86 if getconf is absent).
hz=$(getconf CLK_TCK 2>/dev/null)
[ -n "$hz" ] || hz=100
srv=""  # pid of the server being measured ("" for local EROFS)
rm -f /tmp/t62-bad-*
trap 'cleanup_mounts; cleanup_loops; server_stop' EXIT

# The cookie keys the kernel asks for in an OPEN: the fsid for the metadata image, and
# for each extra device the tag in the image's device table, which `dedupd convert` sets
# to the blob id that `dedupd export` names the blob file after (BLOBID.blob). The image
# is DIFFID.erofs and the fsid (layers.list) is that diff id, but the link is made from
# the fsid given to mount, which is the key the kernel sends whatever the file is called.
rm -rf "$src"
mkdir -p "$src"
ln -s "$image" "$src/$fsid"
for b in "$exp"/*.blob; do
  [ -e "$b" ] && ln -s "$b" "$src/$(basename "$b" .blob)"
done

# The process is there and not a zombie (kill -0 finds zombies until `wait` reaps them).
alive() { [ -e "/proc/$1" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$1/stat" 2>/dev/null; }
# utime + stime of PID in ticks: fields 14 and 15, counted after the ") " that ends the
# command name (which may hold spaces).
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}'; }
hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null; }
# Where a server's CPU went, by thread name (digits dropped: dedupd-serve-0 and -1 add
# up): "name=ticks" words, most first. Threads that exited are not counted.
thread_ticks() {
  for t in /proc/"$1"/task/*; do
    c=$(tr -d '0-9' <"$t/comm" 2>/dev/null | tr ' ' '_')
    sed 's/^.*) //' "$t/stat" 2>/dev/null | awk -v c="$c" '{print c, $12 + $13}'
  done | awk '{s[$1] += $2} END {for (k in s) print s[k], k}' | sort -rn | awk '{printf "%s%s=%s", (NR > 1 ? " " : ""), $2, $1}'
}
# ticks_since BEFORE AFTER: AFTER's words less BEFORE's, per name.
ticks_since() {
  echo "$1|$2" | awk -F'|' '{
    n = split($1, a, " "); for (i = 1; i <= n; i++) { split(a[i], kv, "="); b[kv[1]] = kv[2] }
    m = split($2, c, " "); for (i = 1; i <= m; i++) { split(c[i], kv, "="); printf "%s%s=%d", (i > 1 ? " " : ""), kv[1], kv[2] - b[kv[1]] }
  }'
}

# bad JOB SETUP WHY: remembers the first failure of JOB on SETUP (reported once per pair).
bad() { [ -e "/tmp/t62-bad-$1-$2" ] || echo "$3" >"/tmp/t62-bad-$1-$2"; note "t62: $1 on $2: $3"; }
verdict() { # JOB SETUP
  if [ -e "/tmp/t62-bad-$1-$2" ]; then
    fail "fio-cmp-$1-$2" "$(cat "/tmp/t62-bad-$1-$2")"
  else
    pass "fio-cmp-$1-$2"
  fi
}

# dedupd_start: `dedupd run` on the suite's root with the suite's flags (as run-suite
# starts it); waits until it answers `dedupd status`.
dedupd_start() {
  local i=0
  rm -f "$ROOT/run/stats.json"
  # T62_DEDUPD_FLAGS (vm/run's DEDUPD_VM_ENV; flags joined by '+', e.g.
  # --threads=1+--write-strategy=sync) replaces the suite's flags, to measure other
  # settings of the daemon in the same comparison.
  # shellcheck disable=SC2046 # the flags are words, split on purpose
  dedupd run --root "$ROOT" --front-end cachefiles \
    $(if [ -n "${T62_DEDUPD_FLAGS:-}" ]; then echo "$T62_DEDUPD_FLAGS" | tr '+' ' '; else echo "--threads $(nproc)"; fi) \
    >>/out/t62-dedupd.log 2>&1 &
  srv=$!
  while [ $i -lt 120 ]; do
    alive "$srv" || return 1
    stats_json >/dev/null 2>&1 && return 0
    sleep 0.5
    i=$((i + 1))
  done
  return 1
}
# naive_start: the naive server on a fresh cache dir; waits for its "bound" line (it
# retries a busy device for 15 s: the previous server's cache may still be unbinding).
naive_start() {
  local i=0
  rm -rf "$ncache"
  mkdir -p "$ncache"
  "$naive" "$ncache" t62naive "$src" 2>/tmp/t62-naive.log &
  srv=$!
  while [ $i -lt 60 ]; do
    grep -q '^fscache-naive: bound' /tmp/t62-naive.log && return 0
    alive "$srv" || return 1
    sleep 0.5
    i=$((i + 1))
  done
  return 1
}
# server_stop: SIGTERM, then wait for the exit (the cache unbinds once nothing is mounted,
# and dedupd's holder lets go of it), SIGKILL after 30 s.
server_stop() {
  local i=0
  [ -n "$srv" ] || return 0
  kill "$srv" 2>/dev/null
  while alive "$srv" && [ $i -lt 60 ]; do sleep 0.5; i=$((i + 1)); done
  if alive "$srv"; then
    note "t62: server $srv did not stop within 30 s; killed"
    kill -9 "$srv" 2>/dev/null
  fi
  wait "$srv" 2>/dev/null
  srv=""
}

# profile_report PID OUT: stops the perf record PID (busybox's timeout execs it) and
# writes its report to OUT: the share of each command, then each command's objects and
# symbols (down to 0.2%).
profile_report() {
  # TERM, not INT: a background job of a script starts with SIGINT ignored, and perf
  # stops (writing its data) on either once running.
  kill -TERM "$1" 2>/dev/null
  wait "$1" 2>/dev/null
  {
    perf report -i /tmp/t62-perf.data --stdio --no-children --sort comm 2>&1 | grep -v '^$'
    perf report -i /tmp/t62-perf.data --stdio --no-children --sort comm,dso,sym \
      --percent-limit 0.2 2>&1 | grep -v '^$'
  } >"$2"
  cat /tmp/t62-perf.log >>"$2"
  rm -f /tmp/t62-perf.data
}

# measure JOB SETUP RUN DIR: one cold fio run on DIR; with a server ($srv), its CPU
# time over the run and its peak RSS.
measure() {
  local job=$1 setup=$2 run=$3 dir=$4 line t0="" t1="" cpu="" rss="" kib bw threads0="" prof
  drop_caches
  prof=""
  if [ -n "$srv" ] && [ "$run" = 1 ] && command -v perf >/dev/null 2>&1; then
    # Bounded: a test killed mid-run must not leave it sampling the rest of the suite.
    timeout -s TERM 600 perf record --no-buildid-cache -a -F 499 -e cpu-clock \
      -o /tmp/t62-perf.data >/tmp/t62-perf.log 2>&1 &
    prof=$!
    sleep 2 # perf opens its events
  fi
  [ -n "$srv" ] && t0=$(cpu_ticks "$srv") && threads0=$(thread_ticks "$srv")
  if line=$(FIO_DIR=$dir fio --readonly --output-format=terse --terse-version=3 "/bench/fio/$job.fio" 2>/tmp/fio-err); then
    if [ -n "$srv" ]; then
      t1=$(cpu_ticks "$srv")
      rss=$(hwm_kib "$srv")
      note "t62: $setup threads' CPU ticks during $job run $run: $(ticks_since "$threads0" "$(thread_ticks "$srv")")"
      cpu=$(awk -v a="$t0" -v b="$t1" -v hz="$hz" 'BEGIN { if (a != "" && b != "") print int((b - a) * 1000 / hz) }')
    fi
    line=$(echo "$line" | grep "^3;" | tail -n 1)
    kib=$(echo "$line" | cut -d';' -f6)
    bw=$(echo "$line" | cut -d';' -f7)
    if [ "$kib" -gt 0 ] 2>/dev/null; then
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$job" "$setup" "$run" "$kib" "$bw" "$cpu" "$rss" >>"$out"
      note "fio $job on $setup, run $run: $bw KiB/s${cpu:+, server CPU $cpu ms}${rss:+, VmHWM $rss KiB}"
    else
      bad "$job" "$setup" "run $run read nothing: $line"
    fi
  else
    bad "$job" "$setup" "run $run: fio failed: $(tail -n 2 /tmp/fio-err | tr '\n' ' ')"
  fi
  [ -z "$prof" ] || profile_report "$prof" "/out/perf-$job-$setup.txt"
}

if [ -z "$naive" ]; then
  fail fio-cmp-naive-staged "fscache-naive is not on PATH (vm/run builds bench/naive/fscache-naive.c into the initramfs)"
fi
for job in seq-128k rand-4k small-files; do
  for run in 1 2 3; do
    # (a) dedupd serving the bench layer from its chunk store.
    if dedupd_start; then
      awk '/^VmRSS:/ {print $2}' "/proc/$srv/status" >>/out/fio-naive-idle.tsv
      if mount_layer /mnt/t62 bench "t62-$job-dedupd-$run"; then
        measure "$job" dedupd "$run" /mnt/t62
      else
        bad "$job" dedupd "run $run: mount of bench over fscache failed"
      fi
      cleanup_mounts
    else
      bad "$job" dedupd "run $run: dedupd run did not come up: $(tail -n 2 /out/t62-dedupd.log | tr '\n' ' ')"
    fi
    server_stop

    # (b) the naive server on the exported image and blob.
    if [ -n "$naive" ]; then
      if naive_start; then
        if mount_layer /mnt/t62 bench "t62-$job-naive-$run"; then
          measure "$job" naive "$run" /mnt/t62
        else
          bad "$job" naive "run $run: mount of bench over fscache failed: $(tail -n 2 /tmp/t62-naive.log | tr '\n' ' ')"
        fi
        cleanup_mounts
      else
        bad "$job" naive "run $run: fscache-naive did not bind: $(tail -n 2 /tmp/t62-naive.log | tr '\n' ' ')"
      fi
      server_stop
      cat /tmp/t62-naive.log >>/out/fscache-naive.log
      rm -rf "$ncache"
    fi

    # (c) local EROFS: the same image and blob through loop devices (as in t60).
    if loop_dev "$blob" && mnt /mnt/t62-local -t erofs -o "device=$LOOP" "$image"; then
      measure "$job" erofs-local "$run" /mnt/t62-local
    else
      bad "$job" erofs-local "run $run: mount -t erofs -o device=(loop of $blob) $image failed"
    fi
    cleanup_mounts
    cleanup_loops
  done
  verdict "$job" dedupd
  [ -n "$naive" ] && verdict "$job" naive
  verdict "$job" erofs-local
done
rm -rf "$src"
exit 0
