//! Live migration: the versioned wire protocol, dirty-page bitmaps and the
//! state-capture trait components implement.

pub mod bitmap;
pub mod protocol;
pub mod snapshot;
