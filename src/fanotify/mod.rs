//! The fanotify pre-content front end: EROFS file-backed mounts over sparse blob files
//! that are filled on `FAN_PRE_ACCESS` events.
