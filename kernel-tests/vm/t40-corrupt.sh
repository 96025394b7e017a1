# Acceptance 4: chunk 1 of corrupt/victim.bin was damaged in the store on the host.
# Reading that range gives EIO; the file's other chunks and every other file read
# correctly; the daemon keeps running and counts the error.
. /tests/lib.sh
trap cleanup_mounts EXIT
m=/mnt/t40
mount_layer "$m" corrupt || { fail corrupt-chunk "mount of corrupt failed"; exit 0; }
stats_settle
errors0=$(stat_get chunk_errors)
err=$(dd if="$m/victim.bin" of=/dev/null bs=4096 skip=16 count=16 2>&1)
rc=$?
if [ $rc != 0 ] && echo "$err" | grep -qE 'I/O error|Input/output error'; then
  pass corrupt-chunk-gives-eio
else
  fail corrupt-chunk-gives-eio "dd of the corrupt range: status $rc: $(echo "$err" | tr '\n' ' ')"
fi
# Again: no wrong bytes on a retry either.
if dd if="$m/victim.bin" of=/dev/null bs=4096 skip=20 count=1 2>/dev/null; then
  fail corrupt-chunk-eio-again "a second read of the corrupt range succeeded"
else
  pass corrupt-chunk-eio-again
fi
ok=1
for c in 0 2; do
  got=$(dd if="$m/victim.bin" bs=65536 skip=$c count=1 2>/dev/null | sha256sum | cut -c1-64)
  [ "$got" = "$(cat "$DATA/expect/victim-chunk$c.sha256")" ] || { ok=0; note "victim chunk $c: got $got"; }
done
if [ $ok = 1 ]; then pass corrupt-file-other-chunks-correct; else fail corrupt-file-other-chunks-correct "chunk 0 or 2 of victim.bin differs"; fi
grep -v '^./victim.bin|' "$DATA/manifests/corrupt" >/tmp/t40-want
(cd "$m" && for f in good*.bin; do echo "$(sha256sum <"$f" | cut -c1-64) $f"; done) >/tmp/t40-got
if awk -F'|' '{print $11, substr($1, 3)}' /tmp/t40-want | grep -v '^ ' | diff - /tmp/t40-got >/dev/null; then
  pass corrupt-layer-other-files-correct
else
  fail corrupt-layer-other-files-correct "$(awk -F'|' '{print $11, substr($1, 3)}' /tmp/t40-want | grep -v '^ ' | diff - /tmp/t40-got | head -n 4 | tr '\n' ' ')"
fi
stats_settle
errors1=$(stat_get chunk_errors)
if daemon_alive && [ "${errors1:-0}" -gt "${errors0:-0}" ]; then
  pass corrupt-daemon-alive-and-counted
else
  fail corrupt-daemon-alive-and-counted "daemon alive: $(daemon_alive && echo yes || echo no), chunk_errors $errors0 -> $errors1"
fi
# And it still serves another layer.
mount_layer /mnt/t40-tree tree t40-after || true
check_manifest corrupt-then-other-layer-correct tree /mnt/t40-tree
