//! Legacy port devices of a PC: the 8250 serial port, the i8042 controller,
//! and the power/reset registers a guest uses to stop or restart the machine.

mod ged;
mod i8042;
mod power;
mod serial;

pub use ged::{GedDevice, GedState, GED_EVENT_POWER_BUTTON};
pub use i8042::{I8042Device, I8042State};
pub use power::{PowerDevice, PowerEvent, PowerEventSink, ResetControl, S5_SLEEP_TYPE};
pub use serial::{SerialCounters, SerialDevice, SerialState};

use std::io;

/// An interrupt line a device raises (an irqfd in the VMM, a counter in tests).
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

impl Interrupt for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}
