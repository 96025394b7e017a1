# Shared helpers for the vm/ scripts (sourced, not run).
# The cache holds the kernel build and its bzImage, keyed by content; it lives outside the
# repository so that a fresh worktree reuses it and `git clean` does not throw it away.
VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$VM_DIR/.." && pwd)
VM_CACHE=${DEDUPD_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dedupd-vm}
mkdir -p "$VM_CACHE"

log() { echo "vm-run: $*" >&2; }
die() { echo "vm-run: error: $*" >&2; exit 1; }
