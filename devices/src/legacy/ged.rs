//! The ACPI Generic Event Device (GED, `ACPI0013`): how a hardware-reduced
//! ACPI platform tells the guest about events, here the power button.
//!
//! The VMM sets a bit in the event register and raises the GED's interrupt
//! (an edge on an IOAPIC pin). The guest's `_EVT` method (in the DSDT the
//! VMM writes, see `vmm/src/acpi.rs`) reads the register, writes the bits
//! it saw back to acknowledge them (write 1 to clear) and, for the
//! power-button bit, does `Notify(\_SB.PWRB, 0x80)`: Linux's ACPI button
//! driver turns that into KEY_POWER, which systemd-logind answers with a
//! power-off.
//!
//! Reads have no side effect, so a stray read (or a guest that polls the
//! register instead of taking the interrupt) loses no event.

use std::io;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Interrupt;
use crate::bus::BusDevice;

/// Event register bit: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

/// The GED register state, for save/restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GedState {
    /// Events raised and not yet acknowledged by the guest.
    pub events: u8,
}

pub struct GedDevice {
    events: u8,
    irq: Arc<dyn Interrupt>,
}

impl GedDevice {
    pub fn new(irq: Arc<dyn Interrupt>) -> Self {
        GedDevice { events: 0, irq }
    }

    /// Latches `events` in the event register and raises the interrupt.
    /// Raising it again for an event still pending is deliberate: an edge
    /// the guest missed (interrupt not set up yet) gets another chance.
    pub fn notify(&mut self, events: u8) -> io::Result<()> {
        self.events |= events;
        self.irq.trigger()
    }

    /// Presses (and releases) the ACPI power button.
    pub fn press_power_button(&mut self) -> io::Result<()> {
        self.notify(GED_EVENT_POWER_BUTTON)
    }

    /// Events not yet acknowledged by the guest.
    pub fn pending(&self) -> u8 {
        self.events
    }

    pub fn state(&self) -> GedState {
        GedState {
            events: self.events,
        }
    }

    pub fn restore(&mut self, state: &GedState) {
        self.events = state.events;
    }
}

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.events;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Write 1 to clear: the guest acknowledges the events it handled.
        if let (0, Some(&value)) = (offset, data.first()) {
            self.events &= !value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct CountingIrq(AtomicUsize);

    impl Interrupt for CountingIrq {
        fn trigger(&self) -> io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn device() -> (GedDevice, Arc<CountingIrq>) {
        let irq = Arc::new(CountingIrq(AtomicUsize::new(0)));
        (GedDevice::new(irq.clone()), irq)
    }

    fn read(dev: &mut GedDevice) -> u8 {
        let mut data = [0xaa];
        dev.read(0, &mut data);
        data[0]
    }

    #[test]
    fn idle_register_reads_zero_without_interrupts() {
        let (mut dev, irq) = device();
        assert_eq!(read(&mut dev), 0);
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn power_button_sets_the_bit_and_raises_the_interrupt() {
        let (mut dev, irq) = device();
        dev.press_power_button().unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(dev.pending(), GED_EVENT_POWER_BUTTON);
        // Reading does not clear: polling loses nothing.
        assert_eq!(read(&mut dev), GED_EVENT_POWER_BUTTON);
        assert_eq!(read(&mut dev), GED_EVENT_POWER_BUTTON);
        // Writing the bit back acknowledges it.
        dev.write(0, &[GED_EVENT_POWER_BUTTON]);
        assert_eq!(read(&mut dev), 0);
    }

    #[test]
    fn acknowledging_clears_only_the_bits_written() {
        let (mut dev, irq) = device();
        dev.notify(0b101).unwrap();
        dev.write(0, &[0b001]);
        assert_eq!(read(&mut dev), 0b100);
        dev.write(0, &[0]);
        assert_eq!(read(&mut dev), 0b100);
        // A second press while pending raises the interrupt again.
        dev.press_power_button().unwrap();
        assert_eq!(irq.0.load(Ordering::SeqCst), 2);
        assert_eq!(read(&mut dev), 0b101);
    }

    #[test]
    fn wider_reads_and_other_offsets() {
        let (mut dev, _) = device();
        dev.press_power_button().unwrap();
        let mut word = [0xff; 4];
        dev.read(0, &mut word);
        assert_eq!(word, [GED_EVENT_POWER_BUTTON, 0, 0, 0]);
        let mut other = [0xff];
        dev.read(1, &mut other);
        assert_eq!(other, [0]);
        dev.write(1, &[0xff]);
        assert_eq!(dev.pending(), GED_EVENT_POWER_BUTTON);
    }

    #[test]
    fn state_round_trips() {
        let (mut dev, _) = device();
        dev.press_power_button().unwrap();
        let state = dev.state();
        let (mut other, irq) = device();
        other.restore(&state);
        assert_eq!(other.pending(), GED_EVENT_POWER_BUTTON);
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
    }
}
