//! The i8042 PS/2 controller: just enough of it for a guest to reset the
//! machine (command 0xFE) and to receive Ctrl-Alt-Del, the graceful shutdown
//! request a Linux guest honours without ACPI (systemd's ctrlaltdel.target).

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Interrupt, PowerEvent, PowerEventSink};
use crate::bus::BusDevice;
use crate::error::StateError;

/// Offset of the data port (0x60) in the device's range.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status/command port (0x64) in the device's range.
pub const STATUS_OFFSET: u64 = 4;

// Controller commands, written to port 0x64.
/// Read the controller configuration byte.
const CMD_READ_CONFIG: u8 = 0x20;
/// Write the controller configuration byte (next byte on port 0x60).
const CMD_WRITE_CONFIG: u8 = 0x60;
/// Controller self test; answers 0x55.
const CMD_SELF_TEST: u8 = 0xaa;
/// Keyboard port test; answers 0x00.
const CMD_KBD_TEST: u8 = 0xab;
/// Read the output port.
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
/// Write the output port (next byte on port 0x60).
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// Pulse the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

// Status register bits.
/// Output buffer full: a byte is waiting on port 0x60.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// System flag: the self test passed.
const STATUS_SYSTEM: u8 = 1 << 2;
/// The last write was to port 0x64 (a command) rather than data.
const STATUS_COMMAND: u8 = 1 << 3;
/// Keyboard not inhibited.
const STATUS_KBD_UNLOCKED: u8 = 1 << 4;

// Configuration byte bits.
/// Raise IRQ 1 when keyboard data arrives.
const CONFIG_KBD_INTERRUPT: u8 = 1 << 0;
/// System flag mirror.
const CONFIG_SYSTEM: u8 = 1 << 2;

/// Answer of a keyboard to any command it understands.
const KBD_ACK: u8 = 0xfa;

// Keyboard commands (bytes written to port 0x60 while no controller command
// waits for data), and what a PS/2 keyboard answers after its ACK. Linux's
// atkbd probes with them; without their answers it times out on GET_ID,
// falls back to treating the keyboard as an old AT one, and logs failures.
/// Set the LEDs; a parameter byte follows.
const KBD_SET_LEDS: u8 = 0xed;
/// Echo: answered with 0xEE, no ACK.
const KBD_ECHO: u8 = 0xee;
/// Get or set the scan code set; a parameter byte follows (0: get).
const KBD_SCAN_SET: u8 = 0xf0;
/// Identify: ACK, then the MF2 keyboard ID 0xAB 0x83.
const KBD_GET_ID: u8 = 0xf2;
/// Set the typematic rate; a parameter byte follows.
const KBD_TYPEMATIC: u8 = 0xf3;
/// Reset and self test: ACK, then 0xAA (basic assurance test passed).
const KBD_RESET: u8 = 0xff;
/// The MF2 keyboard's ID bytes.
const KBD_ID: [u8; 2] = [0xab, 0x83];
/// Basic assurance test passed.
const KBD_BAT_OK: u8 = 0xaa;
/// The scan code set in use (Linux's default for an untranslated port).
const KBD_SCAN_SET_2: u8 = 2;
/// Answer of the controller self test.
const SELF_TEST_OK: u8 = 0x55;

/// Ctrl, Alt, Del make codes in scan code set 2, as a PS/2 keyboard sends
/// them (Firecracker's choice too; Linux's atkbd decodes them).
pub const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// At most this many bytes wait in the output buffer.
const BUFFER_LIMIT: usize = 16;

/// The i8042 controller state, for save/restore.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub config: u8,
    pub output_port: u8,
    /// A command waiting for its data byte on port 0x60.
    pub pending_command: Option<u8>,
    pub buffer: Vec<u8>,
    /// A keyboard command waiting for its parameter byte (absent in
    /// states saved before the keyboard answered its commands).
    #[serde(default)]
    pub kbd_pending: Option<u8>,
}

pub struct I8042Device {
    config: u8,
    output_port: u8,
    pending_command: Option<u8>,
    kbd_pending: Option<u8>,
    buffer: VecDeque<u8>,
    last_was_command: bool,
    kbd_irq: Arc<dyn Interrupt>,
    power: PowerEventSink,
}

impl I8042Device {
    pub fn new(kbd_irq: Arc<dyn Interrupt>, power: PowerEventSink) -> Self {
        I8042Device {
            config: CONFIG_KBD_INTERRUPT | CONFIG_SYSTEM,
            output_port: 0,
            pending_command: None,
            kbd_pending: None,
            buffer: VecDeque::new(),
            last_was_command: false,
            kbd_irq,
            power,
        }
    }

    /// Sends Ctrl-Alt-Del as key presses. Returns false if the guest has not
    /// drained earlier input (the buffer is full).
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        if self.buffer.len() + CTRL_ALT_DEL.len() > BUFFER_LIMIT {
            return false;
        }
        self.buffer.extend(CTRL_ALT_DEL);
        self.raise_interrupt();
        true
    }

    pub fn state(&self) -> I8042State {
        I8042State {
            config: self.config,
            output_port: self.output_port,
            pending_command: self.pending_command,
            buffer: self.buffer.iter().copied().collect(),
            kbd_pending: self.kbd_pending,
        }
    }

    pub fn restore(&mut self, state: &I8042State) -> Result<(), StateError> {
        if state.buffer.len() > BUFFER_LIMIT {
            return Err(StateError::Mismatch(format!(
                "i8042 buffer holds {} bytes, more than {BUFFER_LIMIT}",
                state.buffer.len()
            )));
        }
        self.config = state.config;
        self.output_port = state.output_port;
        self.pending_command = state.pending_command;
        self.kbd_pending = state.kbd_pending;
        self.buffer = state.buffer.iter().copied().collect();
        if !self.buffer.is_empty() {
            self.raise_interrupt();
        }
        Ok(())
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_KBD_UNLOCKED;
        if self.config & CONFIG_SYSTEM != 0 {
            status |= STATUS_SYSTEM;
        }
        if !self.buffer.is_empty() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_COMMAND;
        }
        status
    }

    fn raise_interrupt(&self) {
        if self.config & CONFIG_KBD_INTERRUPT != 0 {
            // A lost interrupt is recovered by the guest polling the status port.
            let _ = self.kbd_irq.trigger();
        }
    }

    /// Replaces whatever is waiting with one answer byte.
    fn answer(&mut self, byte: u8) {
        self.reply(&[byte]);
    }

    /// Replaces whatever is waiting with an answer.
    fn reply(&mut self, bytes: &[u8]) {
        self.buffer.clear();
        self.buffer.extend(bytes);
        self.raise_interrupt();
    }

    /// A byte for the keyboard itself, answered as an MF2 keyboard does.
    fn keyboard(&mut self, value: u8) {
        if let Some(command) = self.kbd_pending.take() {
            // The parameter of SET_LEDS, TYPEMATIC or SCAN_SET.
            if command == KBD_SCAN_SET && value == 0 {
                self.reply(&[KBD_ACK, KBD_SCAN_SET_2]);
            } else {
                self.answer(KBD_ACK);
            }
            return;
        }
        match value {
            KBD_SET_LEDS | KBD_TYPEMATIC | KBD_SCAN_SET => {
                self.kbd_pending = Some(value);
                self.answer(KBD_ACK);
            }
            KBD_GET_ID => self.reply(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_RESET => self.reply(&[KBD_ACK, KBD_BAT_OK]),
            KBD_ECHO => self.answer(KBD_ECHO),
            // Enable, disable, defaults, and the rest: acknowledged.
            _ => self.answer(KBD_ACK),
        }
    }

    fn command(&mut self, command: u8) {
        self.last_was_command = true;
        match command {
            CMD_READ_CONFIG => self.answer(self.config),
            CMD_WRITE_CONFIG | CMD_WRITE_OUTPUT_PORT => self.pending_command = Some(command),
            CMD_SELF_TEST => self.answer(SELF_TEST_OK),
            CMD_KBD_TEST => self.answer(0),
            CMD_READ_OUTPUT_PORT => self.answer(self.output_port),
            CMD_RESET_CPU => (self.power)(PowerEvent::Reset),
            // Enabling/disabling ports and the like: nothing to emulate.
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.last_was_command = false;
        match self.pending_command.take() {
            Some(CMD_WRITE_CONFIG) => self.config = value,
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = value;
                // Bit 0 of the output port is the CPU reset line (active low).
                if value & 1 == 0 {
                    (self.power)(PowerEvent::Reset);
                }
            }
            Some(_) => {}
            None => self.keyboard(value),
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let [byte] = data else {
            data.fill(0xff);
            return;
        };
        *byte = match offset {
            STATUS_OFFSET => self.status(),
            DATA_OFFSET => {
                let value = self.buffer.pop_front().unwrap_or(0);
                if !self.buffer.is_empty() {
                    self.raise_interrupt();
                }
                value
            }
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        match offset {
            STATUS_OFFSET => self.command(*value),
            DATA_OFFSET => self.data(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct CountingIrq(AtomicUsize);
    impl Interrupt for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn device() -> (I8042Device, Arc<CountingIrq>, Arc<Mutex<Vec<PowerEvent>>>) {
        let irq = Arc::new(CountingIrq::default());
        let events = Arc::new(Mutex::new(Vec::new()));
        let e = events.clone();
        let dev = I8042Device::new(irq.clone(), Arc::new(move |ev| e.lock().unwrap().push(ev)));
        (dev, irq, events)
    }

    fn read(dev: &mut I8042Device, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_and_output_port_reset() {
        let (mut dev, _, events) = device();
        dev.write(STATUS_OFFSET, &[CMD_RESET_CPU]);
        dev.write(STATUS_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA_OFFSET, &[0xfe]);
        assert_eq!(
            *events.lock().unwrap(),
            vec![PowerEvent::Reset, PowerEvent::Reset]
        );
    }

    #[test]
    fn ctrl_alt_del_is_delivered_in_order_with_interrupts() {
        let (mut dev, irq, _) = device();
        assert_eq!(read(&mut dev, STATUS_OFFSET) & STATUS_OUTPUT_FULL, 0);
        assert!(dev.send_ctrl_alt_del());
        let mut got = Vec::new();
        while read(&mut dev, STATUS_OFFSET) & STATUS_OUTPUT_FULL != 0 {
            got.push(read(&mut dev, DATA_OFFSET));
        }
        assert_eq!(got, CTRL_ALT_DEL);
        // One interrupt for the arrival, one per byte still waiting after a read.
        assert_eq!(irq.0.load(Ordering::SeqCst), 4);
        // A full buffer refuses more input rather than losing bytes.
        for _ in 0..4 {
            assert!(dev.send_ctrl_alt_del());
        }
        assert!(!dev.send_ctrl_alt_del());
    }

    #[test]
    fn config_byte_and_self_test() {
        let (mut dev, _, _) = device();
        dev.write(STATUS_OFFSET, &[CMD_WRITE_CONFIG]);
        dev.write(DATA_OFFSET, &[0x45]);
        dev.write(STATUS_OFFSET, &[CMD_READ_CONFIG]);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x45);
        dev.write(STATUS_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA_OFFSET), SELF_TEST_OK);
        dev.write(DATA_OFFSET, &[KBD_SET_LEDS]); // a keyboard command waiting for its parameter
        let state = dev.state();
        let (mut other, _, _) = device();
        other.restore(&state).unwrap();
        assert_eq!(other.state(), state);
    }

    fn answers(dev: &mut I8042Device) -> Vec<u8> {
        let mut got = Vec::new();
        while read(dev, STATUS_OFFSET) & STATUS_OUTPUT_FULL != 0 {
            got.push(read(dev, DATA_OFFSET));
        }
        got
    }

    /// What Linux's atkbd sends while probing (found by booting Linux: it
    /// logged "Failed to enable keyboard" and "Spurious ACK" when GET_ID and
    /// RESET were only acknowledged), answered as an MF2 keyboard does.
    #[test]
    fn the_keyboard_answers_linux_atkbd_probe_like_an_mf2_keyboard() {
        let (mut dev, _, _) = device();
        let mut exchange = |bytes: &[u8]| {
            let mut got = Vec::new();
            for &b in bytes {
                dev.write(DATA_OFFSET, &[b]);
                got.extend(answers(&mut dev));
            }
            got
        };
        assert_eq!(exchange(&[KBD_RESET]), [KBD_ACK, KBD_BAT_OK]);
        assert_eq!(exchange(&[KBD_GET_ID]), [KBD_ACK, 0xab, 0x83]);
        assert_eq!(exchange(&[KBD_SET_LEDS, 0x00]), [KBD_ACK, KBD_ACK]);
        assert_eq!(exchange(&[KBD_SCAN_SET, 0x00]), [KBD_ACK, KBD_ACK, 2]);
        assert_eq!(exchange(&[KBD_SCAN_SET, 0x02]), [KBD_ACK, KBD_ACK]);
        assert_eq!(exchange(&[KBD_TYPEMATIC, 0x20]), [KBD_ACK, KBD_ACK]);
        assert_eq!(exchange(&[0xf4]), [KBD_ACK], "enable");
        assert_eq!(exchange(&[0xf5]), [KBD_ACK], "disable");
        assert_eq!(exchange(&[KBD_ECHO]), [KBD_ECHO]);
        // A parameter byte that looks like a command is still a parameter.
        assert_eq!(exchange(&[KBD_SET_LEDS, KBD_GET_ID]), [KBD_ACK, KBD_ACK]);
    }

    /// A state saved before the keyboard had pending parameters still loads.
    #[test]
    fn an_older_state_without_the_keyboard_field_restores() {
        let old = r#"{"config":69,"output_port":0,"pending_command":null,"buffer":[250]}"#;
        let state: I8042State = serde_json::from_str(old).unwrap();
        assert_eq!(state.kbd_pending, None);
        let (mut dev, _, _) = device();
        dev.restore(&state).unwrap();
        assert_eq!(answers(&mut dev), [KBD_ACK]);
    }
}
