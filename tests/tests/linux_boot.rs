//! Boots a real Linux guest: Debian 12's stock cloud kernel (bzImage) with a
//! busybox initramfs, both built by resources/linux/build-linux.sh.
//!
//! Linux boot is a product requirement on hosts with VT-x/AMD-V. Where this
//! host's KVM emulates guest ring 0 (a software-assisted nested hypervisor,
//! see the platform notes), Debian's stock kernel stops at instructions the
//! emulator cannot run: the test measures the speed (vmm_tests::probe) and
//! prints `SKIP: ...` with the figures. Linux's drivers are proven there by
//! tests/tests/linux.rs with the project's test kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
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

/// The full boot: kernel, initramfs /init with the virtio modules, power-off,
/// where guest ring 0 runs at hardware speed. Elsewhere it says SKIP with
/// the measured speed (tests/tests/linux.rs runs Linux there: the project's
/// test kernel, with its workarounds for emulated ring 0), and also when the
/// guest cannot be built (SKIP with why).
fn full_boot_or_skip(kernel: fn(&LinuxGuest) -> &PathBuf) {
    let speed = vmm_tests::linux::ring0();
    if !speed.is_native() {
        eprintln!("SKIP: {}", skip_reason(speed));
        return;
    }
    match linux_guest() {
        Ok(guest) => full_boot(kernel(guest), guest),
        Err(reason) => eprintln!("SKIP: {reason}"),
    }
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
    full_boot_or_skip(|g| &g.bzimage);
}

/// The same kernel as an ELF vmlinux through the PVH entry.
#[test]
fn linux_vmlinux_pvh_boots_to_initramfs_and_powers_off() {
    require_kvm!();
    full_boot_or_skip(|g| &g.vmlinux);
}
