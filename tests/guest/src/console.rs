//! Serial console output: `print!`/`println!` format into a stack buffer and
//! send each line with one gate call, under a lock so lines from different
//! CPUs never interleave.

use core::fmt::{self, Write};
use core::hint::spin_loop;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::{gate, percpu, time};

const FREE: u32 = u32::MAX;
/// CPU index holding the console, or FREE.
static OWNER: AtomicU32 = AtomicU32::new(FREE);

/// Write raw bytes to the console, serialised with the other CPUs.
pub fn write_bytes(bytes: &[u8]) {
    let me = percpu::cpu_id() as u32;
    while OWNER
        .compare_exchange(FREE, me, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        spin_loop();
    }
    gate::write(bytes);
    OWNER.store(FREE, Ordering::Release);
}

/// Write for the exception/panic reporter: takes the lock unless this CPU
/// already holds it (fault in the middle of a print), and gives up waiting
/// after about 100 ms (a CPU died holding it) rather than hang.
pub fn write_bytes_emergency(bytes: &[u8]) {
    let me = percpu::cpu_id() as u32;
    let deadline = time::deadline_after_ms(100);
    let mut locked = false;
    loop {
        match OWNER.compare_exchange(FREE, me, Ordering::Acquire, Ordering::Relaxed) {
            Ok(_) => {
                locked = true;
                break;
            }
            Err(owner) if owner == me => break,
            Err(_) if time::passed(deadline) => break,
            Err(_) => spin_loop(),
        }
    }
    gate::write(bytes);
    if locked {
        OWNER.store(FREE, Ordering::Release);
    }
}

/// A fixed-size line buffer implementing `fmt::Write`; flushes when full.
pub struct LineBuf {
    buf: [u8; 512],
    len: usize,
    emergency: bool,
}

impl LineBuf {
    pub const fn new() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
            emergency: false,
        }
    }

    pub const fn new_emergency() -> Self {
        Self {
            buf: [0; 512],
            len: 0,
            emergency: true,
        }
    }

    pub fn flush(&mut self) {
        if self.len > 0 {
            if self.emergency {
                write_bytes_emergency(&self.buf[..self.len]);
            } else {
                write_bytes(&self.buf[..self.len]);
            }
            self.len = 0;
        }
    }
}

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    let mut line = LineBuf::new();
    let _ = line.write_fmt(args);
    line.flush();
}

/// Print to the serial console (one gate call per macro invocation).
#[allow(unused_macros)]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::_print(format_args!($($arg)*)) };
}

/// Print a line to the serial console (one gate call per line).
macro_rules! println {
    () => { $crate::console::_print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::_print(format_args!("{}\n", format_args!($($arg)*))) };
}
