# The VM runs the kernel we built, with what dedupd needs.
. /tests/lib.sh
case "$(uname -r)" in 6.12.*) pass smoke-kernel-version ;; *) fail smoke-kernel-version "uname -r is $(uname -r), want 6.12.*" ;; esac
check smoke-dev-cachefiles test -c /dev/cachefiles
missing=""
for fs in erofs ext4 9p overlay tmpfs; do grep -qw "$fs" /proc/filesystems || missing="$missing $fs"; done
if [ -z "$missing" ]; then pass smoke-filesystems; else fail smoke-filesystems "missing in /proc/filesystems:$missing"; fi
check smoke-io-uring-fio fio --name=uring --ioengine=io_uring --filename=/tmp/uring --size=1m --rw=read --bs=64k --output=/dev/null
rm -f /tmp/uring
