//! Live migration: state capture traits now, the wire protocol later.

pub mod snapshot;
