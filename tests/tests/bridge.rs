//! Taps on Linux bridges (`--net tap=NAME,bridge=BR`), end to end in
//! network namespaces: the host namespace of the guest has a bridge with a
//! veth port whose other end, in a second namespace with an address, is
//! the "rest of the network". Frames go from the guest across the bridge to
//! that port and back; the tap takes the bridge's MTU, and a tap the VMM
//! created is gone when it exits while one made beforehand stays.

use std::process::Command;
use std::time::Duration;

use vmm_tests::harness::{testguest, TempDir, Vmm};
use vmm_tests::netns::{self, ip, Netns, PacketSocket};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);
/// The test guest's frame ethertype.
const ETHERTYPE: u16 = 0x88b5;
const BRIDGE: &str = "vmbr0";
/// The bridge's MTU: not the default, so that following it shows.
const BRIDGE_MTU: &str = "1400";
/// The far port's MAC.
const PEER_MAC: &str = "02:00:00:00:99:02";

/// The guest's host namespace (bridge, tap, one veth end) and the peer's.
struct Lan {
    host: Netns,
    peer: Netns,
}

/// A bridge with MTU 1400 in `host`, and a veth from it to `peer`, where
/// the end `veth-peer` has 10.99.0.2/24.
fn lan() -> Option<Lan> {
    if !netns::available() {
        return None;
    }
    let host = Netns::create("br");
    let peer = Netns::create("brpeer");
    let h = host.name.as_str();
    ip(&["-n", h, "link", "add", BRIDGE, "type", "bridge"]);
    ip(&["-n", h, "link", "set", BRIDGE, "mtu", BRIDGE_MTU, "up"]);
    ip(&[
        "-n",
        h,
        "link",
        "add",
        "veth-br",
        "type",
        "veth",
        "peer",
        "name",
        "veth-peer",
    ]);
    ip(&["-n", h, "link", "set", "veth-peer", "netns", &peer.name]);
    ip(&["-n", h, "link", "set", "veth-br", "mtu", BRIDGE_MTU]);
    ip(&["-n", h, "link", "set", "veth-br", "master", BRIDGE, "up"]);
    let p = peer.name.as_str();
    ip(&[
        "-n",
        p,
        "link",
        "set",
        "veth-peer",
        "address",
        PEER_MAC,
        "mtu",
        BRIDGE_MTU,
        "up",
    ]);
    ip(&["-n", p, "addr", "add", "10.99.0.2/24", "dev", "veth-peer"]);
    Some(Lan { host, peer })
}

/// `ip -d link show NAME` in `ns`, or None if there is no such interface.
fn link(ns: &Netns, name: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", &ns.name, "-d", "link", "show", name])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn vmm_on_bridge(lan: &Lan, dir: &TempDir, net: &str, cmdline: &str) -> Vmm {
    let args: Vec<String> = vec![
        "--kernel".into(),
        testguest().display().to_string(),
        "--cmdline".into(),
        format!("-- net-info; {cmdline}"),
        "--net".into(),
        net.into(),
        "--api-socket".into(),
        dir.join("api.sock").display().to_string(),
    ];
    Vmm::spawn_with_prefix(&lan.host.exec_prefix(), &args)
}

/// The `mac=` of the guest's `net0:` line.
fn guest_mac(vmm: &mut Vmm) -> ([u8; 6], String) {
    let info = vmm.wait_for("net0: mac=", BOOT);
    let mac = netns::parse_mac(
        info.split("mac=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap(),
    );
    (mac, info)
}

/// A test-ethertype frame from `src` to `dst` with `seq` in its payload.
fn frame(dst: [u8; 6], src: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend(dst);
    f.extend(src);
    f.extend(ETHERTYPE.to_be_bytes());
    f.extend(*b"BRIDGED!");
    f.extend(seq.to_le_bytes());
    f.resize(200, 0x5a);
    f
}

#[test]
fn guest_frames_cross_the_bridge_to_another_port_and_back() {
    require_kvm!();
    let Some(lan) = lan() else { return };
    let dir = TempDir::new("bridge");
    let mut vmm = vmm_on_bridge(&lan, &dir, &format!("tap=vmtap0,bridge={BRIDGE}"), "");
    let (guest, info) = guest_mac(&mut vmm);

    // The VMM made the tap a port of the bridge, with its MTU, and up:
    // nobody else touched it.
    let tap = link(&lan.host, "vmtap0").expect("the VMM created the tap");
    assert!(tap.contains(&format!("master {BRIDGE}")), "{tap}");
    assert!(tap.contains(&format!("mtu {BRIDGE_MTU}")), "{tap}");
    assert!(tap.contains(",UP"), "the tap is up: {tap}");
    // ...and offered the bridge's MTU to the guest (VIRTIO_NET_F_MTU, bit 3).
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
    assert_ne!(offered & (1 << 3), 0, "MTU offered: {info}");

    // Guest to the far port: broadcast frames flooded by the bridge.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let collector = lan.peer.spawn(move || {
        let socket = PacketSocket::bind("veth-peer", ETHERTYPE);
        ready_tx.send(()).unwrap();
        let mut frames = Vec::new();
        while frames.len() < 3 {
            match socket.recv(SHORT) {
                Some(f) if f[6..12] == guest => frames.push(f),
                Some(_) => {}
                None => break,
            }
        }
        frames
    });
    ready_rx.recv().unwrap();
    vmm.send_line("net-send count=3 size=300");
    vmm.wait_for("net: sent=3", SHORT);
    let frames = collector.join().unwrap();
    assert_eq!(
        frames.len(),
        3,
        "guest frames at the far port\n{}",
        vmm.report()
    );

    // The far port to the guest and back: the guest echoes, the bridge
    // (which learnt both MACs) carries each frame both ways.
    vmm.send_line("net-echo");
    vmm.wait_for("net-echo: start", SHORT);
    let echoed = lan.peer.run(move || {
        let socket = PacketSocket::bind("veth-peer", ETHERTYPE);
        let peer_mac = netns::parse_mac(PEER_MAC);
        let mut back = 0;
        for seq in 0..10u32 {
            let sent = frame(guest, peer_mac, seq);
            socket.send(&sent);
            while let Some(f) = socket.recv(Duration::from_secs(3)) {
                if f[6..12] == guest {
                    assert_eq!(&f[0..6], &peer_mac, "the echo comes back to its sender");
                    assert_eq!(&f[12..], &sent[12..], "payload unchanged");
                    back += 1;
                    break;
                }
            }
        }
        back
    });
    assert_eq!(echoed, 10, "echoes across the bridge\n{}", vmm.report());
    vmm.send_line("stop");
    vmm.send_line("poweroff");
    assert_eq!(vmm.exit_code(SHORT), 0, "{}", vmm.report());

    // The tap was the VMM's: it went with it, and left the bridge.
    assert_eq!(link(&lan.host, "vmtap0"), None, "the tap outlived its VMM");
    let ports = Command::new("ip")
        .args(["-n", &lan.host.name, "link", "show", "master", BRIDGE])
        .output()
        .unwrap();
    let ports = String::from_utf8_lossy(&ports.stdout);
    assert!(!ports.contains("vmtap0"), "{ports}");
    assert!(ports.contains("veth-br"), "{ports}");
}

#[test]
fn a_tap_made_beforehand_stays_and_may_already_be_on_the_bridge() {
    require_kvm!();
    let Some(lan) = lan() else { return };
    let dir = TempDir::new("bridge-persist");
    let h = lan.host.name.as_str();
    ip(&[
        "-n", h, "tuntap", "add", "dev", "vmtap1", "mode", "tap", "vnet_hdr",
    ]);
    // Twice: the second VMM finds the tap already a port of the bridge
    // (as after a restart, or an admin who attached it by hand).
    for run in 0..2 {
        let mut vmm = vmm_on_bridge(&lan, &dir, &format!("tap=vmtap1,bridge={BRIDGE}"), "");
        guest_mac(&mut vmm);
        let tap = link(&lan.host, "vmtap1").unwrap();
        assert!(
            tap.contains(&format!("master {BRIDGE}")),
            "run {run}: {tap}"
        );
        assert!(
            tap.contains(&format!("mtu {BRIDGE_MTU}")),
            "run {run}: {tap}"
        );
        vmm.send_line("poweroff");
        assert_eq!(vmm.exit_code(SHORT), 0, "run {run}: {}", vmm.report());
        let tap = link(&lan.host, "vmtap1");
        assert!(
            tap.is_some(),
            "run {run}: a tap the VMM did not create must stay"
        );
    }
}

#[test]
fn a_missing_bridge_or_one_that_is_not_a_bridge_is_named_and_nothing_runs() {
    require_kvm!();
    let Some(lan) = lan() else { return };
    let dir = TempDir::new("bridge-errors");
    // Missing, not a bridge (a veth), and a tap held by another bridge.
    let h = lan.host.name.as_str();
    ip(&["-n", h, "link", "add", "vmbr9", "type", "bridge"]);
    ip(&[
        "-n", h, "tuntap", "add", "dev", "vmtap2", "mode", "tap", "vnet_hdr",
    ]);
    ip(&["-n", h, "link", "set", "vmtap2", "master", "vmbr9"]);
    for (net, code, words) in [
        (
            "tap=vmtap3,bridge=nosuchbr",
            2,
            "bridge nosuchbr: no such interface",
        ),
        ("tap=vmtap3,bridge=veth-br", 2, "veth-br is not a bridge"),
        (
            "tap=vmtap2,bridge=vmbr0",
            1,
            "tap vmtap2 is already a port of another bridge (or bond) than vmbr0",
        ),
    ] {
        let mut vmm = vmm_on_bridge(&lan, &dir, net, "");
        assert_eq!(vmm.exit_code(SHORT), code, "{net}\n{}", vmm.report());
        let stderr = vmm.stderr().join("\n");
        assert!(stderr.contains(words), "{net}: {stderr}");
        assert!(
            !vmm.console().iter().any(|l| l.contains("net0: mac=")),
            "{net}: the guest ran"
        );
    }
    // The tap made for the failed starts is gone again.
    assert_eq!(link(&lan.host, "vmtap3"), None);
}

/// Makes /dev/net/tun mode 0666 (Debian's) for a test; puts back the mode it had.
struct TunMode(u32);

impl TunMode {
    fn open_to_all() -> TunMode {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata("/dev/net/tun")
            .unwrap()
            .permissions()
            .mode();
        std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(0o20666)).unwrap();
        TunMode(mode)
    }
}

impl Drop for TunMode {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions("/dev/net/tun", std::fs::Permissions::from_mode(self.0));
    }
}

#[test]
fn a_vmm_that_dropped_root_keeps_its_bridge_port_across_a_guest_reboot() {
    // With --user the VMM has no CAP_NET_ADMIN when a guest reboot
    // (on_reset reboot) rebuilds the NIC: a tap made for the user and
    // already on the bridge must need no privileged call then.
    require_kvm!();
    let Some(lan) = lan() else { return };
    let h = lan.host.name.as_str();
    ip(&[
        "-n", h, "tuntap", "add", "dev", "vmtap5", "mode", "tap", "vnet_hdr", "user", "nobody",
    ]);
    // Re-opening the tap needs /dev/net/tun open to all, as Debian ships
    // it (some hosts make it 0600); the mode is put back afterwards.
    let _tun = TunMode::open_to_all();
    let args: Vec<String> = vec![
        "--kernel".into(),
        testguest().display().to_string(),
        "--cmdline".into(),
        "-- net-info".into(),
        "--net".into(),
        format!("tap=vmtap5,bridge={BRIDGE}"),
        "--on-reset".into(),
        "reboot".into(),
        "--user".into(),
        "nobody".into(),
    ];
    let mut vmm = Vmm::spawn_with_prefix(&lan.host.exec_prefix(), &args);
    let (guest, _) = guest_mac(&mut vmm);
    vmm.send_line("reset");
    vmm.wait_for("testguest: reset", SHORT);
    // Booted again, on the same bridge port, and frames still cross it.
    let (again, _) = guest_mac(&mut vmm);
    assert_eq!(again, guest);
    let tap = link(&lan.host, "vmtap5").unwrap();
    assert!(tap.contains(&format!("master {BRIDGE}")), "{tap}");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let collector = lan.peer.spawn(move || {
        let socket = PacketSocket::bind("veth-peer", ETHERTYPE);
        ready_tx.send(()).unwrap();
        std::iter::from_fn(|| socket.recv(SHORT))
            .find(|f| f[6..12] == guest)
            .is_some()
    });
    ready_rx.recv().unwrap();
    vmm.send_line("net-send count=1");
    vmm.wait_for("net: sent=1", SHORT);
    assert!(collector.join().unwrap(), "{}", vmm.report());
    vmm.send_line("poweroff");
    assert_eq!(vmm.exit_code(SHORT), 0, "{}", vmm.report());
}
