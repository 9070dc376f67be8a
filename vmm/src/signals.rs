//! What each signal means to the VMM, and the log file SIGHUP reopens.
//!
//! | signal | effect |
//! |---|---|
//! | SIGTERM, SIGINT | graceful stop (as `vmm.shutdown`); a second one exits at once |
//! | SIGHUP | reopens `--log-file` (for logrotate); logged and ignored without one |
//! | SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, SIGRTMIN+1..SIGRTMAX | logged and ignored |
//! | SIGPIPE, SIGXFSZ | ignored (the write that caused it fails with an error instead) |
//! | SIGRTMIN | the vCPU kick (see `vcpu::kick_signal`): harmless from outside |
//! | SIGSYS | a seccomp violation: the VMM says which thread and syscall, then dies of it |
//! | SIGQUIT | default: the process dumps core (guest RAM is left out of it) |
//! | SIGTSTP, SIGSTOP, SIGCONT | default: job control stops and continues the whole VMM |
//!
//! The handled signals are blocked in every thread (the mask is set before
//! any thread starts and inherited) and taken one by one with `sigwait` on
//! the `signals` thread, so none interrupts a vCPU or a system call.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::exit::ExitStatus;

/// The log file's mode when the VMM creates it: owner writes, group reads.
pub const LOG_FILE_MODE: u32 = 0o640;

/// Opens `path` for appending (created 0640 whatever the umask) and makes
/// it the process's stderr, where every VMM message goes.
pub fn redirect_stderr(path: &Path) -> io::Result<()> {
    let file = open_log(path)?;
    // SAFETY: both fds are valid; dup2 atomically replaces fd 2, so a
    // concurrent write goes to the old or the new file, never nowhere.
    if unsafe { libc::dup2(file.as_raw_fd(), libc::STDERR_FILENO) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_log(path: &Path) -> io::Result<File> {
    let open = |create_new: bool| {
        OpenOptions::new()
            .append(true)
            .create_new(create_new)
            .mode(LOG_FILE_MODE)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(path)
    };
    match open(true) {
        Ok(file) => {
            // The umask may have taken the group's read bit; the cluster
            // agent's group reads the log.
            file.set_permissions(std::fs::Permissions::from_mode(LOG_FILE_MODE))?;
            Ok(file)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open(false),
        Err(e) => Err(e),
    }
}

/// The signals the `signals` thread takes: the stopping ones, SIGHUP, and
/// the stray ones whose default action would kill the guest.
fn handled_signals() -> Vec<libc::c_int> {
    let mut signals = vec![
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGHUP,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
        libc::SIGSTKFLT,
    ];
    // SIGRTMIN itself is the vCPU kick, which has a handler.
    signals.extend(libc::SIGRTMIN() + 1..=libc::SIGRTMAX());
    signals
}

/// A signal's name for log lines.
pub fn name(signal: libc::c_int) -> String {
    let known = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGALRM => "SIGALRM",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGSTKFLT => "SIGSTKFLT",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGSYS => "SIGSYS",
        _ if (libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&signal) => {
            return format!("SIGRTMIN+{}", signal - libc::SIGRTMIN())
        }
        _ => return format!("signal {signal}"),
    };
    known.to_string()
}

/// Blocks the handled signals in this thread (and so in every thread
/// started later: call it before any thread starts) and ignores SIGPIPE
/// and SIGXFSZ.
pub fn block() -> io::Result<()> {
    let set = handled_set();
    // SAFETY: set is valid; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    for signal in [libc::SIGPIPE, libc::SIGXFSZ] {
        // SAFETY: SIG_IGN for a catchable signal; no handler code runs.
        if unsafe { libc::signal(signal, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for signal in handled_signals() {
        // SAFETY: set is valid and the signal numbers are valid.
        unsafe { libc::sigaddset(&mut set, signal) };
    }
    set
}

/// Serves the signals [`block`] blocked on a thread of their own: a stop
/// (SIGTERM, SIGINT) goes to `stop`, which says whether anyone still
/// listens; SIGHUP reopens `log_file`.
pub fn forward(
    stop: impl Fn(libc::c_int) -> bool + Send + 'static,
    log_file: Option<PathBuf>,
) -> io::Result<()> {
    let set = handled_set();
    crate::seccomp::spawn(
        crate::seccomp::ThreadKind::Signals,
        std::thread::Builder::new().name("signals".into()),
        move || serve(set, stop, log_file),
    )?;
    Ok(())
}

fn serve(set: libc::sigset_t, stop: impl Fn(libc::c_int) -> bool, log_file: Option<PathBuf>) {
    let mut asked = false;
    loop {
        let mut signal: libc::c_int = 0;
        // SAFETY: set and signal are valid for the call.
        if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
            continue;
        }
        let name = name(signal);
        match signal {
            libc::SIGTERM | libc::SIGINT => {
                if asked {
                    // A second stop while the first is being handled: the
                    // control loop is stuck or too slow; leave now.
                    log::warn!("{name} again: exiting at once");
                    std::process::exit(ExitStatus::Stopped.code());
                }
                asked = true;
                if !stop(signal) {
                    return;
                }
            }
            libc::SIGHUP => match &log_file {
                Some(path) => match redirect_stderr(path) {
                    Ok(()) => log::info!("{name}: reopened the log file {}", path.display()),
                    Err(e) => log::error!(
                        "{name}: cannot reopen the log file {}: {e}; still writing to the old one",
                        path.display()
                    ),
                },
                None => log::info!("{name} ignored (no --log-file to reopen)"),
            },
            _ => log::info!("{name} ignored"),
        }
    }
}
