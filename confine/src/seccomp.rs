//! seccomp filters per thread kind.
//!
//! Each thread installs the filter of its kind as the first thing it does
//! ([`apply`]); from then on a system call outside its list (see
//! [`crate::syscalls`]) ends the whole VMM (mode [`Mode::Kill`], the
//! default), or is allowed and logged by the kernel ([`Mode::Log`]).
//!
//! Filters are inherited by the threads a thread starts, and stack: a
//! child of a vCPU thread could only make the system calls both lists
//! allow. So threads are not started by the thread that wants them but by
//! the `vmm-spawner` thread ([`spawn`]), which never runs anything else
//! and whose own filter is the union of every list: each thread ends up
//! confined by exactly its own list.
//!
//! Violations (mode kill) raise SIGSYS (`SECCOMP_RET_TRAP`) in the thread
//! that made the call; the handler installed here writes one line with the
//! thread kind and the system call to stderr, with async-signal-safe code
//! only (no allocation, no locks), and lets SIGSYS kill the process (so a
//! launcher sees "killed by SIGSYS" and the process dumps core, without
//! guest RAM). Mode log uses `SECCOMP_RET_LOG`: the kernel writes an audit
//! record (`type=1326 ... comm="vcpu0" ... syscall=N`) to its log (`dmesg`,
//! or the audit log when auditd runs) and the call goes through.
//!
//! io_uring submissions are not system calls and are not filtered by
//! seccomp (a kernel property); the blk workers' io_uring only reads and
//! writes the disk they were given.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::{Builder, JoinHandle};

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

use crate::syscalls::{self, Rules};

/// How strictly the filters hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No filter.
    Off,
    /// Forbidden system calls are allowed and logged by the kernel
    /// (`SECCOMP_RET_LOG`): to find what a new feature needs.
    Log,
    /// A forbidden system call ends the VMM (SIGSYS). The default.
    Kill,
}

impl Mode {
    /// Parses `off`, `log` or `on`/`kill`.
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "off" => Some(Mode::Off),
            "log" => Some(Mode::Log),
            "on" | "kill" => Some(Mode::Kill),
            _ => None,
        }
    }
}

/// The kinds of threads of the VMM, each with its own list of system calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread: the control loop (builds and tears down VMs, opens
    /// disks and taps, answers the API through the loop).
    Control,
    /// A vCPU thread: KVM_RUN and the port/MMIO exits it serves.
    Vcpu,
    /// The auto-converge ticker that kicks vCPUs during a migration.
    Throttle,
    /// A virtio-blk worker.
    Blk,
    /// A virtio-net worker.
    Net,
    /// The virtio-balloon worker.
    Balloon,
    /// The API server (HTTP over a Unix socket).
    Api,
    /// The migration source's sender.
    MigrationSend,
    /// The migration target's receiver.
    MigrationReceive,
    /// The console's input and socket threads.
    Console,
    /// The thread that takes the VMM's signals.
    Signals,
    /// The thread that starts every other thread (see [`spawn`]).
    Spawner,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 12] = [
        ThreadKind::Control,
        ThreadKind::Vcpu,
        ThreadKind::Throttle,
        ThreadKind::Blk,
        ThreadKind::Net,
        ThreadKind::Balloon,
        ThreadKind::Api,
        ThreadKind::MigrationSend,
        ThreadKind::MigrationReceive,
        ThreadKind::Console,
        ThreadKind::Signals,
        ThreadKind::Spawner,
    ];

    /// The kind's name (in messages and `VMM_SECCOMP_SELFTEST`).
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Control => "control",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Throttle => "throttle",
            ThreadKind::Blk => "blk",
            ThreadKind::Net => "net",
            ThreadKind::Balloon => "balloon",
            ThreadKind::Api => "api",
            ThreadKind::MigrationSend => "migration-send",
            ThreadKind::MigrationReceive => "migration-receive",
            ThreadKind::Console => "console",
            ThreadKind::Signals => "signals",
            ThreadKind::Spawner => "spawner",
        }
    }

    pub fn from_name(name: &str) -> Option<ThreadKind> {
        ThreadKind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn index(self) -> usize {
        ThreadKind::ALL
            .iter()
            .position(|&k| k == self)
            .expect("every kind is in ALL")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {kind} threads: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(io::Error),
    #[error("cannot start the thread spawner: {0}")]
    Spawner(io::Error),
    #[error("the seccomp filters are already configured")]
    Configured,
}

/// The environment variable that makes one thread kind issue a forbidden
/// system call once, right after installing its filter: a test hook that
/// proves the filter holds (see [`SELFTEST_SYSCALL`]).
pub const SELFTEST_ENV: &str = "VMM_SECCOMP_SELFTEST";

/// The forbidden call of the self-test: `personality(0xffffffff)` only
/// reads the execution domain, so it is harmless where it is allowed, and
/// no list allows it.
pub const SELFTEST_SYSCALL: i64 = libc::SYS_personality;

type Job = Box<dyn FnOnce() + Send>;

struct Config {
    mode: Mode,
    /// The compiled filter of each kind, by [`ThreadKind::index`].
    filters: Vec<BpfProgram>,
    selftest: Option<ThreadKind>,
    selftest_done: AtomicBool,
}

static CONFIG: OnceLock<Config> = OnceLock::new();
/// Where [`spawn`] sends its jobs, once the spawner thread runs.
static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
/// The process id, for the SIGSYS handler (which makes no other system call).
static PID: AtomicI32 = AtomicI32::new(0);

thread_local! {
    /// This thread's kind (index + 1; 0 = none yet), for the SIGSYS handler.
    static KIND: Cell<usize> = const { Cell::new(0) };
    /// This thread's id, for the SIGSYS handler.
    static TID: Cell<i32> = const { Cell::new(0) };
}

/// Builds every filter, installs the SIGSYS handler (mode kill) and starts
/// the spawner thread. Called once by `main`, before any other thread
/// starts. `setuid` says whether the process will change its user later
/// (glibc then makes every thread call setresuid and friends).
pub fn configure(
    mode: Mode,
    selftest: Option<ThreadKind>,
    setuid: bool,
) -> Result<(), SeccompError> {
    if CONFIG.get().is_some() {
        return Err(SeccompError::Configured);
    }
    PID.store(std::process::id() as i32, Ordering::Relaxed);
    let mut filters = Vec::new();
    if mode != Mode::Off {
        for kind in ThreadKind::ALL {
            filters.push(compile(kind, mode, setuid)?);
        }
    }
    if mode == Mode::Kill {
        install_sigsys_handler().map_err(SeccompError::Handler)?;
    }
    CONFIG
        .set(Config {
            mode,
            filters,
            selftest,
            selftest_done: AtomicBool::new(false),
        })
        .map_err(|_| SeccompError::Configured)?;
    if mode != Mode::Off {
        let (sender, jobs) = mpsc::channel::<Job>();
        Builder::new()
            .name("vmm-spawner".into())
            .spawn(move || {
                apply(ThreadKind::Spawner);
                for job in jobs {
                    job();
                }
            })
            .map_err(SeccompError::Spawner)?;
        let _ = SPAWNER.set(Mutex::new(sender));
    }
    Ok(())
}

/// The configured mode ([`Mode::Off`] before [`configure`]).
pub fn mode() -> Mode {
    CONFIG.get().map(|c| c.mode).unwrap_or(Mode::Off)
}

fn compile(kind: ThreadKind, mode: Mode, setuid: bool) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls::rules(kind, setuid)
        .map_err(build)?
        .into_iter()
        .collect::<Rules>()
        .into_iter()
        .collect();
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| build(seccompiler::BackendError::InvalidTargetArch(String::new())))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(build)?;
    filter.try_into().map_err(build)
}

/// Installs the filter of `kind` on the calling thread, the first thing a
/// thread does. Does nothing before [`configure`] or in mode off. A filter
/// that cannot be installed ends the VMM: it was asked to run confined.
pub fn apply(kind: ThreadKind) {
    let Some(config) = CONFIG.get() else { return };
    if config.mode == Mode::Off {
        return;
    }
    KIND.with(|k| k.set(kind.index() + 1));
    // SAFETY: gettid has no arguments and cannot fail.
    TID.with(|t| t.set(unsafe { libc::gettid() }));
    if let Err(e) = seccompiler::apply_filter(&config.filters[kind.index()]) {
        log::error!(
            "cannot install the seccomp filter of the {} thread: {e}",
            kind.name()
        );
        std::process::exit(1);
    }
    if config.selftest == Some(kind) && !config.selftest_done.swap(true, Ordering::SeqCst) {
        log::warn!(
            "seccomp self-test: the {} thread makes a forbidden system call ({} = personality)",
            kind.name(),
            SELFTEST_SYSCALL
        );
        // SAFETY: personality(0xffffffff) only queries the persona.
        unsafe { libc::syscall(SELFTEST_SYSCALL, 0xffff_ffffu64) };
    }
}

/// Starts a thread of `kind` from `builder`, running `f` under the
/// kind's filter. The thread is started by the spawner thread (see the
/// module's comment), or directly when the filters are off.
pub fn spawn<F, T>(kind: ThreadKind, builder: Builder, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    start(builder, move || {
        apply(kind);
        f()
    })
}

/// Like [`spawn`], but the new thread first runs `setup`, before it
/// installs its filter (under the spawner's, which allows what [`spawn`]'s
/// children do before theirs: see the spawner's list). A failed `setup`
/// ends the thread without running `f` and is returned here. For what a
/// thread's own list must not allow it to change later: a vCPU thread pins
/// itself to its host CPUs this way.
pub fn spawn_with_setup<S, F>(
    kind: ThreadKind,
    builder: Builder,
    setup: S,
    f: F,
) -> io::Result<JoinHandle<()>>
where
    S: FnOnce() -> io::Result<()> + Send + 'static,
    F: FnOnce() + Send + 'static,
{
    let (done, set_up) = mpsc::sync_channel(1);
    let thread = start(builder, move || {
        let result = setup();
        let ok = result.is_ok();
        let _ = done.send(result);
        if ok {
            apply(kind);
            f()
        }
    })?;
    match set_up.recv() {
        Ok(Ok(())) => Ok(thread),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(io::Error::other("the thread ended during its set-up"))
        }
    }
}

/// Starts `body` on a thread from `builder`: by the spawner thread, or
/// directly when the filters are off.
fn start<T, B>(builder: Builder, body: B) -> io::Result<JoinHandle<T>>
where
    B: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let Some(spawner) = SPAWNER.get() else {
        return builder.spawn(body);
    };
    let (reply, started) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply.send(builder.spawn(body));
    });
    let gone = || io::Error::other("the thread spawner has stopped");
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| gone())?;
    started.recv().map_err(|_| gone())?
}

fn install_sigsys_handler() -> io::Result<()> {
    // SAFETY: an all-zero sigaction is valid; the fields are set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handle_sigsys as *const () as usize;
    // SA_RESETHAND: the handler runs once; the re-raised SIGSYS then takes
    // its default action (terminate with a core dump).
    action.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
    // SAFETY: sa_mask is a valid sigset_t inside `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: a valid action for a catchable signal; the handler is
    // async-signal-safe (see handle_sigsys).
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A fixed buffer to format the SIGSYS message without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, text: &[u8]) {
        let n = text.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut value: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The SIGSYS handler: one line to stderr, then SIGSYS again, which (reset
/// by SA_RESETHAND, blocked until this handler returns) kills the process.
/// Async-signal-safe: thread-local cells with const initialisers, a stack
/// buffer, and the `write` and `tgkill` system calls, which every list allows.
extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // The kernel's seccomp siginfo: si_syscall is an int at byte 24 on
    // x86-64 (after si_call_addr), which libc does not expose.
    // SAFETY: `info` is the kernel's siginfo for this SIGSYS, 128 bytes.
    let syscall = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = KIND.with(|k| k.get());
    let tid = TID.with(|t| t.get());
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"vmm: seccomp: the ");
    match kind.checked_sub(1).and_then(|i| ThreadKind::ALL.get(i)) {
        Some(kind) => line.push(kind.name().as_bytes()),
        None => line.push(b"unconfined"),
    }
    line.push(b" thread (tid ");
    line.push_number(tid as u64);
    line.push(b") made system call ");
    line.push_number(syscall as u64);
    if let Some(name) = syscalls::name(i64::from(syscall)) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b", which its filter forbids: the VMM dies of SIGSYS\n");
    // SAFETY: write(2) from a valid stack buffer; tgkill on this process
    // and thread. Both are async-signal-safe.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
        libc::syscall(
            libc::SYS_tgkill,
            PID.load(Ordering::Relaxed),
            tid,
            libc::SIGSYS,
        );
    }
}
