//! virtio-net on a socket pair standing in for the tap: the input gives the
//! negotiated features, frames arriving from the tap, and the rx, tx and
//! control queues (chains of any shape; tx chains carry the virtio-net
//! header and the frame). The device's worker serves everything queued when
//! it starts and is then stopped. Nothing may panic or hang, and every
//! frame that reaches the tap has a header and an Ethernet header and is
//! no longer than the device's maximum.
#![no_main]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use config::NetConfig;
use devices::virtio::net::{Net, Tap, MAX_FRAME_LEN, NET_HDR_LEN};
use devices::virtio::VirtioDevice;
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::{activate_context, Input};

fn socket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: both fds were just created and are owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let (device_end, host_end) = socket_pair();
    let config = NetConfig {
        tap: Some("fuzz0".into()),
        id: Some("net0".into()),
        ..Default::default()
    };
    let mut net = Net::on_tap(&config, Tap::from_socket(device_end, "fuzz0")).expect("device");
    let acked = input.u64() & net.features();
    // Frames waiting on the tap for the guest.
    for _ in 0..input.u8() % 4 {
        let frame = input.chunk(MAX_FRAME_LEN);
        // SAFETY: sends from a live buffer of its length on our own socket.
        unsafe {
            libc::send(host_end.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0);
        }
    }
    let context = activate_context(&mut input, 3, acked);
    if net.activate(context).is_ok() {
        // Stops the worker once it has served what was queued.
        net.reset();
    }
    let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
    loop {
        // SAFETY: receives into a live buffer of its length on our own socket.
        let n = unsafe { libc::recv(host_end.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { break };
        assert!(n >= NET_HDR_LEN + 14, "a {n}-byte frame reached the tap");
        assert!(n <= MAX_FRAME_LEN, "a {n}-byte frame reached the tap");
    }
});
