//! The registers through which a guest powers off or resets the machine.
//!
//! - Port 0x3C0: the sleep control register of ACPI's hardware-reduced model
//!   (as Cloud Hypervisor places it). Writing SLP_EN with SLP_TYP 5 (S5,
//!   soft off) powers the machine off.
//! - Port 0xCF9: the PC reset control register; setting the reset bit (bit 2)
//!   resets the machine (Linux `reboot=pci`).

use std::sync::Arc;

use crate::bus::BusDevice;

/// SLP_EN: the write requests the sleep state in SLP_TYP.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYP field (bits 2-4).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// The SLP_TYP value our ACPI tables give for S5 (soft off).
pub const S5_SLEEP_TYPE: u8 = 5;
/// Reset control: bit 2 starts the reset (bit 1 asks for a hard reset).
const RST_CPU: u8 = 1 << 2;

/// What the guest asked of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    PowerOff,
    Reset,
}

/// Where power events go (the VMM's control loop).
pub type PowerEventSink = Arc<dyn Fn(PowerEvent) + Send + Sync>;

/// The ACPI sleep control register.
pub struct PowerDevice {
    sink: PowerEventSink,
}

impl PowerDevice {
    pub fn new(sink: PowerEventSink) -> Self {
        PowerDevice { sink }
    }
}

impl BusDevice for PowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE {
            (self.sink)(PowerEvent::PowerOff);
        }
    }
}

/// The reset control register at 0xCF9.
pub struct ResetControl {
    sink: PowerEventSink,
    value: u8,
}

impl ResetControl {
    pub fn new(sink: PowerEventSink) -> Self {
        ResetControl { sink, value: 0 }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Only a byte write to 0xCF9 itself is the reset register (the
        // dword at 0xCF8 is PCI config address, served elsewhere).
        let [value] = data else { return };
        self.value = *value & !RST_CPU;
        if value & RST_CPU != 0 {
            (self.sink)(PowerEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn recorder() -> (PowerEventSink, Arc<Mutex<Vec<PowerEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        (Arc::new(move |ev| e.lock().unwrap().push(ev)), events)
    }

    #[test]
    fn s5_write_powers_off_and_other_states_do_not() {
        let (sink, events) = recorder();
        let mut dev = PowerDevice::new(sink);
        dev.write(0, &[(3 << SLP_TYP_SHIFT) | SLP_EN]); // S3: ignored
        dev.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]); // no SLP_EN: ignored
        assert!(events.lock().unwrap().is_empty());
        dev.write(0, &[0x34]);
        assert_eq!(*events.lock().unwrap(), vec![PowerEvent::PowerOff]);
    }

    #[test]
    fn cf9_reset_bit_resets() {
        let (sink, events) = recorder();
        let mut dev = ResetControl::new(sink);
        dev.write(0, &[0x02]);
        assert!(events.lock().unwrap().is_empty());
        dev.write(0, &[0x06]);
        assert_eq!(*events.lock().unwrap(), vec![PowerEvent::Reset]);
    }
}
