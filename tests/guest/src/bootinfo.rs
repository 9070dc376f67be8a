//! PVH boot information (`struct hvm_start_info`), copied into the image at
//! boot so that low memory can be reused (AP trampoline).

use crate::sync::BootCell;

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

const MAX_CMDLINE: usize = 2048;
const MAX_MEMMAP: usize = 64;

#[derive(Clone, Copy, Default)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub struct BootInfo {
    /// Whether the magic matched.
    pub valid: bool,
    pub version: u32,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    memmap: [MemEntry; MAX_MEMMAP],
    memmap_len: usize,
    /// `rsdp_paddr` (0 if none).
    pub rsdp: u64,
    /// The first module's (the initrd's) size, 0 if none.
    pub initrd_size: u64,
    /// Its first bytes (tests check which file the VMM loaded).
    pub initrd_head: [u8; 8],
}

impl BootInfo {
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    pub fn memmap(&self) -> &[MemEntry] {
        &self.memmap[..self.memmap_len]
    }
}

static BOOT: BootCell<BootInfo> = BootCell::new();

/// Boot information (after `init`).
#[allow(dead_code)]
pub fn get() -> Option<&'static BootInfo> {
    BOOT.get()
}

/// Boot data may be anywhere in low memory, page 0 included (QEMU's PVH
/// option ROM puts the E820 table there): page 0 stays mapped until
/// `mem::unmap_page0` after this copy.
fn phys_ok(addr: u64, len: u64) -> bool {
    addr != 0 && addr.checked_add(len).is_some_and(|end| end <= 0xc000_0000)
}

/// Read a `T` from low physical memory (default value if out of range).
fn rd<T: Copy + Default>(addr: u64) -> T {
    if !phys_ok(addr, core::mem::size_of::<T>() as u64) {
        return T::default();
    }
    // SAFETY: checked by phys_ok: the low 3 GiB are identity mapped and
    // user-readable (page 0 too, until mem::unmap_page0).
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// Copy what we need out of `hvm_start_info` at `paddr`.
pub fn init(paddr: u64) -> &'static BootInfo {
    let mut b = BootInfo {
        valid: false,
        version: 0,
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        memmap: [MemEntry::default(); MAX_MEMMAP],
        memmap_len: 0,
        rsdp: 0,
        initrd_size: 0,
        initrd_head: [0; 8],
    };
    if phys_ok(paddr, 56) && rd::<u32>(paddr) == START_INFO_MAGIC {
        b.valid = true;
        b.version = rd::<u32>(paddr + 4);
        let cmdline = rd::<u64>(paddr + 24);
        b.rsdp = rd::<u64>(paddr + 32);
        if phys_ok(cmdline, 1) {
            while b.cmdline_len < MAX_CMDLINE && phys_ok(cmdline + b.cmdline_len as u64, 1) {
                let c = rd::<u8>(cmdline + b.cmdline_len as u64);
                if c == 0 {
                    break;
                }
                // Keep the command line printable ASCII.
                b.cmdline[b.cmdline_len] = if (0x20..0x7f).contains(&c) { c } else { b' ' };
                b.cmdline_len += 1;
            }
        }
        let modules = rd::<u32>(paddr + 12);
        let modlist = rd::<u64>(paddr + 16);
        if modules >= 1 && phys_ok(modlist, 16) {
            let (addr, size) = (rd::<u64>(modlist), rd::<u64>(modlist + 8));
            if size >= 8 && phys_ok(addr, 8) {
                b.initrd_size = size;
                for (i, byte) in b.initrd_head.iter_mut().enumerate() {
                    *byte = rd::<u8>(addr + i as u64);
                }
            }
        }
        if b.version >= 1 {
            let memmap = rd::<u64>(paddr + 40);
            let entries = rd::<u32>(paddr + 48) as usize;
            for i in 0..entries.min(MAX_MEMMAP) {
                let e = memmap + 24 * i as u64;
                if !phys_ok(e, 24) {
                    break;
                }
                b.memmap[b.memmap_len] = MemEntry {
                    addr: rd::<u64>(e),
                    size: rd::<u64>(e + 8),
                    kind: rd::<u32>(e + 16),
                };
                b.memmap_len += 1;
            }
        }
    }
    if !b.valid {
        println!("testguest: warning: no PVH start_info at {:#x}", paddr);
    } else if b.memmap_len == 0 {
        println!("testguest: warning: start_info has no memory map");
    }
    BOOT.set(b)
}
