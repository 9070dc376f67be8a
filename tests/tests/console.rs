//! The serial console on a Unix socket, against clients that misbehave:
//! output never blocks the guest or the API whatever clients do; several
//! clients watch, one writes; a late client sees the recent output; a stuck
//! client is dropped; `vmmctl console` drives a real terminal (a pty). And
//! the console path never destroys a file it does not own.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use api::http::ClientError;
use api::request::VmState;
use config::{PayloadConfig, SerialConfig, VmConfig};
use vmm_tests::harness::{field, testguest, vmmctl_binary, TempDir, Vmm};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);
const LONG: Duration = Duration::from_secs(120);

/// Boots the test guest with its console on a socket (`options` after the
/// path, e.g. ",buffer=64K") and an API socket; returns the VMM and both paths.
fn boot_with_socket_console(dir: &TempDir, options: &str) -> (Vmm, PathBuf) {
    let console = dir.join("console.sock");
    let api = dir.join("api.sock");
    let vmm = Vmm::boot_testguest(
        "--",
        &[
            "--serial",
            &format!("socket={}{options}", console.display()),
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    vmm.wait_api(BOOT);
    (vmm, console)
}

/// A console client whose received lines arrive on a channel.
struct Client {
    stream: UnixStream,
    lines: Receiver<String>,
    /// Every line received so far.
    seen: Vec<String>,
}

impl Client {
    fn connect(path: &Path) -> Client {
        let stream = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("console socket {}: {e}", path.display()));
        let reader = BufReader::new(stream.try_clone().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in reader.lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Client {
            stream,
            lines,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
    }

    /// The next line equal to `wanted` or starting with it; None on timeout
    /// or when the console closed.
    fn try_wait_for(&mut self, wanted: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(wanted) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn wait_for(&mut self, wanted: &str, timeout: Duration) -> String {
        self.try_wait_for(wanted, timeout).unwrap_or_else(|| {
            panic!(
                "no console line starting with {wanted:?} within {timeout:?}; last lines: {:?}",
                &self.seen[self.seen.len().saturating_sub(5)..]
            )
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The reader thread holds a clone: hang up for both.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

#[test]
fn console_output_never_blocks_a_vcpu_and_a_stuck_client_is_dropped() {
    require_kvm!();
    let dir = TempDir::new("console-stuck");
    let console = dir.join("console.sock");
    let api = dir.join("api.sock");
    // How fast the guest prints with no client at all.
    let vmm = Vmm::boot_testguest(
        "-- spew kib=128",
        &[
            "--serial",
            &format!("socket={},buffer=16K", console.display()),
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    vmm.wait_api(BOOT);
    let mut probe = Client::connect(&console);
    let baseline_ms = field(&probe.wait_for("spew: done", LONG), "ms").unwrap();
    drop(probe);

    // A client that types and never reads (attached first, so it is the
    // writer), and one that watches, while the guest prints 512 KiB (32
    // times the ring, more than the stuck client's socket holds).
    let mut stuck = UnixStream::connect(&console).unwrap();
    let mut watcher = Client::connect(&console);
    std::thread::sleep(Duration::from_millis(200));
    stuck.write_all(b"spew kib=512\n").unwrap();
    let api = vmm.api().with_timeout(SHORT);
    let mut slowest_ping = Duration::ZERO;
    let deadline = Instant::now() + LONG;
    let done = loop {
        let started = Instant::now();
        let ping = api.ping();
        slowest_ping = slowest_ping.max(started.elapsed());
        match ping {
            Ok(ping) => assert_eq!(ping.state, VmState::Running),
            Err(e) => panic!("ping: {e}\n{}", vmm.report()),
        }
        if let Some(line) = watcher.try_wait_for("spew: done kib=512", Duration::from_millis(50)) {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "the guest stopped printing: {:?}\n{}",
            watcher.seen.last(),
            vmm.report()
        );
    };
    let stuck_ms = field(&done, "ms").unwrap();
    eprintln!(
        "128 KiB alone: {baseline_ms} ms; 512 KiB with a stuck client: {stuck_ms} ms; slowest ping {slowest_ping:?}"
    );
    // The API answered all along (it used to stop with the guest).
    assert!(
        slowest_ping < Duration::from_secs(1),
        "a ping took {slowest_ping:?} while the guest printed"
    );
    // The guest was not slowed down: 4 times the output in about 4 times
    // the time (a frozen guest never finishes; the margin is for a loaded host).
    assert!(
        stuck_ms <= baseline_ms * 4 * 2 + 2000,
        "512 KiB took {stuck_ms} ms with a stuck client, 128 KiB {baseline_ms} ms alone"
    );
    // The watcher got every line of it, in order.
    let from = watcher
        .seen
        .iter()
        .rposition(|l| l.starts_with("spew: 00000000"))
        .expect("the first line of the 512 KiB");
    let counters: Vec<u64> = watcher.seen[from..]
        .iter()
        .filter_map(|l| l.strip_prefix("spew: ")?.get(..8)?.parse().ok())
        .collect();
    assert_eq!(counters, (0..4096).collect::<Vec<u64>>());
    // The stuck client was dropped: it reads what its socket held, then EOF.
    stuck.set_read_timeout(Some(SHORT)).unwrap();
    let mut got = Vec::new();
    stuck
        .read_to_end(&mut got)
        .expect("the stuck client's connection is closed");
    assert!(
        got.len() < 512 << 10,
        "the stuck client got {} bytes",
        got.len()
    );
    let deadline = Instant::now() + SHORT;
    while !vmm.stderr().iter().any(|l| l.contains("dropped client")) {
        assert!(
            Instant::now() < deadline,
            "no log line for the drop\n{}",
            vmm.report()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next client that types is the writer.
    watcher.send("echo still-here");
    watcher.wait_for("still-here", SHORT);
}

#[test]
fn several_clients_watch_one_writes_and_a_late_client_sees_recent_output() {
    require_kvm!();
    let dir = TempDir::new("console-watchers");
    let (_vmm, console) = boot_with_socket_console(&dir, "");
    // The first client writes; the second only watches.
    let mut first = Client::connect(&console);
    let mut second = Client::connect(&console);
    // Both see what was printed before they came.
    first.wait_for("testguest: ready", SHORT);
    second.wait_for("testguest: ready", SHORT);
    first.send("echo from-first-1");
    first.wait_for("from-first-1", SHORT);
    second.wait_for("from-first-1", SHORT);
    // A watcher's typing does not reach the guest.
    second.send("echo from-second");
    std::thread::sleep(Duration::from_millis(300));
    first.send("echo from-first-2");
    first.wait_for("from-first-2", SHORT);
    second.wait_for("from-first-2", SHORT);
    for client in [&first, &second] {
        assert!(
            !client.seen.iter().any(|l| l == "from-second"),
            "a watcher's input reached the guest: {:?}",
            client.seen
        );
    }
    // A client attaching now sees the recent output first.
    let mut late = Client::connect(&console);
    late.wait_for("testguest: hello", SHORT);
    late.wait_for("from-first-1", SHORT);
    late.wait_for("from-first-2", SHORT);
    // When the writer leaves, the next client that types writes.
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    second.send("echo from-second-now");
    second.wait_for("from-second-now", SHORT);
    late.wait_for("from-second-now", SHORT);
}

/// A pseudo-terminal: the master for the test, the slave for the program.
fn open_pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: out-pointers are valid; null name, termios and winsize are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two fresh descriptors we own.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

#[test]
fn vmmctl_console_attaches_a_raw_terminal_and_ctrl_bracket_detaches() {
    require_kvm!();
    let dir = TempDir::new("console-vmmctl");
    let (vmm, _console) = boot_with_socket_console(&dir, "");
    let (master, slave) = open_pty();
    let mut command = Command::new(vmmctl_binary());
    command
        .arg("--api-socket")
        .arg(vmm.api_socket.as_ref().unwrap())
        .arg("console")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: only async-signal-safe calls between fork and exec. The pty
    // becomes vmmctl's controlling terminal, so a cooked terminal would turn
    // Ctrl-C into SIGINT for it.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut vmmctl = command.spawn().unwrap();
    let mut terminal = std::fs::File::from(master);
    let reader = terminal.try_clone().unwrap();
    let (tx, output) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut reader = reader;
        let mut buf = [0u8; 4096];
        // EIO once the slave side is closed everywhere.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let mut screen = String::new();
    let wait_for = |needle: &str, screen: &mut String| {
        let deadline = Instant::now() + SHORT;
        while !screen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match output.recv_timeout(left) {
                Ok(bytes) => screen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => panic!("{needle:?} not on the terminal; it shows:\n{screen}"),
            }
        }
    };
    wait_for("detach with Ctrl-]", &mut screen);
    // The recent output, then the guest answering what is typed.
    wait_for("testguest: ready", &mut screen);
    terminal.write_all(b"echo via-vmmctl\r").unwrap();
    wait_for("\nvia-vmmctl", &mut screen);
    // Ctrl-C is a byte for the guest: no signal ends vmmctl (or the VMM).
    terminal.write_all(b"\x03").unwrap();
    terminal.write_all(b"echo after-ctrl-c\r").unwrap();
    wait_for("\nafter-ctrl-c", &mut screen);
    assert!(
        vmmctl.try_wait().unwrap().is_none(),
        "vmmctl ended:\n{screen}"
    );
    // Ctrl-] detaches; the guest runs on.
    terminal.write_all(b"\x1d").unwrap();
    wait_for("detached", &mut screen);
    let deadline = Instant::now() + SHORT;
    let status = loop {
        if let Some(status) = vmmctl.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "vmmctl did not exit:\n{screen}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{screen}");
    assert_eq!(vmm.api().ping().unwrap().state, VmState::Running);
    drop(terminal);
}

fn guest_config(serial: SerialConfig) -> VmConfig {
    VmConfig {
        payload: PayloadConfig {
            kernel: testguest(),
            cmdline: "--".into(),
            initrd: None,
            boot_disk: None,
        },
        serial,
        ..Default::default()
    }
}

fn socket_console(path: &Path) -> SerialConfig {
    SerialConfig::Socket {
        path: path.to_path_buf(),
        buffer_bytes: None,
        group: None,
    }
}

#[test]
fn a_console_path_never_destroys_a_file_it_does_not_own() {
    require_kvm!();
    let dir = TempDir::new("console-paths");
    let image = dir.join("disk.img");
    std::fs::write(&image, b"precious disk image").unwrap();

    // On the command line: a usage error naming the path; the image stays.
    let mut vmm = Vmm::boot_testguest("--", &["--serial", &format!("socket={}", image.display())]);
    assert_eq!(vmm.exit_code(SHORT), 2, "{}", vmm.report());
    assert!(
        vmm.stderr()
            .iter()
            .any(|l| l.contains("disk.img") && l.contains("not a socket")),
        "{}",
        vmm.report()
    );
    assert_eq!(std::fs::read(&image).unwrap(), b"precious disk image");

    // Through the API: vm.create answers 400 naming the path.
    let api_socket = dir.join("api-only.sock");
    let server = Vmm::spawn(&["--api-socket", api_socket.to_str().unwrap()]);
    server.wait_api(SHORT);
    let api = server.api();
    match api.create(&guest_config(socket_console(&image))) {
        Err(ClientError::Api { status, error }) => {
            assert_eq!(status, 400);
            assert!(error.message.contains("disk.img"), "{}", error.message);
        }
        other => panic!("vm.create took a disk image as console: {other:?}"),
    }
    // vm.receive-migration on unix:PATH too.
    let e = api
        .receive_migration(&api::request::ReceiveMigrationRequest {
            listen: format!("unix:{}", image.display()),
            token: "secret".into(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(e, ClientError::Api { status: 400, .. }), "{e:?}");
    assert!(e.to_string().contains("not a socket"), "{e}");
    // A directory is not taken either.
    match api.create(&guest_config(socket_console(dir.path()))) {
        Err(ClientError::Api { status: 400, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&image).unwrap(), b"precious disk image");

    // A live socket (another VMM's console) is not stolen.
    let (mut owner, console) = boot_with_socket_console(&dir, "");
    let mut thief = Vmm::boot_testguest(
        "--",
        &["--serial", &format!("socket={}", console.display())],
    );
    assert_ne!(thief.exit_code(SHORT), 0, "{}", thief.report());
    assert!(
        thief.stderr().iter().any(|l| l.contains("in use")),
        "{}",
        thief.report()
    );
    let mut client = Client::connect(&console);
    client.send("echo still-the-owner");
    client.wait_for("still-the-owner", SHORT);
    drop(client);

    // A stale socket (its VMM was killed) is replaced.
    owner.signal(libc::SIGKILL);
    owner.wait_exit(SHORT);
    assert!(console.exists(), "a killed VMM leaves its socket behind");
    let (_next, console) = boot_with_socket_console(&dir, "");
    let mut client = Client::connect(&console);
    client.wait_for("testguest: ready", SHORT);
    drop(server);
}
