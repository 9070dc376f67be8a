//! Partition tables of a guest disk (MBR with logical partitions, GPT with
//! its checksums and backup header), read through a bounded reader. The disk
//! is hostile input: every offset and count is checked against the disk's
//! size, every loop is bounded, nothing is allocated from a size on disk
//! without a cap.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Bytes in a logical sector of an MBR disk (and the first GPT layout tried).
pub const SECTOR: u64 = 512;
/// Sector sizes a GPT is looked for with (512e and 4Kn disks).
const GPT_SECTOR_SIZES: [u64; 2] = [512, 4096];
/// "EFI PART": a GPT header's signature.
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
/// The smallest GPT header (UEFI 2.x).
const GPT_HEADER_MIN: usize = 92;
/// Largest partition entry array read (the usual one is 16 KiB).
const GPT_MAX_ARRAY_BYTES: u64 = 1 << 20;
/// Largest GPT partition entry (the usual one is 128 bytes).
const GPT_MAX_ENTRY_SIZE: u32 = 4096;
/// An MBR's partition type for a GPT disk.
const MBR_PROTECTIVE: u8 = 0xee;
/// MBR partition types of an extended partition (CHS, LBA, Linux).
const MBR_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];
/// Logical partitions followed in an extended partition's chain.
const MBR_MAX_LOGICAL: u32 = 64;
/// Where the four MBR partition entries start in sector 0.
const MBR_ENTRIES_AT: usize = 446;

/// Random access to a disk image that never reads past its end.
pub trait DiskRead {
    /// The disk's size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; an error if any of it lies past the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{len} bytes at byte {offset} lie past the end ({size} bytes)"),
        )),
    }
}

/// A disk file or block device, its size taken once.
pub struct FileDisk {
    file: File,
    size: u64,
}

impl FileDisk {
    pub fn new(file: File) -> io::Result<FileDisk> {
        use std::io::Seek;
        let mut file = file;
        // Seeking to the end gives the size of block devices too.
        let size = file.seek(io::SeekFrom::End(0))?;
        Ok(FileDisk { file, size })
    }
}

impl DiskRead for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        self.file.read_exact_at(buf, offset)
    }
}

impl DiskRead for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(offset, buf.len(), self.size())?;
        let start = offset as usize;
        buf.copy_from_slice(&self[start..start + buf.len()]);
        Ok(())
    }
}

impl DiskRead for Vec<u8> {
    fn size(&self) -> u64 {
        self.as_slice().size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_at(offset, buf)
    }
}

/// Which kind of table the disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    Gpt,
    Mbr,
    /// No partition table: the whole disk is one filesystem (or nothing).
    None,
}

/// One partition, in bytes from the start of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Its number as Linux names it (`vda2` is 2; logical MBR partitions
    /// start at 5); 0 for the whole disk of a disk without a table.
    pub number: u32,
    pub start: u64,
    pub size: u64,
}

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.number == 0 {
            write!(f, "the whole disk")
        } else {
            write!(f, "partition {}", self.number)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionTable {
    pub kind: TableKind,
    pub partitions: Vec<Partition>,
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("cannot read the {what} at byte {offset}: {source}")]
    Read {
        what: &'static str,
        offset: u64,
        source: io::Error,
    },
    #[error("GPT header: {0}")]
    GptHeader(String),
    #[error("GPT partition {number}: {message}")]
    GptEntry { number: u32, message: String },
    #[error("MBR partition {number}: {message}")]
    MbrEntry { number: u32, message: String },
}

impl PartitionError {
    /// Whether the disk could not be read at all (rather than holding a
    /// malformed table).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            PartitionError::Read { source, .. }
                if source.kind() != io::ErrorKind::UnexpectedEof =>
            {
                Some(source)
            }
            _ => None,
        }
    }
}

fn read(
    disk: &dyn DiskRead,
    what: &'static str,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), PartitionError> {
    disk.read_at(offset, buf)
        .map_err(|source| PartitionError::Read {
            what,
            offset,
            source,
        })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

fn crc32(data: &[u8]) -> u32 {
    crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC).checksum(data)
}

/// Reads the disk's partition table: GPT (primary header, else the backup
/// at the disk's end), else MBR, else none (the whole disk).
pub fn read_table(disk: &dyn DiskRead) -> Result<PartitionTable, PartitionError> {
    let whole = PartitionTable {
        kind: TableKind::None,
        partitions: vec![Partition {
            number: 0,
            start: 0,
            size: disk.size(),
        }],
    };
    if disk.size() < 2 * SECTOR {
        return Ok(whole);
    }
    let mut mbr = [0u8; SECTOR as usize];
    read(disk, "MBR", 0, &mut mbr)?;
    let mbr_signed = mbr[510] == 0x55 && mbr[511] == 0xaa;
    let protective =
        mbr_signed && (0..4).any(|i| mbr[MBR_ENTRIES_AT + 16 * i + 4] == MBR_PROTECTIVE);

    let mut gpt_error = None;
    for sector in GPT_SECTOR_SIZES {
        match read_gpt(disk, sector) {
            Ok(Some(partitions)) => {
                return Ok(PartitionTable {
                    kind: TableKind::Gpt,
                    partitions,
                })
            }
            Ok(None) => {}
            Err(e) => {
                gpt_error.get_or_insert(e);
            }
        }
    }
    // A GPT signature whose header (and backup) are bad, or a protective
    // MBR without a GPT: the disk says GPT but its table is broken.
    if let Some(e) = gpt_error {
        return Err(e);
    }
    if protective {
        return Err(PartitionError::GptHeader(
            "the MBR is a GPT's protective MBR, but there is no GPT header".into(),
        ));
    }
    // A boot sector of a filesystem is signed too; its "entries" then do not
    // look like partitions (the status byte is 0x00 or 0x80 in a real MBR).
    let plausible = (0..4).all(|i| matches!(mbr[MBR_ENTRIES_AT + 16 * i], 0x00 | 0x80));
    if mbr_signed && plausible {
        return Ok(PartitionTable {
            kind: TableKind::Mbr,
            partitions: read_mbr(disk, &mbr)?,
        });
    }
    Ok(whole)
}

/// The GPT of a disk with `sector`-byte sectors: None if there is no GPT
/// signature at LBA 1; the backup header is used when the primary is bad.
fn read_gpt(disk: &dyn DiskRead, sector: u64) -> Result<Option<Vec<Partition>>, PartitionError> {
    let sectors = disk.size() / sector;
    if sectors < 3 {
        return Ok(None);
    }
    let mut header = vec![0u8; sector as usize];
    read(disk, "GPT header", sector, &mut header)?;
    if &header[..8] != GPT_SIGNATURE {
        return Ok(None);
    }
    let primary = gpt_partitions(disk, &header, sector, 1);
    if primary.is_ok() {
        return primary.map(Some);
    }
    let last = sectors - 1;
    read(disk, "backup GPT header", last * sector, &mut header)?;
    if &header[..8] == GPT_SIGNATURE {
        if let Ok(partitions) = gpt_partitions(disk, &header, sector, last) {
            return Ok(Some(partitions));
        }
    }
    // Report what is wrong with the primary.
    primary.map(Some)
}

/// Checks a GPT header found at LBA `my_lba` and reads its partitions.
fn gpt_partitions(
    disk: &dyn DiskRead,
    header: &[u8],
    sector: u64,
    my_lba: u64,
) -> Result<Vec<Partition>, PartitionError> {
    let bad = |m: String| PartitionError::GptHeader(m);
    let size = u32_at(header, 12) as usize;
    if !(GPT_HEADER_MIN..=header.len()).contains(&size) {
        return Err(bad(format!(
            "header size {size} is not between {GPT_HEADER_MIN} and {}",
            header.len()
        )));
    }
    let mut copy = header[..size].to_vec();
    copy[16..20].fill(0);
    let (stored, computed) = (u32_at(header, 16), crc32(&copy));
    if stored != computed {
        return Err(bad(format!(
            "header checksum {stored:#010x} does not match its contents ({computed:#010x})"
        )));
    }
    if u64_at(header, 24) != my_lba {
        return Err(bad(format!(
            "the header at sector {my_lba} says it is at sector {}",
            u64_at(header, 24)
        )));
    }
    let array_lba = u64_at(header, 72);
    let count = u32_at(header, 80);
    let entry_size = u32_at(header, 84);
    if !(128..=GPT_MAX_ENTRY_SIZE).contains(&entry_size) || !entry_size.is_power_of_two() {
        return Err(bad(format!(
            "partition entry size {entry_size} is not a power of two from 128 to {GPT_MAX_ENTRY_SIZE}"
        )));
    }
    let array_bytes = u64::from(count) * u64::from(entry_size);
    if array_bytes > GPT_MAX_ARRAY_BYTES {
        return Err(bad(format!(
            "{count} partition entries of {entry_size} bytes: more than {GPT_MAX_ARRAY_BYTES} bytes"
        )));
    }
    let array_at = array_lba
        .checked_mul(sector)
        .filter(|at| {
            at.checked_add(array_bytes)
                .is_some_and(|end| end <= disk.size())
        })
        .ok_or_else(|| {
            bad(format!(
                "the partition entries at sector {array_lba} lie past the disk's end"
            ))
        })?;
    let mut array = vec![0u8; array_bytes as usize];
    read(disk, "GPT partition entries", array_at, &mut array)?;
    let (stored, computed) = (u32_at(header, 88), crc32(&array));
    if stored != computed {
        return Err(bad(format!(
            "partition entries checksum {stored:#010x} does not match their contents ({computed:#010x})"
        )));
    }
    let sectors = disk.size() / sector;
    let mut partitions = Vec::new();
    for (i, entry) in array.chunks_exact(entry_size as usize).enumerate() {
        if entry[..16].iter().all(|&b| b == 0) {
            continue; // unused entry
        }
        let number = i as u32 + 1;
        let (first, last) = (u64_at(entry, 32), u64_at(entry, 40));
        if first == 0 || first > last || last >= sectors {
            return Err(PartitionError::GptEntry {
                number,
                message: format!(
                    "sectors {first} to {last} are not within the disk's {sectors} sectors"
                ),
            });
        }
        partitions.push(Partition {
            number,
            start: first * sector,
            size: (last - first + 1) * sector,
        });
    }
    Ok(partitions)
}

/// One MBR (or EBR) entry: (type, first sector, sectors).
fn mbr_entry(sector: &[u8], i: usize) -> (u8, u64, u64) {
    let e = &sector[MBR_ENTRIES_AT + 16 * i..MBR_ENTRIES_AT + 16 * (i + 1)];
    (e[4], u64::from(u32_at(e, 8)), u64::from(u32_at(e, 12)))
}

fn mbr_partition(
    disk: &dyn DiskRead,
    number: u32,
    first: u64,
    sectors: u64,
) -> Result<Partition, PartitionError> {
    // first and sectors are below 2^33 each: no overflow.
    let (start, size) = (first * SECTOR, sectors * SECTOR);
    if first == 0 || start + size > disk.size() {
        return Err(PartitionError::MbrEntry {
            number,
            message: format!(
                "sectors {first} to {} are not within the disk's {} sectors",
                first + sectors.saturating_sub(1),
                disk.size() / SECTOR
            ),
        });
    }
    Ok(Partition {
        number,
        start,
        size,
    })
}

fn read_mbr(disk: &dyn DiskRead, mbr: &[u8]) -> Result<Vec<Partition>, PartitionError> {
    let mut partitions = Vec::new();
    let mut extended = None;
    for i in 0..4 {
        let (kind, first, sectors) = mbr_entry(mbr, i);
        if kind == 0 || sectors == 0 {
            continue;
        }
        let partition = mbr_partition(disk, i as u32 + 1, first, sectors)?;
        if MBR_EXTENDED.contains(&kind) {
            extended.get_or_insert(partition);
        } else {
            partitions.push(partition);
        }
    }
    let Some(extended) = extended else {
        return Ok(partitions);
    };
    // Logical partitions: a chain of EBRs, each giving one partition
    // (relative to itself) and the next EBR (relative to the extended
    // partition's start).
    let base = extended.start / SECTOR;
    let mut ebr_lba = base;
    for n in 0..MBR_MAX_LOGICAL {
        let number = 5 + n;
        let mut ebr = [0u8; SECTOR as usize];
        read(disk, "extended boot record", ebr_lba * SECTOR, &mut ebr)?;
        if ebr[510] != 0x55 || ebr[511] != 0xaa {
            return Err(PartitionError::MbrEntry {
                number,
                message: format!("no extended boot record signature at sector {ebr_lba}"),
            });
        }
        let (kind, first, sectors) = mbr_entry(&ebr, 0);
        if kind != 0 && sectors != 0 {
            partitions.push(mbr_partition(disk, number, ebr_lba + first, sectors)?);
        }
        let (next_kind, next, _) = mbr_entry(&ebr, 1);
        if !MBR_EXTENDED.contains(&next_kind) || next == 0 {
            return Ok(partitions);
        }
        ebr_lba = base + next;
        if (ebr_lba + 1) * SECTOR > extended.start + extended.size {
            return Err(PartitionError::MbrEntry {
                number: number + 1,
                message: format!("its extended boot record at sector {ebr_lba} lies outside the extended partition"),
            });
        }
    }
    Err(PartitionError::MbrEntry {
        number: 5 + MBR_MAX_LOGICAL,
        message: format!(
            "more than {MBR_MAX_LOGICAL} logical partitions (a loop in the extended partition's chain?)"
        ),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn mbr_set(sector: &mut [u8], i: usize, kind: u8, first: u64, sectors: u64) {
        let at = MBR_ENTRIES_AT + 16 * i;
        sector[at + 4] = kind;
        put_u32(sector, at + 8, first as u32);
        put_u32(sector, at + 12, sectors as u32);
        sector[510] = 0x55;
        sector[511] = 0xaa;
    }

    /// A disk with a GPT of `parts` (first, last sector) at `sector`-byte
    /// sectors, primary and backup.
    pub(crate) fn gpt_disk(size: u64, sector: u64, parts: &[(u64, u64)]) -> Vec<u8> {
        let mut disk = vec![0u8; size as usize];
        mbr_set(
            &mut disk,
            0,
            MBR_PROTECTIVE,
            1,
            (size / SECTOR - 1).min(u32::MAX as u64),
        );
        let (count, entry_size) = (128u32, 128usize);
        let mut array = vec![0u8; count as usize * entry_size];
        for (i, &(first, last)) in parts.iter().enumerate() {
            let e = &mut array[i * entry_size..(i + 1) * entry_size];
            e[..16].copy_from_slice(&[0x0f; 16]); // any non-zero type GUID
            put_u64(e, 32, first);
            put_u64(e, 40, last);
        }
        let sectors = size / sector;
        let array_sectors = array.len() as u64 / sector;
        for (my_lba, array_lba) in [(1, 2), (sectors - 1, sectors - 1 - array_sectors)] {
            let mut h = vec![0u8; GPT_HEADER_MIN];
            h[..8].copy_from_slice(GPT_SIGNATURE);
            put_u32(&mut h, 8, 0x0001_0000);
            put_u32(&mut h, 12, GPT_HEADER_MIN as u32);
            put_u64(&mut h, 24, my_lba);
            put_u64(&mut h, 72, array_lba);
            put_u32(&mut h, 80, count);
            put_u32(&mut h, 84, entry_size as u32);
            put_u32(&mut h, 88, crc32(&array));
            let c = crc32(&h);
            put_u32(&mut h, 16, c);
            let at = (my_lba * sector) as usize;
            disk[at..at + h.len()].copy_from_slice(&h);
            let at = (array_lba * sector) as usize;
            disk[at..at + array.len()].copy_from_slice(&array);
        }
        disk
    }

    #[test]
    fn gpt_partitions_are_found_at_both_sector_sizes() {
        for sector in [512, 4096] {
            let s = 1 << 20;
            let disk = gpt_disk(
                8 * MIB,
                sector,
                &[
                    (s / sector, 2 * s / sector - 1),
                    (2 * s / sector, 3 * s / sector - 1),
                ],
            );
            let table = read_table(&disk).unwrap();
            assert_eq!(table.kind, TableKind::Gpt);
            assert_eq!(
                table.partitions,
                vec![
                    Partition {
                        number: 1,
                        start: MIB,
                        size: MIB
                    },
                    Partition {
                        number: 2,
                        start: 2 * MIB,
                        size: MIB
                    },
                ]
            );
        }
    }

    #[test]
    fn gpt_with_a_bad_primary_header_uses_the_backup() {
        let mut disk = gpt_disk(8 * MIB, 512, &[(2048, 4095)]);
        disk[512 + 40] ^= 1; // first_usable: breaks the header checksum
        let table = read_table(&disk).unwrap();
        assert_eq!(table.partitions[0].start, MIB);
    }

    #[test]
    fn gpt_with_both_headers_bad_is_refused_with_the_reason() {
        let mut disk = gpt_disk(8 * MIB, 512, &[(2048, 4095)]);
        let last = disk.len() - 512;
        disk[512 + 40] ^= 1;
        disk[last + 40] ^= 1;
        let e = read_table(&disk).unwrap_err().to_string();
        assert!(e.contains("header checksum"), "{e}");
        // A corrupt entry array (both copies).
        let mut disk = gpt_disk(8 * MIB, 512, &[(2048, 4095)]);
        disk[1024 + 33] ^= 1;
        let backup_array = disk.len() - 512 - 128 * 128 + 33;
        disk[backup_array] ^= 1;
        let e = read_table(&disk).unwrap_err().to_string();
        assert!(e.contains("entries checksum"), "{e}");
    }

    #[test]
    fn gpt_partitions_past_the_disk_end_are_refused() {
        let disk = gpt_disk(8 * MIB, 512, &[(2048, 4095), (4096, 1 << 40)]);
        let e = read_table(&disk).unwrap_err().to_string();
        assert!(e.starts_with("GPT partition 2:"), "{e}");
        let disk = gpt_disk(8 * MIB, 512, &[(4095, 2048)]);
        assert!(read_table(&disk).is_err());
    }

    /// A header with a valid checksum but hostile sizes is refused before
    /// anything is allocated from them.
    #[test]
    fn gpt_header_sizes_are_bounded() {
        for (at, value) in [(80usize, u32::MAX), (84, 64), (84, 1 << 20), (12, 4000)] {
            let mut disk = gpt_disk(8 * MIB, 512, &[(2048, 4095)]);
            let sectors = disk.len() / 512;
            for lba in [1, sectors - 1] {
                let h = &mut disk[lba * 512..lba * 512 + GPT_HEADER_MIN];
                put_u32(h, at, value);
                h[16..20].fill(0);
                let c = crc32(h);
                put_u32(h, 16, c);
            }
            let e = read_table(&disk).unwrap_err();
            assert!(matches!(e, PartitionError::GptHeader(_)), "{e}");
        }
    }

    #[test]
    fn mbr_primary_and_logical_partitions_are_found() {
        let mut disk = vec![0u8; (16 * MIB) as usize];
        mbr_set(&mut disk, 0, 0x83, 2048, 2048);
        mbr_set(&mut disk, 1, 0x05, 8192, 16384);
        // EBR 1 at 8192: a logical at +2048, next EBR at extended+8192.
        let ebr1 = 8192 * 512;
        mbr_set(&mut disk[ebr1..ebr1 + 512], 0, 0x83, 2048, 2048);
        mbr_set(&mut disk[ebr1..ebr1 + 512], 1, 0x05, 8192, 4096);
        let ebr2 = (8192 + 8192) * 512;
        mbr_set(&mut disk[ebr2..ebr2 + 512], 0, 0x82, 2048, 2048);
        let table = read_table(&disk).unwrap();
        assert_eq!(table.kind, TableKind::Mbr);
        let found: Vec<(u32, u64)> = table
            .partitions
            .iter()
            .map(|p| (p.number, p.start / SECTOR))
            .collect();
        assert_eq!(found, vec![(1, 2048), (5, 10240), (6, 18432)]);
    }

    #[test]
    fn mbr_extended_chain_loop_is_bounded() {
        let mut disk = vec![0u8; (16 * MIB) as usize];
        mbr_set(&mut disk, 0, 0x05, 8192, 16384);
        // EBR at the extended start: a logical, then the next EBR at
        // relative sector 1, which names relative sector 1 again: itself.
        for lba in [8192usize, 8193] {
            let ebr = &mut disk[lba * 512..lba * 512 + 512];
            mbr_set(ebr, 0, 0x83, 2048, 8);
            mbr_set(ebr, 1, 0x05, 1, 1);
        }
        let e = read_table(&disk).unwrap_err().to_string();
        assert!(e.contains("more than 64 logical partitions"), "{e}");
    }

    #[test]
    fn mbr_partitions_past_the_disk_end_are_refused() {
        let mut disk = vec![0u8; (4 * MIB) as usize];
        mbr_set(&mut disk, 1, 0x83, 2048, u32::MAX as u64);
        let e = read_table(&disk).unwrap_err().to_string();
        assert!(e.starts_with("MBR partition 2:"), "{e}");
    }

    #[test]
    fn a_disk_without_a_table_is_one_filesystem() {
        let disk = vec![0u8; (4 * MIB) as usize];
        let table = read_table(&disk).unwrap();
        assert_eq!(table.kind, TableKind::None);
        assert_eq!(
            table.partitions,
            vec![Partition {
                number: 0,
                start: 0,
                size: 4 * MIB
            }]
        );
        // A signed boot sector whose "entries" are code is not an MBR.
        let mut vbr = disk.clone();
        vbr[MBR_ENTRIES_AT] = 0xeb;
        vbr[510] = 0x55;
        vbr[511] = 0xaa;
        assert_eq!(read_table(&vbr).unwrap().kind, TableKind::None);
        // Tiny disks too.
        assert_eq!(read_table(&vec![0u8; 100]).unwrap().kind, TableKind::None);
    }

    #[test]
    fn a_protective_mbr_without_gpt_is_refused() {
        let mut disk = vec![0u8; (4 * MIB) as usize];
        mbr_set(&mut disk, 0, MBR_PROTECTIVE, 1, 8191);
        let e = read_table(&disk).unwrap_err().to_string();
        assert!(e.contains("protective"), "{e}");
    }

    #[test]
    fn reads_past_the_end_fail() {
        let disk = [0u8; 10];
        let mut buf = [0u8; 4];
        assert!(disk[..].read_at(7, &mut buf).is_err());
        assert!(disk[..].read_at(u64::MAX - 1, &mut buf).is_err());
        disk[..].read_at(6, &mut buf).unwrap();
    }
}
