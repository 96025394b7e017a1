# Acceptance 5: unmount and mount again (same fsid and domain, page cache dropped): reads
# are correct and served from the cache files, nothing is fetched from the store again.
. /tests/lib.sh
trap cleanup_mounts EXIT
m=/mnt/t50
mount_layer "$m" tree t50-remount || { fail remount "first mount of tree failed"; exit 0; }
check_manifest remount-first-read-correct tree "$m"
umount "$m"; MOUNTS=""
drop_caches
stats_settle
fetched0=$(stat_get chunks_fetched); reads0=$(stat_get reads)
mount_layer "$m" tree t50-remount || { fail remount "second mount of tree failed"; exit 0; }
check_manifest remount-second-read-correct tree "$m"
stats_settle
fetched1=$(stat_get chunks_fetched); reads1=$(stat_get reads)
note "after remount: chunks fetched +$((fetched1 - fetched0)), READs +$((reads1 - reads0))"
if [ -n "$fetched0" ] && [ "$fetched1" = "$fetched0" ]; then
  pass remount-no-refetch
else
  fail remount-no-refetch "chunks fetched went from $fetched0 to $fetched1"
fi
