//! The VM's PCI devices: virtio devices on bus 0, each behind the virtio-pci
//! transport with its BAR in the 32-bit window and its MSI-X vectors routed
//! through the GSI router.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::PciRoot;
use devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use devices::virtio::VirtioDevice;

use crate::interrupt::GsiRouter;
use crate::memory::GuestMemoryMmap;
use crate::pci::BarAllocator;

pub struct DeviceManager {
    pci_root: Arc<Mutex<PciRoot>>,
    gsi_router: Arc<GsiRouter>,
    memory: Arc<GuestMemoryMmap>,
    bars: BarAllocator,
    virtio: Vec<Arc<Mutex<VirtioPciDevice>>>,
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
        }
    }

    /// Plugs a virtio device named `id` into the next free slot.
    pub fn add_virtio(&mut self, id: &str, device: Box<dyn VirtioDevice>) -> Result<(), String> {
        let bar = self
            .bars
            .allocate(BAR_SIZE)
            .ok_or_else(|| format!("{id}: no room left in the PCI MMIO window"))?;
        let transport = VirtioPciDevice::new(id, device, self.memory.clone(), self.gsi_router.clone(), bar)?;
        let transport = Arc::new(Mutex::new(transport));
        self.pci_root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(transport.clone())
            .map_err(|e| format!("{id}: {e}"))?;
        self.virtio.push(transport);
        Ok(())
    }

    pub fn virtio_devices(&self) -> &[Arc<Mutex<VirtioPciDevice>>] {
        &self.virtio
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
