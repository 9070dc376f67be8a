//! Loading a kernel and everything it reads at its entry point: command
//! line, initrd, memory map, PVH start_info or Linux boot_params, MP table.

pub mod disk;
pub mod grub;
pub mod mptable;
pub mod partition;
pub mod regs;

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::rc::Rc;

use config::{VmConfig, MAX_CMDLINE_LEN};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
};

pub use regs::{boot_registers, EntryMode};

use crate::layout::{
    CMDLINE_START, EBDA_START, HIGH_RAM_START, MMIO_HOLE_START, PCI_ECAM_SIZE, PCI_ECAM_START,
    PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use crate::memory::{GuestMemoryMmap, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is neither an ELF kernel nor a bzImage: {message}")]
    Format { path: String, message: String },
    #[error("cannot load kernel {path}: {message}")]
    Load { path: String, message: String },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { path: String, size: u64, limit: u64 },
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the {0} into guest memory")]
    Memory(&'static str),
    #[error("{0} vCPUs do not fit in the MP table")]
    TooManyCpus(u8),
    #[error("disk boot from {disk}: {source}")]
    Disk {
        /// `disks[0] (/dev/vg/web1)`
        disk: String,
        source: disk::DiskBootError,
    },
    #[error("payload.boot_disk: no disk has id {0:?}")]
    NoBootDisk(String),
    #[error(
        "the kernel command line would be {len} bytes with the guest's own settings \
         ({guest:?}); at most {max}", max = MAX_CMDLINE_LEN - 1
    )]
    CmdlineTooLong { len: usize, guest: String },
}

impl BootError {
    pub fn class(&self) -> config::ErrorClass {
        match self {
            BootError::Open { source, .. } | BootError::Initrd { source, .. } => {
                config::ErrorClass::of_io(source)
            }
            BootError::Format { .. }
            | BootError::Load { .. }
            | BootError::InitrdTooLarge { .. }
            | BootError::TooManyCpus(_)
            | BootError::CmdlineTooLong { .. }
            | BootError::NoBootDisk(_) => config::ErrorClass::Caller,
            BootError::Disk { source, .. } => source.class(),
            BootError::Memory(_) => config::ErrorClass::Host,
        }
    }
}

/// Where the guest starts and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry: u64,
}

/// E820 / PVH memory map types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Linux boot protocol constants (Documentation/arch/x86/boot.rst).
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry point of a bzImage is 0x200 past its protected-mode start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Largest initrd address a kernel accepts by default.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// The memory map the guest is told: `(start, size, type)`.
pub fn memory_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    // The EBDA (MP table), the VGA/ROM hole and the BIOS area with the ACPI
    // tables: reserved, as a PC BIOS reports them.
    map.push((EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED));
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIGH_RAM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map.push((PCI_ECAM_START, PCI_ECAM_SIZE, E820_RESERVED));
    map
}

/// Loads the kernel, command line and initrd (from host files, or from
/// the guest's disk with `payload.boot_disk`) and writes the boot
/// structures for `cpus` vCPUs, telling the kernel where the ACPI RSDP is
/// when `acpi_rsdp` is given. Returns the entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    config: &VmConfig,
    cpus: u8,
    acpi_rsdp: Option<u64>,
) -> Result<BootEntry, BootError> {
    let payload = &config.payload;
    if payload.boot_disk.is_some() {
        let files = disk_boot_files(config)?;
        let mut cmdline = files.cmdline.clone();
        if !payload.cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&payload.cmdline);
        }
        if cmdline.len() >= MAX_CMDLINE_LEN {
            return Err(BootError::CmdlineTooLong {
                len: cmdline.len(),
                guest: files.cmdline,
            });
        }
        let name = files.kernel_path.clone();
        let initrd_name = files.initrd_paths.join(" + ");
        let initrd = files.initrd.map(|bytes| {
            let size = bytes.len() as u64;
            (Cursor::new(bytes), size, initrd_name)
        });
        return load_images(
            mem,
            (&mut Cursor::new(files.kernel), &name),
            initrd,
            &cmdline,
            cpus,
            acpi_rsdp,
        );
    }
    let path = payload.kernel.display().to_string();
    let mut kernel = File::open(&payload.kernel).map_err(|source| BootError::Open {
        path: path.clone(),
        source,
    })?;
    let initrd = match &payload.initrd {
        Some(initrd) => {
            let name = initrd.display().to_string();
            let file = File::open(initrd).map_err(|source| BootError::Open {
                path: name.clone(),
                source,
            })?;
            let size = file
                .metadata()
                .map_err(|source| BootError::Initrd {
                    path: name.clone(),
                    source,
                })?
                .len();
            Some((file, size, name))
        }
        None => None,
    };
    load_images(
        mem,
        (&mut kernel, &path),
        initrd,
        &payload.cmdline,
        cpus,
        acpi_rsdp,
    )
}

/// Reads the kernel, initrd and the guest's command line from the disk
/// `payload.boot_disk` names, within the caps and the guest's memory.
fn disk_boot_files(config: &VmConfig) -> Result<disk::BootFiles, BootError> {
    let index = config.boot_disk_index();
    let path = index
        .and_then(|i| config.disks.get(i))
        .map(|d| d.path.clone());
    let (Some(i), Some(path)) = (index, path) else {
        let id = config.payload.boot_disk.clone().unwrap_or_default();
        return Err(BootError::NoBootDisk(id));
    };
    let name = format!("disks[{i}] ({})", path.display());
    let error = |source| BootError::Disk {
        disk: name.clone(),
        source,
    };
    let file = File::open(&path).map_err(|e| error(disk::DiskBootError::Io(e)))?;
    let image = partition::FileDisk::new(file).map_err(|e| error(disk::DiskBootError::Io(e)))?;
    let limits = disk::Limits::for_memory(config.memory.size_bytes());
    let files = disk::find_boot_files(Rc::new(image), limits).map_err(error)?;
    log::info!("booting from {name}: {}", files.describe());
    Ok(files)
}

/// Loads a kernel image (ELF or bzImage) and an initrd `(reader, size,
/// name)` and writes the boot structures.
fn load_images<K, I>(
    mem: &GuestMemoryMmap,
    (kernel, path): (&mut K, &str),
    initrd: Option<(I, u64, String)>,
    cmdline: &str,
    cpus: u8,
    acpi_rsdp: Option<u64>,
) -> Result<BootEntry, BootError>
where
    K: Read + ReadVolatile + Seek,
    I: ReadVolatile,
{
    let path = path.to_string();
    let high = Some(GuestAddress(HIGH_RAM_START));
    let (entry, setup_header, kernel_end) = match Elf::load(mem, None, kernel, high) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                    mode: EntryMode::Pvh,
                    entry: addr.raw_value(),
                },
                _ => BootEntry {
                    mode: EntryMode::Linux64,
                    entry: result.kernel_load.raw_value(),
                },
            };
            (entry, None, result.kernel_end)
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            let result = BzImage::load(mem, None, kernel, high).map_err(|e| BootError::Format {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let entry = BootEntry {
                mode: EntryMode::Linux64,
                entry: result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
            };
            (entry, result.setup_header, result.kernel_end)
        }
        Err(e) => {
            return Err(BootError::Load {
                path,
                message: e.to_string(),
            })
        }
    };

    let mut cmdline = cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::Memory("command line"))?;

    let initrd = match initrd {
        Some((mut reader, size, name)) => {
            let limit = setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
            Some(load_initrd(
                mem,
                &mut reader,
                size,
                &name,
                kernel_end,
                limit,
            )?)
        }
        None => None,
    };

    let map = memory_map(mem);
    match entry.mode {
        EntryMode::Pvh => write_pvh_info(mem, &map, initrd, acpi_rsdp)?,
        EntryMode::Linux64 => {
            write_boot_params(mem, &map, setup_header, cmdline.len(), initrd, acpi_rsdp)?
        }
    }
    mptable::write(mem, cpus)?;
    Ok(entry)
}

/// Puts the initrd as high as allowed in low RAM, page aligned; returns (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    reader: &mut impl ReadVolatile,
    size: u64,
    name: &str,
    kernel_end: u64,
    addr_max: u64,
) -> Result<(u64, u64), BootError> {
    let low_end = mem
        .iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|&end| end <= MMIO_HOLE_START)
        .max()
        .unwrap_or(0);
    let top = low_end.min(addr_max + 1);
    let too_large = || BootError::InitrdTooLarge {
        path: name.to_string(),
        size,
        limit: top,
    };
    let start = top.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel_end.max(HIGH_RAM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(start), reader, size as usize)
        .map_err(|e| BootError::Initrd {
            path: name.to_string(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((start, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::Memory("PVH memory map (too many entries)"));
    }
    for (i, &(addr, size, kind)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_: kind,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(|_| BootError::Memory("PVH memory map"))?;
    }
    let modules_at =
        PVH_MEMMAP_START + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let mut info = hvm_start_info {
        magic: linux_loader::loader::elf::start_info::XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: acpi_rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modules_at))
            .map_err(|_| BootError::Memory("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = modules_at;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::Memory("PVH start_info"))
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params {
        acpi_rsdp_addr: acpi_rsdp.unwrap_or(0),
        ..Default::default()
    };
    match setup_header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if map.len() > params.e820_table.len() {
        return Err(BootError::Memory("e820 map (too many entries)"));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::Memory("boot_params"))
}
