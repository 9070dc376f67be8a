//! GSI routing: KVM's table of where each GSI goes. GSIs 0-23 keep their
//! default routes to the PIC and IOAPIC (legacy devices' irqfds use them);
//! each MSI-X vector gets a GSI of its own from 24 up, routed to the MSI
//! message its table entry holds, and signalled through an irqfd.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::pci::msix::{MsiController, MsiMessage, MsiVector};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::mptable::IOAPIC_PINS;

/// KVM's limit on routing entries.
const MAX_ROUTES: usize = 4096;

struct Routes {
    /// (gsi, irqchip-or-msi) entries other than the defaults.
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

pub struct GsiRouter {
    vm_fd: Arc<VmFd>,
    routes: Mutex<Routes>,
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip, pin },
        },
        ..Default::default()
    }
}

fn msi_entry(gsi: u32, message: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: message.address as u32,
                address_hi: (message.address >> 32) as u32,
                data: message.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

impl GsiRouter {
    pub fn new(vm_fd: Arc<VmFd>) -> GsiRouter {
        GsiRouter {
            vm_fd,
            routes: Mutex::new(Routes {
                msi: BTreeMap::new(),
                next_gsi: u32::from(IOAPIC_PINS),
            }),
        }
    }

    /// Hands KVM the whole table (KVM_SET_GSI_ROUTING replaces it).
    fn commit(&self, routes: &Routes) -> std::io::Result<()> {
        let mut entries = Vec::with_capacity(40 + routes.msi.len());
        for gsi in 0..u32::from(IOAPIC_PINS) {
            if gsi < 8 {
                entries.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, &message) in &routes.msi {
            entries.push(msi_entry(gsi, message));
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| std::io::Error::other("too many GSI routes"))?;
        self.vm_fd
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl MsiController for GsiRouter {
    fn allocate(&self) -> std::io::Result<MsiVector> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.msi.len() + 40 >= MAX_ROUTES {
            return Err(std::io::Error::other("no GSI left for another MSI vector"));
        }
        let gsi = routes.next_gsi;
        routes.next_gsi += 1;
        // Routed nowhere useful until the guest programs the entry.
        routes.msi.insert(gsi, MsiMessage::default());
        self.commit(&routes)?;
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        self.vm_fd
            .register_irqfd(&event, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(MsiVector { gsi, event })
    }

    fn route(&self, vector: &MsiVector, message: MsiMessage) -> std::io::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if routes.msi.get(&vector.gsi) == Some(&message) {
            return Ok(());
        }
        routes.msi.insert(vector.gsi, message);
        self.commit(&routes)
    }
}
