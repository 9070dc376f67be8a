//! Address buses: port I/O and MMIO accesses from vCPUs are dispatched to the
//! device whose range holds the address.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. Offsets are relative to the base of the range the
/// device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    Overlap { base: u64, len: u64 },
    /// A zero-length or wrapping range.
    BadRange { base: u64, len: u64 },
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::Overlap { base, len } => {
                write!(
                    f,
                    "range {base:#x}+{len:#x} overlaps a device already on the bus"
                )
            }
            BusError::BadRange { base, len } => write!(f, "invalid range {base:#x}+{len:#x}"),
        }
    }
}

impl std::error::Error for BusError {}

struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, each served by one device.
/// Ranges can be added and removed at run time (PCI BARs move).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let end = base + len;
        // The nearest range starting below `end` is the only one that can overlap.
        if let Some((&b, e)) = ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range starting at `base`; returns whether there was one.
    pub fn remove(&self, base: u64) -> bool {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).is_some()
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the range.
        if offset.checked_add(len as u64)? > entry.len {
            return None;
        }
        Some((offset, entry.device.clone()))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) if no
    /// device serves the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if no device serves the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x108, 0x10, dev.clone()),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10
            })
        );
        assert_eq!(
            bus.insert(0xf8, 0x10, dev.clone()),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        bus.insert(0x110, 0x10, dev.clone()).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data, [5, 5]);
        assert!(!bus.read(0x120, &mut data));
        // An access straddling the end of a range is not served.
        assert!(!bus.read(0x11f, &mut data));
        assert!(bus.write(0x101, &[1, 2]));
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![1, 2])));
        assert!(bus.remove(0x100));
        assert!(!bus.write(0x101, &[1]));
        assert_eq!(
            bus.insert(u64::MAX, 2, dev),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );
    }
}
