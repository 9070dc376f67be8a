//! Booting what the guest's own disk would boot, read before its vCPUs run:
//! the partition table, the guest's root filesystem and a separate /boot
//! (ext2/3/4, through the `ext4-view` reader made for untrusted images),
//! the kernel and initrd of GRUB's default entry, Debian's `/vmlinuz` and
//! `/initrd.img` links or the newest `/boot/vmlinuz-*`, and a command line
//! from the guest's own `/etc/default/grub`.
//!
//! The disk is hostile input: reads stay inside the disk and the partition
//! they are for, paths resolve inside the guest's filesystems only (`..` at
//! the top stays there, an absolute link starts at the guest's `/`), links
//! are followed at most 40 times, every file read is capped before it is
//! allocated, and whatever is missing or malformed is named in the error.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

use ext4_view::{Ext4, Ext4Error, Ext4Read, Metadata};

use super::grub;
use super::partition::{self, DiskRead, Partition, PartitionError, PartitionTable};

/// The largest kernel read from a guest disk.
pub const MAX_KERNEL_BYTES: u64 = 256 << 20;
/// The largest initrd (all of an entry's initrds together) read from a guest disk.
pub const MAX_INITRD_BYTES: u64 = 1 << 30;
/// The largest settings file read (grub.cfg, /etc/default/grub, fstab).
const MAX_TEXT_BYTES: u64 = 1 << 20;
/// Links followed while resolving one path (Linux's limit).
const MAX_LINKS: usize = 40;
/// Path components walked while resolving one path, links included.
const MAX_PATH_STEPS: usize = 256;
/// The longest link target read (PATH_MAX).
const MAX_LINK_TARGET: u64 = 4096;
/// Directory entries looked at in /boot or /etc/default/grub.d.
const MAX_DIR_ENTRIES: usize = 4096;
/// Partitions probed for a filesystem.
const MAX_FILESYSTEMS: usize = 64;
/// Block groups of a filesystem accepted (128 TiB with 4 KiB blocks): the
/// reader allocates a descriptor for each up front.
const MAX_BLOCK_GROUPS: u64 = 1 << 20;
/// Initrds of one GRUB entry (microcode and the initramfs, usually).
const MAX_INITRDS: usize = 8;
/// grub.d fragments read.
const MAX_GRUB_FRAGMENTS: usize = 64;
/// The ext2/3/4 superblock: at byte 1024, its magic at 0x38.
const EXT_SUPERBLOCK: u64 = 1024;
const EXT_MAGIC: u16 = 0xef53;
/// Where other root filesystems keep their magic and UUID.
const XFS_MAGIC: &[u8; 4] = b"XFSB";
const XFS_UUID_AT: u64 = 32;
const BTRFS_SUPERBLOCK: u64 = 0x10000;
const BTRFS_MAGIC: &[u8; 8] = b"_BHRfS_M";
const BTRFS_MAGIC_AT: u64 = 0x40;
const BTRFS_FSID_AT: u64 = 0x20;

/// How much may be loaded: the caps above, and the guest's memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub kernel: u64,
    pub initrd: u64,
}

impl Limits {
    pub fn for_memory(bytes: u64) -> Limits {
        Limits {
            kernel: MAX_KERNEL_BYTES.min(bytes),
            initrd: MAX_INITRD_BYTES.min(bytes),
        }
    }
}

/// Which of the guest's boot settings chose the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootSource {
    /// The default entry of /boot/grub/grub.cfg.
    GrubDefault,
    /// Debian's /vmlinuz and /initrd.img links.
    Links,
    /// The newest /boot/vmlinuz-* by Debian version order.
    Newest,
}

impl std::fmt::Display for BootSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootSource::GrubDefault => "grub.cfg's default entry",
            BootSource::Links => "the /vmlinuz link",
            BootSource::Newest => "the newest /boot/vmlinuz-*",
        })
    }
}

/// What the disk boots.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel: Vec<u8>,
    pub initrd: Option<Vec<u8>>,
    /// The guest's own command line: `root=UUID=... ro` and
    /// GRUB_CMDLINE_LINUX, GRUB_CMDLINE_LINUX_DEFAULT.
    pub cmdline: String,
    pub source: BootSource,
    /// The kernel's path as the guest sees it.
    pub kernel_path: String,
    pub initrd_paths: Vec<String>,
}

impl BootFiles {
    /// One line for the log.
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({})", self.kernel_path, self.source);
        if !self.initrd_paths.is_empty() {
            s += &format!(", initrd {}", self.initrd_paths.join(" + "));
        }
        s + &format!(", command line \"{}\"", self.cmdline)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskBootError {
    #[error("cannot read the disk: {0}")]
    Io(std::io::Error),
    #[error("partition table: {0}")]
    Partition(#[from] PartitionError),
    #[error("no ext2/3/4 filesystem found ({0})")]
    NoFilesystem(String),
    #[error("no root filesystem found: {0}")]
    NoRoot(String),
    #[error("no kernel found: {0}")]
    NoKernel(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// /etc/default/grub or a grub.d fragment cannot be read.
    #[error("{0}")]
    Settings(String),
}

impl DiskBootError {
    pub fn class(&self) -> config::ErrorClass {
        match self {
            DiskBootError::Io(e) => config::ErrorClass::of_io(e),
            DiskBootError::Partition(e) => e
                .io_error()
                .map(config::ErrorClass::of_io)
                .unwrap_or(config::ErrorClass::Caller),
            // What the guest's disk holds is the caller's input.
            _ => config::ErrorClass::Caller,
        }
    }
}

fn file_error(path: &str, message: impl Into<String>) -> DiskBootError {
    DiskBootError::File {
        path: path.to_string(),
        message: message.into(),
    }
}

/// The fuzzing entry point: everything [`find_boot_files`] does, on an
/// image in memory.
pub fn find_boot_files_in_image(bytes: &[u8]) -> Result<BootFiles, DiskBootError> {
    let limits = Limits {
        kernel: 64 << 20,
        initrd: 64 << 20,
    };
    find_boot_files(Rc::new(bytes.to_vec()), limits)
}

/// Finds and reads what `disk` boots.
pub fn find_boot_files(disk: Rc<dyn DiskRead>, limits: Limits) -> Result<BootFiles, DiskBootError> {
    let table = partition::read_table(&*disk)?;
    let (filesystems, problems) = open_filesystems(&disk, &table);
    if filesystems.is_empty() {
        return Err(DiskBootError::NoFilesystem(describe_disk(
            &table, &problems,
        )));
    }
    let root = filesystems.iter().find(|fs| is_dir(fs, b"/etc"));
    let boot = choose_boot(&filesystems, root);
    let tree = Tree {
        root,
        boot,
        prefix: "",
    };
    let root_uuid = match root {
        Some(fs) => fs.uuid.clone(),
        None => other_root_uuid(&*disk, &table, &filesystems).ok_or_else(|| {
            let mut why = String::from(
                "no ext2/3/4 filesystem holds /etc, and no single XFS or btrfs filesystem is there",
            );
            if !problems.is_empty() {
                why += &format!(" ({})", problems.join("; "));
            }
            DiskBootError::NoRoot(why)
        })?,
    };
    let choice = choose_kernel(&tree)?;
    let kernel = read_file(&choice.kernel, limits.kernel, "kernel")?;
    let initrd = if choice.initrds.is_empty() {
        None
    } else {
        Some(read_initrds(&choice.initrds, limits.initrd)?)
    };
    let cmdline = guest_cmdline(&tree, &root_uuid)?;
    Ok(BootFiles {
        kernel,
        initrd,
        cmdline,
        source: choice.source,
        kernel_path: choice.kernel.path.clone(),
        initrd_paths: choice.initrds.iter().map(|f| f.path.clone()).collect(),
    })
}

/// An ext2/3/4 filesystem of the disk.
struct Fs {
    ext4: Ext4,
    partition: Partition,
    uuid: String,
    label: String,
}

/// `ext4-view`'s access to one partition: reads outside it fail.
struct PartitionReader {
    disk: Rc<dyn DiskRead>,
    partition: Partition,
}

impl Ext4Read for PartitionReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let inside = start_byte
            .checked_add(dst.len() as u64)
            .is_some_and(|end| end <= self.partition.size);
        if !inside {
            return Err(format!(
                "a read of {} bytes at byte {start_byte} lies past the end of {} ({} bytes)",
                dst.len(),
                self.partition,
                self.partition.size
            )
            .into());
        }
        Ok(self.disk.read_at(self.partition.start + start_byte, dst)?)
    }
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn format_uuid(b: &[u8]) -> String {
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

/// What is wrong with an ext2/3/4 superblock whose geometry does not fit.
#[derive(Debug, thiserror::Error)]
enum SuperblockError {
    #[error("ext2/3/4 superblock: block size 2^{0} is not between 1 KiB and 64 KiB")]
    BlockSize(u64),
    #[error(
        "ext2/3/4 superblock: {blocks} blocks of {block_size} bytes do not fit in the \
         partition's {size} bytes"
    )]
    TooBig {
        blocks: u64,
        block_size: u64,
        size: u64,
    },
    #[error("ext2/3/4 superblock: {per_group} blocks per group make more than {max} block groups")]
    TooManyGroups { per_group: u64, max: u64 },
}

/// Whether `partition` holds an ext2/3/4 superblock whose geometry fits
/// it; Err names what is wrong with one that does not.
fn check_superblock(disk: &dyn DiskRead, partition: &Partition) -> Result<bool, SuperblockError> {
    let mut sb = [0u8; 1024];
    if partition.size < EXT_SUPERBLOCK + sb.len() as u64
        || disk
            .read_at(partition.start + EXT_SUPERBLOCK, &mut sb)
            .is_err()
    {
        return Ok(false);
    }
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != EXT_MAGIC {
        return Ok(false);
    }
    let log_block = read_u32(&sb, 0x18);
    if log_block > 6 {
        return Err(SuperblockError::BlockSize(u64::from(log_block) + 10));
    }
    let block_size = 1024u64 << log_block;
    let is_64bit = read_u32(&sb, 0x60) & 0x80 != 0;
    let mut blocks = u64::from(read_u32(&sb, 0x4));
    if is_64bit {
        blocks |= u64::from(read_u32(&sb, 0x150)) << 32;
    }
    if blocks
        .checked_mul(block_size)
        .is_none_or(|b| b > partition.size)
    {
        return Err(SuperblockError::TooBig {
            blocks,
            block_size,
            size: partition.size,
        });
    }
    let per_group = u64::from(read_u32(&sb, 0x20));
    let groups = blocks
        .saturating_sub(u64::from(read_u32(&sb, 0x14)))
        .checked_div(per_group);
    if groups.is_none_or(|g| g > MAX_BLOCK_GROUPS) {
        return Err(SuperblockError::TooManyGroups {
            per_group,
            max: MAX_BLOCK_GROUPS,
        });
    }
    Ok(true)
}

/// Opens every ext2/3/4 filesystem of the disk; also says what was wrong
/// with those that would not open.
fn open_filesystems(disk: &Rc<dyn DiskRead>, table: &PartitionTable) -> (Vec<Fs>, Vec<String>) {
    let mut filesystems = Vec::new();
    let mut problems = Vec::new();
    for partition in table.partitions.iter().take(MAX_FILESYSTEMS) {
        match check_superblock(&**disk, partition) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => {
                problems.push(format!("{partition}: {e}"));
                continue;
            }
        }
        let reader = PartitionReader {
            disk: disk.clone(),
            partition: *partition,
        };
        match Ext4::load(Box::new(reader)) {
            Ok(ext4) => filesystems.push(Fs {
                uuid: format_uuid(ext4.uuid().as_bytes()),
                label: ext4.label().to_str().unwrap_or_default().to_string(),
                ext4,
                partition: *partition,
            }),
            Err(e) => problems.push(format!("{partition}: {e}")),
        }
    }
    (filesystems, problems)
}

/// "GPT with partitions 1, 2: partition 2: corrupt ..." for an error.
fn describe_disk(table: &PartitionTable, problems: &[String]) -> String {
    let numbers: Vec<String> = table
        .partitions
        .iter()
        .map(|p| p.number.to_string())
        .collect();
    let mut s = match table.kind {
        partition::TableKind::None => "no partition table, and the whole disk is not one".into(),
        kind if numbers.is_empty() => format!("{kind:?} with no partitions"),
        kind => format!("{kind:?} with partitions {}", numbers.join(", ")),
    };
    s = s.replace("Gpt", "GPT").replace("Mbr", "MBR");
    if !problems.is_empty() {
        s += &format!(": {}", problems.join("; "));
    }
    s
}

fn lstat(fs: &Fs, path: &[u8]) -> Result<Metadata, Ext4Error> {
    let path = ext4_view::Path::try_from(path).map_err(|_| Ext4Error::NotFound)?;
    fs.ext4.symlink_metadata(path)
}

fn is_dir(fs: &Fs, path: &[u8]) -> bool {
    lstat(fs, path).is_ok_and(|m| m.is_dir())
}

/// The separate /boot filesystem: the one root's /etc/fstab mounts there
/// (by UUID or LABEL); else, unless root's own /boot holds a kernel or
/// grub.cfg, one that looks like a /boot (vmlinuz-* or grub/grub.cfg at
/// its top). None when /boot is part of the root.
fn choose_boot<'a>(filesystems: &'a [Fs], root: Option<&'a Fs>) -> Option<&'a Fs> {
    let others = || {
        filesystems
            .iter()
            .filter(move |fs| root.is_none_or(|r| r.partition != fs.partition))
    };
    if let Some(root) = root {
        if let Some(spec) = fstab_boot_spec(root) {
            let found = if let Some(uuid) = spec.strip_prefix("UUID=") {
                let uuid = uuid.trim_matches('"').to_ascii_lowercase();
                others().find(|fs| fs.uuid == uuid)
            } else if let Some(label) = spec.strip_prefix("LABEL=") {
                let label = label.trim_matches('"');
                others().find(|fs| fs.label == label)
            } else {
                None
            };
            if found.is_some() {
                return found;
            }
        }
        if looks_like_boot(root, "/boot") {
            return None;
        }
    }
    others().find(|fs| looks_like_boot(fs, "/"))
}

/// What root's /etc/fstab mounts on /boot (`UUID=...`, `LABEL=...`, a device).
fn fstab_boot_spec(root: &Fs) -> Option<String> {
    let tree = Tree {
        root: Some(root),
        boot: None,
        prefix: "",
    };
    let fstab = tree.read_text("/etc/fstab").ok()??;
    fstab.lines().find_map(|line| {
        let w: Vec<&str> = line.split_whitespace().collect();
        (w.len() >= 2 && !w[0].starts_with('#') && w[1].trim_end_matches('/') == "/boot")
            .then(|| w[0].to_string())
    })
}

/// Whether directory `dir` of `fs` holds grub/grub.cfg or a vmlinuz-*.
/// (Through [`Tree`]: ext4-view would follow links in the middle of a path
/// itself, sizing a link's target from the disk.)
fn looks_like_boot(fs: &Fs, dir: &str) -> bool {
    let tree = Tree {
        root: Some(fs),
        boot: None,
        prefix: "",
    };
    let base = dir.trim_end_matches('/');
    tree.resolve(&format!("{base}/grub/grub.cfg")).is_ok()
        || tree
            .list(dir)
            .is_ok_and(|names| names.iter().any(|n| n.starts_with("vmlinuz-")))
}

/// The UUID of an XFS or btrfs root (the kernel may still be on an ext
/// /boot): the one such filesystem on the disk.
fn other_root_uuid(disk: &dyn DiskRead, table: &PartitionTable, ext: &[Fs]) -> Option<String> {
    let mut found = Vec::new();
    for p in table.partitions.iter().take(MAX_FILESYSTEMS) {
        if ext.iter().any(|fs| fs.partition == *p) {
            continue;
        }
        let mut head = [0u8; 48];
        if disk.read_at(p.start, &mut head).is_ok() && &head[..4] == XFS_MAGIC {
            let at = XFS_UUID_AT as usize;
            found.push(format_uuid(&head[at..at + 16]));
            continue;
        }
        let mut sb = [0u8; 0x48];
        if p.size >= BTRFS_SUPERBLOCK + sb.len() as u64
            && disk.read_at(p.start + BTRFS_SUPERBLOCK, &mut sb).is_ok()
            && &sb[BTRFS_MAGIC_AT as usize..][..8] == BTRFS_MAGIC
        {
            let at = BTRFS_FSID_AT as usize;
            found.push(format_uuid(&sb[at..at + 16]));
        }
    }
    (found.len() == 1).then(|| found.remove(0))
}

/// The guest's file tree as it is mounted: the root filesystem at `/` and
/// a separate /boot filesystem at `/boot`. Paths shown get `prefix` (for a
/// tree of the /boot filesystem alone, as GRUB sees it: "/boot").
struct Tree<'a> {
    root: Option<&'a Fs>,
    boot: Option<&'a Fs>,
    prefix: &'static str,
}

/// A resolved path: no links left in it.
struct Found<'a> {
    fs: &'a Fs,
    /// The path inside `fs`.
    inner: Vec<u8>,
    /// The path as the guest sees it.
    path: String,
    meta: Metadata,
}

/// Why a path does not resolve.
enum Lookup {
    Missing(String),
    NotDir(String),
    Loop(String),
    TooLong(String),
    Unreadable(String, String),
}

impl std::fmt::Display for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lookup::Missing(p) => write!(f, "{p} is missing"),
            Lookup::NotDir(p) => write!(f, "{p} is not a directory"),
            Lookup::Loop(p) => write!(
                f,
                "{p}: more than {MAX_LINKS} links to follow (a link loop?)"
            ),
            Lookup::TooLong(p) => write!(f, "{p}: more than {MAX_PATH_STEPS} path components"),
            Lookup::Unreadable(p, why) => write!(f, "{p}: {why}"),
        }
    }
}

impl Lookup {
    /// The path the lookup stopped at.
    fn path(&self) -> &str {
        match self {
            Lookup::Missing(p)
            | Lookup::NotDir(p)
            | Lookup::Loop(p)
            | Lookup::TooLong(p)
            | Lookup::Unreadable(p, _) => p,
        }
    }
}

/// What a lookup of `path` found wrong, said from `path`.
fn note(path: &str, lookup: &Lookup) -> String {
    if lookup.path() == path {
        lookup.to_string()
    } else {
        format!("{path}: {lookup}")
    }
}

fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

impl<'a> Tree<'a> {
    fn shown(&self, stack: &[Vec<u8>]) -> String {
        let mut s = self.prefix.to_string();
        for c in stack {
            s.push('/');
            s.push_str(&String::from_utf8_lossy(c));
        }
        if s.is_empty() {
            s.push('/');
        }
        s
    }

    /// The filesystem holding `stack` and the path inside it.
    fn locate(&self, stack: &[Vec<u8>]) -> Result<(&'a Fs, Vec<u8>), Lookup> {
        let (fs, rest) = match (self.boot, stack.first()) {
            (Some(boot), Some(first)) if first == b"boot" => (boot, &stack[1..]),
            _ => match self.root {
                Some(root) => (root, stack),
                None => {
                    return Err(Lookup::Unreadable(
                        self.shown(stack),
                        "the root filesystem is not ext2/3/4".into(),
                    ))
                }
            },
        };
        let mut inner = Vec::new();
        for c in rest {
            inner.push(b'/');
            inner.extend_from_slice(c);
        }
        if inner.is_empty() {
            inner.push(b'/');
        }
        Ok((fs, inner))
    }

    fn lstat(&self, stack: &[Vec<u8>]) -> Result<(&'a Fs, Vec<u8>, Metadata), Lookup> {
        let (fs, inner) = self.locate(stack)?;
        match lstat(fs, &inner) {
            Ok(meta) => Ok((fs, inner, meta)),
            Err(Ext4Error::NotFound) => Err(Lookup::Missing(self.shown(stack))),
            Err(Ext4Error::NotADirectory) => Err(Lookup::NotDir(self.shown(stack))),
            Err(e) => Err(Lookup::Unreadable(self.shown(stack), e.to_string())),
        }
    }

    /// Resolves `path` (absolute, or taken as absolute) component by
    /// component, following links inside the tree only.
    fn resolve(&self, path: &str) -> Result<Found<'a>, Lookup> {
        let mut pending: VecDeque<Vec<u8>> =
            components(path.as_bytes()).map(<[u8]>::to_vec).collect();
        let mut stack: Vec<Vec<u8>> = Vec::new();
        let (mut links, mut steps) = (0, 0);
        while let Some(c) = pending.pop_front() {
            steps += 1;
            if steps > MAX_PATH_STEPS {
                return Err(Lookup::TooLong(path.to_string()));
            }
            match c.as_slice() {
                b"." => continue,
                b".." => {
                    // At the top, `..` stays there: nothing lies outside.
                    stack.pop();
                    continue;
                }
                _ => stack.push(c),
            }
            let (fs, inner, meta) = match self.lstat(&stack) {
                // Name the whole path that is missing, not just its first
                // missing directory.
                Err(Lookup::Missing(_)) => {
                    stack.extend(pending);
                    return Err(Lookup::Missing(self.shown(&stack)));
                }
                other => other?,
            };
            if meta.is_symlink() {
                links += 1;
                if links > MAX_LINKS {
                    return Err(Lookup::Loop(path.to_string()));
                }
                let shown = self.shown(&stack);
                if meta.len() > MAX_LINK_TARGET {
                    return Err(Lookup::Unreadable(shown, "link target too long".into()));
                }
                let target = ext4_view::Path::try_from(inner.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|p| fs.ext4.read_link(p).map_err(|e| e.to_string()))
                    .map_err(|e| Lookup::Unreadable(shown, e))?;
                let target = target.as_ref().to_vec();
                stack.pop();
                if target.starts_with(b"/") {
                    stack.clear();
                }
                for c in components(&target).rev() {
                    pending.push_front(c.to_vec());
                }
            } else if !pending.is_empty() && !meta.is_dir() {
                return Err(Lookup::NotDir(self.shown(&stack)));
            }
        }
        let (fs, inner, meta) = self.lstat(&stack)?;
        Ok(Found {
            fs,
            inner,
            path: self.shown(&stack),
            meta,
        })
    }

    /// A settings file: None if it is missing, Err if it is there but
    /// cannot be read.
    fn read_text(&self, path: &str) -> Result<Option<String>, Miss> {
        let found = match self.resolve(path) {
            Ok(found) => found,
            Err(Lookup::Missing(_)) => return Ok(None),
            Err(e) => return Err(Miss::Path(note(path, &e))),
        };
        let bytes = read_file(&found, MAX_TEXT_BYTES, "settings file")?;
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// The names in directory `path` (at most MAX_DIR_ENTRIES looked at).
    fn list(&self, path: &str) -> Result<Vec<String>, Lookup> {
        let dir = self.resolve(path)?;
        if !dir.meta.is_dir() {
            return Err(Lookup::NotDir(dir.path));
        }
        let entries = ext4_view::Path::try_from(dir.inner.as_slice())
            .map_err(|e| e.to_string())
            .and_then(|p| dir.fs.ext4.read_dir(p).map_err(|e| e.to_string()))
            .map_err(|e| Lookup::Unreadable(dir.path.clone(), e))?;
        let mut names = Vec::new();
        for entry in entries.take(MAX_DIR_ENTRIES) {
            let entry = entry.map_err(|e| Lookup::Unreadable(dir.path.clone(), e.to_string()))?;
            if let Ok(name) = entry.file_name().as_str() {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
}

/// Reads a regular file of at most `cap` bytes.
fn read_file(found: &Found, cap: u64, what: &str) -> Result<Vec<u8>, DiskBootError> {
    if !found.meta.file_type().is_regular_file() {
        return Err(file_error(
            &found.path,
            format!("the {what} is not a regular file"),
        ));
    }
    let len = found.meta.len();
    if len > cap {
        return Err(file_error(
            &found.path,
            format!("the {what} is {len} bytes, more than the {cap} allowed"),
        ));
    }
    let path = ext4_view::Path::try_from(found.inner.as_slice())
        .map_err(|e| file_error(&found.path, e.to_string()))?;
    let bytes = found
        .fs
        .ext4
        .read(path)
        .map_err(|e| file_error(&found.path, format!("cannot read the {what}: {e}")))?;
    if bytes.len() as u64 != len {
        return Err(file_error(
            &found.path,
            "the file's size changed while reading it",
        ));
    }
    Ok(bytes)
}

/// Reads and joins initrds as GRUB does (each padded to 4 bytes).
fn read_initrds(initrds: &[Found], cap: u64) -> Result<Vec<u8>, DiskBootError> {
    let mut out = Vec::new();
    for found in initrds {
        let left = cap.saturating_sub(out.len() as u64);
        let bytes = read_file(found, left, "initrd")?;
        out.extend_from_slice(&bytes);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    Ok(out)
}

/// Why one way of finding the kernel (or a settings file) found nothing
/// usable; [`choose_kernel`] lists every way's reason in
/// [`DiskBootError::NoKernel`].
#[derive(Debug, thiserror::Error)]
enum Miss {
    /// A path that is missing, not a file, or unreadable (see [`note`]).
    #[error("{0}")]
    Path(String),
    #[error("{0}")]
    Read(#[from] DiskBootError),
    #[error("/boot/grub/grub.cfg: its default entry ({0}) is not a menu entry with a kernel")]
    NoGrubEntry(String),
    #[error("/boot/grub/grub.cfg: entry {title:?}: {why}")]
    GrubEntry { title: String, why: Box<Miss> },
    #[error("{0} uses a GRUB variable")]
    GrubVariable(String),
    #[error("no linux line")]
    NoLinuxLine,
    #[error("/boot has no vmlinuz-*")]
    NoVmlinuz,
}

/// What to load, before reading it.
struct Choice<'a> {
    kernel: Found<'a>,
    initrds: Vec<Found<'a>>,
    source: BootSource,
}

/// The guest's kernel: GRUB's default entry, else Debian's links, else the
/// newest /boot/vmlinuz-*; the error lists why each was not used.
fn choose_kernel<'a>(tree: &Tree<'a>) -> Result<Choice<'a>, DiskBootError> {
    let mut notes = Vec::new();
    for way in [grub_default, links, newest] {
        match way(tree) {
            Ok(choice) => return Ok(choice),
            Err(note) => notes.push(note),
        }
    }
    let mut notes: Vec<String> = notes.iter().map(Miss::to_string).collect();
    let last = notes.pop().unwrap_or_default();
    let message = if notes.is_empty() {
        last
    } else {
        format!("{} and {last}", notes.join(", "))
    };
    Err(DiskBootError::NoKernel(message))
}

const GRUB_CFG: &str = "/boot/grub/grub.cfg";

fn grub_default<'a>(tree: &Tree<'a>) -> Result<Choice<'a>, Miss> {
    let cfg = match tree.resolve(GRUB_CFG) {
        Ok(found) => found,
        Err(e) => return Err(Miss::Path(note(GRUB_CFG, &e))),
    };
    let text = read_file(&cfg, MAX_TEXT_BYTES, "GRUB configuration")?;
    let text = String::from_utf8_lossy(&text);
    let env = tree.read_text("/boot/grub/grubenv").ok().flatten();
    let saved = env
        .as_deref()
        .and_then(|e| grub::grubenv_value(e, "saved_entry"));
    let menu = grub::parse_grub_cfg(&text, saved);
    let default = menu.default.clone().unwrap_or_else(|| "0".into());
    let entry = menu.default_entry().ok_or(Miss::NoGrubEntry(default))?;
    let bad = |why: Miss| Miss::GrubEntry {
        title: entry.title.clone(),
        why: Box::new(why),
    };
    // GRUB reads paths on its own root: the filesystem grub.cfg is on.
    let grub_tree = Tree {
        root: Some(cfg.fs),
        boot: None,
        prefix: if tree.boot.is_some_and(|b| std::ptr::eq(b, cfg.fs)) {
            "/boot"
        } else {
            ""
        },
    };
    let open = |path: &str| -> Result<Found<'a>, Miss> {
        if path.contains('$') {
            return Err(bad(Miss::GrubVariable(path.to_string())));
        }
        // A device prefix such as `($root)` or `(hd0,gpt2)`: the same filesystem.
        let path = match path.strip_prefix('(') {
            Some(rest) => rest.split_once(')').map(|(_, p)| p).unwrap_or(rest),
            None => path,
        };
        grub_tree
            .resolve(path)
            .map_err(|e| bad(Miss::Path(note(path, &e))))
    };
    let linux = entry.linux.first().ok_or_else(|| bad(Miss::NoLinuxLine))?;
    let kernel = open(linux)?;
    let initrds = entry
        .initrd
        .iter()
        .take(MAX_INITRDS)
        .map(|p| open(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Choice {
        kernel,
        initrds,
        source: BootSource::GrubDefault,
    })
}

/// Debian's links, in / (the default) or in /boot (`link_in_boot`).
fn links<'a>(tree: &Tree<'a>) -> Result<Choice<'a>, Miss> {
    let mut first_note = None;
    for dir in ["", "/boot"] {
        let link = format!("{dir}/vmlinuz");
        let kernel = match tree.resolve(&link) {
            Ok(found) => found,
            Err(e) => {
                first_note.get_or_insert(Miss::Path(note(&link, &e)));
                continue;
            }
        };
        let initrd_link = format!("{dir}/initrd.img");
        let initrds = match tree.resolve(&initrd_link) {
            Ok(found) => vec![found],
            Err(Lookup::Missing(p)) if p == initrd_link => Vec::new(),
            Err(e) => return Err(Miss::Path(note(&initrd_link, &e))),
        };
        return Ok(Choice {
            kernel,
            initrds,
            source: BootSource::Links,
        });
    }
    Err(first_note.unwrap_or(Miss::Path("/vmlinuz".into())))
}

/// The newest /boot/vmlinuz-VERSION and its /boot/initrd.img-VERSION.
fn newest<'a>(tree: &Tree<'a>) -> Result<Choice<'a>, Miss> {
    let names = tree
        .list("/boot")
        .map_err(|e| Miss::Path(note("/boot", &e)))?;
    let version = names
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .filter(|v| !v.is_empty() && !v.contains(".dpkg-"))
        .max_by(|a, b| grub::compare_versions(a, b))
        .ok_or(Miss::NoVmlinuz)?;
    let kernel_path = format!("/boot/vmlinuz-{version}");
    let kernel = tree
        .resolve(&kernel_path)
        .map_err(|e| Miss::Path(note(&kernel_path, &e)))?;
    let initrd_path = format!("/boot/initrd.img-{version}");
    let initrds = match tree.resolve(&initrd_path) {
        Ok(found) => vec![found],
        Err(Lookup::Missing(p)) if p == initrd_path => Vec::new(),
        Err(e) => return Err(Miss::Path(note(&initrd_path, &e))),
    };
    Ok(Choice {
        kernel,
        initrds,
        source: BootSource::Newest,
    })
}

/// `root=UUID=... ro` and the guest's GRUB_CMDLINE_LINUX and
/// GRUB_CMDLINE_LINUX_DEFAULT (/etc/default/grub, then grub.d/*.cfg), as
/// Debian's update-grub puts them on its entries' linux lines.
fn guest_cmdline(tree: &Tree, root_uuid: &str) -> Result<String, DiskBootError> {
    let mut vars = BTreeMap::new();
    if tree.root.is_some() {
        let mut files = vec!["/etc/default/grub".to_string()];
        if let Ok(mut names) = tree.list("/etc/default/grub.d") {
            names.retain(|n| n.ends_with(".cfg"));
            names.sort();
            names.truncate(MAX_GRUB_FRAGMENTS);
            files.extend(names.iter().map(|n| format!("/etc/default/grub.d/{n}")));
        }
        for file in &files {
            match tree.read_text(file) {
                Ok(Some(text)) => grub::apply_shell_assignments(&text, &mut vars),
                Ok(None) => {}
                Err(e) => return Err(DiskBootError::Settings(e.to_string())),
            }
        }
    }
    let mut parts = vec![format!("root=UUID={root_uuid}"), "ro".to_string()];
    for name in ["GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT"] {
        let value = vars.get(name).map(|v| v.trim()).unwrap_or("");
        if !value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(file_error(
                "/etc/default/grub",
                format!("{name} has characters a kernel command line cannot hold"),
            ));
        }
        if !value.is_empty() {
            parts.push(value.to_string());
        }
    }
    Ok(parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::partition::tests::gpt_disk;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    const MIB: u64 = 1 << 20;
    const UUID: &str = "0c8b9a54-3c5e-4d57-9a0e-5f2d1b7e4a10";

    /// A scratch directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!("vmm-disk-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("tree")).unwrap();
            Scratch(dir)
        }

        fn tree(&self, path: &str) -> PathBuf {
            self.0.join("tree").join(path.trim_start_matches('/'))
        }

        /// `mkfs.TYPE -d` of the tree: the filesystem image's bytes.
        fn mkfs(&self, kind: &str, mib: u64) -> Vec<u8> {
            let image = self.0.join(format!("{kind}.img"));
            let out = Command::new(format!("mkfs.{kind}"))
                .args(["-q", "-F", "-U", UUID, "-d"])
                .arg(self.0.join("tree"))
                .arg(&image)
                .arg(format!("{mib}M"))
                .output()
                .expect("mkfs runs (e2fsprogs)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::read(image).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// A GPT disk with `filesystems` in partitions of `mib` MiB each.
    fn gpt_with(filesystems: &[&[u8]], mib: u64) -> Vec<u8> {
        let sectors = mib * MIB / 512;
        let parts: Vec<(u64, u64)> = (0..filesystems.len() as u64)
            .map(|i| (2048 + i * sectors, 2048 + (i + 1) * sectors - 1))
            .collect();
        let size = (filesystems.len() as u64 * mib + 2) * MIB;
        let mut disk = gpt_disk(size, 512, &parts);
        for (fs, (first, _)) in filesystems.iter().zip(&parts) {
            let at = (*first * 512) as usize;
            disk[at..at + fs.len()].copy_from_slice(fs);
        }
        disk
    }

    fn debian_tree(s: &Scratch) {
        write(
            &s.tree("/etc/default/grub"),
            b"GRUB_CMDLINE_LINUX=\"console=ttyS0\"\n",
        );
        write(
            &s.tree("/etc/default/grub.d/50-cloud.cfg"),
            b"GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT cloud\"\n",
        );
        write(&s.tree("/boot/vmlinuz-6.1.0-18-amd64"), b"KERNEL 18");
        write(&s.tree("/boot/initrd.img-6.1.0-18-amd64"), b"INITRD 18");
        std::os::unix::fs::symlink("boot/vmlinuz-6.1.0-18-amd64", s.tree("/vmlinuz")).unwrap();
        std::os::unix::fs::symlink("boot/initrd.img-6.1.0-18-amd64", s.tree("/initrd.img"))
            .unwrap();
    }

    #[test]
    fn ext2_ext3_and_ext4_roots_are_read() {
        for kind in ["ext2", "ext3", "ext4"] {
            let s = Scratch::new(kind);
            debian_tree(&s);
            let disk = gpt_with(&[&s.mkfs(kind, 8)], 8);
            let files = find_boot_files_in_image(&disk).unwrap_or_else(|e| panic!("{kind}: {e}"));
            assert_eq!(files.kernel, b"KERNEL 18", "{kind}");
            assert_eq!(
                files.initrd.as_deref(),
                Some(&b"INITRD 18\0\0\0"[..]),
                "{kind}"
            );
            assert_eq!(files.source, BootSource::Links);
            assert_eq!(
                files.cmdline,
                format!("root=UUID={UUID} ro console=ttyS0 cloud")
            );
        }
    }

    #[test]
    fn a_whole_disk_filesystem_without_a_table_is_read() {
        let s = Scratch::new("whole");
        debian_tree(&s);
        let files = find_boot_files_in_image(&s.mkfs("ext4", 8)).unwrap();
        assert_eq!(files.kernel, b"KERNEL 18");
    }

    /// An XFS root (here only its superblock) with an ext4 /boot: the
    /// kernel from /boot, root=UUID= the XFS filesystem's.
    #[test]
    fn an_xfs_root_with_an_ext4_boot_gets_the_xfs_uuid() {
        let s = Scratch::new("xfs");
        write(&s.tree("/vmlinuz-6.1.0-18-amd64"), b"KERNEL 18");
        let boot = s.mkfs("ext4", 8);
        let mut xfs = vec![0u8; (8 * MIB) as usize];
        xfs[..4].copy_from_slice(b"XFSB");
        xfs[32..48].copy_from_slice(&[0xab; 16]);
        let disk = gpt_with(&[&boot, &xfs], 8);
        let files = find_boot_files_in_image(&disk).unwrap();
        assert_eq!(files.kernel, b"KERNEL 18");
        assert_eq!(files.kernel_path, "/boot/vmlinuz-6.1.0-18-amd64");
        assert_eq!(
            files.cmdline,
            "root=UUID=abababab-abab-abab-abab-abababababab ro"
        );
        // Without it, there is no root to name.
        let e = find_boot_files_in_image(&gpt_with(&[&boot], 8)).unwrap_err();
        assert!(e.to_string().starts_with("no root filesystem found"), "{e}");
    }

    #[test]
    fn oversized_files_are_refused_before_they_are_read() {
        let s = Scratch::new("big");
        debian_tree(&s);
        let disk = gpt_with(&[&s.mkfs("ext4", 8)], 8);
        let limits = Limits {
            kernel: 8,
            initrd: 1 << 20,
        };
        let e = find_boot_files(Rc::new(disk), limits)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/boot/vmlinuz-6.1.0-18-amd64: the kernel is 9 bytes, more than the 8 allowed"
        );
    }

    /// A link whose size on disk is 4 GiB (a hostile inode) is refused
    /// before anything is sized from it, wherever it sits in a path: /boot
    /// here is such a link, in the middle of every path tried.
    #[test]
    fn a_link_claiming_a_huge_target_is_not_read() {
        let s = Scratch::new("hugelink");
        debian_tree(&s);
        std::fs::remove_dir_all(s.tree("/boot")).unwrap();
        std::os::unix::fs::symlink(format!("/{}", "x".repeat(80)), s.tree("/boot")).unwrap();
        let image = s.0.join("ext4.img");
        let fs = s.mkfs("ext4", 8);
        std::fs::write(&image, &fs).unwrap();
        let out = Command::new("debugfs")
            .args(["-w", "-R", "sif /boot size 0xfffffff0"])
            .arg(&image)
            .output()
            .expect("debugfs runs (e2fsprogs)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let disk = gpt_with(&[&std::fs::read(&image).unwrap()], 8);
        let peak_before = peak_rss_bytes();
        let e = find_boot_files_in_image(&disk).unwrap_err().to_string();
        assert!(
            e.contains("/boot/grub/grub.cfg: /boot: link target too long"),
            "{e}"
        );
        // Reading that target would have filled 4 GiB.
        let grown = peak_rss_bytes() - peak_before;
        assert!(grown < 512 << 20, "peak RSS grew by {grown} bytes");
    }

    fn peak_rss_bytes() -> i64 {
        // SAFETY: rusage is plain data, filled in by getrusage.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: usage is a valid rusage to write to.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        usage.ru_maxrss * 1024
    }

    /// Random corruption of a real image's metadata never panics, hangs or
    /// allocates without bound: each attempt ends with files or an error.
    #[test]
    fn corrupted_images_end_in_an_error_not_a_panic() {
        let s = Scratch::new("mutate");
        debian_tree(&s);
        let clean = gpt_with(&[&s.mkfs("ext4", 4)], 4);
        // The metadata lives in the tables and the filesystem's first blocks.
        let hot = (MIB + 64 * 1024) as usize;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // More rounds on request, when hunting.
        let rounds: u32 = std::env::var("VMM_DISK_MUTATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..rounds {
            let mut disk = clean.clone();
            for _ in 0..1 + next() % 8 {
                let at = (next() % hot as u64) as usize;
                disk[at] = next() as u8;
            }
            match find_boot_files_in_image(&disk) {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        assert_eq!(ok + refused, rounds);
        assert!(refused > 0, "no corruption was noticed: {ok} booted");
    }
}
