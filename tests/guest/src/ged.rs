//! ACPI power button, the cheap way: the project's VMM raises its power
//! button through an ACPI Generic Event Device whose event register is an
//! I/O port. A guest with ACPI takes the GED interrupt and runs the DSDT's
//! `_EVT`; this guest does not interpret AML, so the BSP polls the register
//! (with the i8042, about every 10 ms) and acknowledges the bit itself, as
//! `_EVT` does: write the bits seen back (write 1 to clear).

use crate::gate;

/// The GED event register (`devices::legacy::GED_EVENT_PORT` in the VMM).
const EVENT_PORT: u16 = 0x700;
/// Event bit: the power button was pressed.
const POWER_BUTTON: u8 = 1 << 0;

pub enum Ged {
    /// The port reads 0xff: no GED on this machine (e.g. under QEMU).
    Absent,
    Idle,
    PowerButton,
}

/// Reads the event register; acknowledges a power-button press.
pub fn poll() -> Ged {
    let events = gate::port_in(EVENT_PORT, 1) as u8;
    if events == 0xff {
        Ged::Absent
    } else if events & POWER_BUTTON != 0 {
        gate::outb(EVENT_PORT, POWER_BUTTON);
        Ged::PowerButton
    } else {
        Ged::Idle
    }
}
