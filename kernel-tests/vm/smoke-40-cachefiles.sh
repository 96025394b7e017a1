# The kernel accepts cachefiles on-demand mode: bind it by hand on an ext4 cache dir,
# then close the device again (before the daemon binds it: one open system-wide).
. /tests/lib.sh
dir=$SCRATCH/smoke-cachefiles
mkdir -p "$dir"
out=$(
  exec 3<>/dev/cachefiles || exit 1
  printf 'dir %s' "$dir" >&3 || exit 2
  printf 'tag smoke' >&3 || exit 3
  printf 'bind ondemand' >&3 || exit 4
  exec 3>&-
) 2>&1
rc=$?
if [ $rc = 0 ]; then pass smoke-cachefiles-bind-ondemand; else fail smoke-cachefiles-bind-ondemand "step $rc failed: $out"; fi
rm -rf "$dir" 2>/dev/null
