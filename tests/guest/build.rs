//! Link the test guest as a static freestanding ELF placed at 1 MiB.
//!
//! Only `cargo:rustc-link-arg-bins` is used, so no `.cargo/config.toml`
//! (which would depend on the working directory) is needed.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let script = dir.join("linker.ld");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,norelro",
        "-Wl,-z,noexecstack",
        "-Wl,--no-eh-frame-hdr",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed={}", dir.join("src/asm").display());
    println!("cargo:rerun-if-changed=build.rs");
}
