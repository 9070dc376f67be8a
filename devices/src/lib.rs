//! Device models. Each device is a plain struct driven by the VMM through a
//! small set of traits ([`bus::BusDevice`], [`virtio::VirtioDevice`]) with
//! its interrupt line behind a tiny trait, so it is testable without KVM.

pub mod bus;
pub mod error;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod virtio;

pub use error::{DeviceError, StateError};

/// Guest memory as every device sees it: mmap'd regions with the VMM-side
/// dirty bitmap that live migration reads.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
