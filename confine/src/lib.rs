//! Confinement of the VMM process.
//!
//! - [`seccomp`]: a seccomp filter per kind of thread (vCPU, device worker,
//!   API server, migration, console, control loop, signals), built with
//!   `seccompiler`, installed by each thread when it starts.
//! - [`user`]: dropping root for a named user once the privileged things
//!   are open.

pub mod seccomp;
pub mod syscalls;
pub mod user;

pub use seccomp::{apply, spawn, spawn_with_setup, Mode, ThreadKind};
