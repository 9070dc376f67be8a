//! i8042 keyboard: Ctrl-Alt-Del detection.
//!
//! The BSP polls the i8042 output buffer (gate READ_KBD) about every 10 ms.
//! Both scancode sets are tracked in parallel, because a VMM may push set 1
//! (translated, what the brief asks: 1D 38 53 / E0 53) or set 2 (what
//! vm-superio's i8042 pushes: 14 11 E0 71, releases prefixed with F0).

#[derive(Default)]
pub struct CtrlAltDel {
    ctrl1: bool,
    alt1: bool,
    ctrl2: bool,
    alt2: bool,
    release2: bool,
}

impl CtrlAltDel {
    /// Feed one byte from the keyboard; true when Ctrl+Alt+Del was pressed.
    pub fn feed(&mut self, b: u8) -> bool {
        let mut hit = false;
        // Scancode set 1: bit 7 = release; E0 prefixes are ignored so that
        // right Ctrl/Alt and the Delete key (E0 53) count too.
        if b != 0xe0 {
            let down = b & 0x80 == 0;
            match b & 0x7f {
                0x1d => self.ctrl1 = down,
                0x38 => self.alt1 = down,
                0x53 => hit |= down && self.ctrl1 && self.alt1,
                _ => {}
            }
        }
        // Scancode set 2: F0 = the next code is a release.
        match b {
            0xe0 => {}
            0xf0 => self.release2 = true,
            _ => {
                let down = !self.release2;
                self.release2 = false;
                match b {
                    0x14 => self.ctrl2 = down,
                    0x11 => self.alt2 = down,
                    0x71 => hit |= down && self.ctrl2 && self.alt2,
                    _ => {}
                }
            }
        }
        hit
    }
}
