# The data disk is ext4 and writable, and the 9p results share works.
. /tests/lib.sh
if grep -q ' /data ext4 ' /proc/mounts; then pass smoke-data-disk-ext4; else fail smoke-data-disk-ext4 "/data is not an ext4 mount: $(grep ' /data ' /proc/mounts)"; fi
f=$SCRATCH/smoke-write
check smoke-data-disk-write sh -c "dd if=/dev/urandom of=$f bs=1M count=4 2>/dev/null && sync && a=\$(sha256sum <$f) && echo 3 >/proc/sys/vm/drop_caches && b=\$(sha256sum <$f) && [ \"\$a\" = \"\$b\" ]"
rm -f "$f"
check smoke-results-9p sh -c "grep -q ' /out 9p ' /proc/mounts && echo ok >/out/smoke-9p && [ \"\$(cat /out/smoke-9p)\" = ok ]"
