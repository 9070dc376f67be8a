//! Command interpreter and the BSP main loop.
//!
//! Commands come from the kernel command line first, then line by line from
//! COM1. Several commands may be given on one line separated by `;`. The BSP
//! loop interleaves: its own workload slice, serial polling (every 1 ms),
//! i8042 and ACPI GED polling (every 10 ms), periodic workload output, and the next
//! queued command. When it has nothing to do it sleeps at CPL0 until a LAPIC
//! one-shot timer (1 ms) fires.

use core::fmt::Write;
use core::sync::atomic::Ordering;

use crate::console::LineBuf;
use crate::gate::{self, Kbd};
use crate::ged::{self, Ged};
use crate::kbd::CtrlAltDel;
use crate::percpu::{CPUS, MAX_CPUS};
use crate::workload::{
    self, PagesCheck, Walker, JOB_COUNTERS, JOB_FAULT, JOB_HALT, JOB_NONE, JOB_PAGES,
};
use crate::{balloon, blk, fault, irq, lapic, mem, net, pci, time, virtio};

/// What to do on Ctrl-Alt-Del or the ACPI power button (`on_cad=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CadAction {
    Poweroff,
    Reset,
    Ignore,
}

/// Boot options: `key=value` tokens before `--` on the kernel command line.
pub struct Options {
    /// `cpus=N`: use at most N CPUs (and assume APIC IDs 0..N-1 when the
    /// firmware/VMM provides no MP table or MADT).
    pub cpus: Option<usize>,
    /// `tsc_khz=N`: TSC frequency, skipping calibration.
    pub tsc_khz: Option<u64>,
    /// `on_cad=poweroff|reset|ignore` (default poweroff): on Ctrl-Alt-Del
    /// and on the ACPI power button.
    pub on_cad: CadAction,
    /// `ecam=0x...`: PCI ECAM base of bus 0 (default 0xe0000000; QEMU q35:
    /// 0xb0000000).
    pub ecam: Option<u64>,
    /// `net_offload=1`: the virtio-net driver also acks the offloads.
    pub net_offload: bool,
}

/// Split the command line into (options, commands). With a `--` token the
/// options are before it and the commands after it. Without one, the leading
/// tokens containing `=` are options and the commands start at the first
/// token without `=`.
pub fn split_cmdline(cmdline: &str) -> (&str, &str) {
    let mut pos = 0;
    let mut first_cmd = None;
    for tok in cmdline.split(' ') {
        let start = pos;
        pos += tok.len() + 1;
        if tok.is_empty() {
            continue;
        }
        if tok == "--" {
            return (&cmdline[..start], cmdline.get(pos..).unwrap_or(""));
        }
        if first_cmd.is_none() && !tok.contains('=') {
            first_cmd = Some(start);
        }
    }
    match first_cmd {
        Some(s) => (&cmdline[..s], &cmdline[s..]),
        None => (cmdline, ""),
    }
}

impl Options {
    pub fn parse(cmdline: &str) -> Options {
        let mut o = Options {
            cpus: None,
            tsc_khz: None,
            on_cad: CadAction::Poweroff,
            ecam: None,
            net_offload: false,
        };
        let (opts, _) = split_cmdline(cmdline);
        for tok in opts.split_whitespace() {
            let Some((k, v)) = tok.split_once('=') else {
                continue;
            };
            // Unknown options (e.g. Linux ones a VMM adds by default) are ignored.
            match k {
                "cpus" => match parse_u64(v) {
                    Some(n) if n >= 1 => o.cpus = Some(n as usize),
                    _ => println!("testguest: error: bad option {}", tok),
                },
                "tsc_khz" => match parse_u64(v) {
                    Some(n) if n > 0 => o.tsc_khz = Some(n),
                    _ => println!("testguest: error: bad option {}", tok),
                },
                "ecam" => match parse_u64(v) {
                    Some(b) if b % (1 << 20) == 0 && b < 1 << 32 => {
                        o.ecam = Some(b);
                        pci::set_ecam_base(b);
                    }
                    _ => println!(
                        "testguest: error: bad option {} (1 MiB aligned, below 4 GiB)",
                        tok
                    ),
                },
                "net_offload" => match v {
                    "0" | "1" => {
                        o.net_offload = v == "1";
                        net::set_offload(o.net_offload);
                    }
                    _ => println!("testguest: error: bad option {} (0|1)", tok),
                },
                "event_idx" | "indirect" => match v {
                    "0" | "1" => {
                        let feature = if k == "event_idx" {
                            virtio::F_EVENT_IDX
                        } else {
                            virtio::F_INDIRECT_DESC
                        };
                        virtio::set_ring_feature(feature, v == "1");
                    }
                    _ => println!("testguest: error: bad option {} (0|1)", tok),
                },
                "on_cad" => match v {
                    "poweroff" => o.on_cad = CadAction::Poweroff,
                    "reset" => o.on_cad = CadAction::Reset,
                    "ignore" => o.on_cad = CadAction::Ignore,
                    _ => println!(
                        "testguest: error: bad option {} (poweroff|reset|ignore)",
                        tok
                    ),
                },
                _ => {}
            }
        }
        o
    }
}

/// Parse a decimal or 0x-prefixed hexadecimal number.
pub(crate) fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parse hexadecimal with or without 0x.
pub(crate) fn parse_hex(s: &str) -> Option<u64> {
    let h = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u64::from_str_radix(h, 16).ok()
}

/// Pending command text (from the command line and serial lines).
struct Queue {
    buf: [u8; 4096],
    len: usize,
}

impl Queue {
    /// Append commands (`;`/newline separated). False if it does not fit.
    fn push(&mut self, s: &[u8]) -> bool {
        if self.len + s.len() + 1 > self.buf.len() {
            return false;
        }
        self.buf[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
        self.buf[self.len] = b'\n';
        self.len += 1;
        true
    }

    /// Take the next non-empty command into `out`; returns its length.
    fn pop(&mut self, out: &mut [u8; 512]) -> Option<usize> {
        while self.len > 0 {
            let end = self.buf[..self.len]
                .iter()
                .position(|&c| c == b';' || c == b'\n')
                .unwrap_or(self.len);
            let n = end.min(out.len());
            out[..n].copy_from_slice(&self.buf[..n]);
            let rest = (end + 1).min(self.len);
            self.buf.copy_within(rest..self.len, 0);
            self.len -= rest;
            if out[..n].iter().any(|c| !c.is_ascii_whitespace()) {
                return Some(n);
            }
        }
        None
    }
}

const SERIAL_POLL_US: u64 = 1000;
const KBD_POLL_US: u64 = 10_000;
const PAGES_REPORT_MS: u64 = 100;
const IDLE_SLEEP_US: u64 = 1000;

struct Shell {
    opts: Options,
    cmdline: &'static str,
    queue: Queue,
    line: [u8; 256],
    line_len: usize,
    line_overflow: bool,
    cad: CtrlAltDel,
    kbd_present: bool,
    ged_present: bool,
    next_serial: u64,
    next_kbd: u64,
    counters_active: bool,
    counters_period_ms: u64,
    next_counters: u64,
    pages_reported: u64,
    next_pages_report: u64,
    bsp_walker: Option<Walker>,
    sleep_until: Option<u64>,
    /// `memuse`: the used memory the guest moves towards, and whether it
    /// said it is stuck (no free memory) since the target was set.
    memuse_target: Option<u64>,
    memuse_stuck: bool,
}

/// Run the shell on the BSP (never returns).
pub fn run(opts: Options, cmdline: &'static str) -> ! {
    let mut sh = Shell {
        opts,
        cmdline,
        queue: Queue {
            buf: [0; 4096],
            len: 0,
        },
        line: [0; 256],
        line_len: 0,
        line_overflow: false,
        cad: CtrlAltDel::default(),
        kbd_present: true,
        ged_present: true,
        next_serial: time::rdtsc(),
        next_kbd: time::rdtsc(),
        counters_active: false,
        counters_period_ms: 100,
        next_counters: 0,
        pages_reported: 0,
        next_pages_report: 0,
        bsp_walker: None,
        sleep_until: None,
        memuse_target: None,
        memuse_stuck: false,
    };
    let (_, cmds) = split_cmdline(cmdline);
    if !sh.queue.push(cmds.as_bytes()) {
        println!("testguest: error: command line too long");
    }
    let mut cmd = [0u8; 512];
    loop {
        let busy = sh.bsp_slice();
        if time::passed(sh.next_serial) {
            sh.next_serial = time::deadline_after_us(SERIAL_POLL_US);
            sh.poll_serial();
        }
        if (sh.kbd_present || sh.ged_present) && time::passed(sh.next_kbd) {
            sh.next_kbd = time::deadline_after_us(KBD_POLL_US);
            if sh.kbd_present {
                sh.poll_kbd();
            }
            if sh.ged_present {
                sh.poll_ged();
            }
        }
        sh.periodic();
        virtio::poll_background();
        let sleeping = match sh.sleep_until {
            Some(t) if !time::passed(t) => true,
            _ => {
                sh.sleep_until = None;
                false
            }
        };
        let mut ran = false;
        if !sleeping {
            if let Some(n) = sh.queue.pop(&mut cmd) {
                let text = core::str::from_utf8(&cmd[..n]).unwrap_or("");
                sh.execute(text.trim());
                ran = true;
            }
        }
        if !busy && !ran {
            idle();
        }
    }
}

/// Sleep about a millisecond at CPL0 (LAPIC one-shot), or spin if the
/// LAPIC timer is unusable.
fn idle() {
    let seen = irq::count(irq::VEC_TIMER);
    if lapic::oneshot_us(IDLE_SLEEP_US) {
        // Any interrupt ends the sleep; the loop re-checks its deadlines.
        irq::wait_for(irq::VEC_TIMER, seen);
    } else {
        time::delay_us(100);
    }
}

pub(crate) fn error(cmd: &str, msg: core::fmt::Arguments) {
    println!("testguest: error: {}: {}", cmd, msg);
}

/// `key=value` arguments of a command, checked against the accepted keys.
pub(crate) struct Args<'a> {
    cmd: &'a str,
    pairs: [(&'a str, &'a str); 8],
    n: usize,
}

impl<'a> Args<'a> {
    pub(crate) fn parse(cmd: &'a str, rest: &'a str, keys: &[&str]) -> Option<Args<'a>> {
        let mut a = Args {
            cmd,
            pairs: [("", ""); 8],
            n: 0,
        };
        for tok in rest.split_whitespace() {
            match tok.split_once('=') {
                Some((k, v)) if keys.contains(&k) && a.n < a.pairs.len() => {
                    a.pairs[a.n] = (k, v);
                    a.n += 1;
                }
                _ => {
                    error(
                        cmd,
                        format_args!("unknown argument {} (accepted: {})", tok, Keys(keys)),
                    );
                    return None;
                }
            }
        }
        Some(a)
    }

    pub(crate) fn raw(&self, key: &str) -> Option<&'a str> {
        self.pairs[..self.n]
            .iter()
            .rev()
            .find(|p| p.0 == key)
            .map(|p| p.1)
    }

    /// Number argument: Ok(None) if absent, Err(()) (reported) if malformed
    /// or out of `range`.
    pub(crate) fn num(
        &self,
        key: &str,
        range: core::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, ()> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => match parse_u64(v) {
                Some(n) if range.contains(&n) => Ok(Some(n)),
                _ => {
                    error(
                        self.cmd,
                        format_args!(
                            "bad value for {}: {} (expected {}..={})",
                            key,
                            v,
                            range.start(),
                            range.end()
                        ),
                    );
                    Err(())
                }
            },
        }
    }
}

struct Keys<'a>(&'a [&'a str]);

impl core::fmt::Display for Keys<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter) -> core::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, k) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}=", k)?;
        }
        Ok(())
    }
}

const HELP: &str = "echo info counters pages check-pages stop memfill memcheck memuse sleep irqs lspci \
                    gatebench spew poweroff reset triple-fault halt crash ud fault help \
                    blk-info blk-id blk-write blk-read blk-flush blk-discard blk-zeroes \
                    blk-inflight blk-bench blk-hostile blk-reader blk-check \
                    net-info net-send net-recv net-echo net-bench net-announce \
                    balloon-follow balloon-info balloon-report balloon-hostile";

impl Shell {
    /// One slice of the BSP's own job. Returns whether the BSP is busy.
    fn bsp_slice(&mut self) -> bool {
        match workload::job_of(0) {
            JOB_COUNTERS => {
                workload::counters_slice(&CPUS[0]);
                true
            }
            JOB_PAGES => {
                match self.bsp_walker.as_mut() {
                    Some(w) => w.step(workload::PAGES_CHUNK),
                    None => workload::assign(0, JOB_NONE),
                }
                true
            }
            workload::JOB_BLK_READER => {
                blk::reader_step();
                true
            }
            _ => false,
        }
    }

    fn poll_serial(&mut self) {
        let mut buf = [0u8; 64];
        let n = gate::read_serial(&mut buf);
        for &c in &buf[..n] {
            match c {
                b'\r' | b'\n' => {
                    if self.line_overflow {
                        println!(
                            "testguest: error: input line too long (max {})",
                            self.line.len()
                        );
                    } else if !self.queue.push(&self.line[..self.line_len]) {
                        println!("testguest: error: too much pending input, line dropped");
                    }
                    self.line_len = 0;
                    self.line_overflow = false;
                }
                0x08 | 0x7f => self.line_len = self.line_len.saturating_sub(1),
                0x20..=0x7e => {
                    if self.line_len < self.line.len() {
                        self.line[self.line_len] = c;
                        self.line_len += 1;
                    } else {
                        self.line_overflow = true;
                    }
                }
                _ => {}
            }
        }
    }

    fn poll_ged(&mut self) {
        match ged::poll() {
            Ged::Absent => self.ged_present = false,
            Ged::Idle => {}
            Ged::PowerButton => {
                println!("testguest: power-button");
                self.shutdown_request();
            }
        }
    }

    /// Ctrl-Alt-Del or the power button: the `on_cad=` action.
    fn shutdown_request(&mut self) {
        match self.opts.on_cad {
            CadAction::Poweroff => self.execute("poweroff"),
            CadAction::Reset => self.execute("reset"),
            CadAction::Ignore => {}
        }
    }

    fn poll_kbd(&mut self) {
        for _ in 0..16 {
            match gate::read_kbd() {
                Kbd::Absent => {
                    self.kbd_present = false;
                    return;
                }
                Kbd::Empty => return,
                Kbd::Byte { status, data } => {
                    // Bit 5: the byte is from the auxiliary (mouse) port.
                    if status & 0x20 == 0 && self.cad.feed(data) {
                        println!("testguest: ctrl-alt-del");
                        self.shutdown_request();
                    }
                }
            }
        }
    }

    /// Periodic output of the running workloads.
    fn periodic(&mut self) {
        self.memuse_step();
        if self.counters_active && time::passed(self.next_counters) {
            self.next_counters = self
                .next_counters
                .wrapping_add(self.counters_period_ms * time::tsc_khz());
            if time::passed(self.next_counters) {
                // Fell behind (blocking command): skip, don't burst.
                self.next_counters = time::deadline_after_ms(self.counters_period_ms);
            }
            let mut line = LineBuf::new();
            let _ = write!(line, "counters: t_ms={}", time::now_ms());
            for (cpu, c) in CPUS.iter().enumerate().take(workload::cpu_slots()) {
                let _ = write!(line, " cpu{}={}", cpu, c.counter.load(Ordering::Relaxed));
            }
            let _ = writeln!(line);
            line.flush();
        }
        if time::passed(self.next_pages_report) {
            self.next_pages_report = time::deadline_after_ms(PAGES_REPORT_MS);
            let worker = workload::PAGES_CPU.load(Ordering::Relaxed) as usize;
            if workload::job_of(worker) == JOB_PAGES {
                let done = workload::pages_done();
                if done > self.pages_reported {
                    self.pages_reported = done;
                    println!("pages: pass={}", done);
                }
            }
        }
    }

    fn stop_all(&mut self, cmd: &str) -> bool {
        self.counters_active = false;
        self.bsp_walker = None;
        let stuck = workload::stop_all();
        virtio::stop_background();
        for cpu in 0..MAX_CPUS {
            if stuck & (1 << cpu) != 0 {
                error(cmd, format_args!("cpu {} did not stop", cpu));
            }
        }
        stuck == 0
    }

    /// Execute one command line (no `;`).
    fn execute(&mut self, text: &str) {
        let (cmd, rest) = match text.split_once(char::is_whitespace) {
            Some((c, r)) => (c, r.trim()),
            None => (text, ""),
        };
        match cmd {
            "" => {}
            "echo" => {
                let mut line = LineBuf::new();
                for (i, w) in rest.split_whitespace().enumerate() {
                    let _ = write!(line, "{}{}", if i > 0 { " " } else { "" }, w);
                }
                let _ = writeln!(line);
                line.flush();
            }
            "help" => println!("testguest: commands: {}", HELP),
            "info" => {
                if Args::parse(cmd, rest, &[]).is_some() {
                    let (initrd_size, h) = crate::bootinfo::get()
                        .map(|b| (b.initrd_size, b.initrd_head))
                        .unwrap_or_default();
                    println!(
                        "testguest: info cpus={} mem_mib={} tsc_khz={} initrd_size={} \
                         initrd_head={:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}{:02x} cmdline=\"{}\"",
                        crate::percpu::online_count(),
                        mem::total_mib(),
                        time::tsc_khz(),
                        initrd_size,
                        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7],
                        self.cmdline
                    );
                }
            }
            "counters" => self.cmd_counters(cmd, rest),
            "pages" => self.cmd_pages(cmd, rest),
            "check-pages" => self.cmd_check_pages(cmd, rest),
            "stop" => {
                if Args::parse(cmd, rest, &[]).is_some() {
                    self.stop_all(cmd);
                    println!("testguest: stopped");
                }
            }
            "memfill" | "memcheck" => self.cmd_mem(cmd, rest),
            "memuse" => self.cmd_memuse(cmd, rest),
            "sleep" => {
                let Some(a) = Args::parse(cmd, rest, &["ms"]) else {
                    return;
                };
                match a.num("ms", 0..=3_600_000) {
                    Ok(Some(ms)) => self.sleep_until = Some(time::deadline_after_ms(ms)),
                    Ok(None) => error(cmd, format_args!("missing ms=N")),
                    Err(()) => {}
                }
            }
            "irqs" => {
                if Args::parse(cmd, rest, &[]).is_none() {
                    return;
                }
                let mut line = LineBuf::new();
                let _ = write!(line, "irqs:");
                let mut any = false;
                for (v, c) in irq::IRQ_COUNTS.iter().enumerate() {
                    let n = c.load(Ordering::Relaxed);
                    if n > 0 {
                        let _ = write!(line, " vec{}={}", v, n);
                        any = true;
                    }
                }
                let _ = writeln!(line, "{}", if any { "" } else { " none" });
                line.flush();
            }
            "lspci" => {
                if Args::parse(cmd, rest, &[]).is_some() {
                    pci::lspci();
                }
            }
            "spew" => {
                // Console output as fast as the serial port takes it.
                let Some(a) = Args::parse(cmd, rest, &["kib"]) else {
                    return;
                };
                let Ok(kib) = a.num("kib", 1..=1 << 20) else {
                    return;
                };
                let kib = kib.unwrap_or(64);
                let t0 = time::rdtsc();
                // 128-byte lines: a counter and padding.
                for i in 0..kib * 8 {
                    println!(
                        "spew: {:08} ................................................................................................................",
                        i
                    );
                }
                let ms = (time::rdtsc() - t0) / time::tsc_khz().max(1);
                println!("spew: done kib={} ms={}", kib, ms);
            }
            "gatebench" => {
                let Some(a) = Args::parse(cmd, rest, &["n"]) else {
                    return;
                };
                let Ok(n) = a.num("n", 1..=100_000) else {
                    return;
                };
                let n = n.unwrap_or(1000);
                let t0 = time::rdtsc();
                for _ in 0..n {
                    gate::nop();
                }
                let ns = (time::rdtsc() - t0) * 1_000_000 / time::tsc_khz().max(1) / n;
                println!("gatebench: n={} avg_ns={}", n, ns);
            }
            "poweroff" => {
                println!("testguest: poweroff");
                gate::poweroff();
            }
            "reset" => {
                println!("testguest: reset");
                gate::reset();
            }
            "triple-fault" => {
                println!("testguest: triple-fault");
                gate::triple_fault();
            }
            "halt" => {
                println!("testguest: halt");
                for (cpu, c) in CPUS.iter().enumerate().skip(1) {
                    if c.is_alive() {
                        workload::assign(cpu, JOB_HALT);
                    }
                }
                gate::halt_forever();
            }
            "crash" => {
                if Args::parse(cmd, rest, &[]).is_some() {
                    println!("testguest: crash");
                    gate::crash();
                    // CPL0 is not emulated on this host: the instruction ran.
                    println!("testguest: crash status=survived (CPL0 runs natively here)");
                }
            }
            "ud" | "fault" => self.cmd_fault(cmd, rest),
            c if c.starts_with("blk-") => blk::command(c, rest),
            c if c.starts_with("net-") => net::command(c, rest),
            c if c.starts_with("balloon-") => balloon::command(c, rest),
            _ => println!("testguest: error: unknown command {}", cmd),
        }
    }

    /// `ud [cpu=K]` and `fault kind=ud|pf|gp|de|cpl0 [cpu=K]`.
    fn cmd_fault(&mut self, cmd: &str, rest: &str) {
        let keys: &[&str] = if cmd == "ud" {
            &["cpu"]
        } else {
            &["kind", "cpu"]
        };
        let Some(a) = Args::parse(cmd, rest, keys) else {
            return;
        };
        let Ok(cpu) = a.num("cpu", 0..=MAX_CPUS as u64 - 1) else {
            return;
        };
        let kind = match (cmd, a.raw("kind")) {
            ("ud", _) => fault::Kind::Ud,
            (_, Some(k)) => match fault::Kind::parse(k) {
                Some(kind) => kind,
                None => {
                    return error(
                        cmd,
                        format_args!("bad value for kind: {} (ud|pf|gp|de|cpl0)", k),
                    )
                }
            },
            (_, None) => return error(cmd, format_args!("missing kind=ud|pf|gp|de|cpl0")),
        };
        let cpu = cpu.unwrap_or(0) as usize;
        if !CPUS[cpu].is_alive() {
            error(cmd, format_args!("cpu {} is not online", cpu));
        } else if cpu == 0 {
            fault::trigger(kind);
        } else {
            workload::stop_cpu(cpu);
            workload::FAULT_KIND.store(kind as u32, Ordering::Release);
            workload::assign(cpu, JOB_FAULT);
        }
    }

    fn cmd_counters(&mut self, cmd: &str, rest: &str) {
        let Some(a) = Args::parse(cmd, rest, &["period_ms"]) else {
            return;
        };
        let Ok(period) = a.num("period_ms", 1..=3_600_000) else {
            return;
        };
        // Restart: stop the CPUs counting now, zero, start all idle CPUs.
        for cpu in 0..MAX_CPUS {
            if workload::job_of(cpu) == JOB_COUNTERS {
                workload::stop_cpu(cpu);
            }
        }
        workload::reset_counters();
        for (cpu, c) in CPUS.iter().enumerate() {
            if c.is_alive() && workload::job_of(cpu) == JOB_NONE {
                workload::assign(cpu, JOB_COUNTERS);
            }
        }
        self.counters_period_ms = period.unwrap_or(100);
        self.counters_active = true;
        self.next_counters = time::deadline_after_ms(self.counters_period_ms);
    }

    fn cmd_pages(&mut self, cmd: &str, rest: &str) {
        let Some(a) = Args::parse(cmd, rest, &["mib", "cpu"]) else {
            return;
        };
        let Ok(mib) = a.num("mib", 1..=1 << 20) else {
            return;
        };
        let Ok(cpu) = a.num("cpu", 0..=MAX_CPUS as u64 - 1) else {
            return;
        };
        let mib = mib.unwrap_or(64);
        let cpu = cpu.map_or(workload::cpu_slots().saturating_sub(1), |c| c as usize);
        if !CPUS[cpu].is_alive() {
            error(cmd, format_args!("cpu {} is not online", cpu));
            return;
        }
        // One walker at a time; the chosen CPU leaves whatever it ran.
        for c in 0..MAX_CPUS {
            if c == cpu || workload::job_of(c) == JOB_PAGES {
                if c == 0 {
                    self.bsp_walker = None;
                }
                if !workload::stop_cpu(c) {
                    error(cmd, format_args!("cpu {} did not stop", c));
                    return;
                }
            }
        }
        let Some((base, bytes)) = mem::choose(mib, 0) else {
            error(cmd, format_args!("no free RAM"));
            return;
        };
        let pages = bytes / mem::PAGE;
        workload::pages_prepare(base, pages, cpu);
        self.pages_reported = 0;
        println!("pages: start pages={} base={:#x} cpu={}", pages, base, cpu);
        if cpu == 0 {
            self.bsp_walker = Some(Walker::from_region());
        }
        workload::assign(cpu, JOB_PAGES);
    }

    fn cmd_check_pages(&mut self, cmd: &str, rest: &str) {
        if Args::parse(cmd, rest, &[]).is_none() {
            return;
        }
        if !self.stop_all(cmd) {
            return;
        }
        match workload::pages_verify() {
            None => error(cmd, format_args!("no pages region (run pages first)")),
            Some(PagesCheck::Ok { passes, pages }) => {
                println!("pages-ok passes={} pages={}", passes, pages)
            }
            Some(PagesCheck::BadIndex { page, found }) => {
                println!(
                    "pages-bad page={} expected=index:{} found=index:{}",
                    page, page, found
                )
            }
            Some(PagesCheck::BadPass {
                page,
                expected_max,
                expected_min,
                found,
            }) => {
                if expected_max == expected_min {
                    println!(
                        "pages-bad page={} expected=pass:{} found=pass:{}",
                        page, expected_max, found
                    )
                } else {
                    println!(
                        "pages-bad page={} expected=pass:{}|{} found=pass:{}",
                        page, expected_max, expected_min, found
                    )
                }
            }
        }
    }

    /// `memuse [mib=N]`: the guest's own memory use moves towards N MiB.
    fn cmd_memuse(&mut self, cmd: &str, rest: &str) {
        let Some(a) = Args::parse(cmd, rest, &["mib"]) else {
            return;
        };
        let Ok(mib) = a.num("mib", 0..=1 << 20) else {
            return;
        };
        match mib {
            Some(mib) => {
                self.memuse_target = Some(mib * mem::MIB);
                self.memuse_stuck = false;
                self.memuse_step();
            }
            None => println!(
                "memuse: used={} target={} free={}",
                mem::used_bytes() / mem::MIB,
                self.memuse_target.unwrap_or(0) / mem::MIB,
                mem::workload_free_bytes() / mem::MIB
            ),
        }
    }

    /// Moves the used memory towards the `memuse` target: shrinks at once,
    /// grows by at most 4 MiB a pass (it touches each page) into free
    /// memory; prints when it gets there, or once when no memory is free
    /// (the balloon holds it), and goes on when memory is free again.
    fn memuse_step(&mut self) {
        let Some(target) = self.memuse_target else {
            return;
        };
        let used = mem::used_bytes();
        let now = if target < used {
            mem::used_change(-((used - target) as i64))
        } else if target > used {
            mem::used_change((target - used).min(4 * mem::MIB) as i64)
        } else {
            used
        };
        if now == target {
            println!(
                "memuse: used={} target={}",
                now / mem::MIB,
                target / mem::MIB
            );
            self.memuse_target = None;
        } else if now == used && !self.memuse_stuck {
            self.memuse_stuck = true;
            println!(
                "memuse: used={} target={} status=full",
                now / mem::MIB,
                target / mem::MIB
            );
        }
    }

    fn cmd_mem(&mut self, cmd: &str, rest: &str) {
        let Some(a) = Args::parse(cmd, rest, &["pattern", "mib", "off_mib"]) else {
            return;
        };
        let Ok(mib) = a.num("mib", 1..=1 << 20) else {
            return;
        };
        let Ok(off) = a.num("off_mib", 0..=1 << 20) else {
            return;
        };
        let (Some(mib), Some(pat)) = (mib, a.raw("pattern")) else {
            error(
                cmd,
                format_args!("usage: {} pattern=HEX mib=N [off_mib=M]", cmd),
            );
            return;
        };
        let Some(pattern) = parse_hex(pat) else {
            error(
                cmd,
                format_args!(
                    "bad value for pattern: {} (expected up to 16 hex digits)",
                    pat
                ),
            );
            return;
        };
        if (0..MAX_CPUS).any(|c| workload::job_of(c) == JOB_PAGES) {
            error(
                cmd,
                format_args!("the pages workload is running (stop first)"),
            );
            return;
        }
        let off = off.unwrap_or(0);
        match mem::choose(mib, off) {
            Some((base, bytes)) if bytes == mib * mem::MIB => {
                if cmd == "memfill" {
                    mem::fill(base, bytes, pattern);
                    println!(
                        "memfill: done base={:#x} mib={} pattern={:#x}",
                        base, mib, pattern
                    );
                } else {
                    match mem::check(base, bytes, pattern) {
                        None => println!("memcheck-ok base={:#x} mib={}", base, mib),
                        Some((addr, found)) => {
                            println!(
                                "memcheck-bad addr={:#x} expected={:#x} found={:#x}",
                                addr, pattern, found
                            )
                        }
                    }
                }
            }
            _ => error(
                cmd,
                format_args!("not enough free RAM for off_mib={} mib={}", off, mib),
            ),
        }
    }
}
