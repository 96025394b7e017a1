# Acceptance 5: unmount and mount again (same fsid and domain, page cache dropped): reads
# are correct and served from the cache files, nothing is fetched from the store again.
# Runs last and time-bounded; each step is logged so that a hang shows where it is.
# timeout-s: 300
. /tests/lib.sh
trap cleanup_mounts EXIT
MANIFEST_TIMEOUT_S=300
m=/mnt/t70
id=$(layer_id tree)
mount_layer "$m" tree t70-remount || { fail remount "first mount of tree failed"; exit 0; }
check_manifest remount-first-read-correct tree "$m"
note "t70: unmounting"
umount "$m"; MOUNTS=""
note "t70: dropping caches"
drop_caches
note "t70: mounting again"
stats_settle
fetched0=$(stat_get chunks_fetched); reads0=$(stat_get reads); opens0=$(stat_get opens)
mkdir -p "$m"
if timeout -s KILL 120 mount -t erofs none "$m" -o "fsid=$id,domain_id=t70-remount"; then
  MOUNTS=$m
  pass remount-mount
else
  fail remount-mount "second mount failed or took over 120 s; daemon: $(stats_json | tr -d ' \n' | cut -c1-500)"
  exit 0
fi
check_manifest remount-second-read-correct tree "$m"
stats_settle
fetched1=$(stat_get chunks_fetched); reads1=$(stat_get reads); opens1=$(stat_get opens)
note "after remount: OPENs +$((opens1 - opens0)), READs +$((reads1 - reads0)), chunks fetched +$((fetched1 - fetched0))"
if [ -n "$fetched0" ] && [ "$fetched1" = "$fetched0" ]; then
  pass remount-no-refetch
else
  fail remount-no-refetch "chunks fetched went from $fetched0 to $fetched1; daemon: $(stats_json | tr -d ' \n' | cut -c1-300)"
fi
