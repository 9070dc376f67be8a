//! A PCI function's configuration space (4 KiB, PCI Express size): the
//! header, BARs with sizing, and the capability list, with per-bit write
//! masks so the guest can only change what real hardware lets it change.

use crate::error::StateError;

/// Standard header registers (byte offsets).
pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_PROG: usize = 0x09;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;

/// Command register: memory space decoding enabled.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the device may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: a capability list is present.
const STATUS_CAPABILITIES: u16 = 1 << 4;

/// BAR low bits: 64-bit memory BAR.
const BAR_MEM_64: u32 = 0b100;
/// BAR low bits: prefetchable.
const BAR_PREFETCH: u32 = 0b1000;

/// Number of BARs in a type 0 header.
pub const NUM_BARS: usize = 6;
/// Size of the configuration space.
pub const CONFIG_SIZE: usize = 4096;
/// Capabilities live between the header and 0x100 (the legacy space).
const CAPABILITY_START: usize = 0x40;
const CAPABILITY_END: usize = 0x100;

/// A memory BAR as the device defines it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BarInfo {
    pub size: u64,
    pub is_64bit: bool,
    pub prefetchable: bool,
}

/// The identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    /// Class, subclass, programming interface.
    pub class: (u8, u8, u8),
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

pub struct PciConfig {
    bytes: Box<[u8; CONFIG_SIZE]>,
    writable: Box<[u8; CONFIG_SIZE]>,
    bars: [BarInfo; NUM_BARS],
    /// BAR slots in use (a 64-bit BAR takes its slot and the next).
    bar_slots_used: [bool; NUM_BARS],
    /// Offset of the last capability, to chain the next one.
    last_capability: Option<usize>,
    next_capability: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PciConfigError {
    /// No room left for a capability of this length.
    CapabilitySpace(usize),
    /// BAR sizes must be powers of two of at least 16 bytes.
    BadBarSize(u64),
    /// A 64-bit BAR takes two slots; this one or its pair is taken or out of range.
    BadBarIndex(usize),
}

impl std::fmt::Display for PciConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PciConfigError::CapabilitySpace(len) => {
                write!(f, "no room for a {len}-byte capability")
            }
            PciConfigError::BadBarSize(size) => write!(f, "invalid BAR size {size:#x}"),
            PciConfigError::BadBarIndex(i) => write!(f, "invalid BAR index {i}"),
        }
    }
}

impl std::error::Error for PciConfigError {}

impl PciConfig {
    pub fn new(header: &PciHeader) -> PciConfig {
        let mut config = PciConfig {
            bytes: Box::new([0; CONFIG_SIZE]),
            writable: Box::new([0; CONFIG_SIZE]),
            bars: [BarInfo::default(); NUM_BARS],
            bar_slots_used: [false; NUM_BARS],
            last_capability: None,
            next_capability: CAPABILITY_START,
        };
        config.set_u16(VENDOR_ID, header.vendor_id);
        config.set_u16(VENDOR_ID + 2, header.device_id);
        config.bytes[REVISION_ID] = header.revision_id;
        config.bytes[CLASS_PROG] = header.class.2;
        config.bytes[CLASS_PROG + 1] = header.class.1;
        config.bytes[CLASS_PROG + 2] = header.class.0;
        config.set_u16(SUBSYSTEM_VENDOR_ID, header.subsystem_vendor_id);
        config.set_u16(SUBSYSTEM_VENDOR_ID + 2, header.subsystem_id);
        // The guest may toggle I/O, memory, bus master and INTx disable.
        config.set_writable_u16(COMMAND, 0b111 | COMMAND_INTX_DISABLE);
        config.writable[INTERRUPT_LINE] = 0xff;
        config
    }

    fn set_u16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_writable_u16(&mut self, offset: usize, mask: u16) {
        self.writable[offset..offset + 2].copy_from_slice(&mask.to_le_bytes());
    }

    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    pub fn u32_at(&self, offset: usize) -> u32 {
        let b = &self.bytes[offset..offset + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Sets a value the device owns (not subject to the write mask).
    pub fn set_u32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    pub fn command(&self) -> u16 {
        self.u16_at(COMMAND)
    }

    /// Sets the command register as firmware would before handing over.
    pub fn set_command(&mut self, value: u16) {
        self.set_u16(COMMAND, value);
    }

    /// Defines memory BAR `index` of `size` bytes at `address`.
    pub fn add_bar(
        &mut self,
        index: usize,
        bar: BarInfo,
        address: u64,
    ) -> Result<(), PciConfigError> {
        if bar.size < 16 || !bar.size.is_power_of_two() || (!bar.is_64bit && bar.size > 1 << 31) {
            return Err(PciConfigError::BadBarSize(bar.size));
        }
        let slots = if bar.is_64bit { 2 } else { 1 };
        if index + slots > NUM_BARS || (0..slots).any(|i| self.bar_slots_used[index + i]) {
            return Err(PciConfigError::BadBarIndex(index));
        }
        self.bars[index] = bar;
        self.bar_slots_used[index..index + slots].fill(true);
        let mask = !(bar.size - 1);
        let offset = BAR0 + 4 * index;
        let mut flags = 0;
        if bar.is_64bit {
            flags |= BAR_MEM_64;
        }
        if bar.prefetchable {
            flags |= BAR_PREFETCH;
        }
        self.set_u32(offset, (address as u32 & !0xf) | flags);
        self.writable[offset..offset + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
        if bar.is_64bit {
            self.set_u32(offset + 4, (address >> 32) as u32);
            self.writable[offset + 4..offset + 8]
                .copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    /// The BAR's current address, as the guest programmed it.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index)?;
        if bar.size == 0 {
            return None;
        }
        let offset = BAR0 + 4 * index;
        let low = u64::from(self.u32_at(offset) & !0xf);
        let high = if bar.is_64bit {
            u64::from(self.u32_at(offset + 4)) << 32
        } else {
            0
        };
        Some(high | low)
    }

    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        self.bars.get(index).copied().filter(|b| b.size != 0)
    }

    /// Appends a capability (`body` starts with its ID; the next-pointer
    /// byte is filled in). `writable` masks the bytes the guest may change.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, PciConfigError> {
        let len = body.len().max(2).next_multiple_of(4);
        let offset = self.next_capability;
        if offset + len > CAPABILITY_END {
            return Err(PciConfigError::CapabilitySpace(body.len()));
        }
        self.bytes[offset..offset + body.len()].copy_from_slice(body);
        self.bytes[offset + 1] = 0;
        for (i, mask) in writable.iter().enumerate().take(body.len()) {
            self.writable[offset + i] = *mask;
        }
        match self.last_capability {
            Some(last) => self.bytes[last + 1] = offset as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = offset as u8;
                let status = self.u16_at(STATUS) | STATUS_CAPABILITIES;
                self.set_u16(STATUS, status);
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        Ok(offset)
    }

    /// Reads `data.len()` bytes at `offset`; out of range reads give 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes through the write mask; out of range bytes are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &value) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                break;
            }
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
    }

    /// Raw access to bytes the device itself maintains (capability fields).
    pub fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        &mut self.bytes[offset..offset + len]
    }

    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        &self.bytes[offset..offset + len]
    }

    /// Everything the guest can change, for snapshots.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Puts back a snapshot's bytes, keeping read-only bytes as they are
    /// (a snapshot cannot change the device's identity).
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        if bytes.len() != CONFIG_SIZE {
            return Err(StateError::Mismatch(format!(
                "PCI config snapshot is {} bytes, not {CONFIG_SIZE}",
                bytes.len()
            )));
        }
        for (at, &value) in bytes.iter().enumerate() {
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (value & mask);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision_id: 1,
            class: (0x01, 0x80, 0x00),
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    #[test]
    fn ids_and_read_only_fields_resist_writes() {
        let mut c = PciConfig::new(&header());
        c.write(VENDOR_ID, &[0, 0, 0, 0]);
        assert_eq!(c.u32_at(VENDOR_ID), 0x1042_1af4);
        assert_eq!(c.u32_at(REVISION_ID), 0x0180_0001);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = PciConfig::new(&header());
        let bar = BarInfo {
            size: 0x8000,
            is_64bit: true,
            prefetchable: false,
        };
        c.add_bar(0, bar, 0xc000_0000).unwrap();
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        let original = [c.u32_at(BAR0), c.u32_at(BAR0 + 4)];
        c.write(BAR0, &[0xff; 4]);
        c.write(BAR0 + 4, &[0xff; 4]);
        assert_eq!(c.u32_at(BAR0), 0xffff_8000 | BAR_MEM_64);
        assert_eq!(c.u32_at(BAR0 + 4), 0xffff_ffff);
        c.write(BAR0, &original[0].to_le_bytes());
        c.write(BAR0 + 4, &original[1].to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        // Moving it.
        c.write(BAR0, &0xd000_0000u32.to_le_bytes());
        assert_eq!(c.bar_address(0), Some(0xd000_0000));
        assert_eq!(c.add_bar(1, bar, 0), Err(PciConfigError::BadBarIndex(1)));
        assert_eq!(
            c.add_bar(2, BarInfo { size: 3, ..bar }, 0),
            Err(PciConfigError::BadBarSize(3))
        );
    }

    #[test]
    fn capabilities_chain() {
        let mut c = PciConfig::new(&header());
        let a = c.add_capability(&[0x09, 0, 4, 1], &[]).unwrap();
        let b = c
            .add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0], &[0, 0, 0, 0xc0])
            .unwrap();
        assert_eq!(c.bytes[CAPABILITIES_POINTER] as usize, a);
        assert_eq!(c.bytes[a + 1] as usize, b);
        assert_eq!(c.bytes[b + 1], 0);
        assert_ne!(c.u16_at(STATUS) & STATUS_CAPABILITIES, 0);
        c.write(b + 3, &[0xff]);
        assert_eq!(c.bytes[b + 3], 0xc0);
        let mut out = [0u8; 4];
        c.read(CONFIG_SIZE - 2, &mut out);
        assert_eq!(out[2..], [0xff, 0xff]);
    }
}
