# Acceptance 2: 8 reader processes at once, each reading 48 ranges at random (unaligned)
# offsets and lengths of the bench layer's big files through a cold fscache mount; every
# range must equal the same range of the ext4 copy.
. /tests/lib.sh
trap cleanup_mounts EXIT
m=/mnt/t20
mount_layer "$m" bench t20-concurrent || { fail concurrent-readers "mount of bench failed"; exit 0; }
ref=$DATA/ext4copy/bench
drop_caches
readers=8
i=0
while [ $i -lt $readers ]; do
  (
    bad=0
    awk -v seed=$((i + 1)) 'BEGIN {
      srand(seed)
      for (k = 0; k < 48; k++) {
        if (rand() < 0.5) { f = "big/seq.bin"; size = 134217728 } else { f = "big/rand.bin"; size = 67108864 }
        len = 1 + int(rand() * 262144); off = int(rand() * (size - len))
        print f, off, len
      }
    }' | while read -r f off len; do
      a=$(dd if="$m/$f" bs=65536 iflag=skip_bytes,count_bytes skip="$off" count="$len" 2>/dev/null | sha256sum)
      b=$(dd if="$ref/$f" bs=65536 iflag=skip_bytes,count_bytes skip="$off" count="$len" 2>/dev/null | sha256sum)
      if [ "$a" != "$b" ]; then echo "$f $off $len" >>/tmp/t20-bad-$i; fi
    done
  ) &
  i=$((i + 1))
done
wait
bad=$(cat /tmp/t20-bad-* 2>/dev/null | wc -l)
if [ "$bad" = 0 ]; then
  pass concurrent-readers-8x48-random-ranges
else
  fail concurrent-readers-8x48-random-ranges "$bad ranges differ from the ext4 copy, e.g. $(cat /tmp/t20-bad-* | head -n 2 | tr '\n' ' ')"
fi
rm -f /tmp/t20-bad-*
stats_settle
note "reads $(stat_get reads), in-flight high-water mark $(stat_get in_flight_hwm)"
