//! Writes the seed corpora to fuzz/seeds/TARGET/: a few valid inputs per
//! target, so the fuzzers start from requests, configs, streams and rings a
//! real peer or driver would send. Run from fuzz/: `cargo run --bin seeds`.
//! The disk images for boot_disk and boot_partition are made by
//! resources/fuzz.sh (mkfs.ext4 and sfdisk), not here.

use std::fs;
use std::path::Path;

use migration::protocol::{self, Kind, PageRange};
use vmm_fuzz::{Desc, Output, QueueSpec, DATA, F_INDIRECT, F_NEXT, F_WRITE};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    fs::create_dir_all(&dir).expect("seed directory");
    fs::write(dir.join(name), bytes).expect("seed file");
}

fn http() {
    let request = |method: &str, path: &str, body: &str| {
        let mut r = format!("{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\n");
        if !body.is_empty() {
            r += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        r + "\r\n" + body
    };
    write(
        "http_request",
        "ping",
        request("GET", "vmm.ping", "").as_bytes(),
    );
    write(
        "http_request",
        "create",
        request("PUT", "vm.create", VM_CONFIG).as_bytes(),
    );
    let pipelined = request("PUT", "vm.pause", "")
        + &request("PUT", "vm.resume", r#"{"force":true}"#)
        + &request(
            "PUT",
            "vm.shutdown",
            r#"{"mode":"graceful","timeout_ms":500}"#,
        )
        + &request("PUT", "vm.balloon", r#"{"target_mib":64}"#);
    write("http_request", "pipelined", pipelined.as_bytes());
    write(
        "http_request",
        "send_migration",
        request(
            "PUT",
            "vm.send-migration",
            r#"{"destination":"tcp:10.0.0.2:6000","token":"secret","downtime_ms":300,"timeout_s":60}"#,
        )
        .as_bytes(),
    );
    write(
        "http_request",
        "receive_migration",
        request(
            "PUT",
            "vm.receive-migration",
            r#"{"listen":"unix:/run/vmm/in.sock","token":"secret","timeout_s":30}"#,
        )
        .as_bytes(),
    );
    write(
        "http_request",
        "http10_expect",
        b"PUT /api/v1/vm.migration-parameters HTTP/1.0\r\nExpect: 100-continue\r\nConnection: keep-alive\r\nContent-Length: 20\r\n\r\n{\"downtime_ms\":100}\n",
    );
}

const VM_CONFIG: &str = r#"{"cpus":{"boot_vcpus":2},"memory":{"size_mib":256,"backing":"memfd"},"payload":{"kernel":"/boot/vmlinuz","cmdline":"console=ttyS0","initrd":"/boot/initrd.img"},"serial":{"mode":"socket","path":"/run/vmm/web1.console"},"disks":[{"path":"/dev/drbd0","id":"root","direct":true,"serial":"web1"}],"nets":[{"tap":"tap-web1","mac":"52:54:00:12:34:56"}],"balloon":{"target_mib":0,"deflate_on_oom":true},"on_reset":"reboot"}"#;

fn vm_config() {
    let mut json = vec![0u8];
    json.extend_from_slice(VM_CONFIG.as_bytes());
    write("vm_config", "json", &json);
    write(
        "vm_config",
        "json_minimal",
        b"\x00{\"payload\":{\"kernel\":\"/k\"}}",
    );
    let specs: [(u8, &str, &str); 6] = [
        (1, "disk", "path=/dev/vg/web1,id=root,readonly=off,direct=on,serial=web1,logical_block_size=4096,rate_bytes=10M,rate_ops=1000"),
        (2, "net", "tap=tap0,id=net0,mac=52:54:00:12:34:56,rate_bytes=1G"),
        (3, "serial", "socket=/run/vmm/a.console,buffer=1M"),
        (3, "serial_file", "file=/var/log/vm.log"),
        (4, "memory", "size=2G,backing=anonymous,mergeable=on,thp=off,overcommit=on"),
        (5, "balloon", "target_mib=64,deflate_on_oom=on,free_page_reporting=on,stats_interval_s=5"),
    ];
    for (which, name, text) in specs {
        let mut seed = vec![which];
        seed.extend_from_slice(text.as_bytes());
        write("vm_config", name, &seed);
    }
}

fn message(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    protocol::send_raw(&mut out, kind, payload).expect("in memory");
    out
}

/// A source's whole stream after the handshake: config, two memory rounds
/// (data, zero pages, the high region), sync, state, complete.
fn migration_stream(state: &[u8]) -> Vec<u8> {
    let config = br#"{"memory":{"size_mib":16},"payload":{"kernel":"/k"}}"#;
    let mut s = message(Kind::Config, config);
    let mut memory = Vec::new();
    let data = PageRange {
        gpa: 0x1000,
        len: 0x2000,
        zero: false,
    };
    memory.extend_from_slice(&data.encode());
    memory.extend((0..0x2000).map(|i| (i % 251) as u8));
    let zero = PageRange {
        gpa: 0x8000,
        len: 0x4000,
        zero: true,
    };
    memory.extend_from_slice(&zero.encode());
    let high = PageRange {
        gpa: 2 << 20,
        len: 0x1000,
        zero: false,
    };
    memory.extend_from_slice(&high.encode());
    memory.extend(std::iter::repeat_n(0xa5, 0x1000));
    s.extend(message(Kind::Memory, &memory));
    s.extend(message(Kind::Sync, b"{}"));
    s.extend(message(Kind::State, state));
    s.extend(message(Kind::Complete, b"{}"));
    s
}

/// The smallest VM state the decoder accepts (no vCPUs, no devices).
fn empty_state() -> Vec<u8> {
    let snapshot = vmm::snapshot::VmSnapshot {
        version: vmm::snapshot::SNAPSHOT_VERSION,
        vcpus: Vec::new(),
        irqchips: Vec::new(),
        pit: Default::default(),
        clock: Default::default(),
        serial: Default::default(),
        i8042: Default::default(),
        ged: Default::default(),
        devices: Default::default(),
    };
    snapshot.encode().expect("encodes")
}

fn migration() {
    let state = empty_state();
    write("migration_receive", "whole", &migration_stream(&state));
    let mut abandon = message(
        Kind::Config,
        br#"{"memory":{"size_mib":16},"payload":{"kernel":"/k"}}"#,
    );
    abandon.extend(message(Kind::Abandon, br#"{"message":"cancelled"}"#));
    write("migration_receive", "abandon", &abandon);

    let mut stream = vec![0u8];
    stream.extend(migration_stream(&state));
    write("migration_protocol", "stream", &stream);
    let hello = message(
        Kind::Hello,
        format!(r#"{{"vmm_version":"0.1.0","nonce":"{}"}}"#, "ab".repeat(32)).as_bytes(),
    );
    let proof = message(
        Kind::Proof,
        format!(r#"{{"proof":"{}"}}"#, "cd".repeat(32)).as_bytes(),
    );
    write(
        "migration_protocol",
        "target_auth",
        &[&[1u8][..], &hello, &proof].concat(),
    );
    let challenge = message(
        Kind::Challenge,
        format!(r#"{{"nonce":"{}"}}"#, "ef".repeat(32)).as_bytes(),
    );
    write(
        "migration_protocol",
        "source_auth",
        &[&[2u8][..], &challenge, &proof].concat(),
    );
    write(
        "migration_protocol",
        "hex",
        format!("\x03{}", "0f".repeat(32)).as_bytes(),
    );
}

/// A chain of `bufs` starting at descriptor `first`.
fn chain(descs: &mut Vec<Desc>, bufs: &[(u64, u32, u16)]) -> u16 {
    let first = descs.len() as u16;
    for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
        let last = i + 1 == bufs.len();
        descs.push(Desc {
            addr,
            len,
            flags: if last { flags } else { flags | F_NEXT },
            next: if last { 0 } else { first + i as u16 + 1 },
        });
    }
    first
}

fn queue(descs: Vec<Desc>, heads: Vec<u16>) -> QueueSpec {
    QueueSpec {
        // At least 16 entries, enough for every descriptor.
        size_log2: (descs.len().max(16).next_power_of_two().trailing_zeros()) as u8,
        descs,
        heads,
        avail_flags: 0,
        bogus_idx: None,
    }
}

fn virtio_blk() {
    // Requests at DATA: headers every 16 bytes from DATA, status bytes at
    // DATA + 0x100, data buffers at DATA + 0x1000.
    let header = |t: u32, sector: u64| {
        let mut h = Vec::new();
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        h
    };
    let mut data = vec![0u8; 0x3000];
    let types = [0u32, 1, 4, 8, 11, 13];
    for (i, &t) in types.iter().enumerate() {
        data[i * 16..i * 16 + 16].copy_from_slice(&header(t, 8));
    }
    // The discard / write-zeroes segment: sector 0, 8 sectors, no flags.
    data[0x200..0x208].copy_from_slice(&0u64.to_le_bytes());
    data[0x208..0x20c].copy_from_slice(&8u32.to_le_bytes());
    let mut descs = Vec::new();
    let mut heads = Vec::new();
    let status = DATA + 0x100;
    let buf = DATA + 0x1000;
    let h = |i: u64| DATA + 16 * i;
    // IN: header, two data buffers, status.
    heads.push(chain(
        &mut descs,
        &[
            (h(0), 16, 0),
            (buf, 512, F_WRITE),
            (buf + 512, 512, F_WRITE),
            (status, 1, F_WRITE),
        ],
    ));
    // OUT.
    heads.push(chain(
        &mut descs,
        &[(h(1), 16, 0), (buf, 1024, 0), (status + 1, 1, F_WRITE)],
    ));
    // FLUSH.
    heads.push(chain(
        &mut descs,
        &[(h(2), 16, 0), (status + 2, 1, F_WRITE)],
    ));
    // GET_ID.
    heads.push(chain(
        &mut descs,
        &[(h(3), 16, 0), (buf, 20, F_WRITE), (status + 3, 1, F_WRITE)],
    ));
    // DISCARD and WRITE_ZEROES with their segment.
    heads.push(chain(
        &mut descs,
        &[
            (h(4), 16, 0),
            (DATA + 0x200, 16, 0),
            (status + 4, 1, F_WRITE),
        ],
    ));
    heads.push(chain(
        &mut descs,
        &[
            (h(5), 16, 0),
            (DATA + 0x200, 16, 0),
            (status + 5, 1, F_WRITE),
        ],
    ));
    let mut out = Output::default();
    out.u64(8 << 20).u8(0).u8(0).u8(0).u32(1 << 16).u32(1 << 16);
    queue(descs, heads).encode(&mut out);
    out.bytes(&data);
    write("virtio_blk_request", "requests", &out.0);

    // An indirect table at DATA + 0x2000 holding an IN request.
    let mut table = Vec::new();
    for (i, (addr, len, flags)) in [
        (h(0), 16u32, 0u16),
        (buf, 4096, F_WRITE),
        (status, 1, F_WRITE),
    ]
    .into_iter()
    .enumerate()
    {
        let next_flag = if i < 2 { F_NEXT } else { 0 };
        table.extend_from_slice(&addr.to_le_bytes());
        table.extend_from_slice(&len.to_le_bytes());
        table.extend_from_slice(&(flags | next_flag).to_le_bytes());
        table.extend_from_slice(&(i as u16 + 1).to_le_bytes());
    }
    data[0x2000..0x2000 + table.len()].copy_from_slice(&table);
    let descs = vec![Desc {
        addr: DATA + 0x2000,
        len: table.len() as u32,
        flags: F_INDIRECT,
        next: 0,
    }];
    let mut out = Output::default();
    out.u64(8 << 20).u8(0).u8(1).u8(0).u32(0).u32(0);
    queue(descs, vec![0]).encode(&mut out);
    out.bytes(&data);
    write("virtio_blk_request", "indirect", &out.0);
}

fn virtio_net() {
    // Features: VERSION_1, MRG_RXBUF, CTRL_VQ, CTRL_RX (ignored if not offered).
    let acked: u64 = (1 << 32) | (1 << 15) | (1 << 17) | (1 << 18) | (1 << 29);
    let frame = |len: usize| {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.resize(len, 0x5a);
        f
    };
    // rx: two 2 KiB buffers; tx: a frame split into header and body, and
    // one whole; ctrl: RX_PROMISC on.
    let rx_buf = DATA + 0x4000;
    let tx_buf = DATA;
    let ctrl = DATA + 0x2000;
    let mut rx = Vec::new();
    let rx_heads = vec![
        chain(&mut rx, &[(rx_buf, 2048, F_WRITE)]),
        chain(&mut rx, &[(rx_buf + 2048, 2048, F_WRITE)]),
    ];
    let mut tx = Vec::new();
    let tx_heads = vec![
        chain(&mut tx, &[(tx_buf, 12, 0), (tx_buf + 12, 88, 0)]),
        chain(&mut tx, &[(tx_buf + 0x800, 100, 0)]),
    ];
    let mut cq = Vec::new();
    let ctrl_heads = vec![chain(&mut cq, &[(ctrl, 3, 0), (ctrl + 0x10, 1, F_WRITE)])];
    let mut data = vec![0u8; 0x3000];
    data[..100].copy_from_slice(&frame(100));
    data[0x800..0x800 + 100].copy_from_slice(&frame(100));
    data[0x2000..0x2003].copy_from_slice(&[0, 0, 1]);
    let mut out = Output::default();
    out.u64(acked).u8(2).chunk(&frame(80)).chunk(&frame(1500));
    queue(rx, rx_heads).encode(&mut out);
    queue(tx, tx_heads).encode(&mut out);
    queue(cq, ctrl_heads).encode(&mut out);
    out.bytes(&data);
    write("virtio_net", "traffic", &out.0);
}

fn virtio_pci() {
    // A driver bringing the balloon up: status, features, three queues,
    // DRIVER_OK, MSI-X on, a table entry, a config read; then a migration
    // save and restore.
    let mut out = Output::default();
    let bar_write = |out: &mut Output, offset: u16, value: &[u8]| {
        let op = 3 | (((value.len() - 1) as u8) << 5);
        out.u8(op).u16(offset).bytes(value);
    };
    let bar_read = |out: &mut Output, offset: u16, len: u8| {
        out.u8(2 | ((len - 1) << 5)).u16(offset);
    };
    // PCI command: memory decoding and bus mastering, through ECAM.
    out.u8(1 | (1 << 5)).u16(0x04).bytes(&[0x06, 0x00]);
    // And the same through 0xCF8/0xCFC: address of slot 1, register 4.
    out.u8(6).u32(0x8000_0804);
    out.u8(7 | (1 << 5)).u8(0).bytes(&[0x06, 0x00]);
    bar_write(&mut out, 0x14, &[1]);
    bar_write(&mut out, 0x14, &[3]);
    bar_write(&mut out, 0x00, &0u32.to_le_bytes());
    bar_read(&mut out, 0x04, 4);
    bar_write(&mut out, 0x08, &1u32.to_le_bytes());
    bar_write(&mut out, 0x0c, &1u32.to_le_bytes());
    bar_write(&mut out, 0x08, &0u32.to_le_bytes());
    bar_write(&mut out, 0x0c, &0x23u32.to_le_bytes());
    bar_write(&mut out, 0x14, &[11]);
    for q in 0..3u16 {
        let base = u32::from(q) * 0x4000;
        bar_write(&mut out, 0x16, &q.to_le_bytes());
        bar_write(&mut out, 0x18, &16u16.to_le_bytes());
        bar_write(&mut out, 0x1a, &q.to_le_bytes());
        bar_write(&mut out, 0x20, &base.to_le_bytes());
        bar_write(&mut out, 0x28, &(base + 0x1000).to_le_bytes());
        bar_write(&mut out, 0x30, &(base + 0x2000).to_le_bytes());
        bar_write(&mut out, 0x1c, &1u16.to_le_bytes());
    }
    bar_write(&mut out, 0x14, &[15]);
    // MSI-X: table entry 0, then enable in the capability (found by reads).
    bar_write(&mut out, 0x4000, &0xfee0_0000u32.to_le_bytes());
    bar_write(&mut out, 0x4008, &0x41u32.to_le_bytes());
    bar_write(&mut out, 0x400c, &0u32.to_le_bytes());
    out.u8(0).u16(0x34);
    out.u8(3 << 5).u16(0x40);
    bar_read(&mut out, 0x2000, 8);
    bar_read(&mut out, 0x1000, 1);
    bar_write(&mut out, 0x3004, &1u16.to_le_bytes());
    out.u8(4);
    write("virtio_pci", "driver", &out.0);
}

fn balloon() {
    // Inflate 4 pages (one outside RAM), deflate 2, stats, a free page report.
    let mut data = vec![0u8; 0x1000];
    for (i, pfn) in [1u32, 2, 3, 0x300].iter().enumerate() {
        data[i * 4..i * 4 + 4].copy_from_slice(&pfn.to_le_bytes());
    }
    for (i, tag) in [4u16, 5, 6].iter().enumerate() {
        let at = 0x100 + i * 10;
        data[at..at + 2].copy_from_slice(&tag.to_le_bytes());
        data[at + 2..at + 10].copy_from_slice(&(1u64 << 20).to_le_bytes());
    }
    let mut inflate = Vec::new();
    let h_in = vec![chain(&mut inflate, &[(DATA, 16, 0)])];
    let mut deflate = Vec::new();
    let h_de = vec![chain(&mut deflate, &[(DATA, 8, 0)])];
    let mut stats = Vec::new();
    let h_st = vec![chain(&mut stats, &[(DATA + 0x100, 30, 0)])];
    let mut report = Vec::new();
    let h_rep = vec![chain(
        &mut report,
        &[(0x8_0000, 0x4000, F_WRITE), (2 << 20, 0x2000, F_WRITE)],
    )];
    // MUST_TELL_HOST, STATS_VQ, DEFLATE_ON_OOM, PAGE_REPORTING, VERSION_1.
    let acked: u64 = 0b10_0111 | (1 << 32);
    let mut out = Output::default();
    out.u8(0x13).u64(acked);
    queue(inflate, h_in).encode(&mut out);
    queue(deflate, h_de).encode(&mut out);
    queue(stats, h_st).encode(&mut out);
    queue(report, h_rep).encode(&mut out);
    out.bytes(&data);
    write("balloon_queues", "all_queues", &out.0);
}

fn grub() {
    let cfg = r#"set default="gnulinux-advanced-1234>gnulinux-6.1.0-18-amd64-advanced-1234"
load_env
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
fi
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-1234' {
	linux	/boot/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro quiet
	initrd	/boot/initrd.img-6.1.0-18-amd64
}
submenu 'Advanced options' $menuentry_id_option 'gnulinux-advanced-1234' {
	menuentry 'Debian, with Linux 6.1.0-18-amd64' $menuentry_id_option 'gnulinux-6.1.0-18-amd64-advanced-1234' {
		linux	/vmlinuz-6.1.0-18-amd64 root=/dev/vda1 ro "console=ttyS0,115200" \$x
		initrd	/initrd.img-6.1.0-18-amd64
	}
}
"#;
    let env = "# GRUB Environment Block\nsaved_entry=gnulinux-simple-1234\nGRUB_CMDLINE_LINUX_DEFAULT=\"quiet $X\"\nexport GRUB_DISABLE_OS_PROBER=true\n";
    let versions = "6.1.0-18-amd64\n6.1.0-9-amd64\n6.1.0~rc1";
    write(
        "boot_grub",
        "debian",
        format!("{cfg}\0{env}\0{versions}").as_bytes(),
    );
}

fn main() {
    http();
    vm_config();
    migration();
    virtio_blk();
    virtio_net();
    virtio_pci();
    balloon();
    grub();
}
