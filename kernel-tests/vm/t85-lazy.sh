# Issue 13 in the VM: lazy pull over cachefiles. The lazy_e2e test binary (built by vm/run,
# staged by vm/stage-e2e) runs its main test here: a docker-registry on the VM's loopback,
# `dedupd publish` of two generated images, then `dedupd run` with the cachefiles front end
# on a fresh root mounts their layers from metadata (Prepare with the CRI labels answers
# ALREADY_EXISTS), 8 readers check every byte, and the fetch counters show each chunk
# fetched once, also after a remount and for the second image that shares a layer.
# The suite's own daemon is stopped first (# own-daemon): cachefiles binds one cache.
# own-daemon
# timeout-s: 1800
. /tests/lib.sh
stage=$DATA/e2e
if [ ! -x "$stage/lazy_e2e" ] || [ ! -d "$stage/root" ]; then
  fail lazy-staged "$stage/lazy_e2e is missing: $(cat "$stage/stage-error" 2>/dev/null || echo 'vm/stage-e2e did not stage it')"
  exit 0
fi
cp -a "$stage/root/." /
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
mkdir -p "$SCRATCH/lazy"
# Then issue 16's bounded cache over cachefiles: lazily pulled data read far past an
# 8 MiB limit by verifying readers; once no view uses a layer, it is unmounted and its
# cache files culled, and usage is back under the high watermark; evicted chunks are
# fetched again; and fills that meet an evicted chunk's hole fetch it again.
for t in lazy_layers_read_back_byte_identical_and_each_chunk_is_fetched_once:lazy-e2e-cachefiles \
  the_bounded_cache_evicts_fetched_chunks_and_fetches_them_again_on_demand:bounded-cache-cachefiles \
  a_fill_that_meets_an_evicted_chunks_hole_fetches_it_again:evicted-hole-refetch-cachefiles; do
  name=${t%%:*} check=${t#*:}
  log=/out/$check.log
  PATH=/usr/bin:/usr/sbin:$PATH DEDUPD_BIN=$(command -v dedupd) LAZY_E2E_FRONT_END=cachefiles \
    LAZY_E2E_TMP=$SCRATCH/lazy RUST_BACKTRACE=1 \
    "$stage/lazy_e2e" --exact "$name" --nocapture --test-threads=1 >"$log" 2>&1
  rc=$?
  grep -E '^(image A mounted|A: |A in use|after [AC]|at the end|evicted at)' "$log" | sed "s/^/kt: $check: /" | cut -c1-300
  if [ $rc = 0 ] && grep -q 'test result: ok. 1 passed' "$log"; then
    pass "$check"
  else
    fail "$check" "exit $rc: $(grep -m1 -A2 'panicked' "$log" | tr '\n' ' ' | cut -c1-300)"
  fi
done
# Whatever the test left mounted under its scratch dir goes first (a failed test may
# leave layer mounts behind); a leftover is reported, and never fails a later test.
left=$(awk -v d="$SCRATCH/lazy" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r)
if [ -n "$left" ]; then
  note "lazy: mounts left under the scratch dir: $(echo "$left" | tr '\n' ' ')"
  for mp in $left; do umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null; done
fi
rm -rf "$SCRATCH/lazy" || note "lazy: could not remove the scratch dir"
exit 0
