//! Linux benchmark: the project's test kernel and busybox initramfs
//! (resources/linux/build-test-kernel.sh) on our VMM, on QEMU 7.2's microvm
//! and on QEMU's pc machine, in one run.
//!
//! `cargo bench -p vmm-tests --bench linux` writes docs/benchmarks/linux.md.
//! Two figures per VMM, one run each (a boot costs minutes where guest ring
//! 0 is emulated):
//! - exec to the initramfs's `/init` (`linux-test: init`);
//! - a whole Linux test script: exec, boot, write 4 MiB to a virtio-blk disk
//!   with fsync, read it back and compare checksums, power off, VMM exit.
//!
//! Ours boots the vmlinux through PVH; microvm the same vmlinux (PVH, its
//! PCIe host and ACPI on, so the same virtio-blk-pci driver runs); pc the
//! bzImage through SeaBIOS and the Linux boot protocol (`-cpu
//! host,-arch-capabilities`: plain `host` aborts on MSR 0x10a here).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_tests::bench::{have_qemu, write_report, ConsoleGuest, Table, QEMU};
use vmm_tests::harness::{vmm_binary, TempDir};
use vmm_tests::linux::{self, TestKernel, CMDLINE};

const MEMORY_MIB: u64 = 256;

#[derive(Clone, Copy)]
enum Vmm {
    Ours,
    Microvm,
    Pc,
}

fn command(vmm: Vmm, kernel: &TestKernel, disk: &Path) -> Command {
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    match vmm {
        Vmm::Ours => {
            let mut cmd = Command::new(vmm_binary());
            cmd.arg("--kernel")
                .arg(&kernel.vmlinux)
                .arg("--initrd")
                .arg(&kernel.initramfs)
                .args(["--cmdline", CMDLINE])
                .args(["--memory", &format!("size={MEMORY_MIB}M")])
                .args(["--disk", &format!("path={}", disk.display())]);
            cmd
        }
        Vmm::Microvm | Vmm::Pc => {
            let (machine, image) = match vmm {
                Vmm::Microvm => (
                    "microvm,acpi=on,pcie=on,isa-serial=on,rtc=on",
                    &kernel.vmlinux,
                ),
                _ => ("pc", &kernel.bzimage),
            };
            let mut cmd = Command::new(QEMU);
            cmd.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
                .args(["-machine", machine])
                .args(["-m", &format!("{MEMORY_MIB}M"), "-smp", "1"])
                .args(["-nodefaults", "-no-user-config", "-nographic"])
                .args(["-serial", "stdio", "-no-reboot"])
                .arg("-kernel")
                .arg(image)
                .arg("-initrd")
                .arg(&kernel.initramfs)
                .args(["-append", CMDLINE])
                .args(["-drive", &drive, "-device", "virtio-blk-pci,drive=d0"]);
            cmd
        }
    }
}

/// Boots, runs the script, powers off: (exec to init, exec to exit).
fn run(vmm: Vmm, kernel: &TestKernel, dir: &TempDir, timeout: Duration) -> (f64, f64) {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let start = Instant::now();
    let mut guest = ConsoleGuest::spawn(command(vmm, kernel, &disk), timeout);
    guest.wait("linux-test: init ");
    let init = start.elapsed().as_secs_f64();
    guest.wait("linux-test: ready");
    let line = guest.run(
        "run b1 linux-test-helper pattern 4 1 > /tmp/x && \
         dd if=/tmp/x of=/dev/vda bs=64k conv=fsync 2>/dev/null && \
         echo 3 > /proc/sys/vm/drop_caches && \
         dd if=/dev/vda bs=64k count=64 2>/dev/null | cmp - /tmp/x && echo same",
        "linux-test: end b1",
    );
    assert!(line.contains("rc=0"), "the disk check failed: {line}");
    guest.wait("linux-test: ready");
    guest.send("run b2 poweroff");
    let end = Instant::now() + timeout;
    loop {
        if let Some(status) = guest.child.try_wait().unwrap() {
            assert!(status.success(), "the VMM exited with {status}");
            break;
        }
        assert!(Instant::now() < end, "no power-off within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (init, start.elapsed().as_secs_f64())
}

fn main() {
    let kernel = match linux::test_kernel() {
        Ok(kernel) => kernel,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let speed = linux::ring0();
    let timeout = linux::deadline(Duration::from_secs(1200));
    let dir = TempDir::new("bench-linux");
    let mut vmms = vec![("ours", Vmm::Ours)];
    if have_qemu() {
        vmms.push(("QEMU 7.2 microvm", Vmm::Microvm));
        vmms.push(("QEMU 7.2 pc (SeaBIOS, bzImage)", Vmm::Pc));
    }
    let results: Vec<(f64, f64)> = vmms
        .iter()
        .map(|&(name, vmm)| {
            let r = run(vmm, kernel, &dir, timeout);
            eprintln!("{name}: init after {:.1} s, whole script {:.1} s", r.0, r.1);
            r
        })
        .collect();
    let mut header = vec!["figure"];
    header.extend(vmms.iter().map(|(name, _)| *name));
    let mut table = Table::new(&header);
    let row = |name: &str, pick: fn(&(f64, f64)) -> f64| {
        let mut cells = vec![name.to_string()];
        cells.extend(results.iter().map(|r| format!("{:.1}", pick(r))));
        cells
    };
    table.row(row("exec to Linux /init (s)", |r| r.0));
    table.row(row(
        "whole script: boot, 4 MiB to virtio-blk with fsync, read back, power off (s)",
        |r| r.1,
    ));
    let note = format!(
        "Kernel {} (test kernel, 1 vCPU, {MEMORY_MIB} MiB), one run each, one after the other. \
         {}. Guest ring 0 is emulated here, so these are mostly the emulated kernel's time; \
         compare within one run.",
        kernel.release,
        speed.describe()
    );
    let rendered = table.render();
    println!("{rendered}");
    write_report("linux", &note, &rendered);
}
