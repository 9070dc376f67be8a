//! Boots a real Linux guest: Debian 12's stock cloud kernel (bzImage) with a
//! busybox initramfs, both built by resources/linux/build-linux.sh.
//!
//! Linux boot is a product requirement on hosts with VT-x/AMD-V. Where this
//! host's KVM emulates guest ring 0 (a software-assisted nested hypervisor,
//! see the platform notes), a kernel cannot boot in useful time: the test
//! measures that (vmm_tests::probe), prints `SKIP: ...` with the figures, and
//! runs only a bounded reduced check instead.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use vmm_tests::harness::Vmm;
use vmm_tests::probe;
use vmm_tests::require_kvm;

/// Kernel command line for every boot (plus test-specific words).
const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Exit codes of `vmm` (see `vmm --help`).
const EXIT_POWERED_OFF: i32 = 0;
const EXIT_RESET: i32 = 3;

/// The guest's artifacts.
struct LinuxGuest {
    bzimage: PathBuf,
    /// The same kernel as an ELF (with a PVH entry), from the bzImage.
    vmlinux: PathBuf,
    initramfs: PathBuf,
    kernel_version: String,
}

/// The guest, built once per test binary; Err is a reason to skip.
fn linux_guest() -> Result<&'static LinuxGuest, String> {
    static GUEST: OnceLock<Result<LinuxGuest, String>> = OnceLock::new();
    GUEST
        .get_or_init(build_linux_guest)
        .as_ref()
        .map_err(Clone::clone)
}

/// Runs build-linux.sh (quick when its output is up to date).
fn build_linux_guest() -> Result<LinuxGuest, String> {
    let linux_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/linux");
    let out = std::env::var_os("LINUX_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| linux_dir.join("work"));
    let guest = LinuxGuest {
        bzimage: out.join("bzImage"),
        vmlinux: out.join("vmlinux"),
        initramfs: out.join("initramfs.cpio.gz"),
        kernel_version: String::new(),
    };
    let present = guest.bzimage.exists() && guest.vmlinux.exists() && guest.initramfs.exists();

    let started = Instant::now();
    let script = linux_dir.join("build-linux.sh");
    let result = Command::new("bash").arg(&script).arg(&out).output();
    match result {
        Ok(output) if output.status.success() => {
            eprintln!(
                "build-linux.sh ({:.1} s):\n{}",
                started.elapsed().as_secs_f64(),
                String::from_utf8_lossy(&output.stdout).trim_end()
            );
        }
        other => {
            let why = match &other {
                Ok(output) => format!(
                    "{} failed ({}):\n{}",
                    script.display(),
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim_end()
                ),
                Err(e) => format!("cannot run {}: {e}", script.display()),
            };
            if present {
                eprintln!(
                    "WARNING: {why}\nusing the artifacts already in {}",
                    out.display()
                );
            } else if which("apt-get").is_none() || which("dpkg-deb").is_none() {
                return Err(format!(
                    "no Linux guest in {} and this is not a Debian host to build one ({why})",
                    out.display()
                ));
            } else {
                panic!("{why}");
            }
        }
    }
    let kernel_version = std::fs::read_to_string(out.join("kernel-version"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    assert!(
        guest.bzimage.exists() && guest.vmlinux.exists() && guest.initramfs.exists(),
        "build-linux.sh made no artifacts in {}",
        out.display()
    );
    Ok(LinuxGuest {
        kernel_version,
        ..guest
    })
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    })
}

fn boot(kernel: &Path, initramfs: &Path, extra_cmdline: &str) -> Vmm {
    boot_with(kernel, initramfs, extra_cmdline, &[])
}

fn boot_with(kernel: &Path, initramfs: &Path, extra_cmdline: &str, devices: &[&str]) -> Vmm {
    let cmdline = format!("{CMDLINE} {extra_cmdline}");
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initramfs.to_str().unwrap(),
        "--cmdline",
        cmdline.trim(),
        "--memory",
        "size=512M",
        "--cpus",
        "2",
    ];
    args.extend_from_slice(devices);
    eprintln!("vmm {}", args.join(" "));
    Vmm::spawn(&args)
}

/// The probe, measured once per test binary (and printed).
fn ring0() -> &'static probe::Ring0Speed {
    static SPEED: OnceLock<probe::Ring0Speed> = OnceLock::new();
    SPEED.get_or_init(|| {
        let speed =
            probe::ring0_speed().unwrap_or_else(|e| panic!("the ring-0 speed probe failed: {e}"));
        eprintln!("probe: {}", speed.describe());
        speed
    })
}

/// The emulated reduced checks run one at a time: each guest needs a host core
/// to itself to stay within its bound (this host has two).
fn emulated_boot_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn skip_reason(speed: &probe::Ring0Speed) -> String {
    format!(
        "Linux boot needs guest ring 0 at hardware speed; here it runs at {:.2e} \
         instructions/s (threshold {:.0e}/s, /proc/cpuinfo: {}), so the kernel cannot reach \
         its initramfs in useful time",
        speed.instructions_per_second(),
        probe::NATIVE_THRESHOLD_IPS,
        speed.cpu_virt_flag.unwrap_or("no vmx/svm"),
    )
}

/// The full boot: kernel, initramfs /init with the virtio modules, power-off.
/// Boots the guest's `kernel` fully where guest ring 0 runs at hardware
/// speed (None: done), or says SKIP with the measured speed and returns the
/// guest for the test's reduced check. None also when the guest cannot be
/// built (SKIP with why).
fn full_boot_or_skip(kernel: fn(&LinuxGuest) -> &PathBuf) -> Option<&'static LinuxGuest> {
    let speed = ring0();
    let guest = match linux_guest() {
        Ok(guest) => guest,
        Err(reason) => {
            eprintln!("SKIP: {reason}");
            return None;
        }
    };
    if speed.is_native() {
        full_boot(kernel(guest), guest);
        return None;
    }
    eprintln!("SKIP: {}", skip_reason(speed));
    Some(guest)
}

fn full_boot(kernel: &Path, guest: &LinuxGuest) {
    let start = Instant::now();
    let secs = || start.elapsed().as_secs_f64();
    // Every device Debian's stock drivers must bind: a disk, a NIC, a balloon.
    let dir = vmm_tests::harness::TempDir::new("linux-devices");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let disk_arg = format!("path={}", disk.display());
    let tap_arg = format!("tap=vmlx{}", std::process::id() % 100_000);
    let mut vmm = boot_with(
        kernel,
        &guest.initramfs,
        "",
        &[
            "--disk",
            &disk_arg,
            "--net",
            &tap_arg,
            "--balloon",
            "target_mib=0",
        ],
    );
    let line = vmm.wait_for("linux-guest: init started", Duration::from_secs(120));
    eprintln!("{:6.2} s  {line}", secs());
    assert!(
        guest.kernel_version.is_empty()
            || line.contains(&format!("kernel={}", guest.kernel_version)),
        "expected kernel {} in {line:?}",
        guest.kernel_version
    );
    let done = vmm.wait_for("linux-guest: done", Duration::from_secs(60));
    eprintln!("{:6.2} s  {done}", secs());
    let code = vmm.exit_code(Duration::from_secs(30));
    let console = vmm.console();
    for wanted in ["linux-guest: blk", "linux-guest: net"] {
        if let Some(l) = console.iter().find(|l| l.contains(wanted)) {
            eprintln!("          {l}");
        }
    }
    let line = |prefix: &str| {
        console
            .iter()
            .find(|l| l.contains(prefix))
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        line("linux-guest: blk").contains("vda"),
        "virtio_blk bound: {}",
        vmm.report()
    );
    assert!(
        line("linux-guest: net").contains("eth0"),
        "virtio_net bound: {}",
        vmm.report()
    );
    let drivers = line("linux-guest: virtio-drivers");
    for driver in ["virtio_blk", "virtio_net", "virtio_balloon"] {
        assert!(drivers.contains(driver), "{driver} bound: {drivers}");
    }
    assert!(
        line("linux-guest: cpus").ends_with(" 2"),
        "both vCPUs online (ACPI MADT): {}",
        vmm.report()
    );
    let failed: Vec<&String> = console
        .iter()
        .filter(|l| l.contains("linux-guest: insmod"))
        .collect();
    assert!(
        failed.is_empty(),
        "modules failed to load: {failed:?}\n{}",
        vmm.report()
    );
    match code {
        EXIT_POWERED_OFF => eprintln!("{:6.2} s  vmm exited 0: the guest powered off", secs()),
        EXIT_RESET => eprintln!("{:6.2} s  vmm exited 3: the guest reset (reboot=k)", secs()),
        other => panic!(
            "vmm exited {other}, expected 0 (powered off) or 3 (reset)\n{}",
            vmm.report()
        ),
    }
}

/// bzImage through the Linux boot protocol (64-bit entry, boot_params).
#[test]
fn linux_bzimage_boots_to_initramfs_and_powers_off() {
    require_kvm!();
    let Some(guest) = full_boot_or_skip(|g| &g.bzimage) else {
        return;
    };

    // Reduced check: the bzImage's decompressor runs and reads our command
    // line (bzImage loaded where the setup header says, 64-bit entry,
    // boot_params.hdr.cmd_line_ptr, serial port). It prints `KASLR disabled`
    // before decompressing, 3 s in here (17 s on a loaded host); the kernel's own first line
    // would take 80-150 s (the decompression is emulated too), so it is not
    // waited for.
    let _one_at_a_time = emulated_boot_lock();
    let start = Instant::now();
    let mut vmm = boot(
        &guest.bzimage,
        &guest.initramfs,
        "earlyprintk=serial,ttyS0 nokaslr",
    );
    let line = vmm.wait_for(
        "KASLR disabled: 'nokaslr' on cmdline",
        Duration::from_secs(60),
    );
    eprintln!(
        "reduced check passed: the bzImage decompressor printed {line:?} after {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

/// The same kernel as an ELF vmlinux through the PVH entry.
#[test]
fn linux_vmlinux_pvh_boots_to_initramfs_and_powers_off() {
    require_kvm!();
    let Some(guest) = full_boot_or_skip(|g| &g.vmlinux) else {
        return;
    };

    // Reduced check: the kernel proper starts (no decompression on this
    // path), prints its banner with our command line, and takes the memory
    // map we gave it (about 20 s in here, 55 s on a loaded host; it dies later, at the first
    // cmpxchg16b, which this host cannot emulate). The bound allows for a
    // loaded host.
    let _one_at_a_time = emulated_boot_lock();
    let start = Instant::now();
    let mut vmm = boot(&guest.vmlinux, &guest.initramfs, "earlyprintk=serial,ttyS0");
    let banner = vmm.wait_for("Linux version 6.1", Duration::from_secs(100));
    let first = start.elapsed().as_secs_f64();
    let command_line = vmm.wait_for("Command line:", Duration::from_secs(10));
    assert!(
        command_line.contains(CMDLINE),
        "{command_line:?} lacks {CMDLINE:?}"
    );
    vmm.wait_for(
        "printk: bootconsole [earlyser0] enabled",
        Duration::from_secs(10),
    );
    let console = vmm.console();
    let e820: Vec<&String> = console
        .iter()
        .filter(|l| l.contains("BIOS-e820:"))
        .collect();
    let usable: u64 = e820
        .iter()
        .filter(|l| l.ends_with("usable"))
        .filter_map(|l| e820_size(l))
        .sum();
    for line in &e820 {
        eprintln!("          {line}");
    }
    assert!(
        (510 << 20..=512 << 20).contains(&usable),
        "usable e820 memory is {usable:#x} bytes, expected about 512 MiB\n{}",
        vmm.report()
    );
    // ACPI: the kernel finds the RSDP through PVH rsdp_paddr, and its CPUs
    // and IOAPIC in the MADT (about 15 s more in here).
    vmm.wait_for("ACPI: RSDP 0x00000000000E0000", Duration::from_secs(30));
    vmm.wait_for(
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        Duration::from_secs(120),
    );
    vmm.wait_for("smpboot: Allowing 2 CPUs", Duration::from_secs(30));
    eprintln!(
        "reduced check passed: {banner:?} after {first:.1} s; {} MiB usable in {} e820 entries",
        usable >> 20,
        e820.len()
    );
}

/// The size of `BIOS-e820: [mem 0xSTART-0xEND] kind`.
fn e820_size(line: &str) -> Option<u64> {
    let range = line.split("[mem ").nth(1)?.split(']').next()?;
    let (a, b) = range.split_once('-')?;
    let a = u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()?;
    let b = u64::from_str_radix(b.trim_start_matches("0x"), 16).ok()?;
    Some(b + 1 - a)
}
