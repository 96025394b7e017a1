# EROFS images made by mkfs.erofs mount and read back exactly: a plain image,
# and a chunk-based one whose data lives in a separate blob device (dedupd's layout).
. /tests/lib.sh
trap "cleanup_mounts; cleanup_loops" EXIT
work=$SCRATCH/smoke-erofs
rm -rf "$work" && mkdir -p "$work/tree/sub"
dd if=/dev/urandom of="$work/tree/random.bin" bs=64k count=40 2>/dev/null
cp -r /tests "$work/tree/sub/tests"
ln -s random.bin "$work/tree/link"
setfattr -n user.smoke -v yes "$work/tree/random.bin"
manifest "$work/tree" >"$work/want"

mkfs.erofs --preserve-mtime "$work/plain.erofs" "$work/tree" >/dev/null &&
  mnt "$work/m1" -t erofs "$work/plain.erofs" &&
  manifest "$work/m1" >"$work/got1" && diff "$work/want" "$work/got1" >"$work/diff1"
if [ $? = 0 ]; then pass smoke-erofs-plain; else fail smoke-erofs-plain "$(head -n 4 "$work/diff1" 2>/dev/null | tr '\n' ' ')"; fi

mkfs.erofs --preserve-mtime --chunksize=65536 --blobdev="$work/chunks.blob" "$work/chunked.erofs" "$work/tree" >/dev/null &&
  loop_dev "$work/chunks.blob" &&
  mnt "$work/m2" -t erofs -o device="$LOOP" "$work/chunked.erofs" &&
  manifest "$work/m2" >"$work/got2" && diff "$work/want" "$work/got2" >"$work/diff2"
if [ $? = 0 ]; then pass smoke-erofs-chunked-blobdev; else fail smoke-erofs-chunked-blobdev "$(head -n 4 "$work/diff2" 2>/dev/null | tr '\n' ' ')"; fi
cleanup_mounts
cleanup_loops
rm -rf "$work"
