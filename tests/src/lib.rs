//! End-to-end tests of the VMM with real KVM, real devices and the test guest.

/// The test guest image, built by build.rs from tests/guest.
pub const TESTGUEST_IMAGE: &str = match option_env!("TESTGUEST_IMAGE") {
    Some(path) => path,
    None => concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/guest/target/release/testguest"
    ),
};

pub mod bench;
pub mod harness;
pub mod linux;
pub mod migration;
pub mod netns;
pub mod probe;
pub mod web;
