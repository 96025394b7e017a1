# Acceptance 3: layers shared-a and shared-b hold the same file data (one data blob, same
# blob id) under other names and metadata. Mounted in one domain, the blob is OPENed once
# and each of its chunks is fetched from the store once, whichever mount reads it.
. /tests/lib.sh
trap cleanup_mounts EXIT
blob=$(layer_blob shared-a)
chunks=$(layer_chunks shared-a)
if [ "$blob" = "$(layer_blob shared-b)" ] && [ "$blob" != none ]; then
  pass shared-blob-same-id
else
  fail shared-blob-same-id "shared-a has blob $blob, shared-b has $(layer_blob shared-b)"
fi
stats_settle
opens0=$(stat_get opens); fetched0=$(stat_get chunks_fetched); blob_opens0=$(stat_get "$blob"); blob_opens0=${blob_opens0:-0}
mount_layer /mnt/t30-a shared-a t30-shared || { fail shared-domain "mount of shared-a failed"; exit 0; }
mount_layer /mnt/t30-b shared-b t30-shared || { fail shared-domain "mount of shared-b failed"; exit 0; }
check_manifest shared-domain-a-reads-correct shared-a /mnt/t30-a
stats_settle
fetched1=$(stat_get chunks_fetched)
check_manifest shared-domain-b-reads-correct shared-b /mnt/t30-b
stats_settle
opens2=$(stat_get opens); fetched2=$(stat_get chunks_fetched); blob_opens2=$(stat_get "$blob"); blob_opens2=${blob_opens2:-0}
note "opens +$((opens2 - opens0)) (blob +$((blob_opens2 - blob_opens0))), chunks fetched: +$((fetched1 - fetched0)) reading a, +$((fetched2 - fetched1)) reading b; the blob has $chunks chunks"
# Three OPENs: the two metadata images and the shared data blob, once.
if [ $((blob_opens2 - blob_opens0)) = 1 ] && [ $((opens2 - opens0)) = 3 ]; then
  pass shared-domain-blob-opened-once
else
  fail shared-domain-blob-opened-once "blob OPENs +$((blob_opens2 - blob_opens0)), all OPENs +$((opens2 - opens0)) (want 1 and 3)"
fi
if [ $((fetched1 - fetched0)) = "$chunks" ] && [ "$fetched2" = "$fetched1" ]; then
  pass shared-domain-each-chunk-fetched-once
else
  fail shared-domain-each-chunk-fetched-once "fetched +$((fetched1 - fetched0)) reading a (want $chunks), +$((fetched2 - fetched1)) reading b (want 0)"
fi
