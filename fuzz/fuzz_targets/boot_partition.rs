//! The partition table of a guest disk (MBR with logical partitions, GPT
//! with its backup header, 512 and 4096-byte sectors). Nothing may panic
//! or loop, and every partition found lies inside the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::boot::partition::read_table;

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = read_table(&data.to_vec()) {
        for p in &table.partitions {
            let end = p.start.checked_add(p.size).expect("no overflow");
            assert!(end <= data.len() as u64, "{p} ends past the disk");
        }
    }
});
