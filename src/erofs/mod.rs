//! The EROFS on-disk format (`fs/erofs/erofs_fs.h`) and our image writer.
