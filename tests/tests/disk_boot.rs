//! Booting from the guest's own disk (`--boot disk`): disk images made as
//! an installer makes them (sfdisk partition tables, `mkfs.ext4 -d` file
//! systems written at the partitions' offsets) with the test guest as the
//! "kernel", booted through the VMM binary; and broken or hostile images
//! refused with a message naming what is wrong.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use vmm_tests::harness::{testguest, TempDir, Vmm};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;
const ROOT_UUID: &str = "0c8b9a54-3c5e-4d57-9a0e-5f2d1b7e4a10";
const BOOT_UUID: &str = "7d1f0e2a-9b3c-4f6e-8a1d-2c3b4a5f6e70";
/// What the test guest's /etc/default/grub sets.
const GRUB_CMDLINE_LINUX: &str = "console=ttyS0 net.ifnames=0";

/// A directory tree that becomes a filesystem.
struct Tree {
    dir: PathBuf,
}

impl Tree {
    fn new(parent: &TempDir, name: &str) -> Tree {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        Tree { dir }
    }

    fn file(&self, path: &str, contents: &[u8]) -> &Tree {
        let path = self.dir.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
        self
    }

    fn kernel(&self, path: &str) -> &Tree {
        self.file(path, &std::fs::read(testguest()).unwrap())
    }

    fn link(&self, path: &str, target: &str) -> &Tree {
        let path = self.dir.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        symlink(target, path).unwrap();
        self
    }

    /// What a Debian root has besides its kernel: /etc with fstab and the
    /// GRUB settings.
    fn debian_root(&self) -> &Tree {
        self.file(
            "/etc/default/grub",
            format!(
                "# If you change this file, run 'update-grub' afterwards\n\
                 GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\n\
                 GRUB_DISTRIBUTOR=`lsb_release -i -s 2> /dev/null || echo Debian`\n\
                 GRUB_CMDLINE_LINUX_DEFAULT=\"quiet\"\n\
                 GRUB_CMDLINE_LINUX=\"{GRUB_CMDLINE_LINUX}\"\n"
            )
            .as_bytes(),
        )
        .file(
            "/etc/fstab",
            format!("UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n").as_bytes(),
        )
        .file("/etc/hostname", b"web1\n");
        std::fs::create_dir_all(self.dir.join("boot")).unwrap();
        self
    }

    /// `mkfs.ext4 -d`: the tree as an ext4 image file of `mib` MiB.
    fn mkfs(&self, uuid: &str, mib: u64) -> PathBuf {
        let image = self.dir.with_extension("img");
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-U", uuid, "-d"])
            .arg(&self.dir)
            .arg(&image)
            .arg(format!("{mib}M"))
            .output()
            .expect("mkfs.ext4 runs (e2fsprogs)");
        assert!(
            out.status.success(),
            "mkfs.ext4: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        image
    }
}

/// A disk image with a `label` ("gpt" or "dos") partition table made by
/// sfdisk and each filesystem image written at its partition's offset.
/// `parts` are (sfdisk type, filesystem image or None, size in MiB).
fn disk(dir: &TempDir, label: &str, parts: &[(&str, Option<&Path>, u64)]) -> PathBuf {
    let path = dir.join(&format!("disk-{label}.img"));
    let total: u64 = parts.iter().map(|p| p.2 + 1).sum::<u64>() + 2;
    File::create(&path).unwrap().set_len(total * MIB).unwrap();
    let mut script = format!("label: {label}\n");
    for (kind, _, mib) in parts {
        script += &format!("size={}MiB, type={kind}\n", mib);
    }
    let mut sfdisk = Command::new("sfdisk")
        .args(["--no-reread", "--no-tell-kernel", "-q"])
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sfdisk runs (fdisk)");
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = sfdisk.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Where sfdisk put them: `sfdisk --dump` lines "DEV1 : start=N, size=M, type=T".
    let dump = Command::new("sfdisk")
        .arg("--dump")
        .arg(&path)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout).to_string();
    let field = |line: &str, key: &str| -> String {
        let value = line.split(&format!("{key}=")).nth(1).unwrap_or("");
        value.split(',').next().unwrap().trim().to_string()
    };
    let starts: Vec<u64> = dump
        .lines()
        .filter(|l| l.contains("start=") && field(l, "type") != "5")
        .map(|l| field(l, "start").parse().unwrap())
        .collect();
    let data_parts: Vec<_> = parts.iter().filter(|p| p.0 != EXTENDED).collect();
    assert_eq!(starts.len(), data_parts.len(), "{dump}");
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    for (part, start) in data_parts.into_iter().zip(starts) {
        if let Some(fs) = part.1 {
            file.seek(SeekFrom::Start(start * 512)).unwrap();
            let bytes = std::fs::read(fs).unwrap();
            assert!(bytes.len() as u64 <= part.2 * MIB);
            file.write_all(&bytes).unwrap();
        }
    }
    file.sync_all().unwrap();
    path
}

const LINUX: &str = "L";
const EXTENDED: &str = "E";

/// Boots `disk` with `--boot disk` and the test guest's `info` command.
fn boot(disk: &Path) -> Vmm {
    Vmm::spawn(&[
        "--boot",
        "disk",
        "--disk",
        &format!("path={}", disk.display()),
        "--memory",
        "size=128M",
        "--cmdline",
        "-- info",
    ])
}

/// Runs `--boot disk` on a disk expected to be refused: returns stderr.
fn refused(disk: &Path) -> String {
    let mut vmm = boot(disk);
    // A bound on the whole attempt: a link loop or a hostile table must
    // not hang the VMM.
    assert_eq!(vmm.exit_code(BOOT), 2, "{}", vmm.report());
    vmm.stderr().join("\n")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The guest's `info` line: its command line and the initrd it was given.
fn info(vmm: &mut Vmm) -> String {
    vmm.wait_for("testguest: info", BOOT)
}

#[test]
fn root_filesystem_links_boot_the_guest_with_its_own_command_line() {
    require_kvm!();
    let dir = TempDir::new("diskboot-links");
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .kernel("/boot/vmlinuz-6.1.0-18-amd64")
        .file("/boot/initrd.img-6.1.0-18-amd64", b"INITRD18 the initramfs")
        .link("/vmlinuz", "boot/vmlinuz-6.1.0-18-amd64")
        .link("/initrd.img", "boot/initrd.img-6.1.0-18-amd64")
        // An older kernel that is not bootable: the links choose.
        .file("/boot/vmlinuz-6.1.0-9-amd64", b"not a kernel")
        .link("/vmlinuz.old", "boot/vmlinuz-6.1.0-9-amd64");
    let fs = root.mkfs(ROOT_UUID, 16);
    let disk = disk(&dir, "gpt", &[(LINUX, Some(&fs), 16)]);
    let mut vmm = boot(&disk);
    let line = info(&mut vmm);
    let expected =
        format!("cmdline=\"root=UUID={ROOT_UUID} ro {GRUB_CMDLINE_LINUX} quiet -- info\"");
    assert!(line.contains(&expected), "{line}\n{}", vmm.report());
    assert!(
        line.contains(&format!("initrd_head={}", hex(b"INITRD18"))),
        "{line}"
    );
    assert!(line.contains("initrd_size=24"), "{line}"); // 22 bytes, padded to 4
    let stderr = vmm.stderr().join("\n");
    assert!(
        stderr.contains("/boot/vmlinuz-6.1.0-18-amd64 (the /vmlinuz link)"),
        "{stderr}"
    );
}

#[test]
fn separate_boot_partition_on_gpt_is_followed_from_the_root_links() {
    require_kvm!();
    let dir = TempDir::new("diskboot-gpt-boot");
    let boot_fs = Tree::new(&dir, "boot");
    boot_fs
        .kernel("/vmlinuz-6.1.0-18-amd64")
        .file("/initrd.img-6.1.0-18-amd64", b"BOOTPART");
    let boot_img = boot_fs.mkfs(BOOT_UUID, 16);
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .file(
            "/etc/fstab",
            format!(
                "UUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n\
                 UUID={BOOT_UUID} /boot ext4 defaults 0 2\n"
            )
            .as_bytes(),
        )
        // As Debian makes them with a separate /boot: in /, into /boot.
        .link("/vmlinuz", "boot/vmlinuz-6.1.0-18-amd64")
        .link("/initrd.img", "/boot/initrd.img-6.1.0-18-amd64");
    let root_img = root.mkfs(ROOT_UUID, 16);
    let disk = disk(
        &dir,
        "gpt",
        &[(LINUX, Some(&boot_img), 16), (LINUX, Some(&root_img), 16)],
    );
    let mut vmm = boot(&disk);
    let line = info(&mut vmm);
    // The root filesystem's UUID, not /boot's.
    assert!(
        line.contains(&format!("root=UUID={ROOT_UUID} ro {GRUB_CMDLINE_LINUX}")),
        "{line}"
    );
    assert!(
        line.contains(&format!("initrd_head={}", hex(b"BOOTPART"))),
        "{line}"
    );
}

#[test]
fn mbr_disk_with_the_root_in_a_logical_partition_boots() {
    require_kvm!();
    let dir = TempDir::new("diskboot-mbr");
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .kernel("/boot/vmlinuz-6.1.0-18-amd64")
        .file("/boot/initrd.img-6.1.0-18-amd64", b"MBRROOT!")
        .link("/vmlinuz", "boot/vmlinuz-6.1.0-18-amd64")
        .link("/initrd.img", "boot/initrd.img-6.1.0-18-amd64");
    let root_img = root.mkfs(ROOT_UUID, 16);
    // A primary swap-like partition, then the root as logical partition 5.
    let disk = disk(
        &dir,
        "dos",
        &[
            ("S", None, 4),
            (EXTENDED, None, 20),
            (LINUX, Some(&root_img), 16),
        ],
    );
    let mut vmm = boot(&disk);
    let line = info(&mut vmm);
    assert!(line.contains(&format!("root=UUID={ROOT_UUID}")), "{line}");
    assert!(
        line.contains(&format!("initrd_head={}", hex(b"MBRROOT!"))),
        "{line}"
    );
}

#[test]
fn a_disk_without_a_kernel_is_refused_naming_what_is_missing() {
    require_kvm!();
    let dir = TempDir::new("diskboot-nokernel");
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .file("/boot/config-6.1.0-18-amd64", b"CONFIG_EXT4_FS=y\n");
    let fs = root.mkfs(ROOT_UUID, 16);
    let disk = disk(&dir, "gpt", &[(LINUX, Some(&fs), 16)]);
    let stderr = refused(&disk);
    let expected = format!(
        "disk boot from disks[0] ({}): no kernel found: /boot/grub/grub.cfg is missing, \
         /vmlinuz is missing and /boot has no vmlinuz-*",
        disk.display()
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn a_corrupt_superblock_is_refused_naming_the_partition() {
    require_kvm!();
    let dir = TempDir::new("diskboot-corrupt");
    let root = Tree::new(&dir, "root");
    root.debian_root().kernel("/vmlinuz");
    let fs = root.mkfs(ROOT_UUID, 16);
    let disk = disk(&dir, "gpt", &[(LINUX, Some(&fs), 16)]);
    let superblock = MIB + 1024;
    // s_inodes_per_group = 0 (the superblock checksum no longer matches either).
    let mut f = OpenOptions::new().write(true).open(&disk).unwrap();
    f.seek(SeekFrom::Start(superblock + 0x28)).unwrap();
    f.write_all(&0u32.to_le_bytes()).unwrap();
    let stderr = refused(&disk);
    assert!(
        stderr.contains(
            "no ext2/3/4 filesystem found (GPT with partitions 1: partition 1: corrupt filesystem:"
        ),
        "{stderr}"
    );
    // A block count larger than the partition is caught before the reader
    // sizes anything from it.
    f.seek(SeekFrom::Start(superblock + 0x4)).unwrap();
    f.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let stderr = refused(&disk);
    assert!(
        stderr.contains("partition 1: ext2/3/4 superblock: 4294967295 blocks"),
        "{stderr}"
    );
}

#[test]
fn a_link_loop_is_refused_without_hanging() {
    require_kvm!();
    let dir = TempDir::new("diskboot-loop");
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .link("/vmlinuz", "/vmlinuz2")
        .link("/vmlinuz2", "vmlinuz");
    let fs = root.mkfs(ROOT_UUID, 16);
    let disk = disk(&dir, "gpt", &[(LINUX, Some(&fs), 16)]);
    let stderr = refused(&disk);
    assert!(
        stderr.contains("no kernel found: /boot/grub/grub.cfg is missing, /vmlinuz: more than 40 links to follow (a link loop?) and"),
        "{stderr}"
    );
}

#[test]
fn links_pointing_out_of_the_image_resolve_inside_it() {
    require_kvm!();
    let dir = TempDir::new("diskboot-escape");
    // On the host, the target paths exist: the test guest and /etc/passwd.
    let host_kernel = testguest().canonicalize().unwrap();
    let up = "../".repeat(12);
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .link("/vmlinuz", &format!("{up}{}", host_kernel.display()))
        .link("/initrd.img", "/etc/passwd")
        .file("/etc/passwd", b"INSIDE!!root:x:0:0::/root:/bin/sh\n");
    let fs = root.mkfs(ROOT_UUID, 16);
    let disk = disk(&dir, "gpt", &[(LINUX, Some(&fs), 16)]);
    // The kernel link names a host file that is not in the image: refused.
    let stderr = refused(&disk);
    let expected = format!("/vmlinuz: {} is missing", host_kernel.display());
    assert!(stderr.contains(&expected), "{stderr}");

    // With the same path inside the image, that one is booted, and the
    // absolute initrd link gives the image's /etc/passwd, not the host's.
    let root = Tree::new(&dir, "root2");
    root.debian_root()
        .link("/vmlinuz", &format!("{up}{}", host_kernel.display()))
        .kernel(host_kernel.to_str().unwrap())
        .link("/initrd.img", "/etc/passwd")
        .file("/etc/passwd", b"INSIDE!!root:x:0:0::/root:/bin/sh\n");
    let fs = root.mkfs(ROOT_UUID, 16);
    let disk = self::disk(&dir, "gpt", &[(LINUX, Some(&fs), 16)]);
    let mut vmm = boot(&disk);
    let line = info(&mut vmm);
    assert!(
        line.contains(&format!("initrd_head={}", hex(b"INSIDE!!"))),
        "{line}"
    );
}

#[test]
fn the_newest_kernel_version_in_boot_is_chosen() {
    require_kvm!();
    let dir = TempDir::new("diskboot-newest");
    let root = Tree::new(&dir, "root");
    root.debian_root();
    // Only the newest by Debian ordering is bootable; 9 > 18 as text.
    for (version, bootable) in [
        ("6.1.0-9", false),
        ("6.1.0-18", true),
        ("6.1.0-10", false),
        ("5.10.0-28", false),
    ] {
        let kernel = format!("/boot/vmlinuz-{version}-amd64");
        if bootable {
            root.kernel(&kernel);
        } else {
            root.file(&kernel, b"not this one");
        }
        root.file(
            &format!("/boot/initrd.img-{version}-amd64"),
            format!("{version:<8}").as_bytes(),
        );
    }
    let fs = root.mkfs(ROOT_UUID, 16);
    let disk = disk(&dir, "gpt", &[(LINUX, Some(&fs), 16)]);
    let mut vmm = boot(&disk);
    let line = info(&mut vmm);
    assert!(
        line.contains(&format!("initrd_head={}", hex(b"6.1.0-18"))),
        "{line}"
    );
    let stderr = vmm.stderr().join("\n");
    assert!(
        stderr.contains("/boot/vmlinuz-6.1.0-18-amd64 (the newest /boot/vmlinuz-*)"),
        "{stderr}"
    );
}

#[test]
fn grub_default_entry_on_a_separate_boot_partition_is_booted() {
    require_kvm!();
    let dir = TempDir::new("diskboot-grub");
    let boot_fs = Tree::new(&dir, "boot");
    // set default="1>1": the second entry of the submenu, an older kernel
    // the admin chose; the links and the newest version point elsewhere.
    let grub_cfg = format!(
        "if [ \"${{next_entry}}\" ] ; then\n   set default=\"${{next_entry}}\"\nelse\n   set default=\"1>1\"\nfi\n\
         function load_video {{\n  insmod all_video\n}}\n\
         menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-{ROOT_UUID}' {{\n\
         \tlinux\t/vmlinuz-6.1.0-18-amd64 root=UUID={ROOT_UUID} ro  quiet\n\
         \tinitrd\t/initrd.img-6.1.0-18-amd64\n}}\n\
         submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-{ROOT_UUID}' {{\n\
         \tmenuentry 'Debian GNU/Linux, with Linux 6.1.0-18-amd64' --class debian {{\n\
         \t\tlinux\t/vmlinuz-6.1.0-18-amd64 root=UUID={ROOT_UUID} ro  quiet\n\
         \t\tinitrd\t/initrd.img-6.1.0-18-amd64\n\t}}\n\
         \tmenuentry 'Debian GNU/Linux, with Linux 6.1.0-9-amd64' --class debian {{\n\
         \t\tlinux\t/vmlinuz-6.1.0-9-amd64 root=UUID={ROOT_UUID} ro  quiet\n\
         \t\tinitrd\t/intel-ucode.img /initrd.img-6.1.0-9-amd64\n\t}}\n}}\n"
    );
    boot_fs
        .file("/grub/grub.cfg", grub_cfg.as_bytes())
        .file("/vmlinuz-6.1.0-18-amd64", b"not the default")
        .file("/initrd.img-6.1.0-18-amd64", b"WRONG")
        .kernel("/vmlinuz-6.1.0-9-amd64")
        .file("/intel-ucode.img", b"UCODE") // 5 bytes, padded to 8
        .file("/initrd.img-6.1.0-9-amd64", b"INITRD9!");
    let boot_img = boot_fs.mkfs(BOOT_UUID, 16);
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .link("/vmlinuz", "boot/vmlinuz-6.1.0-18-amd64")
        .link("/initrd.img", "boot/initrd.img-6.1.0-18-amd64");
    let root_img = root.mkfs(ROOT_UUID, 16);
    let disk = disk(
        &dir,
        "gpt",
        &[(LINUX, Some(&boot_img), 16), (LINUX, Some(&root_img), 16)],
    );
    let mut vmm = boot(&disk);
    let line = info(&mut vmm);
    // The microcode first, then the initramfs, as GRUB loads them.
    assert!(
        line.contains(&format!("initrd_head={}", hex(b"UCODE\0\0\0"))),
        "{line}"
    );
    assert!(line.contains("initrd_size=16"), "{line}");
    assert!(
        line.contains(&format!("root=UUID={ROOT_UUID} ro {GRUB_CMDLINE_LINUX}")),
        "{line}"
    );
    let stderr = vmm.stderr().join("\n");
    assert!(
        stderr.contains("/boot/vmlinuz-6.1.0-9-amd64 (grub.cfg's default entry), initrd /boot/intel-ucode.img + /boot/initrd.img-6.1.0-9-amd64"),
        "{stderr}"
    );
}

/// A kernel update inside the guest (here written with debugfs, as apt
/// would through the guest's own filesystem) takes effect at its next
/// boot: a reboot reads the disk again. The disk is a filesystem without a
/// partition table, as an LV formatted whole.
#[test]
fn a_kernel_update_on_the_disk_takes_effect_at_the_next_reboot() {
    require_kvm!();
    let dir = TempDir::new("diskboot-update");
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .kernel("/boot/vmlinuz-6.1.0-17-amd64")
        .file("/boot/initrd.img-6.1.0-17-amd64", b"INITRD17")
        .link("/vmlinuz", "boot/vmlinuz-6.1.0-17-amd64")
        .link("/initrd.img", "boot/initrd.img-6.1.0-17-amd64");
    let disk = root.mkfs(ROOT_UUID, 16);
    let mut vmm = Vmm::spawn(&[
        "--boot",
        "disk",
        "--disk",
        &format!("path={}", disk.display()),
        "--on-reset",
        "reboot",
        "--cmdline",
        "-- info",
    ]);
    let line = info(&mut vmm);
    assert!(
        line.contains(&format!("initrd_head={}", hex(b"INITRD17"))),
        "{line}"
    );

    // "apt upgrade": the new kernel and initrd, and the links moved.
    let initrd = dir.join("initrd-18");
    std::fs::write(&initrd, b"INITRD18").unwrap();
    let commands = dir.join("debugfs.cmds");
    std::fs::write(
        &commands,
        format!(
            "cd /boot\nwrite {} vmlinuz-6.1.0-18-amd64\nwrite {} initrd.img-6.1.0-18-amd64\n\
             cd /\nrm /vmlinuz\nrm /initrd.img\n\
             symlink /vmlinuz boot/vmlinuz-6.1.0-18-amd64\n\
             symlink /initrd.img boot/initrd.img-6.1.0-18-amd64\n",
            testguest().display(),
            initrd.display()
        ),
    )
    .unwrap();
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&commands)
        .arg(&disk)
        .output()
        .expect("debugfs runs (e2fsprogs)");
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    vmm.send_line("reset");
    let line = info(&mut vmm);
    assert!(
        line.contains(&format!("initrd_head={}", hex(b"INITRD18"))),
        "{line}\n{}",
        vmm.report()
    );
    let stderr = vmm.stderr().join("\n");
    assert!(
        stderr.contains("/boot/vmlinuz-6.1.0-18-amd64 (the /vmlinuz link)"),
        "{stderr}"
    );
}

/// The same through the API: `vm.create` with `payload.boot_disk`, then
/// `vm.boot`; a disk that boots nothing is a 400 naming what is missing.
#[test]
fn the_api_boots_a_disk_named_by_boot_disk_and_refuses_one_without_a_kernel() {
    require_kvm!();
    let dir = TempDir::new("diskboot-api");
    let root = Tree::new(&dir, "root");
    root.debian_root()
        .kernel("/boot/vmlinuz-6.1.0-18-amd64")
        .link("/vmlinuz", "boot/vmlinuz-6.1.0-18-amd64");
    let good = root.mkfs(ROOT_UUID, 16);
    let empty = Tree::new(&dir, "empty");
    empty.debian_root();
    let bad = empty.mkfs(BOOT_UUID, 16);
    let config = |boot_disk: &str| {
        format!(
            r#"{{"payload": {{"boot_disk": "{boot_disk}", "cmdline": "-- info"}},
                 "disks": [{{"path": "{}", "id": "data"}}, {{"path": "{}", "id": "root"}}]}}"#,
            bad.display(),
            good.display()
        )
    };
    let socket = dir.join("api.sock");
    let vmm = Vmm::spawn(&["--api-socket", socket.to_str().unwrap()]);
    vmm.wait_api(BOOT);
    let api = vmm.api();
    api.create_json(config("data").as_bytes()).unwrap();
    match api.boot() {
        Err(api::http::client::ClientError::Api { status, error }) => {
            assert_eq!(status, 400);
            assert!(
                error.message.contains(&format!(
                    "disk boot from disks[0] ({}): no kernel found",
                    bad.display()
                )),
                "{}",
                error.message
            );
        }
        other => panic!("expected a 400, got {other:?}"),
    }
    drop(vmm);

    let mut vmm = Vmm::spawn(&["--api-socket", socket.to_str().unwrap()]);
    vmm.wait_api(BOOT);
    let api = vmm.api();
    api.create_json(config("root").as_bytes()).unwrap();
    api.boot().unwrap();
    let line = info(&mut vmm);
    assert!(line.contains(&format!("root=UUID={ROOT_UUID}")), "{line}");
    assert_eq!(
        api.info().unwrap().config.payload.boot_disk.as_deref(),
        Some("root")
    );
}

#[test]
fn boot_flag_errors_name_the_flag() {
    // No KVM needed: these fail before any VM exists.
    for (args, needle) in [
        (
            vec!["--boot", "cdrom"],
            "--boot: \"cdrom\" is not disk or disk=ID",
        ),
        (vec!["--boot", "disk"], "--boot: disk boot needs a --disk"),
        (
            vec!["--boot", "disk=root", "--disk", "path=/d"],
            "payload.boot_disk: no disk has id \"root\" (disks: disk0)",
        ),
        (
            vec!["--boot", "disk", "--disk", "path=/d", "--kernel", "/k"],
            "payload.boot_disk: cannot be combined with kernel",
        ),
    ] {
        let mut vmm = Vmm::spawn(&args);
        assert_eq!(vmm.exit_code(BOOT), 2, "{args:?}\n{}", vmm.report());
        let stderr = vmm.stderr().join("\n");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
