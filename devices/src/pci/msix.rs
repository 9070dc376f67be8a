//! MSI-X: the vector table and pending bits a device exposes in a BAR, and
//! the capability that enables it. Each vector is an eventfd wired to its
//! own GSI (KVM_IRQFD); the GSI's route is the message the guest wrote in
//! the table entry. A masked vector records a pending bit instead of firing
//! and fires when unmasked.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::error::StateError;

/// Capability ID of MSI-X.
pub const CAPABILITY_ID: u8 = 0x11;
/// Message control: MSI-X enabled.
const CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: all vectors masked.
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;

/// An MSI message: where and what the device writes to interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// One interrupt source: an eventfd KVM turns into an MSI on `gsi`.
pub struct MsiVector {
    pub gsi: u32,
    pub event: EventFd,
}

/// The VMM side of MSI: allocates GSIs with irqfds and routes them.
pub trait MsiController: Send + Sync {
    fn allocate(&self) -> io::Result<MsiVector>;
    fn route(&self, vector: &MsiVector, message: MsiMessage) -> io::Result<()>;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub message: MsiMessage,
    pub control: u32,
}

impl MsixEntry {
    /// The entry as the table holds it: address, data, vector control.
    fn to_bytes(self) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.message.address.to_le_bytes());
        raw[8..12].copy_from_slice(&self.message.data.to_le_bytes());
        raw[12..16].copy_from_slice(&self.control.to_le_bytes());
        raw
    }

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// MSI-X state, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<bool>,
    pub enabled: bool,
    pub function_masked: bool,
}

pub struct Msix {
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    vectors: Vec<MsiVector>,
    controller: Arc<dyn MsiController>,
}

impl Msix {
    /// A table of `count` vectors, all masked, MSI-X disabled.
    pub fn new(count: u16, controller: Arc<dyn MsiController>) -> io::Result<Msix> {
        let vectors = (0..count)
            .map(|_| controller.allocate())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Msix {
            entries: vec![
                MsixEntry {
                    message: MsiMessage::default(),
                    control: VECTOR_MASKED,
                };
                usize::from(count)
            ],
            pending: vec![false; usize::from(count)],
            enabled: false,
            function_masked: false,
            vectors,
            controller,
        })
    }

    pub fn count(&self) -> u16 {
        self.entries.len() as u16
    }

    /// The capability body for config space: ID, next (filled by the
    /// config), message control, table and PBA offset/BIR.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 12], [u8; 12]) {
        let control = self.count() - 1;
        let mut body = [0u8; 12];
        body[0] = CAPABILITY_ID;
        body[2..4].copy_from_slice(&control.to_le_bytes());
        body[4..8].copy_from_slice(&(table_offset | u32::from(bar)).to_le_bytes());
        body[8..12].copy_from_slice(&(pba_offset | u32::from(bar)).to_le_bytes());
        // Only the enable and function mask bits are writable.
        let mut writable = [0u8; 12];
        writable[3] = 0xc0;
        (body, writable)
    }

    /// Called after the guest wrote the capability's message control.
    pub fn set_control(&mut self, control: u16) {
        let was_active = self.enabled && !self.function_masked;
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        if !was_active && self.enabled && !self.function_masked {
            for i in 0..self.entries.len() {
                self.deliver_pending(i);
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let index = (offset / ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get(index) else {
            return;
        };
        let raw = entry.to_bytes();
        let start = (offset % ENTRY_SIZE) as usize;
        let len = data.len().min(16 - start);
        data[..len].copy_from_slice(&raw[start..start + len]);
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let index = (offset / ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        let mut raw = entry.to_bytes();
        let start = (offset % ENTRY_SIZE) as usize;
        let len = data.len().min(16 - start);
        raw[start..start + len].copy_from_slice(&data[..len]);
        let was_masked = entry.masked();
        let old_message = entry.message;
        entry.message = MsiMessage {
            address: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
            data: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
        };
        entry.control =
            u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes")) & VECTOR_MASKED;
        let masked = entry.masked();
        let message = entry.message;
        if message != old_message || (was_masked && !masked) {
            // The guest can write garbage; the next valid write repairs it.
            let _ = self.controller.route(&self.vectors[index], message);
        }
        if was_masked && !masked {
            self.deliver_pending(index);
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first = (offset as usize + i) * 8;
            *byte = (0..8)
                .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }

    fn deliver_pending(&mut self, index: usize) {
        if self.pending[index] && !self.entries[index].masked() {
            self.pending[index] = false;
            // A failed eventfd write cannot be retried meaningfully.
            let _ = self.vectors[index].event.write(1);
        }
    }

    /// Fires vector `index`, or marks it pending while masked. Returns
    /// false if MSI-X is off or the vector does not exist.
    pub fn trigger(&mut self, index: u16) -> bool {
        let index = usize::from(index);
        if !self.enabled || index >= self.entries.len() {
            return false;
        }
        if self.function_masked || self.entries[index].masked() {
            self.pending[index] = true;
        } else {
            let _ = self.vectors[index].event.write(1);
        }
        true
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    pub fn restore(&mut self, state: &MsixState) -> Result<(), StateError> {
        if state.entries.len() != self.entries.len() || state.pending.len() != self.entries.len() {
            return Err(StateError::Mismatch(format!(
                "MSI-X state has {} vectors, the device {}",
                state.entries.len(),
                self.entries.len()
            )));
        }
        self.entries = state.entries.clone();
        self.pending = state.pending.clone();
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for (i, entry) in self.entries.iter().enumerate() {
            self.controller
                .route(&self.vectors[i], entry.message)
                .map_err(|e| StateError::Mismatch(format!("MSI-X vector {i}: {e}")))?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records routes; vectors are plain eventfds.
    #[derive(Default)]
    pub struct RecordingController {
        pub routes: Mutex<Vec<(u32, MsiMessage)>>,
        next: Mutex<u32>,
    }

    impl MsiController for RecordingController {
        fn allocate(&self) -> io::Result<MsiVector> {
            let mut next = self.next.lock().unwrap();
            *next += 1;
            Ok(MsiVector {
                gsi: 23 + *next,
                event: EventFd::new(libc::EFD_NONBLOCK)?,
            })
        }
        fn route(&self, vector: &MsiVector, message: MsiMessage) -> io::Result<()> {
            self.routes.lock().unwrap().push((vector.gsi, message));
            Ok(())
        }
    }

    fn fired(msix: &Msix, i: usize) -> bool {
        msix.vectors[i].event.read().is_ok()
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let controller = Arc::new(RecordingController::default());
        let mut msix = Msix::new(2, controller.clone()).unwrap();
        assert!(!msix.trigger(0), "disabled");
        msix.set_control(CONTROL_ENABLE);
        // Program entry 1: address, data, then unmask.
        msix.write_table(16, &0xfee0_0000u64.to_le_bytes());
        msix.write_table(24, &0x41u32.to_le_bytes());
        assert!(msix.trigger(1));
        assert!(!fired(&msix, 1), "masked by default");
        let mut pba = [0u8];
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        msix.write_table(28, &0u32.to_le_bytes());
        assert!(fired(&msix, 1), "pending fired on unmask");
        msix.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(msix.trigger(1));
        assert!(fired(&msix, 1));
        let routes = controller.routes.lock().unwrap();
        assert_eq!(
            routes.last().unwrap().1,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }
        );
        drop(routes);
        // Function mask holds everything back.
        msix.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(msix.trigger(1));
        assert!(!fired(&msix, 1));
        msix.set_control(CONTROL_ENABLE);
        assert!(fired(&msix, 1));
        // Out of range.
        assert!(!msix.trigger(5));
        let mut out = [0u8; 4];
        msix.read_table(16 * 9, &mut out);
        assert_eq!(out, [0; 4]);
    }
}
