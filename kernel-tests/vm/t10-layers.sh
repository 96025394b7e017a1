# Acceptance 1: every converted layer (generated trees and Debian packages, >= 1 GiB of file
# data) read through an EROFS-over-fscache mount served by dedupd matches the host's
# manifest of the tar: content digests, modes, owners, times, xattrs, links, devices and
# whiteouts.
. /tests/lib.sh
trap cleanup_mounts EXIT
total=0
for name in $(awk '$1 != "corrupt" {print $1}' "$DATA/layers.list"); do
  m=/mnt/t10-$name
  if ! mount_layer "$m" "$name"; then
    fail "layer-$name" "mount -t erofs none $m -o fsid=$(layer_id "$name") failed"
    continue
  fi
  check_manifest "layer-$name" "$name" "$m"
  umount "$m"
  bytes=$(awk -F'|' '$2 == "regular file" {s += $6} END {printf "%d", s}' "$DATA/manifests/$name")
  total=$((total + bytes))
done
note "file data checked through fscache: $total bytes"
if [ "$total" -ge 1073741824 ]; then pass layers-total-at-least-1gib; else fail layers-total-at-least-1gib "only $total bytes of file data"; fi
if daemon_alive; then pass t10-daemon-alive; else fail t10-daemon-alive "dedupd exited: $(tail -n 3 /out/dedupd.log | tr '\n' ' ')"; fi
