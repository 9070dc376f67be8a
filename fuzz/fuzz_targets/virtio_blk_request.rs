//! The virtio-blk request parser on descriptor chains the input lays out
//! in guest memory (direct and indirect descriptors, loops, buffers across
//! the end of RAM or in its hole), against disk limits from the input.
//! Nothing may panic or loop; a request accepted for I/O lies inside the
//! disk, has whole sectors and buffers inside guest memory that add up to
//! its length; the status byte, when there is one, is in guest memory.
#![no_main]

use devices::virtio::block::request::{parse, Limits, Parsed, RequestType, Scratch};
use devices::virtio::block::SEG_MAX;
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryBackend;
use vmm_fuzz::{install_data, memory, Input, QueueSpec};

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let limits = Limits {
        size: input.u64() >> (input.u8() % 64),
        readonly: input.u8() & 1 != 0,
        max_descriptors: match input.u8() {
            0 => SEG_MAX as usize + 2,
            n => usize::from(n),
        },
        max_discard_sectors: input.u32(),
        max_write_zeroes_sectors: input.u32(),
    };
    let spec = QueueSpec::decode(&mut input);
    let mem = memory();
    let mut queue = spec.install(&mem, 0);
    install_data(&mem, input.rest());
    let mut scratch = Scratch::default();
    // Bounded by the ring: every pop advances next_avail.
    for _ in 0..=spec.size() {
        let Some(chain) = queue.pop_descriptor_chain(&mem) else {
            break;
        };
        match parse(chain, &mem, &limits, &mut scratch) {
            Parsed::Valid(request) => {
                assert!(mem.check_range(request.status, 1), "status outside RAM");
                let data_len: u64 = scratch.data.iter().map(|s| u64::from(s.len)).sum();
                for s in &scratch.data {
                    assert!(mem.check_range(s.addr, s.len as usize), "{s:?} outside RAM");
                }
                match request.kind {
                    RequestType::In | RequestType::Out => {
                        assert_eq!(data_len, request.len, "buffers and length differ");
                        assert_eq!(request.offset % 512, 0);
                        assert_eq!(request.len % 512, 0);
                        let end = request
                            .offset
                            .checked_add(request.len)
                            .expect("no overflow");
                        assert!(end <= limits.size, "past the end of the disk");
                        assert!(!(limits.readonly && request.kind == RequestType::Out));
                    }
                    RequestType::GetId => assert_eq!(data_len, request.len),
                    RequestType::Discard | RequestType::WriteZeroes => {
                        assert!(!limits.readonly);
                        let end = request
                            .offset
                            .checked_add(request.len)
                            .expect("no overflow");
                        assert!(end <= limits.size, "past the end of the disk");
                    }
                    RequestType::Flush => {}
                }
            }
            Parsed::Invalid { status, .. } => {
                if let Some(status) = status {
                    assert!(mem.check_range(status, 1), "status outside RAM");
                }
            }
        }
    }
});
