//! The cachefiles on-demand kernel ABI (`include/uapi/linux/cachefiles.h`).
