//! Memory overcommit end to end: the balloon API of a real `vmm` (targets,
//! refusals, statistics), `vm.info`'s KSM and balloon figures, `vmmctl
//! list`, and KSM merging identical pages of two guests.
//!
//! The tests that need the test guest's virtio-balloon driver
//! (`balloon_*_with_the_guest_driver`) run only once the guest has one: they
//! check that its image knows the `balloon-follow` command and print SKIP
//! otherwise. The commands and outputs they expect from the guest are
//! described at [`GUEST_DRIVER_CONTRACT`].

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::http::{ClientError, Method};
use api::request::{ApiError, ApiErrorKind};
use config::{BalloonConfig, MemoryConfig, PayloadConfig, VmConfig};
use vmm_tests::harness::{field, pss_bytes, testguest, vmmctl_binary, KsmGuard, TempDir, Vmm, KSM};
use vmm_tests::require_kvm;

const BOOT: Duration = Duration::from_secs(20);
const SHORT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// What the balloon tests expect from the test guest's driver
/// (tests/guest/src/balloon.rs; its README has the details):
///
/// * `balloon-follow` starts the driver on the first virtio-balloon
///   function: features VERSION_1, MUST_TELL_HOST, STATS_VQ, and
///   PAGE_REPORTING if offered; queues numbered by the acked features; the
///   stats queue primed with one buffer. Prints
///   `balloon: ready features=0x<acked> queues=<n> num_pages=<n>`. From then
///   on, in the background (as `virtio::poll_background`): on a config
///   interrupt (or polling `num_pages` every few ms) it inflates or deflates
///   towards `num_pages`, at most 256 page numbers per buffer, waiting for
///   each buffer to be used before the next, writes `actual` after each
///   buffer, and when it reaches the target prints
///   `balloon: actual=<pages> target=<pages>`. Inflation takes free RAM
///   pages in ascending order from the start of the `memfill` area (so it
///   covers filled memory); deflation gives back the most recently inflated
///   ones first. When the device returns the stats buffer it refills it and
///   queues it again: tags 4 (free bytes), 5 (total bytes: the E820 RAM),
///   6 (available = free), and 3 (minor faults) = the number of refills so
///   far (so a test sees the re-request round trip).
/// * `balloon-info`: `balloon: num_pages=<n> actual=<n> inflated=<pages the
///   driver holds> refills=<n>`, or `balloon: status=nodevice`.
/// * `balloon-report mib=N [off_mib=M]`: one reporting buffer whose
///   device-writable descriptors cover N MiB of free RAM from the memfill
///   area (+M MiB) in 2 MiB pieces; waits for it to be used; prints
///   `balloon: report status=ok mib=N` (or `status=noreporting` if the
///   feature was not negotiated).
/// * `balloon-hostile kind=pfn-range|write-only|huge-len`: one inflate
///   buffer with page numbers beyond RAM / device-writable / longer than
///   65536 entries; prints `balloon-hostile kind=<k> status=used` once the
///   device returned it.
pub const GUEST_DRIVER_CONTRACT: () = ();

/// Whether the test guest has a balloon driver (its command list names
/// `balloon-follow`).
fn guest_has_balloon_driver() -> bool {
    let image = std::fs::read(testguest()).unwrap_or_default();
    let has = image
        .windows(b"balloon-follow".len())
        .any(|w| w == b"balloon-follow");
    if !has {
        eprintln!(
            "SKIP: the test guest has no virtio-balloon driver (no `balloon-follow` command)"
        );
    }
    has
}

fn api_error<T: std::fmt::Debug>(result: Result<T, ClientError>) -> (u16, ApiError) {
    match result {
        Err(ClientError::Api { status, error }) => (status, error),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// PUTs `body` on vm.balloon; the status and the ApiError of a refusal.
fn put_balloon(vmm: &Vmm, body: &[u8]) -> (u16, Option<ApiError>) {
    let (status, reply) = vmm
        .api()
        .request(Method::Put, "vm.balloon", Some(body))
        .unwrap();
    (status, serde_json::from_slice(&reply).ok())
}

fn ksm_reported_by_this_kernel() -> bool {
    Path::new("/proc/self/ksm_merging_pages").exists()
}

fn boot(dir: &TempDir, name: &str, cmdline: &str, flags: &[&str]) -> Vmm {
    let socket = dir.join(&format!("{name}.sock"));
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["--api-socket", socket.to_str().unwrap()]);
    let mut vmm = Vmm::boot_testguest(cmdline, &args);
    vmm.wait_for("testguest: ready", BOOT);
    vmm.wait_api(SHORT);
    vmm
}

/// Sends `source`'s guest to `destination` (token "t0ken") and waits until
/// it runs on `target` and the source has exited "migrated".
fn migrate(source: &mut Vmm, destination: &str, target: &Vmm) {
    source
        .api()
        .send_migration(&api::request::SendMigrationRequest {
            destination: destination.to_string(),
            token: "t0ken".into(),
            tls_dir: None,
            force: false,
            parameters: Default::default(),
        })
        .unwrap();
    assert_eq!(
        source.exit_code(Duration::from_secs(60)),
        6,
        "{}",
        source.report()
    );
    target.wait_state(api::request::VmState::Running, SHORT);
}

/// Boots a guest (with boot `options`, e.g. ring features) that fills
/// `fill_mib` MiB with `pattern`, then starts its balloon driver; returns
/// the VMM and the driver's `balloon: ready` line.
fn boot_with_balloon_driver(
    dir: &TempDir,
    options: &str,
    pattern: &str,
    fill_mib: u64,
    flags: &[&str],
) -> (Vmm, String) {
    let mut vmm = boot(
        dir,
        "vm",
        &format!("{options} -- memfill pattern={pattern} mib={fill_mib}"),
        flags,
    );
    vmm.wait_for("memfill: done", BOOT);
    vmm.send_line("balloon-follow");
    let ready = vmm.wait_for("balloon: ready", SHORT);
    (vmm, ready)
}

#[test]
fn balloon_api_refusals_targets_and_memory_info() {
    require_kvm!();
    let dir = TempDir::new("balloon-api");
    let vmm = boot(
        &dir,
        "with",
        "-- info",
        &[
            "--memory",
            "size=64M",
            "--balloon",
            "target_mib=8,stats_interval_s=1",
        ],
    );
    let api = vmm.api();

    let memory = api.info().unwrap().memory.unwrap();
    assert_eq!(memory.guest_bytes, 64 * MIB);
    assert_eq!(memory.balloon_target_bytes, Some(8 * MIB));
    assert_eq!(memory.balloon_actual_bytes, Some(0));
    if ksm_reported_by_this_kernel() {
        // Not mergeable: nothing merged, whatever KSM does on the host.
        assert_eq!(memory.ksm_merging_pages, Some(0));
        assert!(memory.ksm_rmap_items.is_some());
        assert!(memory.ksm_process_profit.is_some());
    }

    // More than the guest's memory: 400 naming the field.
    let (status, error) = put_balloon(&vmm, br#"{"target_mib": 65}"#);
    let error = error.unwrap();
    assert_eq!((status, error.kind), (400, ApiErrorKind::BadRequest));
    assert!(
        error.message.starts_with("target_mib: "),
        "{}",
        error.message
    );
    assert!(error.message.contains("64 MiB"), "{}", error.message);
    // Negative, not a number, fractional, missing, unknown fields, not JSON.
    for (body, names) in [
        (&br#"{"target_mib": -1}"#[..], "target_mib"),
        (br#"{"target_mib": "32"}"#, "target_mib"),
        (br#"{"target_mib": 1.5}"#, "target_mib"),
        (br#"{"target_mib": null}"#, "target_mib"),
        (br#"{}"#, "target_mib"),
        (br#"{"target_mib": 1, "now": true}"#, "now"),
        (b"target_mib=1", "line 1 column"),
    ] {
        let (status, error) = put_balloon(&vmm, body);
        let error = error.unwrap();
        let body = String::from_utf8_lossy(body);
        assert_eq!(status, 400, "{body}: {error:?}");
        assert!(error.message.contains(names), "{body}: {}", error.message);
    }
    // The refusals changed nothing.
    let stats = api.balloon_statistics().unwrap();
    assert_eq!((stats.target_mib, stats.target_pages), (8, 8 * MIB / PAGE));

    // Accepted targets, up to the whole guest.
    for target in [32, 64, 0, 32] {
        api.balloon(target).unwrap();
        let stats = api.balloon_statistics().unwrap();
        assert_eq!(stats.target_mib, target);
        assert_eq!(stats.target_pages, target * MIB / PAGE);
    }
    let stats = api.balloon_statistics().unwrap();
    // No driver: nothing inflated, no guest statistics.
    assert_eq!((stats.actual_pages, stats.inflated_pages), (0, 0));
    assert_eq!(
        (stats.timestamp_ms, stats.age_ms, stats.free_memory),
        (None, None, None)
    );
    let info = api.info().unwrap();
    assert_eq!(info.config.balloon.as_ref().unwrap().target_mib, 32);
    assert_eq!(info.memory.unwrap().balloon_target_bytes, Some(32 * MIB));
    let counters = api.counters().unwrap();
    assert_eq!(counters["balloon"]["target_changes"], 4);
    assert_eq!(counters["balloon"]["inflated_pages"], 0);

    // vmmctl: the same refusal exits 1, a good target 0.
    let socket = vmm.api_socket.clone().unwrap();
    let vmmctl = |args: &[&str]| {
        std::process::Command::new(vmmctl_binary())
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap()
    };
    let out = vmmctl(&["balloon", "--target-mib", "65"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("target_mib: must be at most"));
    let out = vmmctl(&["balloon", "--target-mib", "16"]);
    assert_eq!(out.status.code(), Some(0));
    let out = vmmctl(&["balloon"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.starts_with("target: 16 MiB (4096 pages)\n"), "{text}");
    assert!(text.contains("guest statistics: none yet"), "{text}");

    // A VM without a balloon: 409 for both endpoints.
    let plain = boot(&dir, "without", "-- info", &["--memory", "size=64M"]);
    let (status, error) = api_error(plain.api().balloon(1));
    assert_eq!((status, error.kind), (409, ApiErrorKind::WrongState));
    assert!(
        error.message.contains("no balloon device"),
        "{}",
        error.message
    );
    let (status, _) = api_error(plain.api().balloon_statistics());
    assert_eq!(status, 409);
    let memory = plain.api().info().unwrap().memory.unwrap();
    assert_eq!(memory.balloon_target_bytes, None);
    assert_eq!(memory.balloon_actual_bytes, None);
    assert_eq!(
        memory.ksm_merging_pages.is_some(),
        ksm_reported_by_this_kernel()
    );
}

#[test]
fn a_created_vm_boots_with_the_target_set_before() {
    require_kvm!();
    let dir = TempDir::new("balloon-created");
    let socket = dir.join("api.sock");
    let mut vmm = Vmm::spawn(&["--api-socket", socket.to_str().unwrap()]);
    vmm.wait_api(SHORT);
    let api = vmm.api();
    // No VM at all.
    let (status, error) = api_error(api.balloon(1));
    assert_eq!((status, error.kind), (409, ApiErrorKind::WrongState));
    assert!(error.message.contains("not-created"), "{}", error.message);

    let config = VmConfig {
        payload: PayloadConfig {
            kernel: testguest(),
            cmdline: "-- info".into(),
            initrd: None,
            boot_disk: None,
        },
        memory: MemoryConfig {
            size_mib: 64,
            ..Default::default()
        },
        balloon: Some(BalloonConfig {
            target_mib: 4,
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval_s: 0,
        }),
        ..Default::default()
    };
    api.create(&config).unwrap();
    // Over the guest's memory before boot too.
    let (status, _) = api_error(api.balloon(65));
    assert_eq!(status, 400);
    api.balloon(16).unwrap();
    assert_eq!(api.info().unwrap().config.balloon.unwrap().target_mib, 16);
    // Statistics need a booted VM.
    let (status, _) = api_error(api.balloon_statistics());
    assert_eq!(status, 409);
    api.boot().unwrap();
    vmm.wait_for("testguest: ready", BOOT);
    assert_eq!(api.balloon_statistics().unwrap().target_mib, 16);
    // A target over guest memory in a config is refused at vm.create.
    let other = dir.join("other.sock");
    let vmm2 = Vmm::spawn(&["--api-socket", other.to_str().unwrap()]);
    vmm2.wait_api(SHORT);
    let mut too_big = config.clone();
    too_big.balloon.as_mut().unwrap().target_mib = 65;
    let (status, error) = api_error(vmm2.api().create(&too_big));
    assert_eq!(status, 400);
    assert!(
        error.message.starts_with("balloon.target_mib: "),
        "{}",
        error.message
    );
}

#[test]
fn vmmctl_list_shows_live_and_stale_vmms() {
    require_kvm!();
    let dir = TempDir::new("list");
    let live = boot(
        &dir,
        "web",
        "-- info",
        &["--memory", "size=64M", "--balloon", "target_mib=8"],
    );
    // A VMM that is gone and left its socket behind.
    drop(std::os::unix::net::UnixListener::bind(dir.join("gone.sock")).unwrap());
    let out = std::process::Command::new(vmmctl_binary())
        .args(["--json", "list"])
        .env("VMM_SOCKET_DIR", dir.path())
        .env_remove("VMM_API_SOCKET")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["name"], "gone");
    assert_eq!(list[0]["state"], "stale");
    assert_eq!(list[1]["name"], "web");
    assert_eq!(list[1]["state"], "running");
    assert_eq!(list[1]["pid"], live.pid());
    assert_eq!(list[1]["guest_bytes"], 64 * MIB);
    assert_eq!(list[1]["balloon_target_bytes"], 8 * MIB);
    assert!(list[1]["rss_bytes"].as_u64().unwrap() > 0);
    let out = std::process::Command::new(vmmctl_binary())
        .args(["list", "--socket-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with("web ") && l.contains(" running ")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("gone ") && l.contains(" stale ")),
        "{text}"
    );
}

#[test]
fn a_balloon_migrates_with_its_target() {
    require_kvm!();
    let dir = TempDir::new("balloon-migrate");
    let (mut target, listen) = Vmm::incoming(&dir, "t0ken");
    let mut source = boot(
        &dir,
        "source",
        "-- memfill pattern=77 mib=16",
        &[
            "--memory",
            "size=64M",
            "--balloon",
            "target_mib=8,free_page_reporting=on,stats_interval_s=1",
        ],
    );
    source.wait_for("memfill: done", BOOT);
    source.api().balloon(24).unwrap();
    migrate(&mut source, &listen, &target);
    let api = target.api();
    let stats = api.balloon_statistics().unwrap();
    assert_eq!((stats.target_mib, stats.inflated_pages), (24, 0));
    let info = api.info().unwrap();
    assert_eq!(info.config.balloon.unwrap().target_mib, 24);
    assert_eq!(info.memory.unwrap().balloon_target_bytes, Some(24 * MIB));
    // The guest runs on, with its memory.
    target.send_line("memcheck pattern=77 mib=16");
    target.wait_for("memcheck-ok", SHORT);
    api.balloon(0).unwrap();
    assert_eq!(api.counters().unwrap()["balloon"]["target_changes"], 1);
}

// ---------------------------------------------------- transparent huge pages

/// Whether the host hands out transparent huge pages to memory that asks
/// (`always` or `madvise` in /sys/kernel/mm/transparent_hugepage/enabled).
fn host_has_thp() -> bool {
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if mode.contains("[always]") || mode.contains("[madvise]") {
        return true;
    }
    eprintln!("SKIP: transparent huge pages are off on this host ({mode:?})");
    false
}

#[test]
fn guest_memory_gets_huge_pages_by_default_and_after_migration() {
    require_kvm!();
    if !host_has_thp() {
        return;
    }
    let dir = TempDir::new("thp");
    let huge = |vmm: &Vmm| vmm_tests::harness::smaps_rollup_bytes(vmm.pid(), "AnonHugePages");
    let fill = "-- memfill pattern=3c mib=64";

    let mut off = boot(&dir, "off", fill, &["--memory", "size=128M,thp=off"]);
    off.wait_for("memfill: done", BOOT);
    assert_eq!(huge(&off), 0, "thp=off");
    drop(off);

    let (mut target, listen) = Vmm::incoming(&dir, "t0ken");
    let mut source = boot(&dir, "source", fill, &["--memory", "size=128M"]);
    source.wait_for("memfill: done", BOOT);
    // Most of the 64 MiB the guest filled sits in 2 MiB pages (khugepaged
    // aside, faults give huge pages where a whole aligned 2 MiB is free).
    assert!(huge(&source) >= 48 * MIB, "{} MiB", huge(&source) / MIB);
    assert!(
        source.api().info().unwrap().config.transparent_huge_pages(),
        "vm.info"
    );
    migrate(&mut source, &listen, &target);
    // The target filled its memory in huge pages too, and the data is there.
    assert!(huge(&target) >= 48 * MIB, "{} MiB", huge(&target) / MIB);
    target.send_line("memcheck pattern=3c mib=64");
    target.wait_for("memcheck-ok", SHORT);
}

// ------------------------------------------------------------------- KSM

/// KSM is host-wide: one test at a time touches it.
static KSM_LOCK: Mutex<()> = Mutex::new(());

fn merging_pages(vmm: &Vmm) -> u64 {
    vmm.api()
        .info()
        .unwrap()
        .memory
        .unwrap()
        .ksm_merging_pages
        .expect("the kernel reports ksm_merging_pages")
}

#[test]
fn ksm_merges_identical_pages_of_mergeable_guests_only() {
    require_kvm!();
    if !ksm_reported_by_this_kernel() || !Path::new(KSM).join("run").exists() {
        eprintln!("SKIP: this kernel has no KSM or no per-process KSM figures");
        return;
    }
    let _lock = KSM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    const FILL_MIB: u64 = 48;
    // The same pattern in every guest: every filled page is identical.
    let cmdline = format!("-- memfill pattern=5a5a5a5a00c0ffee mib={FILL_MIB}");
    let dir = TempDir::new("ksm");
    let mut vmms = Vec::new();
    for (name, memory) in [
        ("on-a", "size=128M,mergeable=on"),
        ("on-b", "size=128M,mergeable=on"),
        ("off-a", "size=128M"),
        ("off-b", "size=128M"),
    ] {
        let mut vmm = boot(&dir, name, &cmdline, &["--memory", memory]);
        vmm.wait_for("memfill: done", BOOT);
        vmms.push(vmm);
    }
    let (on, off) = vmms.split_at(2);
    let pss = |pair: &[Vmm]| pair.iter().map(|v| pss_bytes(v.pid())).sum::<u64>();
    let rss = |pair: &[Vmm]| pair.iter().map(|v| v.rss_bytes()).sum::<u64>();
    let pss_before = (pss(on), pss(off));

    let guard = match KsmGuard::start(5000, 10) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("SKIP: cannot switch KSM on: {e}");
            return;
        }
    };
    // Each mergeable guest's filled pages merge (within the guest and with
    // the other guest's).
    let want = FILL_MIB * MIB / PAGE * 9 / 10;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let merged: Vec<u64> = on.iter().map(merging_pages).collect();
        if merged.iter().all(|&m| m >= want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "KSM merged only {merged:?} pages of the mergeable guests (want {want} each)"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // KSM ran over everything by now: the other guests have nothing merged.
    for vmm in off {
        assert_eq!(
            merging_pages(vmm),
            0,
            "a guest without mergeable memory merged"
        );
    }
    let (pss_on, pss_off) = (pss(on), pss(off));
    let (rss_on, rss_off) = (rss(on), rss(off));
    drop(guard);
    eprintln!(
        "KSM: PSS of the mergeable pair {} -> {} MiB, of the other pair {} -> {} MiB; \
         RSS {} and {} MiB (RSS counts merged pages in every process)",
        pss_before.0 / MIB,
        pss_on / MIB,
        pss_before.1 / MIB,
        pss_off / MIB,
        rss_on / MIB,
        rss_off / MIB
    );
    // The host's cost of the mergeable pair fell by about both fills; the
    // other pair's did not move.
    assert!(
        pss_on + FILL_MIB * MIB < pss_before.0,
        "PSS of the mergeable pair {pss_on} was {}",
        pss_before.0
    );
    assert!(
        pss_off + 8 * MIB > pss_before.1,
        "{pss_off} was {}",
        pss_before.1
    );
    assert!(pss_on + FILL_MIB * MIB < pss_off, "{pss_on} vs {pss_off}");
    // vm.info still shows the merge.
    let info = on[0].api().info().unwrap().memory.unwrap();
    assert!(info.ksm_merging_pages.unwrap() >= want);
    assert!(info.ksm_process_profit.unwrap() > 0, "{info:?}");
}

// ------------------------------------- with the guest's balloon driver

#[test]
fn balloon_inflation_returns_memory_with_the_guest_driver() {
    require_kvm!();
    if !guest_has_balloon_driver() {
        return;
    }
    let dir = TempDir::new("balloon-inflate");
    // The guest's driver negotiates the ring features Linux's does.
    let (mut vmm, ready) = boot_with_balloon_driver(
        &dir,
        "event_idx=1 indirect=1",
        "1122334455667788",
        128,
        &["--memory", "size=256M", "--balloon", "stats_interval_s=1"],
    );
    let features = field(&ready, "features").unwrap();
    assert_eq!(
        features & (3 << 28),
        3 << 28,
        "EVENT_IDX and INDIRECT_DESC: {ready}"
    );
    let api = vmm.api();
    let rss_before = vmm.rss_bytes();

    api.balloon(96).unwrap();
    let line = vmm.wait_for("balloon: actual=", Duration::from_secs(60));
    assert_eq!(field(&line, "actual"), Some(96 * MIB / PAGE), "{line}");
    assert_eq!(field(&line, "target"), Some(96 * MIB / PAGE), "{line}");
    let stats = api.balloon_statistics().unwrap();
    assert_eq!(stats.actual_mib, 96);
    assert_eq!(stats.inflated_pages, 96 * MIB / PAGE);
    let counters = api.counters().unwrap();
    assert_eq!(counters["balloon"]["inflated_pages"], 96 * MIB / PAGE);
    assert_eq!(counters["balloon"]["invalid_pfns"], 0);
    assert_eq!(counters["balloon"]["discard_errors"], 0);
    let rss_after = vmm.rss_bytes();
    assert!(
        rss_after + 90 * MIB < rss_before,
        "RSS {} MiB -> {} MiB after inflating 96 MiB",
        rss_before / MIB,
        rss_after / MIB
    );
    let memory = api.info().unwrap().memory.unwrap();
    assert_eq!(memory.balloon_actual_bytes, Some(96 * MIB));

    // Deflate: the guest gets its memory back and can use it again.
    api.balloon(0).unwrap();
    let line = vmm.wait_for("balloon: actual=", Duration::from_secs(60));
    assert_eq!(field(&line, "actual"), Some(0), "{line}");
    assert_eq!(api.balloon_statistics().unwrap().inflated_pages, 0);
    // The pages come back zeroed (the host dropped their contents), the
    // part that was never ballooned keeps its data.
    vmm.send_line("memcheck pattern=0 mib=96");
    vmm.wait_for("memcheck-ok", SHORT);
    vmm.send_line("memcheck pattern=1122334455667788 mib=32 off_mib=96");
    vmm.wait_for("memcheck-ok", SHORT);
    vmm.send_line("memfill pattern=8877665544332211 mib=128");
    vmm.wait_for("memfill: done", SHORT);
    vmm.send_line("memcheck pattern=8877665544332211 mib=128");
    vmm.wait_for("memcheck-ok", SHORT);
    assert!(vmm.rss_bytes() + 16 * MIB > rss_before);

    // Hostile buffers are returned and change nothing.
    for kind in ["pfn-range", "write-only", "huge-len"] {
        vmm.send_line(&format!("balloon-hostile kind={kind}"));
        vmm.wait_for(&format!("balloon-hostile kind={kind} status=used"), SHORT);
    }
    assert_eq!(api.balloon_statistics().unwrap().inflated_pages, 0);
}

#[test]
fn balloon_inflation_punches_holes_in_memfd_memory() {
    require_kvm!();
    if !guest_has_balloon_driver() {
        return;
    }
    let dir = TempDir::new("balloon-memfd");
    let (mut vmm, _) = boot_with_balloon_driver(
        &dir,
        "",
        "5566778899aabbcc",
        96,
        &["--memory", "size=192M,backing=memfd", "--balloon", ""],
    );
    let rss_before = vmm.rss_bytes();
    vmm.api().balloon(64).unwrap();
    let line = vmm.wait_for("balloon: actual=", Duration::from_secs(60));
    assert_eq!(field(&line, "actual"), Some(64 * MIB / PAGE), "{line}");
    let counters = vmm.api().counters().unwrap();
    assert_eq!(counters["balloon"]["discard_errors"], 0);
    // Shared memory leaves RSS only when its pages leave the memfd.
    let rss_after = vmm.rss_bytes();
    assert!(
        rss_after + 60 * MIB < rss_before,
        "RSS {} MiB -> {} MiB after inflating 64 MiB of memfd memory",
        rss_before / MIB,
        rss_after / MIB
    );
    vmm.api().balloon(0).unwrap();
    let line = vmm.wait_for("balloon: actual=", Duration::from_secs(60));
    assert_eq!(field(&line, "actual"), Some(0), "{line}");
    vmm.send_line("memcheck pattern=0 mib=64");
    vmm.wait_for("memcheck-ok", SHORT);
    vmm.send_line("memcheck pattern=5566778899aabbcc mib=32 off_mib=64");
    vmm.wait_for("memcheck-ok", SHORT);
}

#[test]
fn balloon_statistics_come_from_the_guest_driver() {
    require_kvm!();
    if !guest_has_balloon_driver() {
        return;
    }
    let dir = TempDir::new("balloon-stats");
    let mut vmm = boot(
        &dir,
        "vm",
        "-- info",
        &["--memory", "size=128M", "--balloon", "stats_interval_s=1"],
    );
    vmm.send_line("balloon-follow");
    vmm.wait_for("balloon: ready", SHORT);
    let api = vmm.api();
    let deadline = Instant::now() + SHORT;
    let first = loop {
        let stats = api.balloon_statistics().unwrap();
        if stats.timestamp_ms.is_some() {
            break stats;
        }
        assert!(Instant::now() < deadline, "no guest statistics");
        std::thread::sleep(Duration::from_millis(50));
    };
    let total = first.total_memory.unwrap();
    assert!(total > 100 * MIB && total <= 128 * MIB, "{first:?}");
    assert!(first.free_memory.unwrap() <= total);
    assert!(first.age_ms.unwrap() < 2500, "{first:?}");
    // The device asks again every second: the refill count grows.
    std::thread::sleep(Duration::from_millis(2500));
    let later = api.balloon_statistics().unwrap();
    assert!(
        later.minor_faults.unwrap() > first.minor_faults.unwrap(),
        "{later:?}"
    );
    assert!(later.timestamp_ms.unwrap() > first.timestamp_ms.unwrap());
    assert!(later.age_ms.unwrap() < 2500, "{later:?}");
    let counters = api.counters().unwrap();
    assert!(counters["balloon"]["stats_requests"] >= 2);
    assert!(counters["balloon"]["stats_updates"] >= 3);
}

#[test]
fn free_page_reporting_returns_memory_with_the_guest_driver() {
    require_kvm!();
    if !guest_has_balloon_driver() {
        return;
    }
    let dir = TempDir::new("balloon-report");
    let (mut vmm, _) = boot_with_balloon_driver(
        &dir,
        "",
        "0f0f0f0f0f0f0f0f",
        64,
        &[
            "--memory",
            "size=128M",
            "--balloon",
            "free_page_reporting=on",
        ],
    );
    let rss_before = vmm.rss_bytes();
    vmm.send_line("balloon-report mib=64");
    vmm.wait_for("balloon: report status=ok mib=64", SHORT);
    let rss_after = vmm.rss_bytes();
    assert!(
        rss_after + 60 * MIB < rss_before,
        "RSS {} MiB -> {} MiB after reporting 64 MiB",
        rss_before / MIB,
        rss_after / MIB
    );
    let counters = vmm.api().counters().unwrap();
    assert_eq!(counters["balloon"]["reported_pages"], 64 * MIB / PAGE);
    // Reported pages read as zero and are not in the balloon.
    vmm.send_line("memcheck pattern=0 mib=64");
    vmm.wait_for("memcheck-ok", SHORT);
    assert_eq!(vmm.api().balloon_statistics().unwrap().inflated_pages, 0);
}

#[test]
fn a_migrated_ballooned_guest_keeps_its_balloon_and_its_pages_are_not_sent() {
    require_kvm!();
    if !guest_has_balloon_driver() {
        return;
    }
    let dir = TempDir::new("balloon-migrate-pages");
    let (mut target, listen) = Vmm::incoming(&dir, "t0ken");
    let mut source = boot(
        &dir,
        "source",
        "-- memfill pattern=77 mib=192; balloon-follow",
        &["--memory", "size=256M", "--balloon", "target_mib=0"],
    );
    source.wait_for("balloon: ready", BOOT);
    // 128 MiB of the filled memory go into the balloon.
    source.api().balloon(128).unwrap();
    source.wait_for(
        "balloon: actual=32768 target=32768",
        Duration::from_secs(60),
    );
    let api = source.api();
    api.send_migration(&api::request::SendMigrationRequest {
        destination: listen,
        token: "t0ken".into(),
        tls_dir: None,
        force: false,
        parameters: Default::default(),
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = api.migration_status().unwrap();
        if s.phase == api::request::MigrationPhase::Completed {
            break s;
        }
        assert!(Instant::now() < deadline, "{s:#?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    // 192 MiB were filled, 128 MiB of them are ballooned: only the other
    // 64 MiB (and the guest's own few MiB) may go over the wire.
    let sent_mib = status.data_pages * 4096 / MIB;
    assert!(
        sent_mib < 100,
        "{sent_mib} MiB of data pages sent: {status:#?}"
    );
    assert_eq!(source.exit_code(SHORT), 6, "{}", source.report());
    let target_api = target.api();
    let stats = target_api.balloon_statistics().unwrap();
    assert_eq!(
        stats.inflated_pages, 32768,
        "the balloon moved with the guest"
    );
    assert_eq!(stats.target_mib, 128);
    // What the guest kept is intact.
    target.send_line("memcheck pattern=77 mib=64");
    target.wait_for("memcheck-ok", SHORT);
}

// ------------------------------------------------ the overcommit policy

/// `vmm-overcommit` running against a socket directory, its log in a file.
struct Policy {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Policy {
    fn start(dir: &TempDir, args: &[&str]) -> Policy {
        let log = dir.join("policy.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(vmm_tests::harness::overcommit_binary())
            .arg("--socket-dir")
            .arg(dir.path())
            .args(args)
            .stderr(file)
            .spawn()
            .unwrap();
        Policy { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM: it stops with exit 0.
    fn stop(mut self) -> String {
        // SAFETY: kill on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{}", self.log());
        self.log()
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The simulated host of the policy test: a budget of `BUDGET_MIB` for the
/// three VMMs, of which `TARGET_MIB` must stay available.
const BUDGET_MIB: u64 = 520;
const TARGET_MIB: u64 = 100;
const MARGIN_MIB: u64 = 24;
/// Slack for figures read at slightly different moments (RSS, statistics).
const SLACK_MIB: u64 = 6;

/// The policy's view, measured by the test: the VMMs' resident memory and
/// each guest's free memory (MiB).
fn resident_mib(vmms: &[Vmm]) -> u64 {
    vmms.iter().map(|v| v.rss_bytes()).sum::<u64>() / MIB
}

fn guest_free_mib(vmm: &Vmm) -> Option<u64> {
    vmm.api()
        .balloon_statistics()
        .ok()?
        .free_memory
        .map(|b| b / MIB)
}

/// Waits until the host target holds and every guest has its floor, and
/// goes on holding for 3 s (balloons still moving may break it for a
/// moment before that); returns when that stable period began.
fn settle(vmms: &[Vmm], policy: &Policy, what: &str) -> Duration {
    let started = Instant::now();
    let ok = |vmms: &[Vmm]| {
        resident_mib(vmms) <= BUDGET_MIB - TARGET_MIB + SLACK_MIB
            && vmms
                .iter()
                .all(|v| guest_free_mib(v).is_some_and(|f| f + SLACK_MIB >= MARGIN_MIB))
    };
    let mut holding: Option<Instant> = None;
    loop {
        if ok(vmms) {
            let since = *holding.get_or_insert_with(Instant::now);
            if since.elapsed() >= Duration::from_secs(3) {
                return since - started;
            }
        } else {
            holding = None;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{what}: the policy did not settle: resident {} MiB (budget {BUDGET_MIB}, target \
             {TARGET_MIB} available), guests free {:?} MiB\n{}",
            resident_mib(vmms),
            vmms.iter().map(guest_free_mib).collect::<Vec<_>>(),
            policy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_overcommit_policy_keeps_the_host_target_and_every_guest_floor_as_guests_change() {
    require_kvm!();
    if !guest_has_balloon_driver() {
        return;
    }
    let dir = TempDir::new("policy");
    // Three guests of 192 MiB that touched almost all their memory (so that
    // what a balloon takes leaves the host), each using some of it.
    let mut vmms: Vec<Vmm> = [("a", 24), ("b", 40), ("c", 56)]
        .iter()
        .map(|(name, used)| {
            let mut vmm = boot(
                &dir,
                name,
                &format!("-- memfill pattern=5a mib=176; balloon-follow; memuse mib={used}"),
                &["--memory", "size=192M", "--balloon", "stats_interval_s=1"],
            );
            vmm.wait_for(&format!("memuse: used={used} target={used}"), BOOT);
            vmm
        })
        .collect();
    let before = resident_mib(&vmms);
    assert!(
        before > BUDGET_MIB - TARGET_MIB + 50,
        "the guests must overcommit the budget: {before} MiB resident"
    );
    let policy = Policy::start(
        &dir,
        &[
            "--interval-ms",
            "300",
            "--host-memory-mib",
            &BUDGET_MIB.to_string(),
            "--host-target-mib",
            &TARGET_MIB.to_string(),
            "--hysteresis-mib",
            "32",
            "--guest-margin-mib",
            &MARGIN_MIB.to_string(),
            "--step-mib",
            "32",
        ],
    );

    // (1) Overcommitted: the policy inflates balloons until the host target
    // holds, leaving every guest its floor.
    let took = settle(&vmms, &policy, "start");
    eprintln!(
        "policy: resident {before} -> {} MiB in {took:?}",
        resident_mib(&vmms)
    );

    // (2) Guest a needs 116 MiB more, more than it has outside its balloon
    // (every guest gave at least a step): its balloon follows it back up
    // (the guest gets the memory it asks for), the others give more.
    let logged = policy.log().len();
    let grown = Instant::now();
    vmms[0].send_line("memuse mib=140");
    vmms[0].wait_for("memuse: used=140 target=140", Duration::from_secs(60));
    let fed = grown.elapsed();
    let took = settle(&vmms, &policy, "a grew");
    assert!(
        policy.log()[logged..].contains("deflate a: "),
        "{}",
        policy.log()
    );
    eprintln!(
        "policy: guest a grew by 116 MiB: it had them after {fed:?}, host target and floors \
         back {took:?} later"
    );

    // (3) a shrinks back, b grows to nearly all it has: b's balloon
    // deflates, and a's freed memory goes to the host through a's balloon.
    vmms[0].send_line("memuse mib=24");
    vmms[0].wait_for("memuse: used=24 target=24", SHORT);
    let logged = policy.log().len();
    let grown = Instant::now();
    vmms[1].send_line("memuse mib=150");
    vmms[1].wait_for("memuse: used=150 target=150", Duration::from_secs(60));
    let fed = grown.elapsed();
    let took = settle(&vmms, &policy, "b grew");
    let later = policy.log()[logged..].to_string();
    assert!(
        later.contains("deflate b: ") && later.contains("inflate a: "),
        "{later}"
    );
    eprintln!(
        "policy: a shrank, b grew by 110 MiB: it had them after {fed:?}, settled {took:?} later"
    );

    let log = policy.stop();
    for needle in [
        "vmm-overcommit: inflate ",
        "vmm-overcommit: deflate a: ",
        "guest below its floor",
        "vmm-overcommit: stopped",
    ] {
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }
    // Every action is logged with the figures behind it; no failures.
    assert!(!log.contains("failed"), "{log}");
    let actions = log.lines().filter(|l| l.contains(": balloon ")).count();
    eprintln!("policy: {actions} balloon changes logged:\n{log}");
}

#[test]
fn the_overcommit_policy_refuses_bad_options_and_its_unit_is_valid() {
    let run = |args: &[&str]| {
        std::process::Command::new(vmm_tests::harness::overcommit_binary())
            .args(args)
            .output()
            .unwrap()
    };
    for (args, needle) in [
        (&["--step-mib", "0"][..], "--step-mib"),
        (&["--interval-ms", "soon"], "--interval-ms"),
        (&["--psi-limit", "150"], "--psi-limit"),
        (&["--bogus", "1"], "--bogus"),
        (&["--host-target-mib"], "needs a value"),
        (&["--ksm", "--ksm-max-pages", "0"], "--ksm-max-pages"),
        (
            &["--ksm-fast-scan-s", "60", "--ksm-slow-scan-s", "30"],
            "--ksm-fast-scan-s",
        ),
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let help = run(&["--help"]).stdout;
    assert!(String::from_utf8_lossy(&help).contains("--host-memory-mib"));
    assert!(String::from_utf8_lossy(&help).contains("--ksm-slow-scan-s"));

    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("SKIP: systemd-analyze is not installed (package systemd)");
        return;
    };
    let dir = TempDir::new("policy-unit");
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/systemd/vmm-overcommit.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/vmm-overcommit "));
    // The binary must exist for the check: this build's.
    let unit = unit.replace(
        "/usr/local/bin/vmm-overcommit",
        vmm_tests::harness::overcommit_binary().to_str().unwrap(),
    );
    std::fs::write(dir.join("vmm-overcommit.service"), unit).unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(dir.join("vmm-overcommit.service"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A KSM counter of the host (`pages_shared`, `run`, ...).
fn ksm_knob(knob: &str) -> u64 {
    std::fs::read_to_string(Path::new(KSM).join(knob))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_policy_runs_ksmd_while_mergeable_guests_run_and_stops_it_after() {
    require_kvm!();
    if !ksm_reported_by_this_kernel() || !Path::new(KSM).join("run").exists() {
        eprintln!("SKIP: this kernel has no KSM or no per-process KSM figures");
        return;
    }
    let _lock = KSM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // The host's settings come back at the end, also if the test fails.
    let _guard = match KsmGuard::save() {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("SKIP: cannot read the KSM settings: {e}");
            return;
        }
    };
    std::fs::write(Path::new(KSM).join("run"), "0").unwrap();
    // Four patterns of 12 MiB, the same in both guests: at least four KSM
    // pages (pages_shared), each shared by thousands of guest pages.
    const FILL_MIB: u64 = 48;
    let cmdline = format!(
        "-- {}",
        (0..4)
            .map(|i| format!(
                "memfill pattern=5a5a5a5a00c0ff{i:02x} mib=12 off_mib={}",
                i * 12
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let dir = TempDir::new("policy-ksm");
    let mut vmms: Vec<Vmm> = ["m-a", "m-b"]
        .iter()
        .map(|name| {
            let mut vmm = boot(
                &dir,
                name,
                &cmdline,
                &["--memory", "size=128M,mergeable=on"],
            );
            for _ in 0..4 {
                vmm.wait_for("memfill: done", BOOT);
            }
            vmm
        })
        .collect();
    let shared_before = ksm_knob("pages_shared");

    // A host with plenty of room (a budget far above what the guests use):
    // the slow pace, a full scan of the 256 MiB every 2 s.
    let policy = Policy::start(
        &dir,
        &[
            "--interval-ms",
            "300",
            "--host-memory-mib",
            "100000",
            "--ksm",
            "--ksm-fast-scan-s",
            "1",
            "--ksm-slow-scan-s",
            "2",
        ],
    );
    let deadline = Instant::now() + SHORT;
    while ksm_knob("run") != 1 {
        assert!(
            Instant::now() < deadline,
            "ksmd not started\n{}",
            policy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // 65536 pages every 2 s: 655 pages every 20 ms.
    assert_eq!(
        (ksm_knob("pages_to_scan"), ksm_knob("sleep_millisecs")),
        (656, 20),
        "{}",
        policy.log()
    );
    let want = FILL_MIB * MIB / PAGE * 9 / 10;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut shared_max = 0;
    loop {
        shared_max = shared_max.max(ksm_knob("pages_shared"));
        let merged: Vec<u64> = vmms.iter().map(merging_pages).collect();
        if merged.iter().all(|&m| m >= want) && shared_max > shared_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "KSM merged {merged:?} pages of the guests (want {want} each); pages_shared \
             {shared_before} -> at most {shared_max}\n{}",
            policy.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("policy ksm: pages_shared {shared_before} -> {shared_max}");

    // The guests go: ksmd stops, with run 0 (merged pages elsewhere stay).
    for vmm in &mut vmms {
        vmm.signal(libc::SIGTERM);
        assert_eq!(vmm.exit_code(SHORT), 5);
    }
    let deadline = Instant::now() + SHORT;
    while ksm_knob("run") != 0 {
        assert!(
            Instant::now() < deadline,
            "ksmd not stopped\n{}",
            policy.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = policy.stop();
    let start = log
        .lines()
        .find(|l| l.contains("ksm: start"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        start.contains("run 0 -> 1")
            && start.contains("pages_to_scan")
            && start.contains("2 guests"),
        "{start}"
    );
    let stop = log
        .lines()
        .find(|l| l.contains("ksm: stop"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(stop.contains("run 1 -> 0"), "{stop}");
    eprintln!("{start}\n{stop}");
    // Started once, stopped once: no flapping in between.
    assert_eq!(log.matches("ksm: start").count(), 1, "{log}");
    assert_eq!(log.matches("ksm: stop").count(), 1, "{log}");
}
