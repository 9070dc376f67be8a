//! The balloon's queues as a guest driver fills them: inflate and deflate
//! buffers of page frame numbers, a stats buffer, free page reports, each a
//! chain of any shape, with the features the input negotiates. The
//! device's worker serves everything queued when it starts; then the stats
//! buffer is asked back and the device reset. Nothing may panic or hang;
//! the backend is only ever asked to discard whole pages of guest RAM, and
//! the balloon never counts more pages than the guest has.
#![no_main]

use std::io;
use std::sync::Arc;

use config::BalloonConfig;
use devices::virtio::balloon::{Balloon, BalloonBackend};
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{activate_context, Input, RAM};

struct CheckingBackend;

impl BalloonBackend for CheckingBackend {
    fn discard(&self, gpa: u64, len: u64) -> io::Result<()> {
        assert!(
            len > 0 && gpa.is_multiple_of(4096) && len.is_multiple_of(4096),
            "{gpa:#x}+{len:#x}"
        );
        let inside = RAM
            .iter()
            .any(|&(start, size)| gpa >= start && gpa.saturating_add(len) <= start + size);
        assert!(inside, "discarded {gpa:#x}+{len:#x}, not guest RAM");
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.u8();
    let config = BalloonConfig {
        target_mib: u64::from(flags >> 4) % 2,
        deflate_on_oom: flags & 1 != 0,
        free_page_reporting: flags & 2 != 0,
        stats_interval_s: 0,
    };
    let mut balloon = Balloon::new(&config, &RAM, Arc::new(CheckingBackend)).expect("balloon");
    let handle = balloon.handle();
    let acked = input.u64() & balloon.features();
    let context = activate_context(&mut input, balloon.queue_max_sizes().len() as u64, acked);
    if balloon.activate(context).is_ok() {
        balloon.request_stats();
        let _ = balloon.held_stats_buffer();
        // Stops the worker once it has served what was queued.
        balloon.reset();
    }
    let ram_pages: u64 = RAM.iter().map(|&(_, len)| len / 4096).sum();
    assert!(handle.inflated_pages() <= ram_pages);
});
