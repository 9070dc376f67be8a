//! The VMM core: one process per guest on /dev/kvm.

pub mod acpi;
pub mod boot;
pub mod cgroup;
pub mod console;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod dirty_log;
pub mod exit;
pub mod interrupt;
pub mod layout;
pub mod logger;
pub mod memory;
pub mod migrate;
pub mod pci;
/// Per-thread seccomp filters (the `confine` crate).
pub use confine::seccomp;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
