//! The image store: content-addressed blobs, the reference index, the
//! conversion cache.
