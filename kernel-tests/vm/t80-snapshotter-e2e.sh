# Issue 5 in the VM: kernel-tests/snapshotter-e2e (a real registry, containerd 1.6 and runc
# on 127.0.0.1, dedupd as the `dedup` proxy snapshotter) on our kernel, where `dedupd run`
# must pick the cachefiles front end by itself. Needs the tools vm/stage-e2e put on the
# data disk (e2e/root, copied onto /). Each "e2e: ok NAME" line of the script becomes
# "PASS e2e-NAME"; its first failure becomes a FAIL line and ends it.
# The suite's own daemon is stopped before this test (# own-daemon): cachefiles binds one
# cache per tag, and this test starts its own dedupd.
# own-daemon
# timeout-s: 2400
. /tests/lib.sh
stage=$DATA/e2e
if [ ! -x "$stage/snapshotter-e2e" ] || [ ! -d "$stage/root" ]; then
  fail e2e-staged "$stage is incomplete: $(cat "$stage/stage-error" 2>/dev/null || echo 'vm/stage-e2e did not run')"
  exit 0
fi
cp -a "$stage/root/." /
# containerd and runc need cgroup v2; the registry listens on loopback.
if ! grep -q " /sys/fs/cgroup " /proc/mounts; then
  mkdir -p /sys/fs/cgroup
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
fi
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
mkdir -p /var/tmp "$SCRATCH/e2e-tmp"
log=/out/snapshotter-e2e.log
note "e2e: big file ${E2E_BIG_MIB:-256} MiB, ${E2E_SMALL_FILES:-3000} small files, ${E2E_MANY_LAYERS:-128} layers in d; log in out/$(basename "$log")"
# Host-path binaries (GNU tar, bash, containerd...) first, busybox after. skopeo and umoci
# keep their temporary blobs on ext4, not in the VM's memory.
# A watcher writes every process (state, current system call, command line) and the tail
# of the test's dedupd log to out/e2e-watch.log every 2 min: where a hang sits shows live.
watch_once() {
  local d st
  echo "--- $(date -u +%T)"
  for d in /proc/[0-9]*/task/[0-9]*; do
    st=$(sed -n 's/^[0-9]* ([^)]*) \(.\).*/\1/p' "$d/stat" 2>/dev/null)
    [ -n "$st" ] || continue
    echo "$st ${d#/proc/} $(cat "$d/comm" 2>/dev/null) [$(cut -d' ' -f1-3 "$d/syscall" 2>/dev/null)] $(tr '\0' ' ' <"$d/cmdline" 2>/dev/null | cut -c1-120)"
  done | grep -v ' ksoftirq\| migration\| rcu_\| cpuhp\| idle_inject' 
  for d in /proc/[0-9]*; do # open pipes: who holds the other end of a blocked read
    l=$(ls -l "$d/fd" 2>/dev/null | grep -o 'pipe:\[[0-9]*\]' | tr '\n' ' ')
    [ -n "$l" ] && echo "pipes ${d#/proc/} $(cat "$d/comm" 2>/dev/null): $l"
  done
  tail -n 3 "$SCRATCH"/dedupd-e2e.*/dedupd.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200
}
( while sleep 120; do watch_once >>/out/e2e-watch.log 2>&1; done ) &
watcher=$!
PATH=/usr/bin:/usr/sbin:$PATH TMPDIR=$SCRATCH/e2e-tmp \
  DEDUPD=$(command -v dedupd) DEDUPD_CMD=run EXPECT_FRONT_END=cachefiles \
  BIG_MIB=${E2E_BIG_MIB:-256} SMALL_FILES=${E2E_SMALL_FILES:-3000} \
  MANY_LAYERS=${E2E_MANY_LAYERS:-128} \
  E2E_TMP=$SCRATCH CTR_RUN_FLAGS=--no-pivot E2E_WAIT_S=180 KEEP=1 \
  bash "$stage/snapshotter-e2e" >"$log" 2>&1
rc=$?
kill $watcher 2>/dev/null
# Progress to the console, results to the suite.
sed -n 's/^e2e: /kt: e2e: /p' "$log"
sed -n 's/^e2e: ok \([a-z0-9-]*\): .*/\1/p' "$log" | while read -r name; do pass "e2e-$name"; done
if [ $rc != 0 ]; then
  why=$(sed -n 's/^e2e: FAIL: //p' "$log" | head -n 1)
  [ -n "$why" ] || why="exit status $rc: $(tail -n 3 "$log" | tr '\n' ' ')"
  fail snapshotter-e2e "$why"
  for f in "$SCRATCH"/dedupd-e2e.*/*.log; do [ -f "$f" ] && cp "$f" "/out/e2e-$(basename "$f")"; done
  exit 0
fi
grep -qx "e2e: PASS" "$log" && pass snapshotter-e2e || fail snapshotter-e2e "the script exited 0 without its closing PASS line"
