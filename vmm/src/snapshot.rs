//! The VM's state at a switch-over, everything but memory: vCPUs, the
//! in-kernel irqchip, PIT and clock, the legacy devices and the virtio
//! devices. One type ([`VmSnapshot`]) with a format version, one path that
//! takes it ([`Vm::snapshot`]) and one that puts it back ([`Vm::restore`]),
//! and one wire encoding ([`VmSnapshot::encode`], [`VmSnapshot::decode`]).

use std::collections::BTreeMap;

use devices::legacy::{GedState, I8042State, SerialState};
use devices::virtio::VirtioDeviceSnapshot;
use devices::StateError;
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use crate::vcpu::{VcpuError, VcpuState};
use crate::vm::Vm;

/// The format of [`VmSnapshot`] this VMM writes and reads. Bump it when a
/// field changes meaning or a state type changes shape.
pub const SNAPSHOT_VERSION: u32 = 2;

/// KVM's irqchip ids: PIC master, PIC slave, IOAPIC.
const IRQCHIP_IDS: [u32; 3] = [
    kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
    kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
    kvm_bindings::KVM_IRQCHIP_IOAPIC,
];

/// The whole VM state except memory.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// [`SNAPSHOT_VERSION`] of the VMM that wrote it.
    pub version: u32,
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub serial: SerialState,
    pub i8042: I8042State,
    /// The ACPI power button's pending events.
    pub ged: GedState,
    /// Virtio devices by id.
    pub devices: BTreeMap<String, VirtioDeviceSnapshot>,
}

/// Why a VM state could not be taken, read or put back.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("VM state format version {found}; this VMM reads version {SNAPSHOT_VERSION}")]
    Version { found: u32 },
    #[error("malformed VM state: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("the VM state does not fit this VM: {0}")]
    Mismatch(String),
    #[error("KVM: {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Device(#[from] StateError),
    #[error("the vCPUs are gone")]
    NoVcpus,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

impl VmSnapshot {
    /// The wire encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        serde_json::to_vec(self).map_err(SnapshotError::Malformed)
    }

    /// Reads the wire encoding: a state of another format version is
    /// refused before anything else is looked at.
    pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, SnapshotError> {
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let Version { version } =
            serde_json::from_slice(bytes).map_err(SnapshotError::Malformed)?;
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version { found: version });
        }
        serde_json::from_slice(bytes).map_err(SnapshotError::Malformed)
    }
}

impl Vm {
    /// Takes the state of a paused VM: vCPUs, in-kernel irqchip, PIT and
    /// clock, legacy devices and virtio devices (paused by this call).
    pub fn snapshot(&mut self) -> Result<VmSnapshot, SnapshotError> {
        let vcpus = self.vcpus.as_ref().ok_or(SnapshotError::NoVcpus)?;
        let mut vcpu_states = Vec::new();
        for vcpu in vcpus.vcpus() {
            let vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            vcpu_states.push(vcpu.save_state()?);
        }
        let mut irqchips = Vec::new();
        for chip_id in IRQCHIP_IDS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        let pit = self.vm_fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
        let clock = self.vm_fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        Ok(VmSnapshot {
            version: SNAPSHOT_VERSION,
            vcpus: vcpu_states,
            irqchips,
            pit,
            clock,
            serial: lock(&self.serial).state(),
            i8042: lock(&self.i8042).state(),
            ged: lock(&self.ged).state(),
            devices: self.device_manager.snapshot(),
        })
    }

    /// Puts a snapshot into a VM built with [`crate::vm::VmStart::Incoming`]
    /// from the same config; the vCPUs stay parked until [`Vm::resume`].
    pub fn restore(&mut self, snapshot: VmSnapshot) -> Result<(), SnapshotError> {
        let vcpus = self.vcpus.as_ref().ok_or(SnapshotError::NoVcpus)?;
        if snapshot.vcpus.len() != vcpus.vcpus().len() {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot has {} vCPUs, this VM {}",
                snapshot.vcpus.len(),
                vcpus.vcpus().len()
            )));
        }
        if snapshot.irqchips.len() != IRQCHIP_IDS.len()
            || snapshot
                .irqchips
                .iter()
                .zip(IRQCHIP_IDS)
                .any(|(c, id)| c.chip_id != id)
        {
            return Err(SnapshotError::Mismatch(
                "the irqchip state is not PIC master, PIC slave, IOAPIC".into(),
            ));
        }
        // Order that works on KVM: irqchip and PIT, vCPUs, then the clock.
        for chip in &snapshot.irqchips {
            self.vm_fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        self.vm_fd
            .set_pit2(&snapshot.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        for (vcpu, state) in vcpus.vcpus().iter().zip(&snapshot.vcpus) {
            let vcpu = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            if state.id != vcpu.id {
                return Err(SnapshotError::Mismatch(format!(
                    "vCPU state {} arrived for vcpu{}",
                    state.id, vcpu.id
                )));
            }
            vcpu.restore_state(state)?;
        }
        let mut clock = snapshot.clock;
        // Only the clock value is ours to set; KVM computes the flags.
        clock.flags = 0;
        self.vm_fd
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        lock(&self.serial).restore(&snapshot.serial)?;
        lock(&self.i8042).restore(&snapshot.i8042)?;
        lock(&self.ged).restore(&snapshot.ged);
        self.device_manager.restore(snapshot.devices)?;
        Ok(())
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_of_another_format_version_is_refused_before_it_is_read() {
        let error = VmSnapshot::decode(br#"{"version": 1, "vcpus": "anything"}"#)
            .err()
            .expect("version 1 is refused");
        assert_eq!(
            error.to_string(),
            format!("VM state format version 1; this VMM reads version {SNAPSHOT_VERSION}")
        );
        let error = VmSnapshot::decode(b"{\"vcpus\": []}")
            .err()
            .expect("refused");
        assert!(
            error.to_string().contains("missing field `version`"),
            "{error}"
        );
        let error = VmSnapshot::decode(b"\x00garbage").err().expect("refused");
        assert!(
            error.to_string().starts_with("malformed VM state"),
            "{error}"
        );
    }
}
