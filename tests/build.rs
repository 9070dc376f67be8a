//! Builds the test guest (tests/guest, its own cargo workspace) and exports
//! its path as `TESTGUEST_IMAGE`.
//!
//! The guest is a freestanding image with its own profile and link flags, so
//! it is built by a nested `cargo build --release --manifest-path ...` with
//! the outer build's configuration removed from the environment. Its target
//! dir is the guest's default, tests/guest/target, so the image is always at
//! tests/guest/target/release/testguest.

use std::env;
use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

/// Variables of the outer cargo invocation that must not reach the nested
/// guest build (they would change its target dir, flags, profile or jobs).
fn leaks_into_guest_build(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    const EXACT: &[&str] = &[
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_INCREMENTAL",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_PRIMARY_PACKAGE",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "PROFILE",
        "OPT_LEVEL",
        "DEBUG",
        "NUM_JOBS",
        "RUSTC_LINKER",
        "CARGO_LLVM_COV",
        "LLVM_PROFILE_FILE",
    ];
    const PREFIXES: &[&str] = &[
        "CARGO_BUILD_",
        "CARGO_PROFILE_",
        "CARGO_TARGET_",
        "CARGO_CFG_",
        "CARGO_FEATURE_",
        "CARGO_PKG_",
        "CARGO_ENCODED_",
        "DEP_",
        "__CARGO",
    ];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest = manifest_dir.join("guest");
    for entry in ["Cargo.toml", "Cargo.lock", "build.rs", "linker.ld", "src"] {
        println!("cargo:rerun-if-changed={}", guest.join(entry).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .current_dir(&guest);
    for (name, _) in env::vars_os() {
        if leaks_into_guest_build(&name) {
            cmd.env_remove(&name);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the test guest: {e}"));
    if !status.success() {
        panic!(
            "building the test guest failed ({status}); run `cargo build --release` in {} to see why",
            guest.display()
        );
    }

    let image = guest.join("target").join("release").join("testguest");
    assert!(
        image.is_file(),
        "test guest image missing after build: {}",
        image.display()
    );
    println!("cargo:rustc-env=TESTGUEST_IMAGE={}", image.display());
}
