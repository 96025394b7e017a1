//! The serving core: a thread-per-core io_uring engine that turns fill requests from a
//! kernel front end into verified bytes in the cache file.
