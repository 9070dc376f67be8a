//! virtio-net end to end: the guest's NIC on a tap inside a network
//! namespace, a raw Ethernet socket on the tap as the host-side peer,
//! frames both ways.

use std::time::Duration;

use vmm_tests::harness::{field, TempDir, Vmm};
use vmm_tests::netns::{self, Netns, PacketSocket};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);
/// The test guest's frame ethertype (local experimental).
const ETHERTYPE: u16 = 0x88b5;
const TAP: &str = "vmtap0";

fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A test frame as the guest builds them (tests/guest/src/net.rs).
fn frame(dst: [u8; 6], src: [u8; 6], seq: u32, payload_len: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload_len);
    f.extend(dst);
    f.extend(src);
    f.extend(ETHERTYPE.to_be_bytes());
    let body: Vec<u8> = (0..payload_len.saturating_sub(16))
        .map(|i| (seq as usize + i) as u8)
        .collect();
    f.extend(*b"TGNF");
    f.extend(seq.to_le_bytes());
    f.extend((payload_len as u32).to_le_bytes());
    f.extend(fnv1a32(&body).to_le_bytes());
    f.extend(body);
    f
}

/// Checks a frame from the guest; returns its sequence number.
fn check_guest_frame(f: &[u8], guest_mac: [u8; 6]) -> u32 {
    assert!(f.len() >= 30, "short frame {f:02x?}");
    assert_eq!(&f[6..12], &guest_mac, "source MAC");
    assert_eq!(u16::from_be_bytes([f[12], f[13]]), ETHERTYPE);
    let p = &f[14..];
    assert_eq!(&p[0..4], b"TGNF");
    let seq = u32::from_le_bytes(p[4..8].try_into().unwrap());
    let len = u32::from_le_bytes(p[8..12].try_into().unwrap()) as usize;
    assert_eq!(len, p.len(), "payload length field");
    assert_eq!(
        u32::from_le_bytes(p[12..16].try_into().unwrap()),
        fnv1a32(&p[16..]),
        "payload checksum"
    );
    seq
}

struct Nic {
    net: Netns,
    vmm: Vmm,
    mac: [u8; 6],
    _dir: TempDir,
}

impl Nic {
    /// The driver's `net0: mac=... acked=0x...` line.
    fn info_line(&self) -> String {
        self.vmm
            .console()
            .into_iter()
            .find(|l| l.starts_with("net0: mac="))
            .expect("net-info ran at boot")
    }
}

fn boot_with_nic(cmdline: &str, extra_net: &str) -> Option<Nic> {
    boot_with_nic_and_options("", cmdline, extra_net)
}

/// [`boot_with_nic`] with guest boot options (`key=value` before `--`).
fn boot_with_nic_and_options(options: &str, cmdline: &str, extra_net: &str) -> Option<Nic> {
    if !netns::available() {
        return None;
    }
    let net = Netns::create("nic");
    let dir = TempDir::new("net");
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        vmm_tests::harness::testguest().display().to_string(),
        "--cmdline".into(),
        format!("{options} -- net-info; {cmdline}"),
        "--net".into(),
        format!("tap={TAP}{extra_net}"),
        "--api-socket".into(),
        dir.join("api.sock").display().to_string(),
    ];
    args.extend(["--cpus".into(), "2".into()]);
    let mut vmm = Vmm::spawn_with_prefix(&net.exec_prefix(), &args);
    let info = vmm.wait_for("net0: mac=", BOOT);
    let mac = netns::parse_mac(
        info.split("mac=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap(),
    );
    net.link_up(TAP, SHORT);
    Some(Nic {
        net,
        vmm,
        mac,
        _dir: dir,
    })
}

#[test]
fn frames_flow_both_ways_between_the_guest_and_a_host_peer() {
    require_kvm!();
    let Some(mut nic) = boot_with_nic("", "") else {
        return;
    };
    let guest_mac = nic.mac;
    let host_mac = [0x02, 0, 0, 0, 0, 0x42];

    // Guest to host: the peer socket must be open before the guest sends.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let collector = nic.net.spawn(move || {
        let socket = PacketSocket::bind(TAP, ETHERTYPE);
        ready_tx.send(()).unwrap();
        let mut frames = Vec::new();
        while frames.len() < 5 {
            match socket.recv(SHORT) {
                Some(f) => frames.push(f),
                None => break,
            }
        }
        frames
    });
    ready_rx.recv().unwrap();
    nic.vmm.send_line("net-send count=5 size=300");
    nic.vmm.wait_for("net: sent=5", SHORT);
    let frames = collector.join().unwrap();
    assert_eq!(frames.len(), 5, "frames seen on the tap");
    let seqs: Vec<u32> = frames
        .iter()
        .map(|f| check_guest_frame(f, guest_mac))
        .collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    // Host to guest.
    nic.vmm.send_line("net-recv count=5 timeout_ms=5000");
    std::thread::sleep(Duration::from_millis(300));
    nic.net.run(move || {
        let socket = PacketSocket::bind(TAP, ETHERTYPE);
        for seq in 100..105 {
            socket.send(&frame(guest_mac, host_mac, seq, 400));
        }
    });
    let received = nic.vmm.wait_for("net: received=", SHORT);
    assert_eq!(
        field(&received, "received"),
        Some(5),
        "{}",
        nic.vmm.report()
    );
    let oks = nic
        .vmm
        .console()
        .iter()
        .filter(|l| l.starts_with("net-rx:") && l.contains("ok=1"))
        .count();
    assert_eq!(oks, 5, "{}", nic.vmm.report());

    let counters = nic.vmm.api().counters().unwrap();
    assert!(counters["net0"]["tx_frames"] >= 5, "{counters:?}");
    assert!(counters["net0"]["rx_frames"] >= 5, "{counters:?}");
}

#[test]
fn the_guest_echoes_host_frames_round_trip() {
    require_kvm!();
    echo_round_trip("");
}

#[test]
fn the_echo_round_trip_with_linux_ring_features() {
    // Linux's virtio_net acks VIRTIO_F_EVENT_IDX (notifications and
    // interrupts by avail_event / used_event, not the ring flags) and
    // VIRTIO_F_INDIRECT_DESC (multi-buffer chains in tables of their own).
    require_kvm!();
    echo_round_trip("event_idx=1 indirect=1");
}

/// Twenty host frames echoed back by the guest, whose boot `options` choose
/// the ring features; checks they were negotiated as asked.
fn echo_round_trip(options: &str) {
    let Some(mut nic) = boot_with_nic_and_options(options, "net-echo", "") else {
        return;
    };
    let info = nic.info_line();
    let acked = hex_field(&info, "acked");
    assert_eq!(
        acked & (1 << 29) != 0,
        options.contains("event_idx=1"),
        "{info}"
    );
    assert_eq!(
        acked & (1 << 28) != 0,
        options.contains("indirect=1"),
        "{info}"
    );
    let guest_mac = nic.mac;
    std::thread::sleep(Duration::from_millis(200));
    let returned = nic.net.run(move || {
        let socket = PacketSocket::bind(TAP, ETHERTYPE);
        let host_mac = [0x02, 0, 0, 0, 0, 0x43];
        let mut back = 0;
        for seq in 0..20u32 {
            let sent = frame(guest_mac, host_mac, seq, 1000);
            socket.send(&sent);
            // Our own frame also shows up on the socket; wait for the echo.
            while let Some(f) = socket.recv(Duration::from_secs(2)) {
                if f[6..12] == guest_mac {
                    assert_eq!(&f[0..6], &host_mac, "echo goes back to the sender");
                    assert_eq!(&f[12..], &sent[12..], "payload unchanged");
                    back += 1;
                    break;
                }
            }
        }
        back
    });
    assert_eq!(returned, 20, "{}", nic.vmm.report());
    nic.vmm.send_line("stop");
}

#[test]
fn offloads_negotiated_by_the_guest_reach_the_tap() {
    require_kvm!();
    let Some(mut nic) = boot_with_nic("", "") else {
        return;
    };
    let info = nic
        .vmm
        .console()
        .into_iter()
        .find(|l| l.starts_with("net0: mac="))
        .unwrap();
    let offered = u64::from_str_radix(
        info.split("features=0x")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap(),
        16,
    )
    .unwrap();
    // The device offers checksum and TSO offloads to a tap that takes them.
    for (bit, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
    ] {
        assert_ne!(offered & (1 << bit), 0, "{name} offered: {info}");
    }
    nic.vmm.send_line("poweroff");
    assert_eq!(nic.vmm.exit_code(SHORT), 0);
}

/// A hexadecimal field `key=0x...` of a console line.
fn hex_field(line: &str, key: &str) -> u64 {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix("=0x"))
        .unwrap_or_else(|| panic!("no {key}=0x.. in {line:?}"));
    u64::from_str_radix(value, 16).unwrap()
}

#[test]
fn offloads_acked_with_net_offload_turn_the_taps_offloads_on() {
    require_kvm!();
    const GUEST_CSUM: u64 = 1 << 1;
    const GUEST_TSO4: u64 = 1 << 7;
    // With the option the guest acks the offloads; without, none (the
    // existing tests' default).
    for (options, on) in [("net_offload=1", true), ("", false)] {
        let Some(mut nic) = boot_with_nic_and_options(options, "", "") else {
            return;
        };
        let info = nic.info_line();
        let acked = hex_field(&info, "acked");
        for (bit, name) in [(GUEST_CSUM, "GUEST_CSUM"), (GUEST_TSO4, "GUEST_TSO4")] {
            assert_eq!(acked & bit != 0, on, "{options:?}: {name} acked: {info}");
        }
        // The device set the tap's offloads at DRIVER_OK, before net-info.
        let (csum, tso) = netns::tap_offloads(&nic.net, TAP);
        eprintln!("{options:?}: acked={acked:#x}, tap tx-checksumming={csum} tso={tso}");
        assert_eq!(
            (csum, tso),
            (on, on),
            "{options:?}: tap tx-checksumming, tcp-segmentation-offload ({info})"
        );
        // Plain frames still reach the guest intact.
        let guest_mac = nic.mac;
        nic.net.run(move || {
            let socket = PacketSocket::bind(TAP, ETHERTYPE);
            socket.send(&frame(guest_mac, [0x02, 0, 0, 0, 0, 0x44], 7, 500));
        });
        nic.vmm.send_line(&format!(
            "net-recv count=1 ethertype={ETHERTYPE:#x} timeout_ms=5000"
        ));
        let line = nic.vmm.wait_for("net: received=", SHORT);
        assert_eq!(
            (field(&line, "received"), field(&line, "ok")),
            (Some(1), Some(1)),
            "{options:?}: {line}"
        );
        nic.vmm.send_line("poweroff");
        assert_eq!(nic.vmm.exit_code(SHORT), 0, "{}", nic.vmm.report());
    }
}
