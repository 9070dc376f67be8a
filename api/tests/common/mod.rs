//! Helpers shared by the API tests: a temp dir, a canned VMM, raw sockets.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api::http::{start_server, ApiCall, ApiServer};
use api::request::{
    ApiError, ApiRequest, ApiResponse, BalloonStatistics, Counters, MemoryInfo, MigrationPhase,
    MigrationRole, MigrationStatus, PingInfo, VmInfo, VmState,
};
use config::{DiskConfig, NetConfig, VmConfig};

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "api-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn socket(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn sample_config() -> VmConfig {
    let mut config = VmConfig::from_json(
        br#"{"payload": {"kernel": "/boot/vmlinux", "cmdline": "console=ttyS0"},
             "cpus": {"boot_vcpus": 2}, "memory": {"size_mib": 512}}"#,
    )
    .unwrap();
    config
        .disks
        .push(DiskConfig::parse("path=/var/disk.img,readonly=on").unwrap());
    config
        .nets
        .push(NetConfig::parse("tap=tap0,mac=52:54:00:00:00:01").unwrap());
    config.assign_device_ids();
    config
}

pub fn sample_info() -> VmInfo {
    VmInfo {
        name: Some("web1".into()),
        state: VmState::Running,
        pid: 4242,
        uptime_ms: Some(3_723_000),
        cpu_time_ms: 1500,
        config: sample_config(),
        serial_pty: None,
        memory: Some(MemoryInfo {
            guest_bytes: 512 << 20,
            rss_bytes: 100 << 20,
            pss_bytes: Some(90 << 20),
            ksm_merging_pages: Some(300),
            ksm_rmap_items: Some(131_072),
            ksm_process_profit: Some(1 << 20),
            balloon_target_bytes: Some(128 << 20),
            balloon_actual_bytes: Some(64 << 20),
        }),
        cgroup: None,
    }
}

pub fn sample_counters() -> Counters {
    let mut counters = BTreeMap::new();
    counters.insert(
        "vcpu0".to_string(),
        BTreeMap::from([("exits".to_string(), 1234u64), ("io_exits".to_string(), 56)]),
    );
    counters.insert(
        "disk0".to_string(),
        BTreeMap::from([("read_bytes".to_string(), 4096u64)]),
    );
    counters
}

/// A balloon half-way to a 128 MiB target, with guest statistics.
pub fn sample_balloon_statistics() -> BalloonStatistics {
    BalloonStatistics {
        target_pages: 32768,
        actual_pages: 16384,
        target_mib: 128,
        actual_mib: 64,
        inflated_pages: 16384,
        timestamp_ms: Some(1_700_000_000_000),
        age_ms: Some(2500),
        free_memory: Some(200 << 20),
        total_memory: Some(448 << 20),
        available_memory: Some(300 << 20),
        major_faults: Some(7),
        ..BalloonStatistics::default()
    }
}

/// The status of an outgoing migration of 1 GiB in `phase`: figures that
/// grow with the phase, the measured downtime once completed, an error once
/// failed.
pub fn sample_migration_status(phase: MigrationPhase) -> MigrationStatus {
    let (transferred_mib, remaining_mib, iterations) = match phase {
        MigrationPhase::None | MigrationPhase::Setup => (0, 1024, 0),
        MigrationPhase::Active => (512, 512, 0),
        _ => (1100, 0, 3),
    };
    MigrationStatus {
        phase,
        role: (phase != MigrationPhase::None).then_some(MigrationRole::Send),
        total_time_ms: 4200,
        setup_time_ms: 15,
        expected_downtime_ms: 40,
        downtime_ms: if phase == MigrationPhase::Completed {
            55
        } else {
            0
        },
        total_bytes: 1 << 30,
        transferred_bytes: transferred_mib << 20,
        remaining_bytes: remaining_mib << 20,
        zero_pages: 200_000,
        data_pages: 70_000,
        dirty_pages_rate: 1500,
        throughput_bytes_per_s: 250_000_000,
        iterations,
        throttle_percent: if iterations > 0 { 10 } else { 0 },
        error: (phase == MigrationPhase::Failed)
            .then(|| "connection reset by the destination".into()),
    }
}

/// What the canned VMM answers: everything succeeds except `vm.pause`,
/// refused as a VM that is only created.
pub fn canned_answer(request: &ApiRequest) -> Result<ApiResponse, ApiError> {
    match request {
        ApiRequest::VmmPing => Ok(ApiResponse::Ping(PingInfo {
            version: "0.1.0".into(),
            pid: 4242,
            name: Some("web1".into()),
            state: VmState::Running,
        })),
        ApiRequest::VmInfo => Ok(ApiResponse::Info(Box::new(sample_info()))),
        ApiRequest::VmCounters => Ok(ApiResponse::Counters(sample_counters())),
        ApiRequest::VmMigrationStatus => Ok(ApiResponse::MigrationStatus(Box::new(
            sample_migration_status(MigrationPhase::Completed),
        ))),
        ApiRequest::VmBalloonStatistics => Ok(ApiResponse::BalloonStatistics(Box::new(
            sample_balloon_statistics(),
        ))),
        ApiRequest::VmPause => Err(ApiError::wrong_state("pause", VmState::Created)),
        ApiRequest::VmBoot => Ok(action(VmState::Running, "booted")),
        ApiRequest::VmResume(_) => Ok(action(VmState::Running, "resumed")),
        ApiRequest::VmReboot => Ok(action(VmState::Running, "rebooted")),
        ApiRequest::VmPowerButton => Ok(action(
            VmState::Running,
            "the ACPI power button was pressed",
        )),
        ApiRequest::VmDelete => Ok(action(VmState::NotCreated, "deleted")),
        ApiRequest::VmShutdown(_) => Ok(action(
            VmState::ShuttingDown,
            "shutting down: the ACPI power button was pressed",
        )),
        _ => Ok(ApiResponse::Empty),
    }
}

/// The reply of an action that was done.
pub fn action(state: VmState, message: &str) -> ApiResponse {
    ApiResponse::Action(api::request::ActionReply::done(state, message))
}

/// A server with the canned VMM, recording every request it is handed.
pub struct Canned {
    pub dir: TempDir,
    pub server: ApiServer,
    pub seen: Arc<Mutex<Vec<ApiRequest>>>,
}

impl Canned {
    pub fn start() -> Canned {
        Canned::start_with(canned_answer)
    }

    /// A server whose VMM answers with `answer`.
    pub fn start_with(
        answer: impl Fn(&ApiRequest) -> Result<ApiResponse, ApiError> + Send + Sync + 'static,
    ) -> Canned {
        let dir = TempDir::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let server = start_server(&dir.socket(), move |call: ApiCall| {
            let answer = answer(&call.request);
            log.lock().unwrap().push(call.request);
            let _ = call.reply.send(answer);
        })
        .unwrap();
        Canned { dir, server, seen }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.socket()
    }

    pub fn seen(&self) -> Vec<ApiRequest> {
        self.seen.lock().unwrap().clone()
    }
}

/// A reply read off a raw connection.
#[derive(Debug)]
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

pub fn connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads one reply (head and Content-Length body) from `stream`; None at EOF.
pub fn read_reply(stream: &mut UnixStream, pending: &mut Vec<u8>) -> Option<Raw> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(pos) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).to_string();
    let status = head[9..12].parse().unwrap();
    let mut raw = Raw {
        status,
        head,
        body: String::new(),
    };
    let length: usize = raw
        .header("content-length")
        .map_or(0, |v| v.parse().unwrap());
    while pending.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
    raw.body = String::from_utf8_lossy(&pending[head_end..head_end + length]).to_string();
    pending.drain(..head_end + length);
    Some(raw)
}

/// Sends `bytes` on a new connection and reads one reply.
pub fn raw(path: &Path, bytes: &[u8]) -> Raw {
    let mut stream = connect(path);
    stream.write_all(bytes).unwrap();
    read_reply(&mut stream, &mut Vec::new()).expect("no reply")
}

/// Whether the server closes `stream` (EOF or reset) within the read timeout.
pub fn closed(stream: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(n) => n == 0,
        // Closed with bytes of ours unread.
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}
