//! The virtio-pci transport (virtio 1.2, 4.1, modern only): a PCI function
//! whose BAR 0 holds the common configuration, ISR, device configuration,
//! queue notification and MSI-X regions, found through vendor capabilities.
//! Notifications arrive as ioeventfds; interrupts leave as MSI-X vectors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, ActivateError, QueueSnapshot, VirtioDevice, VirtioDeviceSnapshot,
    VirtioInterrupt, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED,
    STATUS_FEATURES_OK, STATUS_NEEDS_RESET, TYPE_BALLOON, TYPE_BLOCK, TYPE_NET,
};
use crate::error::StateError;
use crate::pci::config::{BarInfo, PciConfig, PciHeader, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::pci::msix::{MsiController, Msix, MsixState};
use crate::pci::{PciDevice, PciError};
use crate::GuestMemoryMmap;

/// PCI IDs of modern virtio devices.
const VIRTIO_VENDOR: u16 = 0x1af4;
const MODERN_DEVICE_BASE: u16 = 0x1040;

/// BAR 0 layout.
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const ISR_SIZE: u64 = 1;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Each queue's notify address is this many bytes after the previous one.
const NOTIFY_MULTIPLIER: u32 = 4;
const NOTIFY_SIZE: u64 = 0x1000;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
pub const BAR_SIZE: u64 = 0x8000;
const BAR_INDEX: usize = 0;

/// Vendor capability types.
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// No MSI-X vector assigned.
pub const NO_VECTOR: u16 = 0xffff;
/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Common configuration registers (byte offsets in the common region).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC_LO: u64 = 0x20;
    pub const QUEUE_DESC_HI: u64 = 0x24;
    pub const QUEUE_DRIVER_LO: u64 = 0x28;
    pub const QUEUE_DRIVER_HI: u64 = 0x2c;
    pub const QUEUE_DEVICE_LO: u64 = 0x30;
    pub const QUEUE_DEVICE_HI: u64 = 0x34;
}

/// Interrupt delivery shared with the device's worker thread: it never
/// takes the transport's lock, so a vCPU holding that lock (e.g. while
/// resetting the device and joining its worker) cannot deadlock with it.
pub struct PciInterrupt {
    msix: Mutex<Msix>,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
}

impl PciInterrupt {
    fn fire(&self, vector: u16, isr: u8) -> std::io::Result<()> {
        self.isr.fetch_or(isr, Ordering::SeqCst);
        if vector != NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(vector);
        }
        Ok(())
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn notify_queue(&self, index: u16) -> std::io::Result<()> {
        let vector = self
            .queue_vectors
            .get(usize::from(index))
            .map(|v| v.load(Ordering::SeqCst))
            .unwrap_or(NO_VECTOR);
        self.fire(vector, ISR_QUEUE)
    }

    fn notify_config(&self) -> std::io::Result<()> {
        self.fire(self.config_vector.load(Ordering::SeqCst), ISR_CONFIG)
    }
}

/// A queue as the driver configures it, before activation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSetup {
    pub size: u16,
    pub max_size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// Transport state, for migration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioPciState {
    pub status: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub queue_select: u16,
    pub queues: Vec<QueueSetup>,
    pub queue_vectors: Vec<u16>,
    pub config_vector: u16,
    pub config_generation: u8,
    pub msix: MsixState,
    pub pci_config: Vec<u8>,
}

pub struct VirtioPciDevice {
    id: String,
    config: PciConfig,
    device: Box<dyn VirtioDevice>,
    memory: Arc<GuestMemoryMmap>,
    interrupt: Arc<PciInterrupt>,
    queue_events: Vec<EventFd>,
    queues: Vec<QueueSetup>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability.
    pci_cfg_cap: usize,
    msix_cap: usize,
    activated: bool,
}

fn class_of(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        TYPE_NET => (0x02, 0x00, 0x00),
        TYPE_BLOCK => (0x01, 0x80, 0x00),
        TYPE_BALLOON => (0x05, 0x00, 0x00),
        _ => (0xff, 0x00, 0x00),
    }
}

/// A virtio vendor capability: cap_vndr, cap_next, cap_len, cfg_type, bar,
/// id, padding, offset, length (+ extra).
fn vendor_capability(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Vec<u8> {
    let mut cap = vec![
        CAP_VENDOR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        BAR_INDEX as u8,
        0,
        0,
        0,
    ];
    cap.extend((offset as u32).to_le_bytes());
    cap.extend((length as u32).to_le_bytes());
    cap.extend(extra);
    cap
}

impl VirtioPciDevice {
    /// Wraps `device` with its BAR 0 at `bar_address`. `id` names it in errors.
    pub fn new(
        id: &str,
        device: Box<dyn VirtioDevice>,
        memory: Arc<GuestMemoryMmap>,
        msi: Arc<dyn MsiController>,
        bar_address: u64,
    ) -> Result<VirtioPciDevice, PciError> {
        let device_type = device.device_type();
        let max_sizes = device.queue_max_sizes();
        let queue_count = max_sizes.len();
        let mut config = PciConfig::new(&PciHeader {
            vendor_id: VIRTIO_VENDOR,
            device_id: MODERN_DEVICE_BASE + device_type as u16,
            revision_id: 1,
            class: class_of(device_type),
            subsystem_vendor_id: VIRTIO_VENDOR,
            subsystem_id: 0x40,
        });
        config.add_bar(
            BAR_INDEX,
            BarInfo {
                size: BAR_SIZE,
                is_64bit: true,
                prefetchable: false,
            },
            bar_address,
        )?;
        // Firmware duty: BARs assigned, decoding and bus mastering on.
        config.set_command(COMMAND_MEMORY | COMMAND_BUS_MASTER);
        config.add_capability(
            &vendor_capability(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE, &[]),
            &[],
        )?;
        config.add_capability(
            &vendor_capability(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ),
            &[],
        )?;
        config.add_capability(&vendor_capability(CAP_ISR, ISR_OFFSET, ISR_SIZE, &[]), &[])?;
        config.add_capability(
            &vendor_capability(CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE, &[]),
            &[],
        )?;
        // The PCI configuration access window: bar, offset, length and data are the driver's.
        let mut pci_cfg_writable = vec![0u8; 20];
        pci_cfg_writable[4] = 0xff;
        pci_cfg_writable[8..20].fill(0xff);
        let pci_cfg_cap = config.add_capability(
            &vendor_capability(CAP_PCI_CFG, 0, 0, &[0; 4]),
            &pci_cfg_writable,
        )?;

        // One vector per queue plus one for configuration changes.
        let vectors = queue_count as u16 + 1;
        let msix = Msix::new(vectors, msi).map_err(|source| PciError::Io {
            what: "MSI-X vectors",
            source,
        })?;
        let (cap, writable) = msix.capability(
            BAR_INDEX as u8,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(&cap, &writable)?;

        let queue_events = (0..queue_count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|source| PciError::Io {
                what: "queue eventfds",
                source,
            })?;
        let queues = max_sizes
            .iter()
            .map(|&max| QueueSetup {
                size: max,
                max_size: max,
                ..Default::default()
            })
            .collect();
        Ok(VirtioPciDevice {
            id: id.to_string(),
            config,
            device,
            memory,
            interrupt: Arc::new(PciInterrupt {
                msix: Mutex::new(msix),
                queue_vectors: (0..queue_count)
                    .map(|_| AtomicU16::new(NO_VECTOR))
                    .collect(),
                config_vector: AtomicU16::new(NO_VECTOR),
                isr: AtomicU8::new(0),
            }),
            queue_events,
            queues,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
            pci_cfg_cap,
            msix_cap,
            activated: false,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn interrupt(&self) -> Arc<PciInterrupt> {
        self.interrupt.clone()
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.device.counters()
    }

    fn selected_queue(&mut self) -> Option<&mut QueueSetup> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let value: u64 = match offset {
            common::DEVICE_FEATURE_SELECT => u64::from(self.device_feature_select),
            common::DEVICE_FEATURE => match self.device_feature_select {
                0 => self.device.features() & 0xffff_ffff,
                1 => self.device.features() >> 32,
                _ => 0,
            },
            common::DRIVER_FEATURE_SELECT => u64::from(self.driver_feature_select),
            common::DRIVER_FEATURE => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            common::CONFIG_MSIX_VECTOR => {
                u64::from(self.interrupt.config_vector.load(Ordering::SeqCst))
            }
            common::NUM_QUEUES => self.queues.len() as u64,
            common::DEVICE_STATUS => u64::from(self.status),
            common::CONFIG_GENERATION => u64::from(self.config_generation),
            common::QUEUE_SELECT => u64::from(self.queue_select),
            common::QUEUE_SIZE => self.selected_queue().map_or(0, |q| u64::from(q.size)),
            common::QUEUE_MSIX_VECTOR => self
                .interrupt
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(u64::from(NO_VECTOR), |v| {
                    u64::from(v.load(Ordering::SeqCst))
                }),
            common::QUEUE_ENABLE => self.selected_queue().map_or(0, |q| u64::from(q.enabled)),
            // Queue i notifies at NOTIFY_OFFSET + i * NOTIFY_MULTIPLIER.
            common::QUEUE_NOTIFY_OFF => u64::from(self.queue_select),
            common::QUEUE_DESC_LO => self.selected_queue().map_or(0, |q| q.desc & 0xffff_ffff),
            common::QUEUE_DESC_HI => self.selected_queue().map_or(0, |q| q.desc >> 32),
            common::QUEUE_DRIVER_LO => self.selected_queue().map_or(0, |q| q.driver & 0xffff_ffff),
            common::QUEUE_DRIVER_HI => self.selected_queue().map_or(0, |q| q.driver >> 32),
            common::QUEUE_DEVICE_LO => self.selected_queue().map_or(0, |q| q.device & 0xffff_ffff),
            common::QUEUE_DEVICE_HI => self.selected_queue().map_or(0, |q| q.device >> 32),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(8);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut raw = [0u8; 8];
        let len = data.len().min(8);
        raw[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(raw);
        let v32 = value as u32;
        let v16 = value as u16;
        // Queue layout may only change before the driver starts the device.
        let configurable = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            common::DEVICE_FEATURE_SELECT => self.device_feature_select = v32,
            common::DRIVER_FEATURE_SELECT => self.driver_feature_select = v32,
            common::DRIVER_FEATURE if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(v32)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v32) << 32)
                    }
                    _ => {}
                }
            }
            common::CONFIG_MSIX_VECTOR => {
                let vector = self.valid_vector(v16);
                self.interrupt.config_vector.store(vector, Ordering::SeqCst);
            }
            common::DEVICE_STATUS => self.write_status(value as u8),
            common::QUEUE_SELECT => self.queue_select = v16,
            common::QUEUE_SIZE if configurable => {
                if let Some(q) = self.selected_queue() {
                    // Split queues need a power-of-two size within the maximum.
                    if v16.is_power_of_two() && v16 <= q.max_size {
                        q.size = v16;
                    }
                }
            }
            common::QUEUE_MSIX_VECTOR => {
                let vector = self.valid_vector(v16);
                if let Some(v) = self
                    .interrupt
                    .queue_vectors
                    .get(usize::from(self.queue_select))
                {
                    v.store(vector, Ordering::SeqCst);
                }
            }
            common::QUEUE_ENABLE if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.enabled = v16 == 1;
                }
            }
            common::QUEUE_DESC_LO if configurable => {
                self.set_queue_address(|q| &mut q.desc, v32, false)
            }
            common::QUEUE_DESC_HI if configurable => {
                self.set_queue_address(|q| &mut q.desc, v32, true)
            }
            common::QUEUE_DRIVER_LO if configurable => {
                self.set_queue_address(|q| &mut q.driver, v32, false)
            }
            common::QUEUE_DRIVER_HI if configurable => {
                self.set_queue_address(|q| &mut q.driver, v32, true)
            }
            common::QUEUE_DEVICE_LO if configurable => {
                self.set_queue_address(|q| &mut q.device, v32, false)
            }
            common::QUEUE_DEVICE_HI if configurable => {
                self.set_queue_address(|q| &mut q.device, v32, true)
            }
            _ => {}
        }
        // 64-bit writes to address pairs arrive as one access.
        if data.len() == 8
            && configurable
            && matches!(
                offset,
                common::QUEUE_DESC_LO | common::QUEUE_DRIVER_LO | common::QUEUE_DEVICE_LO
            )
        {
            self.write_common(offset + 4, &data[4..8]);
        }
    }

    fn set_queue_address(
        &mut self,
        field: impl Fn(&mut QueueSetup) -> &mut u64,
        value: u32,
        high: bool,
    ) {
        if let Some(q) = self.selected_queue() {
            let f = field(q);
            *f = if high {
                (*f & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (*f & !0xffff_ffff) | u64::from(value)
            };
        }
    }

    /// A vector the device has, or NO_VECTOR (which the driver reads back
    /// to learn that its choice failed).
    fn valid_vector(&self, vector: u16) -> u16 {
        let count = self
            .interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count();
        if vector < count {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        // FEATURES_OK sticks only if the driver asked for offered features,
        // including VERSION_1 (no legacy interface here).
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & (1 << super::F_VERSION_1) != 0;
            if !ok {
                status &= !STATUS_FEATURES_OK;
            }
        }
        let newly_ok = status & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = status
            & (STATUS_ACKNOWLEDGE
                | STATUS_DRIVER
                | STATUS_FEATURES_OK
                | STATUS_DRIVER_OK
                | STATUS_FAILED
                | STATUS_NEEDS_RESET);
        if newly_ok && self.status & STATUS_FEATURES_OK != 0 && !self.activated {
            if let Err(e) = self.activate() {
                log::error!("{}: cannot activate: {e}", self.id);
                self.status |= STATUS_NEEDS_RESET;
                self.config_generation = self.config_generation.wrapping_add(1);
                let _ = self.interrupt.notify_config();
            }
        }
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (index, setup) in self.queues.iter().enumerate() {
            let mut queue = Queue::new(setup.max_size).map_err(|e| ActivateError::Queue {
                index,
                reason: format!("{e:?}"),
            })?;
            if setup.enabled {
                queue.set_size(setup.size);
                queue.set_desc_table_address(
                    Some(setup.desc as u32),
                    Some((setup.desc >> 32) as u32),
                );
                queue.set_avail_ring_address(
                    Some(setup.driver as u32),
                    Some((setup.driver >> 32) as u32),
                );
                queue.set_used_ring_address(
                    Some(setup.device as u32),
                    Some((setup.device >> 32) as u32),
                );
                queue.set_event_idx(self.driver_features & (1 << super::F_EVENT_IDX) != 0);
                // is_valid() also requires the queue to be ready.
                queue.set_ready(true);
                if !queue.is_valid(self.memory.as_ref()) {
                    return Err(ActivateError::Queue {
                        index,
                        reason: format!(
                            "rings outside guest memory or misaligned \
                             (size {}, desc {:#x}, avail {:#x}, used {:#x})",
                            setup.size, setup.desc, setup.driver, setup.device
                        ),
                    });
                }
            }
            let event = self.queue_events[index]
                .try_clone()
                .map_err(ActivateError::Worker)?;
            queues.push((queue, event));
        }
        self.device.activate(ActivateContext {
            memory: self.memory.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        })?;
        self.activated = true;
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueSetup {
                size: q.max_size,
                max_size: q.max_size,
                ..Default::default()
            };
        }
        for v in &self.interrupt.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::SeqCst);
        self.interrupt.isr.store(0, Ordering::SeqCst);
    }

    /// Reads or writes BAR 0 through the VIRTIO_PCI_CAP_PCI_CFG window.
    fn pci_cfg_access(&mut self, data: Option<&[u8]>, out: Option<&mut [u8]>) {
        let cap = self.pci_cfg_cap;
        let bar = self.config.bytes(cap + 4, 1)[0] as usize;
        let offset = u64::from(self.config.u32_at(cap + 8));
        let length = self.config.u32_at(cap + 12) as usize;
        if bar != BAR_INDEX || !matches!(length, 1 | 2 | 4) {
            return;
        }
        match (data, out) {
            (Some(data), _) => {
                let len = length.min(data.len());
                self.write_bar(BAR_INDEX, offset, &data[..len]);
            }
            (None, Some(out)) => {
                let mut buf = [0u8; 4];
                self.read_bar(BAR_INDEX, offset, &mut buf[..length]);
                let len = out.len().min(4);
                out[..len].copy_from_slice(&buf[..len]);
            }
            _ => {}
        }
    }

    /// Pauses the device and saves it with its transport (see
    /// [`super::persist`]).
    pub fn snapshot(&mut self) -> VirtioDeviceSnapshot {
        self.device.pause();
        VirtioDeviceSnapshot {
            transport: self.transport_state(),
            queues: self
                .device
                .queue_states()
                .into_iter()
                .map(QueueSnapshot::from)
                .collect(),
            device: self.device.state(),
        }
    }

    fn transport_state(&self) -> VirtioPciState {
        VirtioPciState {
            status: self.status,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues: self.queues.clone(),
            queue_vectors: self
                .interrupt
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            config_vector: self.interrupt.config_vector.load(Ordering::SeqCst),
            config_generation: self.config_generation,
            msix: self
                .interrupt
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
            pci_config: self.config.snapshot(),
        }
    }

    /// Restores a snapshot taken on the source into this new device: the
    /// transport's registers, then the device with its queues at the
    /// source's ring positions if the driver had started it. Errors name
    /// the device.
    pub fn restore(&mut self, snapshot: VirtioDeviceSnapshot) -> Result<(), StateError> {
        let id = self.id.clone();
        self.restore_transport(&snapshot.transport)
            .map_err(|e| e.of(&id))?;
        // Started on the source: DRIVER_OK alone does not say so (it sticks
        // without FEATURES_OK, or after a failed start), the queues do.
        self.activated =
            snapshot.transport.status & STATUS_DRIVER_OK != 0 && !snapshot.queues.is_empty();
        let context = if self.activated {
            Some(
                self.restored_context(&snapshot.queues)
                    .map_err(|e| e.of(&id))?,
            )
        } else {
            None
        };
        self.device
            .restore(snapshot.device, context)
            .map_err(|e| e.of(&id))
    }

    /// Puts the transport's registers back as they were on the source.
    fn restore_transport(&mut self, state: &VirtioPciState) -> Result<(), StateError> {
        let bad = StateError::Mismatch;
        if state.queues.len() != self.queues.len() || state.queue_vectors.len() != self.queues.len()
        {
            return Err(bad(format!(
                "the snapshot has {} queues, the device {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        for (q, s) in self.queues.iter().zip(&state.queues) {
            if s.max_size != q.max_size || s.size > q.max_size {
                return Err(bad("queue sizes differ from the snapshot".into()));
            }
        }
        // Until FEATURES_OK the register holds whatever the driver wrote
        // (write_status refuses FEATURES_OK for unoffered ones): only
        // negotiated features must be offered here.
        let unoffered = state.driver_features & !self.device.features();
        if unoffered != 0 && state.status & STATUS_FEATURES_OK != 0 {
            return Err(bad(format!(
                "the driver acked features {unoffered:#x} this device does not offer"
            )));
        }
        self.config.restore(&state.pci_config)?;
        self.interrupt
            .msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&state.msix)?;
        self.status = state.status;
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.queue_select = state.queue_select;
        self.queues = state.queues.clone();
        for (v, s) in self
            .interrupt
            .queue_vectors
            .iter()
            .zip(&state.queue_vectors)
        {
            v.store(*s, Ordering::SeqCst);
        }
        self.interrupt
            .config_vector
            .store(state.config_vector, Ordering::SeqCst);
        self.config_generation = state.config_generation;
        Ok(())
    }

    /// What the device restarts with: the queues at the source's ring
    /// positions, each with its notification eventfd.
    fn restored_context(&self, queues: &[QueueSnapshot]) -> Result<ActivateContext, StateError> {
        let bad = StateError::Mismatch;
        if queues.len() != self.queues.len() {
            return Err(bad(format!(
                "{} queue states for {} queues",
                queues.len(),
                self.queues.len()
            )));
        }
        let mut restored = Vec::with_capacity(queues.len());
        for (index, &snapshot) in queues.iter().enumerate() {
            let queue = Queue::try_from(virtio_queue::QueueState::from(snapshot))
                .map_err(|e| bad(format!("queue {index}: {e:?}")))?;
            if queue.ready() && !queue.is_valid(self.memory.as_ref()) {
                return Err(bad(format!("queue {index}: rings outside guest memory")));
            }
            let event = self.queue_events[index]
                .try_clone()
                .map_err(ActivateError::Worker)?;
            restored.push((queue, event));
        }
        Ok(ActivateContext {
            memory: self.memory.clone(),
            queues: restored,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        })
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset == window && data.len() <= 4 {
            self.pci_cfg_access(None, Some(data));
            return;
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let window = self.pci_cfg_cap + 16;
        if offset == window && data.len() <= 4 {
            self.pci_cfg_access(Some(data), None);
            return;
        }
        self.config.write(offset, data);
        let control = self.msix_cap + 2;
        if offset <= control + 1 && control < offset + data.len() {
            let value = self.config.u16_at(control);
            self.interrupt
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_control(value);
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR_INDEX {
            return;
        }
        match offset {
            o if (COMMON_OFFSET..COMMON_OFFSET + COMMON_SIZE).contains(&o) => {
                self.read_common(o - COMMON_OFFSET, data)
            }
            o if (ISR_OFFSET..ISR_OFFSET + ISR_SIZE).contains(&o) => {
                // Reading the ISR clears it.
                data[0] = self.interrupt.isr.swap(0, Ordering::SeqCst);
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .interrupt
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(o - MSIX_TABLE_OFFSET, data),
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => self
                .interrupt
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_pba(o - MSIX_PBA_OFFSET, data),
            _ => {}
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR_INDEX {
            return;
        }
        match offset {
            o if (COMMON_OFFSET..COMMON_OFFSET + COMMON_SIZE).contains(&o) => {
                self.write_common(o - COMMON_OFFSET, data)
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                // Reached only when the ioeventfd is not registered (yet).
                let index = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(event) = self.queue_events.get(index) {
                    let _ = event.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .interrupt
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }

    fn ioeventfds(&self, bar: usize) -> Vec<(u64, EventFd)> {
        if bar != BAR_INDEX {
            return Vec::new();
        }
        self.queue_events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                let offset = NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
                e.try_clone().ok().map(|e| (offset, e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use config::BalloonConfig;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::pci::msix::{MsiMessage, MsiVector};
    use crate::virtio::balloon::{Balloon, BalloonBackend};
    use crate::virtio::block::BlockState;
    use crate::virtio::DeviceState;

    struct NoMsi;

    impl MsiController for NoMsi {
        fn allocate(&self) -> io::Result<MsiVector> {
            Ok(MsiVector {
                gsi: 0,
                event: EventFd::new(libc::EFD_NONBLOCK)?,
            })
        }
        fn route(&self, _vector: &MsiVector, _message: MsiMessage) -> io::Result<()> {
            Ok(())
        }
    }

    struct NoBackend;

    impl BalloonBackend for NoBackend {
        fn discard(&self, _gpa: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    const RAM: u64 = 16 << 20;

    /// A balloon behind the transport, as the VMM plugs it.
    fn balloon_transport(memory: &Arc<GuestMemoryMmap>) -> VirtioPciDevice {
        let config = BalloonConfig {
            target_mib: 2,
            ..BalloonConfig::default()
        };
        let balloon = Balloon::new(&config, &[(0, RAM)], Arc::new(NoBackend)).unwrap();
        VirtioPciDevice::new(
            "balloon",
            Box::new(balloon),
            memory.clone(),
            Arc::new(NoMsi),
            0xc000_0000,
        )
        .unwrap()
    }

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap())
    }

    /// The encoding a snapshot crosses the wire in, both ways.
    fn through_the_wire(snapshot: &VirtioDeviceSnapshot) -> VirtioDeviceSnapshot {
        serde_json::from_slice(&serde_json::to_vec(snapshot).unwrap()).unwrap()
    }

    #[test]
    fn a_snapshot_restores_through_the_wire_encoding() {
        let memory = memory();
        let mut source = balloon_transport(&memory);
        // The driver picks an MSI-X vector and acknowledges the device.
        source.write_bar(
            BAR_INDEX,
            COMMON_OFFSET + common::CONFIG_MSIX_VECTOR,
            &3u16.to_le_bytes(),
        );
        source.write_bar(BAR_INDEX, COMMON_OFFSET + common::DEVICE_STATUS, &[1]);
        let snapshot = source.snapshot();
        assert!(matches!(snapshot.device, DeviceState::Balloon(_)));
        assert!(snapshot.queues.is_empty(), "the driver never started it");
        let decoded = through_the_wire(&snapshot);
        assert_eq!(decoded, snapshot);

        let mut target = balloon_transport(&memory);
        target.restore(decoded).unwrap();
        let mut vector = [0u8; 2];
        target.read_bar(
            BAR_INDEX,
            COMMON_OFFSET + common::CONFIG_MSIX_VECTOR,
            &mut vector,
        );
        assert_eq!(u16::from_le_bytes(vector), 3);
        let mut status = [0u8];
        target.read_bar(
            BAR_INDEX,
            COMMON_OFFSET + common::DEVICE_STATUS,
            &mut status,
        );
        assert_eq!(status, [1]);
        let mut num_pages = [0u8; 4];
        target.read_bar(BAR_INDEX, DEVICE_OFFSET, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 2 << 8);
    }

    #[test]
    fn a_state_for_another_kind_of_device_is_refused() {
        let memory = memory();
        let mut snapshot = balloon_transport(&memory).snapshot();
        snapshot.device = DeviceState::Block(BlockState {
            capacity: 8,
            logical_block_size: 512,
            physical_block_size: 512,
            readonly: false,
        });
        let error = balloon_transport(&memory)
            .restore(through_the_wire(&snapshot))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "balloon: the state is for a block device, not a balloon one"
        );
    }

    #[test]
    fn features_this_device_does_not_offer_are_refused() {
        let memory = memory();
        let mut snapshot = balloon_transport(&memory).snapshot();
        snapshot.transport.driver_features |= 1 << 40;
        snapshot.transport.status |= STATUS_FEATURES_OK;
        let error = balloon_transport(&memory)
            .restore(snapshot)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("features 0x10000000000 this device does not offer"),
            "{error}"
        );
    }

    fn write_common(device: &mut VirtioPciDevice, offset: u64, value: &[u8]) {
        device.write_bar(BAR_INDEX, COMMON_OFFSET + offset, value);
    }

    fn read_common(device: &mut VirtioPciDevice, offset: u64) -> u32 {
        let mut value = [0u8; 4];
        device.read_bar(BAR_INDEX, COMMON_OFFSET + offset, &mut value);
        u32::from_le_bytes(value)
    }

    /// Found by fuzzing: a driver that wrote feature bits the device does
    /// not offer (refused at FEATURES_OK, but kept in the register) left a
    /// state no target would restore, so its guest could not migrate.
    #[test]
    fn a_driver_still_negotiating_unoffered_features_migrates() {
        let memory = memory();
        let mut source = balloon_transport(&memory);
        write_common(&mut source, common::DEVICE_STATUS, &[3]);
        write_common(
            &mut source,
            common::DRIVER_FEATURE_SELECT,
            &0u32.to_le_bytes(),
        );
        write_common(
            &mut source,
            common::DRIVER_FEATURE,
            &0x2_0010u32.to_le_bytes(),
        );
        write_common(
            &mut source,
            common::DEVICE_STATUS,
            &[3 | STATUS_FEATURES_OK],
        );
        assert_eq!(
            read_common(&mut source, common::DEVICE_STATUS) as u8 & STATUS_FEATURES_OK,
            0,
            "FEATURES_OK refused"
        );
        let snapshot = through_the_wire(&source.snapshot());
        let mut target = balloon_transport(&memory);
        target.restore(snapshot).unwrap();
        assert_eq!(read_common(&mut target, common::DRIVER_FEATURE), 0x2_0010);
    }

    /// Found by fuzzing: DRIVER_OK sticks without FEATURES_OK, with the
    /// device never started; the target took it for a started device and
    /// refused the state for its missing queues.
    #[test]
    fn a_device_never_started_despite_driver_ok_migrates() {
        let memory = memory();
        let mut source = balloon_transport(&memory);
        // No VERSION_1: FEATURES_OK does not stick, DRIVER_OK does.
        write_common(&mut source, common::DEVICE_STATUS, &[15]);
        let status = read_common(&mut source, common::DEVICE_STATUS) as u8;
        assert_eq!(
            status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            STATUS_DRIVER_OK
        );
        let snapshot = through_the_wire(&source.snapshot());
        assert!(snapshot.queues.is_empty(), "never started");
        let mut target = balloon_transport(&memory);
        target.restore(snapshot).unwrap();
        assert_eq!(
            read_common(&mut target, common::DEVICE_STATUS) as u8,
            status
        );
    }
}
