//! Dirty-page tracking for live migration: KVM's dirty log (pages the guest
//! wrote) OR'd with the VMM's own bitmap (pages devices wrote through
//! vm-memory: virtio rings, disk reads into guest buffers).
//!
//! With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG only reads the
//! log; the pages are write-protected again by KVM_CLEAR_DIRTY_LOG, which
//! the sender calls for each chunk just before copying it, so a page the
//! guest writes after its copy is caught by the next round. Without the
//! capability the GET both reads and re-protects.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use migration::bitmap::DirtyBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::memory::{GuestMemoryMmap, PAGE_SIZE};
use crate::vm::register_memory;

ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("cannot enable dirty logging: {0}")]
    Enable(String),
    #[error("KVM_GET_DIRTY_LOG on slot {slot}: {source}")]
    Get {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_CLEAR_DIRTY_LOG on slot {slot}: {source}")]
    Clear { slot: u32, source: std::io::Error },
}

/// Dirty logging over all RAM regions (slot i = region i).
pub struct DirtyLog {
    vm_fd: Arc<VmFd>,
    memory: Arc<GuestMemoryMmap>,
    /// Whether KVM_CLEAR_DIRTY_LOG is in use.
    manual: bool,
    /// Pages harvested but not sent when a round failed: put back into the
    /// next harvest so no dirty page is ever lost.
    carried: Vec<DirtyBitmap>,
}

/// Pages in a region.
fn region_pages(len: u64) -> usize {
    (len / PAGE_SIZE) as usize
}

impl DirtyLog {
    /// Starts logging: enables manual protection if KVM has it, sets
    /// KVM_MEM_LOG_DIRTY_PAGES on every slot and clears the VMM bitmap.
    pub fn start(
        vm_fd: Arc<VmFd>,
        memory: Arc<GuestMemoryMmap>,
    ) -> Result<DirtyLog, DirtyLogError> {
        let manual = vm_fd.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) > 0
            && {
                let cap = kvm_enable_cap {
                    cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                    args: [u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE), 0, 0, 0],
                    ..Default::default()
                };
                vm_fd.enable_cap(&cap).is_ok()
            };
        for region in memory.iter() {
            MmapRegion::bitmap(region).reset();
        }
        register_memory(&vm_fd, &memory, true).map_err(|e| DirtyLogError::Enable(e.to_string()))?;
        let carried = memory
            .iter()
            .map(|r| DirtyBitmap::new(region_pages(r.len())))
            .collect();
        Ok(DirtyLog {
            vm_fd,
            memory,
            manual,
            carried,
        })
    }

    pub fn is_manual(&self) -> bool {
        self.manual
    }

    /// Pages dirtied since the last harvest, per region: KVM's log, the
    /// VMM's bitmap, and anything carried over from a failed round.
    pub fn harvest(&mut self) -> Result<Vec<DirtyBitmap>, DirtyLogError> {
        let mut result = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let pages = region_pages(region.len());
            let kvm = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| DirtyLogError::Get {
                    slot: slot as u32,
                    source,
                })?;
            let mut bitmap = DirtyBitmap::from_words(kvm, pages);
            let vmm = MmapRegion::bitmap(region).get_and_reset();
            bitmap.merge(&DirtyBitmap::from_words(vmm, pages));
            let carried = &mut self.carried[slot];
            bitmap.merge(carried);
            carried.clear();
            result.push(bitmap);
        }
        Ok(result)
    }

    /// Re-protects pages `[first, first + count)` of region `slot` whose bits
    /// are set in `bitmap`, before they are copied (manual mode only).
    pub fn clear(
        &self,
        slot: usize,
        bitmap: &DirtyBitmap,
        first: usize,
        count: usize,
    ) -> Result<(), DirtyLogError> {
        if !self.manual || count == 0 {
            return Ok(());
        }
        // KVM wants the first page 64-aligned; the bitmap words already are.
        let start = first - first % 64;
        let end = (first + count).div_ceil(64) * 64;
        let words: Vec<u64> =
            bitmap.words()[start / 64..(end / 64).min(bitmap.words().len())].to_vec();
        let num_pages = (end.min(bitmap.pages()) - start) as u32;
        let clear = kvm_clear_dirty_log {
            slot: slot as u32,
            num_pages,
            first_page: start as u64,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_ptr() as *mut libc::c_void,
            },
        };
        // SAFETY: the VM fd is valid, `clear` is a valid kvm_clear_dirty_log
        // whose bitmap covers num_pages bits and outlives the call.
        let rc = unsafe { ioctl_with_ref(self.vm_fd.as_ref(), KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            return Err(DirtyLogError::Clear {
                slot: slot as u32,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Puts back pages that were harvested but not sent.
    pub fn carry(&mut self, slot: usize, unsent: &DirtyBitmap) {
        if let Some(c) = self.carried.get_mut(slot) {
            c.merge(unsent);
        }
    }

    /// Stops logging (the slots lose KVM_MEM_LOG_DIRTY_PAGES).
    pub fn stop(self) {
        // Leaving the flag on only costs the guest write faults.
        let _ = register_memory(&self.vm_fd, &self.memory, false);
    }
}
