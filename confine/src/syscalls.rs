//! The system calls each thread kind may make.
//!
//! The lists come from traces of the whole end-to-end suite (`strace -f`
//! per thread, then the suite in `--seccomp=log` mode with the kernel log
//! checked for `type=1326` records), plus the calls of error paths the
//! suite does not reach but a thread's code can (closing fds, logging).
//!
//! To extend a list for a new feature: run the VMM (or the suite, with
//! `VMM_SECCOMP=log` in the environment) in log mode, read the kernel's
//! records (`dmesg | grep 'type=1326'`: `comm=` is the thread name,
//! `syscall=` the number, `ausyscall NUMBER` or
//! `/usr/include/x86_64-linux-gnu/asm/unistd_64.h` its name), and add each
//! call to the kind's list below with a comment saying what needs it. A
//! thread that starts other threads does so through `seccomp::spawn`, so
//! its own list need not cover its children's.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::seccomp::ThreadKind;

/// Rules by system call number (an empty vector allows any arguments).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What a list allows of one system call.
#[derive(Clone, Copy)]
enum Allow {
    /// Any arguments.
    Any,
    /// ioctl with one of these request numbers only.
    Ioctls(&'static [u64]),
    /// mmap/mprotect without PROT_EXEC: nothing becomes executable after
    /// start-up (the dynamic loader is done by then).
    NoExec,
    /// tgkill of threads of this process only (arg 0 == our pid).
    OwnProcess,
    /// prctl(PR_SET_NAME) and prctl(PR_SET_NO_NEW_PRIVS) only.
    ThreadSetup,
}

struct Entry {
    nr: i64,
    #[allow(dead_code)] // Read in tests and when debugging a list.
    name: &'static str,
    allow: Allow,
}

macro_rules! sys {
    ($name:ident) => {
        entry(stringify!($name), Allow::Any)
    };
    ($name:ident, $allow:expr) => {
        entry(stringify!($name), $allow)
    };
}

/// The entry of the system call called `name`, which must be in [`NAMES`]
/// (a unit test builds every list, so a missing name fails there).
fn entry(name: &'static str, allow: Allow) -> Entry {
    let nr = NAMES
        .iter()
        .find(|(_, n)| &n[4..] == name)
        .map(|(nr, _)| *nr)
        .unwrap_or_else(|| panic!("system call {name} is missing from NAMES"));
    Entry { nr, name, allow }
}

/// ioctl request numbers (asm-generic/ioctl.h encoding).
const fn io(kind: u64, nr: u64) -> u64 {
    (kind << 8) | nr
}
const fn iow(kind: u64, nr: u64, size: u64) -> u64 {
    (1 << 30) | (size << 16) | (kind << 8) | nr
}
const fn ior(kind: u64, nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (kind << 8) | nr
}

const KVMIO: u64 = 0xAE;
pub const KVM_RUN: u64 = io(KVMIO, 0x80);
pub const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, 144);
pub const KVM_GET_SREGS: u64 = ior(KVMIO, 0x83, 312);
pub const KVM_CHECK_EXTENSION: u64 = io(KVMIO, 0x03);
pub const KVM_IRQ_LINE: u64 = iow(KVMIO, 0x61, 8);
pub const KVM_SET_GSI_ROUTING: u64 = iow(KVMIO, 0x6a, 8);
pub const KVM_IRQFD: u64 = iow(KVMIO, 0x76, 32);
pub const KVM_IOEVENTFD: u64 = iow(KVMIO, 0x79, 64);
pub const KVM_SIGNAL_MSI: u64 = iow(KVMIO, 0xa5, 32);
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow(KVMIO, 0x46, 32);
pub const KVM_GET_DIRTY_LOG: u64 = iow(KVMIO, 0x42, 16);
pub const KVM_CLEAR_DIRTY_LOG: u64 = ior(KVMIO, 0xc0, 24) | (1 << 30);
pub const KVM_ENABLE_CAP: u64 = iow(KVMIO, 0xa3, 104);
pub const TUNSETOFFLOAD: u64 = iow(b'T' as u64, 208, 4);
pub const TUNSETVNETHDRSZ: u64 = iow(b'T' as u64, 216, 4);
pub const FIONBIO: u64 = 0x5421;
pub const FIOCLEX: u64 = 0x5451;
pub const FIONREAD: u64 = 0x541B;
pub const BLKDISCARD: u64 = io(0x12, 119);
pub const BLKZEROOUT: u64 = io(0x12, 127);

/// What a vCPU thread's exits may lead to: KVM_RUN itself, the registers
/// of a crash report, and the device programming the guest does (MSI-X
/// routes and irqfds, BAR moves with their ioeventfds, tap offloads on
/// feature negotiation).
const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_IRQ_LINE,
    KVM_SET_GSI_ROUTING,
    KVM_IRQFD,
    KVM_IOEVENTFD,
    KVM_SIGNAL_MSI,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
    FIONBIO,
    FIOCLEX,
];

/// The migration source's dirty logging.
const MIGRATION_SEND_IOCTLS: &[u64] = &[
    KVM_CHECK_EXTENSION,
    KVM_ENABLE_CAP,
    KVM_SET_USER_MEMORY_REGION,
    KVM_GET_DIRTY_LOG,
    KVM_CLEAR_DIRTY_LOG,
    FIONBIO,
    FIOCLEX,
    // glibc's DNS resolver (res_send).
    FIONREAD,
];

/// Every thread: the Rust runtime and allocator, stderr, thread exit, the
/// vCPU kick's return and the SIGSYS handler (write, tgkill).
fn common() -> Vec<Entry> {
    vec![
        sys!(futex),
        sys!(mmap, Allow::NoExec),
        sys!(mprotect, Allow::NoExec),
        sys!(munmap),
        sys!(madvise),
        sys!(brk),
        sys!(mremap),
        sys!(sched_getaffinity),
        sys!(sched_yield),
        sys!(sigaltstack),
        sys!(rt_sigprocmask),
        sys!(rt_sigreturn),
        sys!(restart_syscall),
        sys!(gettid),
        sys!(getpid),
        sys!(tgkill, Allow::OwnProcess),
        sys!(write),
        sys!(close),
        sys!(exit),
        sys!(exit_group),
        sys!(nanosleep),
        sys!(clock_nanosleep),
        sys!(clock_gettime),
        sys!(getrandom),
        sys!(rseq),
        sys!(set_robust_list),
    ]
}

/// glibc's setgroups/setresgid/setresuid run in every thread (through a
/// signal) when `--user` changes the process's credentials.
fn setuid() -> Vec<Entry> {
    vec![sys!(setgroups), sys!(setresgid), sys!(setresuid)]
}

fn kind_list(kind: ThreadKind) -> Vec<Entry> {
    match kind {
        // Builds VMs (KVM, memory, devices, kernel loading), opens disks,
        // taps, consoles and sockets, answers vm.info from /proc, starts
        // the console threads itself.
        ThreadKind::Control => vec![
            sys!(ioctl),
            sys!(openat),
            sys!(read),
            sys!(readv),
            sys!(writev),
            sys!(pread64),
            sys!(pwrite64),
            sys!(lseek),
            sys!(newfstatat),
            sys!(fstat),
            sys!(statx),
            sys!(readlink),
            sys!(readlinkat),
            sys!(getdents64),
            sys!(access),
            sys!(faccessat2),
            sys!(ftruncate),
            sys!(fallocate),
            sys!(fdatasync),
            sys!(fsync),
            sys!(fchmod),
            sys!(fchown),
            // Socket and log files (modes, groups, stale sockets).
            sys!(chmod),
            sys!(fchmodat),
            sys!(chown),
            sys!(fchownat),
            sys!(lchown),
            sys!(umask),
            sys!(mkdir),
            sys!(mkdirat),
            sys!(rename),
            sys!(renameat),
            sys!(renameat2),
            sys!(unlink),
            sys!(unlinkat),
            sys!(memfd_create),
            sys!(eventfd2),
            sys!(epoll_create1),
            sys!(epoll_ctl),
            sys!(epoll_wait),
            sys!(epoll_pwait),
            sys!(timerfd_create),
            sys!(timerfd_settime),
            sys!(io_uring_setup),
            sys!(io_uring_register),
            sys!(io_uring_enter),
            sys!(fcntl),
            sys!(dup),
            sys!(dup2),
            sys!(dup3),
            sys!(pipe2),
            sys!(poll),
            sys!(ppoll),
            sys!(socket),
            sys!(socketpair),
            sys!(bind),
            sys!(listen),
            sys!(connect),
            sys!(accept4),
            sys!(setsockopt),
            sys!(getsockopt),
            sys!(getsockname),
            sys!(getpeername),
            sys!(sendto),
            sys!(recvfrom),
            sys!(sendmsg),
            sys!(recvmsg),
            sys!(sendmmsg),
            sys!(recvmmsg),
            sys!(shutdown),
            // The console threads, started here (see Spawner).
            sys!(clone3),
            sys!(prctl, Allow::ThreadSetup),
            sys!(seccomp),
            sys!(rt_sigaction),
            sys!(prlimit64),
            sys!(uname),
            sys!(sysinfo),
            // vm.snapshot: an existing snapshot directory must be ours.
            sys!(geteuid),
            // cpus.weight/max_percent: the VMM's cgroup (a stale one of the
            // same name removed when a VM is built, its own at exit).
            sys!(rmdir),
        ],
        ThreadKind::Vcpu => vec![
            sys!(ioctl, Allow::Ioctls(VCPU_IOCTLS)),
            // Console output (stdout, a file, a pty, a socket client).
            sys!(writev),
            sys!(sendto),
            sys!(fcntl),
            // Device activation on the guest's DRIVER_OK: the worker's
            // eventfds, epoll set, timers and io_uring ring.
            sys!(eventfd2),
            sys!(epoll_create1),
            sys!(epoll_ctl),
            sys!(timerfd_create),
            sys!(timerfd_settime),
            sys!(io_uring_setup),
            sys!(io_uring_register),
            sys!(io_uring_enter),
            sys!(read),
        ],
        ThreadKind::Throttle => vec![],
        ThreadKind::Blk => vec![
            sys!(read),
            sys!(readv),
            sys!(writev),
            sys!(pread64),
            sys!(pwrite64),
            sys!(preadv),
            sys!(pwritev),
            sys!(preadv2),
            sys!(pwritev2),
            sys!(fdatasync),
            sys!(fsync),
            sys!(fallocate),
            sys!(ioctl, Allow::Ioctls(&[BLKDISCARD, BLKZEROOUT])),
            sys!(io_uring_enter),
            sys!(epoll_wait),
            sys!(epoll_pwait),
            sys!(epoll_ctl),
            sys!(timerfd_settime),
        ],
        ThreadKind::Net => vec![
            sys!(read),
            sys!(readv),
            sys!(writev),
            sys!(ioctl, Allow::Ioctls(&[TUNSETOFFLOAD])),
            sys!(epoll_wait),
            sys!(epoll_pwait),
            sys!(epoll_ctl),
            sys!(timerfd_settime),
        ],
        ThreadKind::Balloon => vec![
            sys!(read),
            sys!(fallocate),
            sys!(epoll_wait),
            sys!(epoll_pwait),
            sys!(epoll_ctl),
            sys!(timerfd_settime),
            sys!(timerfd_gettime),
        ],
        // tokio's current-thread runtime on a Unix socket.
        ThreadKind::Api => vec![
            sys!(accept4),
            sys!(read),
            sys!(recvfrom),
            sys!(recvmsg),
            sys!(sendto),
            sys!(sendmsg),
            sys!(writev),
            sys!(shutdown),
            sys!(getsockopt),
            sys!(getsockname),
            sys!(getpeername),
            sys!(epoll_wait),
            sys!(epoll_pwait),
            sys!(epoll_ctl),
            sys!(fcntl),
            sys!(ioctl, Allow::Ioctls(&[FIONBIO, FIOCLEX])),
        ],
        ThreadKind::MigrationSend => vec![
            sys!(ioctl, Allow::Ioctls(MIGRATION_SEND_IOCTLS)),
            sys!(socket),
            sys!(connect),
            sys!(setsockopt),
            sys!(getsockopt),
            sys!(getsockname),
            sys!(getpeername),
            sys!(read),
            sys!(readv),
            sys!(writev),
            sys!(sendto),
            sys!(recvfrom),
            sys!(sendmsg),
            sys!(recvmsg),
            sys!(poll),
            sys!(ppoll),
            sys!(shutdown),
            sys!(fcntl),
            // Reading /proc for status figures and the pages ever touched.
            sys!(openat),
            sys!(pread64),
            sys!(lseek),
            sys!(newfstatat),
            sys!(fstat),
            sys!(statx),
            // Resolving the destination's name (glibc: nsswitch.conf,
            // /etc/hosts, DNS over UDP).
            sys!(uname),
            sys!(bind),
            sys!(sendmmsg),
            sys!(recvmmsg),
            // vm.snapshot: the snapshot thread (this kind) syncs its file.
            sys!(fdatasync),
        ],
        ThreadKind::MigrationReceive => vec![
            sys!(ioctl, Allow::Ioctls(&[FIONBIO, FIOCLEX])),
            sys!(accept4),
            sys!(setsockopt),
            sys!(getsockopt),
            sys!(getsockname),
            sys!(getpeername),
            sys!(read),
            sys!(readv),
            sys!(writev),
            sys!(sendto),
            sys!(recvfrom),
            sys!(sendmsg),
            sys!(recvmsg),
            sys!(poll),
            sys!(ppoll),
            sys!(shutdown),
            sys!(fcntl),
            sys!(unlink),
        ],
        ThreadKind::Console => vec![
            sys!(read),
            // Accepted clients are made non-blocking (std uses FIONBIO).
            sys!(ioctl, Allow::Ioctls(&[FIONBIO])),
            sys!(accept4),
            sys!(recvfrom),
            sys!(sendto),
            sys!(writev),
            sys!(fcntl),
            sys!(poll),
            sys!(ppoll),
        ],
        // sigwait; SIGHUP reopens the log file.
        ThreadKind::Signals => vec![
            sys!(rt_sigtimedwait),
            sys!(openat),
            sys!(fcntl),
            sys!(fchmod),
            sys!(dup2),
            sys!(dup3),
        ],
        // A new thread names itself and installs its own filter before
        // running anything else: it does so under the filter inherited
        // from the thread that started it.
        ThreadKind::Spawner => vec![
            sys!(clone3),
            sys!(clone),
            sys!(prctl, Allow::ThreadSetup),
            sys!(seccomp),
            // cpus.affinity: a vCPU thread pins itself before its own
            // filter, which then forbids changing it (seccomp::spawn_with_setup).
            sys!(sched_setaffinity),
        ],
    }
}

/// The entries of `kind`: its own list, the common one, and for the
/// control loop the console's (it starts the console threads itself), for
/// the spawner every list (its children inherit its filter).
fn entries(kind: ThreadKind, setuid_calls: bool) -> Vec<Entry> {
    let mut all = kind_list(kind);
    match kind {
        ThreadKind::Control => all.extend(kind_list(ThreadKind::Console)),
        ThreadKind::Spawner => {
            for other in ThreadKind::ALL {
                if other != ThreadKind::Spawner {
                    all.extend(kind_list(other));
                }
            }
        }
        _ => {}
    }
    all.extend(common());
    if setuid_calls {
        all.extend(setuid());
    }
    all
}

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value)
}

/// The rules of `kind` (with the setuid calls if `--user` is given).
pub fn rules(kind: ThreadKind, setuid_calls: bool) -> Result<Rules, BackendError> {
    // Per call: None = any arguments; Some(rules) = one of these.
    let mut merged: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for entry in entries(kind, setuid_calls) {
        let rules = match entry.allow {
            Allow::Any => None,
            Allow::Ioctls(requests) => Some(
                requests
                    .iter()
                    .map(|&r| {
                        SeccompRule::new(vec![SeccompCondition::new(
                            1,
                            SeccompCmpArgLen::Dword,
                            SeccompCmpOp::Eq,
                            r,
                        )?])
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Allow::NoExec => Some(vec![SeccompRule::new(vec![condition(
                2,
                SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
                0,
            )?])?]),
            Allow::ThreadSetup => Some(
                [libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS]
                    .into_iter()
                    .map(|option| {
                        SeccompRule::new(vec![condition(0, SeccompCmpOp::Eq, option as u64)?])
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Allow::OwnProcess => Some(vec![SeccompRule::new(vec![condition(
                0,
                SeccompCmpOp::Eq,
                u64::from(std::process::id()),
            )?])?]),
        };
        match (merged.get_mut(&entry.nr), rules) {
            // Any arguments wins over conditions from another list.
            (Some(slot), None) => *slot = None,
            (Some(Some(existing)), Some(more)) => existing.extend(more),
            (Some(None), Some(_)) => {}
            (None, rules) => {
                merged.insert(entry.nr, rules);
            }
        }
    }
    Ok(merged
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect())
}

/// The name of system call `nr`, if a list knows it (for the SIGSYS
/// message; async-signal-safe: a walk over a static table).
pub fn name(nr: i64) -> Option<&'static str> {
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| &name[4..])
}

macro_rules! names {
    ($($name:ident),* $(,)?) => {
        /// The system calls the lists (and the self-test) use, by number.
        static NAMES: &[(i64, &str)] = &[$((libc::$name, stringify!($name))),*];
    };
}

names!(
    SYS_accept4,
    SYS_access,
    SYS_bind,
    SYS_brk,
    SYS_chmod,
    SYS_chown,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_clone,
    SYS_clone3,
    SYS_close,
    SYS_connect,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_wait,
    SYS_eventfd2,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat2,
    SYS_fallocate,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchownat,
    SYS_fchown,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fstat,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_getdents64,
    SYS_getpeername,
    SYS_geteuid,
    SYS_getpid,
    SYS_getrandom,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_io_uring_setup,
    SYS_ioctl,
    SYS_lchown,
    SYS_listen,
    SYS_lseek,
    SYS_madvise,
    SYS_memfd_create,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_mmap,
    SYS_mprotect,
    SYS_mremap,
    SYS_munmap,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_openat,
    SYS_personality,
    SYS_pipe2,
    SYS_poll,
    SYS_prctl,
    SYS_seccomp,
    SYS_ppoll,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_prlimit64,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_read,
    SYS_readlink,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmsg,
    SYS_recvmmsg,
    SYS_sendmmsg,
    SYS_rename,
    SYS_rmdir,
    SYS_renameat,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_rt_sigtimedwait,
    SYS_sched_getaffinity,
    SYS_sched_setaffinity,
    SYS_sched_yield,
    SYS_sendmsg,
    SYS_sendto,
    SYS_set_robust_list,
    SYS_setgroups,
    SYS_setresgid,
    SYS_setresuid,
    SYS_setsockopt,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_socket,
    SYS_socketpair,
    SYS_statx,
    SYS_sysinfo,
    SYS_tgkill,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_umask,
    SYS_uname,
    SYS_unlink,
    SYS_unlinkat,
    SYS_write,
    SYS_writev,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090ae81);
        assert_eq!(KVM_IRQFD, 0x4020ae76);
        assert_eq!(KVM_IOEVENTFD, 0x4040ae79);
        assert_eq!(KVM_SET_GSI_ROUTING, 0x4008ae6a);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018aec0);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010ae42);
        assert_eq!(KVM_ENABLE_CAP, 0x4068aea3);
        assert_eq!(KVM_SET_USER_MEMORY_REGION, 0x4020ae46);
        assert_eq!(TUNSETOFFLOAD, 0x400454d0);
        assert_eq!(BLKDISCARD, 0x1277);
        assert_eq!(BLKZEROOUT, 0x127f);
    }

    #[test]
    fn names_are_found_and_no_list_allows_the_self_test_call() {
        assert_eq!(name(libc::SYS_read), Some("read"));
        assert_eq!(name(libc::SYS_personality), Some("personality"));
        for kind in ThreadKind::ALL {
            for setuid in [false, true] {
                let rules = rules(kind, setuid).unwrap();
                assert!(
                    !rules.contains_key(&crate::seccomp::SELFTEST_SYSCALL),
                    "{kind:?}"
                );
                assert!(rules.contains_key(&libc::SYS_write), "{kind:?}");
            }
        }
    }

    #[test]
    fn any_arguments_win_over_conditions_when_lists_merge() {
        let spawner = rules(ThreadKind::Spawner, false).unwrap();
        // The control loop allows any ioctl: so does the spawner.
        assert!(spawner[&libc::SYS_ioctl].is_empty());
        let vcpu = rules(ThreadKind::Vcpu, false).unwrap();
        assert_eq!(vcpu[&libc::SYS_ioctl].len(), VCPU_IOCTLS.len());
        assert!(!vcpu.contains_key(&libc::SYS_openat));
        // A vCPU thread is pinned before its filter and cannot unpin itself.
        assert!(!vcpu.contains_key(&libc::SYS_sched_setaffinity));
        assert!(spawner.contains_key(&libc::SYS_sched_setaffinity));
    }
}
