//! The 8250/16550A UART at 0x3F8 (COM1), a thin wrapper over vm-superio's
//! model adding the bus interface, counters and serde state.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};

use super::Interrupt;
use crate::bus::BusDevice;
use crate::error::StateError;

/// Counters of the serial port, shared with the VMM's `vm.counters`.
#[derive(Debug, Default)]
pub struct SerialCounters {
    /// Bytes the guest wrote.
    pub out_bytes: AtomicU64,
    /// Bytes the guest read.
    pub in_bytes: AtomicU64,
    /// Bytes written while the output could not take them.
    pub lost_bytes: AtomicU64,
}

impl SerialEvents for SerialCounters {
    fn buffer_read(&self) {
        self.in_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn out_byte(&self) {
        self.out_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.lost_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

/// The interrupt line in vm-superio's terms.
pub struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger()
    }
}

/// Serial port registers, for save/restore (vm-superio's `SerialState` with serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

type Uart = Serial<IrqTrigger, Arc<SerialCounters>, Box<dyn Write + Send>>;

pub struct SerialDevice {
    uart: Uart,
    irq: Arc<dyn Interrupt>,
    counters: Arc<SerialCounters>,
}

impl SerialDevice {
    /// A UART whose output goes to `out` (flushed after every guest write).
    pub fn new(irq: Arc<dyn Interrupt>, out: Box<dyn Write + Send>) -> Self {
        let counters = Arc::new(SerialCounters::default());
        let uart = Serial::with_events(IrqTrigger(irq.clone()), counters.clone(), out);
        SerialDevice {
            uart,
            irq,
            counters,
        }
    }

    pub fn counters(&self) -> Arc<SerialCounters> {
        self.counters.clone()
    }

    /// Queues input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        self.uart.enqueue_raw_bytes(&bytes[..room]).unwrap_or(0)
    }

    pub fn state(&self) -> SerialState {
        self.uart.state().into()
    }

    /// Replaces the registers; output keeps going where it went.
    pub fn restore(&mut self, state: &SerialState) -> Result<(), StateError> {
        let out = std::mem::replace(self.uart.writer_mut(), Box::new(std::io::sink()));
        let uart = Serial::from_state(
            &state.into(),
            IrqTrigger(self.irq.clone()),
            self.counters.clone(),
            out,
        )
        .map_err(|e| StateError::Mismatch(format!("serial state: {e:?}")))?;
        self.uart = uart;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) => *byte = self.uart.read(offset),
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        // String I/O (`rep outsb`) arrives as several bytes for one port.
        for &byte in data {
            // An interrupt that cannot be raised is not fatal for a console.
            let _ = self.uart.write(offset, byte);
        }
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct NoIrq;
    impl Interrupt for NoIrq {
        fn trigger(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_input_and_state_roundtrip() {
        let out = SharedBuf::default();
        let mut dev = SerialDevice::new(Arc::new(NoIrq), Box::new(out.clone()));
        dev.write(0, b"hi\n");
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(dev.counters().out_bytes.load(Ordering::Relaxed), 3);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let state = dev.state();
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
        dev.restore(&state).unwrap();
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a', "restored FIFO");
        dev.write(0, b"x");
        assert_eq!(&*out.0.lock().unwrap(), b"hi\nx", "output survives restore");
        // A FIFO that is full takes no more.
        let big = [b'z'; 100];
        assert!(dev.enqueue_input(&big) < 100);
    }
}
