# Issue 15 over cachefiles with a lazily pulled layer: the lazy_e2e binary's soak (8
# readers of a layer served from a registry on the VM's loopback, through a proxy that
# holds every range request back so that kills land with fetches in flight; dedupd
# killed with SIGKILL and started again T87_KILLS times, each after serving 1-3 s, as a
# fetch takes most of a second under emulation). No wrong byte, no EIO, no read
# waiting longer than the slowest restart + 5 s, and a byte fetched twice only when a
# kill lost its first fetch. The suite's own daemon is stopped first (# own-daemon).
# own-daemon
# timeout-s: 1500
. /tests/lib.sh
stage=$DATA/e2e
if [ ! -x "$stage/lazy_e2e" ] || [ ! -d "$stage/root" ]; then
  fail failover-lazy-staged "$stage/lazy_e2e is missing: $(cat "$stage/stage-error" 2>/dev/null || echo 'vm/stage-e2e did not stage it')"
  exit 0
fi
cp -a "$stage/root/." /
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
mkdir -p "$SCRATCH/soak"
log=/out/failover-lazy.log
PATH=/usr/bin:/usr/sbin:$PATH DEDUPD_BIN=$(command -v dedupd) LAZY_E2E_FRONT_END=cachefiles \
  LAZY_E2E_TMP=$SCRATCH/soak RUST_BACKTRACE=1 DEDUPD_SOAK_KILLS=${T87_KILLS:-50} DEDUPD_SOAK_MIB=32 \
  DEDUPD_SOAK_UP_MIN_MS=${T87_UP_MIN_MS:-1000} DEDUPD_SOAK_UP_MAX_MS=${T87_UP_MAX_MS:-3000} \
  "$stage/lazy_e2e" --exact lazy_layer_readers_never_notice_kill_9_restarts \
  --nocapture --test-threads=1 >"$log" 2>&1
rc=$?
grep -E '^soak' "$log" | sed 's/^/kt: /' | cut -c1-600
if [ $rc = 0 ] && grep -q 'test result: ok. 1 passed' "$log"; then
  pass failover-lazy-cachefiles
else
  fail failover-lazy-cachefiles "exit $rc: $(grep -m1 -A2 'panicked' "$log" | tr '\n' ' ' | cut -c1-400)"
fi
# Whatever the test left mounted under its scratch dir goes first (a failed test may
# leave layer mounts behind); a leftover is reported, and never fails a later test.
left=$(awk -v d="$SCRATCH/soak" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
if [ -n "$left" ]; then
  note "soak: mounts left under the scratch dir: $(echo "$left" | tr '\n' ' ')"
  for mp in $left; do umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null; done
fi
rm -rf "$SCRATCH/soak" || note "soak: could not remove the scratch dir"
exit 0
