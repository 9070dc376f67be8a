//! Live migration: the versioned wire protocol and dirty-page bitmaps.

pub mod bitmap;
pub mod protocol;
