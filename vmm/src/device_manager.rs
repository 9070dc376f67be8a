//! The VM's PCI devices: virtio devices on bus 0, each behind the virtio-pci
//! transport with its BAR in the 32-bit window and its MSI-X vectors routed
//! through the GSI router.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::{PciError, PciRoot};
use devices::virtio::balloon::{Balloon, BalloonBackend, BalloonHandle};
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use devices::virtio::{VirtioDevice, VirtioDeviceSnapshot};
use devices::{DeviceError, StateError};
use migration::bitmap::DirtyBitmap;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::interrupt::GsiRouter;
use crate::memory::{self, GuestMemoryMmap};
use crate::pci::BarAllocator;

pub struct DeviceManager {
    pci_root: Arc<Mutex<PciRoot>>,
    gsi_router: Arc<GsiRouter>,
    memory: Arc<GuestMemoryMmap>,
    bars: BarAllocator,
    virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// The balloon, if configured, to drive it from the API and migration.
    balloon: Option<BalloonHandle>,
}

impl DeviceManager {
    pub fn new(
        pci_root: Arc<Mutex<PciRoot>>,
        gsi_router: Arc<GsiRouter>,
        memory: Arc<GuestMemoryMmap>,
    ) -> DeviceManager {
        DeviceManager {
            pci_root,
            gsi_router,
            memory,
            bars: BarAllocator::default(),
            virtio: Vec::new(),
            balloon: None,
        }
    }

    /// Creates the disks and NICs of `config`. On a migration target
    /// (`incoming`) disks open without their lock, which is taken when the
    /// source has released it.
    pub fn add_configured(
        &mut self,
        config: &config::VmConfig,
        incoming: bool,
    ) -> Result<(), DeviceError> {
        check_distinct_disks(&config.disks)?;
        for disk in &config.disks {
            let id = disk.id.clone().unwrap_or_default();
            let block = if incoming {
                Block::new_unlocked(disk)
            } else {
                Block::new(disk)
            }?;
            self.add_virtio(&id, Box::new(block))?;
        }
        for net in &config.nets {
            let id = net.id.clone().unwrap_or_default();
            self.add_virtio(&id, Box::new(Net::new(net)?))?;
        }
        if let Some(balloon) = &config.balloon {
            let ram: Vec<(u64, u64)> = self
                .memory
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect();
            let backend = Arc::new(MemoryBalloonBackend {
                memory: self.memory.clone(),
            });
            let device = Balloon::new(balloon, &ram, backend)?;
            let handle = device.handle();
            self.add_virtio(config::BALLOON_DEVICE_ID, Box::new(device))?;
            self.balloon = Some(handle);
        }
        Ok(())
    }

    /// Plugs a virtio device named `id` into the next free slot.
    pub fn add_virtio(&mut self, id: &str, device: Box<dyn VirtioDevice>) -> Result<(), PciError> {
        let bar = self.bars.allocate(BAR_SIZE).ok_or(PciError::NoMmioSpace)?;
        let transport = VirtioPciDevice::new(
            id,
            device,
            self.memory.clone(),
            self.gsi_router.clone(),
            bar,
        )?;
        let transport = Arc::new(Mutex::new(transport));
        self.pci_root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(transport.clone())?;
        self.virtio.push(transport);
        Ok(())
    }

    pub fn virtio_devices(&self) -> &[Arc<Mutex<VirtioPciDevice>>] {
        &self.virtio
    }

    /// The balloon, if the VM has one.
    pub fn balloon(&self) -> Option<&BalloonHandle> {
        self.balloon.as_ref()
    }

    /// The pages a migration need not send, per RAM region: see
    /// [`migration_skippable_pages`].
    pub fn ballooned_pages(&self) -> Option<Vec<DirtyBitmap>> {
        self.balloon.as_ref().and_then(migration_skippable_pages)
    }

    /// Per-device counters, by device id.
    pub fn counters(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.virtio
            .iter()
            .map(|d| {
                let d = d.lock().unwrap_or_else(|e| e.into_inner());
                (d.id().to_string(), d.counters())
            })
            .collect()
    }
}

impl DeviceManager {
    /// Pauses every virtio device and saves it with its transport, by device id.
    pub fn snapshot(&self) -> BTreeMap<String, VirtioDeviceSnapshot> {
        self.virtio
            .iter()
            .map(|device| {
                let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
                (device.id().to_string(), device.snapshot())
            })
            .collect()
    }

    /// Restores every virtio device from the source's snapshots (same ids).
    pub fn restore(
        &self,
        mut snapshots: BTreeMap<String, VirtioDeviceSnapshot>,
    ) -> Result<(), StateError> {
        if snapshots.len() != self.virtio.len() {
            return Err(StateError::Mismatch(format!(
                "the snapshot has {} virtio devices, this VM {}",
                snapshots.len(),
                self.virtio.len()
            )));
        }
        for device in &self.virtio {
            let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
            let id = device.id().to_string();
            let snapshot = snapshots.remove(&id).ok_or_else(|| {
                StateError::Mismatch(format!("the snapshot has no state for {id}"))
            })?;
            device.restore(snapshot)?;
        }
        Ok(())
    }

    /// Resumes devices paused by [`DeviceManager::snapshot`] (a failed migration).
    pub fn resume(&self) {
        for device in &self.virtio {
            device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_mut()
                .resume();
        }
    }
}

impl DeviceManager {
    /// Flushes and releases host resources of every device (switch-over).
    pub fn migration_release(&self) -> Result<(), DeviceError> {
        for device in &self.virtio {
            let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
            device.device_mut().migration_release()?;
        }
        Ok(())
    }

    /// Flushes every device, keeping its host resources (a snapshot).
    pub fn sync(&self) -> Result<(), DeviceError> {
        for device in &self.virtio {
            let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
            device.device_mut().sync()?;
        }
        Ok(())
    }

    /// Takes host resources back (target start, or source after a failure).
    pub fn migration_acquire(&self) -> Result<(), DeviceError> {
        for device in &self.virtio {
            let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
            device.device_mut().migration_acquire()?;
        }
        Ok(())
    }

    /// Tells every device the guest now runs here (target).
    pub fn migration_completed(&self) {
        for device in &self.virtio {
            device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_mut()
                .migration_completed();
        }
    }
}

/// Refuses one disk given twice (two paths to one file, a loop device and
/// the file behind it): two devices of one VM would write it without
/// knowing of each other. A config error naming both.
fn check_distinct_disks(disks: &[config::DiskConfig]) -> Result<(), DeviceError> {
    use devices::virtio::block::lock::DiskIdentity;
    let identities: Vec<Option<DiskIdentity>> =
        disks.iter().map(|d| DiskIdentity::of(&d.path)).collect();
    for (i, identity) in identities.iter().enumerate() {
        let Some(identity) = identity else { continue };
        for (j, earlier) in identities[..i].iter().enumerate() {
            if earlier.as_ref().is_some_and(|e| e.same_disk(identity)) {
                return Err(devices::virtio::block::BlockError::Invalid {
                    path: disks[i].path.clone(),
                    reason: format!(
                        "disks[{i}] is the same disk as disks[{j}] ({}): a VM cannot have one disk twice",
                        disks[j].path.display()
                    ),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// Gives ballooned and reported pages back to the host: MADV_DONTNEED for
/// private anonymous memory, a punched hole for memfd and hugetlbfs memory
/// (which frees only whole huge pages; 4 KiB balloon pages inside a huge
/// page are zeroed, not freed).
///
/// Anonymous ranges are also marked in the VMM's dirty bitmap: they now
/// read as zero, and a migration under way sends zero markers for those
/// the target had data for, so its memory stays identical. Not for memfd
/// memory: the migration would read the punched pages, and reading a hole
/// of a shared mapping allocates it again. The guest does not care either
/// way: ballooned pages are skipped, and reported pages are free pages
/// whose content it does not rely on (Linux turns reporting off when it
/// poisons or zeroes free pages and the device does not offer PAGE_POISON).
struct MemoryBalloonBackend {
    memory: Arc<GuestMemoryMmap>,
}

impl BalloonBackend for MemoryBalloonBackend {
    fn discard(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        memory::discard_range(&self.memory, gpa, len)?;
        if let Some(region) = self
            .memory
            .find_region(GuestAddress(gpa))
            .filter(|r| r.file_offset().is_none())
        {
            let offset = gpa - region.start_addr().0;
            region.bitmap().mark_dirty(offset as usize, len as usize);
        }
        Ok(())
    }
}

/// The pages in `balloon` as dirty-bitmap-shaped maps (one per RAM region,
/// in region order), if a migration may skip them: only when the driver
/// negotiated MUST_TELL_HOST, so that it never touches a ballooned page
/// before the device has taken it out of the balloon (and out of this map).
/// Read it after harvesting the dirty log: a page deflated and written
/// before the harvest is then no longer in the map, and one written after
/// it shows up in the next harvest.
pub fn migration_skippable_pages(balloon: &BalloonHandle) -> Option<Vec<DirtyBitmap>> {
    if !balloon.must_tell_host() {
        return None;
    }
    Some(
        balloon
            .ballooned_pages()
            .into_iter()
            .map(|r| DirtyBitmap::from_words(r.words, r.pages))
            .collect(),
    )
}
