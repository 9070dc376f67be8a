//! The VMM side of PCI: placing BARs on the MMIO bus with their ioeventfds,
//! and handing out BAR addresses in the 32-bit window.

use std::sync::{Arc, Mutex, Weak};

use devices::bus::Bus;
use devices::pci::{BarAccess, BarMapper, PciError, SharedPciDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};

use crate::layout::{PCI_MMIO_SIZE, PCI_MMIO_START};

pub struct VmBarMapper {
    /// Weak: the bus holds the ECAM device, which holds the PCI root, which
    /// holds this mapper; a strong reference would keep a stopped VM (its
    /// memory, its disks' files and locks) alive, and a reboot could not
    /// open its disks again.
    pub mmio: Weak<Bus>,
    pub vm_fd: Arc<VmFd>,
}

impl BarMapper for VmBarMapper {
    fn map(
        &self,
        device: &SharedPciDevice,
        bar: usize,
        address: u64,
        size: u64,
    ) -> Result<(), PciError> {
        let access = Arc::new(Mutex::new(BarAccess {
            device: device.clone(),
            bar,
        }));
        let failed = |source: Box<dyn std::error::Error + Send + Sync>| PciError::Map {
            bar,
            address,
            source,
        };
        let Some(mmio) = self.mmio.upgrade() else {
            return Err(failed("the VM is gone".into()));
        };
        mmio.insert(address, size, access)
            .map_err(|e| failed(Box::new(e)))?;
        let events = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ioeventfds(bar);
        for (offset, event) in events {
            self.vm_fd
                .register_ioevent(&event, &IoEventAddress::Mmio(address + offset), NoDatamatch)
                .map_err(|e| {
                    failed(format!("KVM_IOEVENTFD at {:#x}: {e}", address + offset).into())
                })?;
        }
        Ok(())
    }

    fn unmap(&self, device: &SharedPciDevice, bar: usize, address: u64, _size: u64) {
        let events = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ioeventfds(bar);
        for (offset, event) in events {
            // An ioeventfd that was never registered has nothing to undo.
            let _ = self.vm_fd.unregister_ioevent(
                &event,
                &IoEventAddress::Mmio(address + offset),
                NoDatamatch,
            );
        }
        if let Some(mmio) = self.mmio.upgrade() {
            mmio.remove(address);
        }
    }
}

/// Hands out naturally aligned BAR addresses in the 32-bit PCI window.
pub struct BarAllocator {
    next: u64,
}

impl Default for BarAllocator {
    fn default() -> Self {
        BarAllocator {
            next: PCI_MMIO_START,
        }
    }
}

impl BarAllocator {
    pub fn allocate(&mut self, size: u64) -> Option<u64> {
        let start = self.next.next_multiple_of(size);
        let end = start.checked_add(size)?;
        if end > PCI_MMIO_START + PCI_MMIO_SIZE {
            return None;
        }
        self.next = end;
        Some(start)
    }
}
