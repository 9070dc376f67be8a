//! Live migration: the versioned wire protocol and dirty-page bitmaps.

pub mod auth;
pub mod bitmap;
pub mod protocol;
