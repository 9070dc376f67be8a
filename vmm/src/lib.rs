//! The VMM core: one process per guest on /dev/kvm.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod memory;
pub mod vcpu;
pub mod console;
pub mod vm;
pub mod exit;
pub mod control;
