//! Samples every VMM in the socket directory each interval and publishes a
//! snapshot of all guests (with a few minutes of history for the charts) to
//! the pages, which receive it by server-sent events.
//!
//! Rates (CPU, disk and NIC bytes per second) are differences between two
//! samples of the same VMM process; a new pid starts a new history.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use api::http::{find_vmm_sockets, ApiClient, ClientError};
use api::request::{Counters, MigrationPhase, MigrationRole, MigrationStatus, PingInfo, VmInfo};
use serde::Serialize;
use tokio::sync::watch;

use crate::console::{ConsoleSource, Consoles};
use crate::procfs::{self, ProcStat};

/// How long one sample may wait for one VMM.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a running migration's status is read (a migrated source exits
/// 1.5 s after completion; this catches its last status).
pub const MIGRATION_POLL: Duration = Duration::from_millis(200);
/// How long the last migration of a guest that left stays on the page.
pub const DEPARTED_KEPT: Duration = Duration::from_secs(600);

/// What one sample of one VMM found.
#[derive(Debug)]
pub struct Probe {
    pub name: String,
    pub socket: PathBuf,
    /// The answer to `vmm.ping`; None if there was none (see `error`).
    pub ping: Option<PingInfo>,
    /// Why ping failed, in words.
    pub error: Option<String>,
    /// What the list says when ping failed: `stale` (nobody listens on the
    /// socket: a VMM that died), `not-answering` (it accepts but does not
    /// answer in time: hung or stopped), `error` (it answered wrongly).
    pub failure: &'static str,
    pub info: Option<VmInfo>,
    pub counters: Option<Counters>,
    pub migration: Option<MigrationStatus>,
    pub stat: Option<ProcStat>,
    pub at: Instant,
}

/// Asks one VMM everything a sample needs (blocking).
pub fn probe(name: String, socket: PathBuf, timeout: Duration) -> Probe {
    let client = ApiClient::new(&socket).with_timeout(timeout);
    let mut probe = Probe {
        name,
        socket,
        ping: None,
        error: None,
        failure: "",
        info: None,
        counters: None,
        migration: None,
        stat: None,
        at: Instant::now(),
    };
    match client.ping() {
        Ok(ping) => {
            probe.stat = procfs::read_stat(ping.pid);
            probe.ping = Some(ping);
        }
        Err(e) => {
            probe.failure = match e {
                ClientError::NotListening { .. } => "stale",
                ClientError::Timeout { .. } => "not-answering",
                _ => "error",
            };
            probe.error = Some(e.to_string());
            return probe;
        }
    }
    // A VMM without a VM answers 409 to these: its columns stay empty.
    probe.info = client.info().ok();
    probe.counters = client.counters().ok();
    probe.migration = client.migration_status().ok();
    probe.at = Instant::now();
    probe
}

/// One point of a guest's charts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Unix time in seconds.
    pub t: u64,
    /// CPU time of the VMM process, in percent of one core.
    pub cpu: Option<f64>,
    pub rss_mib: Option<f64>,
    pub pss_mib: Option<f64>,
    /// Disk bytes read plus written per second, all disks.
    pub disk_bps: Option<u64>,
    /// NIC bytes received plus sent per second, all NICs.
    pub net_bps: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MemoryView {
    pub configured_bytes: Option<u64>,
    pub balloon_target_bytes: Option<u64>,
    pub balloon_actual_bytes: Option<u64>,
    pub rss_bytes: Option<u64>,
    pub pss_bytes: Option<u64>,
    pub ksm_merging_pages: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct DiskView {
    pub id: String,
    pub path: String,
    pub readonly: bool,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_bps: Option<u64>,
    pub write_bps: Option<u64>,
    pub errors: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NetView {
    pub id: String,
    pub tap: Option<String>,
    pub mac: Option<String>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_bps: Option<u64>,
    pub tx_bps: Option<u64>,
}

/// A migration as the page shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MigrationView {
    #[serde(flatten)]
    pub status: MigrationStatus,
    /// Where it goes, if it was started from this console.
    pub destination: Option<String>,
    /// 0-100 for the progress bar (absent when failed or cancelled).
    pub progress_percent: Option<f64>,
    /// Seconds since the status was read.
    pub age_s: u64,
}

/// How far a migration is, for a progress bar: round 0 (every page once)
/// fills 0-90 %, dirty rounds hold at 90 %, switch-over is 95 %, done is
/// 100 %. Failed and cancelled migrations have no progress.
pub fn migration_progress(status: &MigrationStatus) -> Option<f64> {
    match status.phase {
        MigrationPhase::None | MigrationPhase::Failed | MigrationPhase::Cancelled => None,
        MigrationPhase::Setup => Some(0.0),
        MigrationPhase::Active if status.iterations == 0 && status.total_bytes > 0 => {
            let done = (status.zero_pages + status.data_pages).saturating_mul(4096);
            Some(90.0 * (done as f64 / status.total_bytes as f64).min(1.0))
        }
        MigrationPhase::Active => Some(90.0),
        MigrationPhase::SwitchOver => Some(95.0),
        MigrationPhase::Completed => Some(100.0),
    }
}

fn migration_running(phase: MigrationPhase) -> bool {
    matches!(
        phase,
        MigrationPhase::Setup | MigrationPhase::Active | MigrationPhase::SwitchOver
    )
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GuestView {
    pub name: String,
    pub socket: String,
    /// The VM's state, or why there is none (see [`Probe::failure`]).
    pub state: String,
    pub pid: Option<u32>,
    pub error: Option<String>,
    pub vcpus: Option<u8>,
    pub memory: MemoryView,
    /// How long the VMM process has run.
    pub uptime_s: Option<u64>,
    pub cpu_percent: Option<f64>,
    pub disks: Vec<DiskView>,
    pub nets: Vec<NetView>,
    pub balloon: bool,
    /// `socket`, `file`, or `none` (see the guest page for why).
    pub console: &'static str,
    pub migration: Option<MigrationView>,
    pub history: Vec<Sample>,
}

/// A guest that left this host (migrated away) while the console watched.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DepartedView {
    pub name: String,
    pub migration: MigrationView,
}

/// Everything the page shows, sent whole every interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Unix time in milliseconds of the sample.
    pub time_ms: u64,
    pub interval_ms: u64,
    pub socket_dir: String,
    /// Why the socket directory could not be read.
    pub error: Option<String>,
    pub guests: Vec<GuestView>,
    pub departed: Vec<DepartedView>,
}

/// The last migration seen of one guest.
#[derive(Clone, Debug)]
struct MigrationRecord {
    status: MigrationStatus,
    destination: Option<String>,
    read_at: Instant,
    /// When the guest stopped being listed.
    departed_at: Option<Instant>,
    /// A poller runs.
    following: bool,
}

/// The previous sample of one VMM process, for rates.
struct Track {
    pid: u32,
    prev: Option<(Instant, Option<ProcStat>, Counters)>,
    history: VecDeque<Sample>,
}

#[derive(Default)]
struct Inner {
    tracks: BTreeMap<String, Track>,
    migrations: BTreeMap<String, MigrationRecord>,
    views: Vec<GuestView>,
    dir_error: Option<String>,
    time_ms: u64,
}

pub struct Monitor {
    dir: PathBuf,
    interval: Duration,
    history_len: usize,
    ticks_per_second: u64,
    inner: Mutex<Inner>,
    tx: watch::Sender<Arc<String>>,
    consoles: Arc<Consoles>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `after - before` per second over `dt`, when both exist and the counter
/// did not go backwards.
fn rate(before: Option<u64>, after: Option<u64>, dt: Duration) -> Option<u64> {
    let delta = after?.checked_sub(before?)?;
    let secs = dt.as_secs_f64();
    (secs > 0.0).then(|| (delta as f64 / secs).round() as u64)
}

fn counter(counters: &Counters, device: &str, name: &str) -> Option<u64> {
    counters.get(device)?.get(name).copied()
}

impl Monitor {
    pub fn new(
        dir: PathBuf,
        interval: Duration,
        history: Duration,
        consoles: Arc<Consoles>,
    ) -> Arc<Monitor> {
        let history_len =
            usize::try_from(history.as_millis() / interval.as_millis().max(1)).unwrap_or(300);
        let (tx, _) = watch::channel(Arc::new(String::from("{}")));
        Arc::new(Monitor {
            dir,
            interval,
            history_len: history_len.max(2),
            ticks_per_second: procfs::ticks_per_second(),
            inner: Mutex::new(Inner::default()),
            tx,
            consoles,
        })
    }

    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The snapshot JSON, updated every interval and on migration progress.
    pub fn subscribe(&self) -> watch::Receiver<Arc<String>> {
        self.tx.subscribe()
    }

    /// The last snapshot.
    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.build(&inner)
    }

    /// Samples forever.
    pub async fn run(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.sample_once().await;
        }
    }

    /// One sample of every VMM.
    pub async fn sample_once(self: &Arc<Self>) {
        let dir = self.dir.clone();
        let sockets = tokio::task::spawn_blocking(move || find_vmm_sockets(&dir)).await;
        let (sockets, dir_error) = match sockets {
            Ok(Ok(sockets)) => (sockets, None),
            Ok(Err(e)) => (
                Vec::new(),
                Some(format!("cannot read {}: {e}", self.dir.display())),
            ),
            Err(e) => (Vec::new(), Some(format!("the directory scan failed: {e}"))),
        };
        let tasks: Vec<_> = sockets
            .into_iter()
            .map(|(name, path)| {
                tokio::task::spawn_blocking(move || probe(name, path, PROBE_TIMEOUT))
            })
            .collect();
        // A probe that panicked (a bug) is left out of this sample.
        let probes: Vec<Probe> = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .flatten()
            .collect();
        self.consoles.track(
            &probes
                .iter()
                .filter(|p| p.ping.is_some())
                .filter_map(|p| {
                    let info = p.info.as_ref()?;
                    Some((p.name.clone(), ConsoleSource::of(&info.config.serial)))
                })
                .collect::<Vec<_>>(),
        );
        let follow = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.dir_error = dir_error;
            self.absorb(&mut inner, probes)
        };
        for (name, socket) in follow {
            self.clone().follow_migration(name, socket);
        }
        self.publish();
    }

    /// Folds a sample into the tracks and views; returns the guests whose
    /// running migration needs a poller.
    fn absorb(&self, inner: &mut Inner, probes: Vec<Probe>) -> Vec<(String, PathBuf)> {
        let uptime = procfs::uptime();
        inner.time_ms = unix_ms();
        let t = inner.time_ms / 1000;
        let mut views = Vec::new();
        let mut follow = Vec::new();
        let names: Vec<String> = probes.iter().map(|p| p.name.clone()).collect();
        inner.tracks.retain(|name, _| names.contains(name));
        for probe in probes {
            let mut view = self.view(inner, &probe, uptime, t);
            if let Some(status) = probe.migration.clone() {
                if status.phase != MigrationPhase::None {
                    let record =
                        inner
                            .migrations
                            .entry(probe.name.clone())
                            .or_insert(MigrationRecord {
                                status: status.clone(),
                                destination: None,
                                read_at: probe.at,
                                departed_at: None,
                                following: false,
                            });
                    if record.read_at <= probe.at {
                        record.status = status;
                        record.read_at = probe.at;
                    }
                    record.departed_at = None;
                    if migration_running(record.status.phase) && !record.following {
                        record.following = true;
                        follow.push((probe.name.clone(), probe.socket.clone()));
                    }
                }
            }
            view.migration = None;
            views.push(view);
        }
        let now = Instant::now();
        for (name, record) in inner.migrations.iter_mut() {
            if !names.contains(name) && record.departed_at.is_none() {
                record.departed_at = Some(now);
            }
        }
        inner.migrations.retain(|_, r| {
            r.departed_at
                .is_none_or(|at| now.duration_since(at) < DEPARTED_KEPT)
        });
        inner.views = views;
        follow
    }

    /// The view of one probe; updates its track (rates, history).
    fn view(
        &self,
        inner: &mut Inner,
        probe: &Probe,
        uptime: Option<Duration>,
        t: u64,
    ) -> GuestView {
        let mut view = GuestView {
            name: probe.name.clone(),
            socket: probe.socket.display().to_string(),
            console: "none",
            ..GuestView::default()
        };
        let Some(ping) = &probe.ping else {
            view.state = probe.failure.into();
            view.error = probe.error.clone();
            return view;
        };
        view.state = ping.state.to_string();
        view.pid = Some(ping.pid);
        if let Some(info) = &probe.info {
            let config = &info.config;
            view.vcpus = Some(config.cpus.boot_vcpus);
            view.memory.configured_bytes = Some(config.memory.size_mib << 20);
            view.balloon = config.balloon.is_some();
            view.console = match ConsoleSource::of(&config.serial) {
                ConsoleSource::Socket(_) => "socket",
                ConsoleSource::File(_) => "file",
                ConsoleSource::Unavailable(_) => "none",
            };
            if let Some(m) = &info.memory {
                view.memory.rss_bytes = Some(m.rss_bytes);
                view.memory.pss_bytes = m.pss_bytes;
                view.memory.ksm_merging_pages = m.ksm_merging_pages;
                view.memory.balloon_target_bytes = m.balloon_target_bytes;
                view.memory.balloon_actual_bytes = m.balloon_actual_bytes;
            }
        }
        if let (Some(stat), Some(uptime)) = (probe.stat, uptime) {
            view.uptime_s = Some(
                procfs::process_age(stat.start_ticks, self.ticks_per_second, uptime).as_secs(),
            );
        }
        let counters = probe.counters.clone().unwrap_or_default();
        let track = inner
            .tracks
            .entry(probe.name.clone())
            .or_insert_with(|| Track {
                pid: ping.pid,
                prev: None,
                history: VecDeque::new(),
            });
        if track.pid != ping.pid {
            // Another VMM process under the same name: start over.
            *track = Track {
                pid: ping.pid,
                prev: None,
                history: VecDeque::new(),
            };
        }
        let prev = track.prev.as_ref();
        let dt = prev.map(|(at, _, _)| probe.at.saturating_duration_since(*at));
        let before = |device: &str, name: &str| prev.and_then(|(_, _, c)| counter(c, device, name));
        if let (Some(dt), Some((_, Some(before), _)), Some(after)) = (dt, prev, probe.stat) {
            if !dt.is_zero() {
                let ticks = after.cpu_ticks.saturating_sub(before.cpu_ticks);
                let busy = ticks as f64 / self.ticks_per_second as f64;
                view.cpu_percent = Some((busy / dt.as_secs_f64() * 1000.0).round() / 10.0);
            }
        }
        if let Some(info) = &probe.info {
            for (i, disk) in info.config.disks.iter().enumerate() {
                let id = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
                let now = |name| counter(&counters, &id, name);
                let rate_of = |name| dt.and_then(|dt| rate(before(&id, name), now(name), dt));
                view.disks.push(DiskView {
                    path: disk.path.display().to_string(),
                    readonly: disk.readonly,
                    read_bytes: now("read_bytes").unwrap_or(0),
                    write_bytes: now("write_bytes").unwrap_or(0),
                    read_bps: rate_of("read_bytes"),
                    write_bps: rate_of("write_bytes"),
                    errors: now("errors").unwrap_or(0),
                    id,
                });
            }
            for (i, net) in info.config.nets.iter().enumerate() {
                let id = net.id.clone().unwrap_or_else(|| format!("net{i}"));
                let now = |name| counter(&counters, &id, name);
                let rate_of = |name| dt.and_then(|dt| rate(before(&id, name), now(name), dt));
                view.nets.push(NetView {
                    tap: net.tap.clone(),
                    mac: net.mac.clone(),
                    rx_bytes: now("rx_bytes").unwrap_or(0),
                    tx_bytes: now("tx_bytes").unwrap_or(0),
                    rx_bps: rate_of("rx_bytes"),
                    tx_bps: rate_of("tx_bytes"),
                    id,
                });
            }
        }
        let sum = |rates: Vec<Option<u64>>| -> Option<u64> {
            if rates.is_empty() || rates.iter().any(Option::is_none) {
                None
            } else {
                Some(rates.into_iter().flatten().sum())
            }
        };
        let mib = |b: Option<u64>| b.map(|b| (b as f64 / 1048576.0 * 10.0).round() / 10.0);
        track.history.push_back(Sample {
            t,
            cpu: view.cpu_percent,
            rss_mib: mib(view.memory.rss_bytes),
            pss_mib: mib(view.memory.pss_bytes),
            disk_bps: sum(view
                .disks
                .iter()
                .flat_map(|d| [d.read_bps, d.write_bps])
                .collect()),
            net_bps: sum(view
                .nets
                .iter()
                .flat_map(|n| [n.rx_bps, n.tx_bps])
                .collect()),
        });
        while track.history.len() > self.history_len {
            track.history.pop_front();
        }
        track.prev = Some((probe.at, probe.stat, counters));
        view.history = track.history.iter().copied().collect();
        view
    }

    fn build(&self, inner: &Inner) -> Snapshot {
        let now = Instant::now();
        let migration_view = |r: &MigrationRecord| MigrationView {
            progress_percent: migration_progress(&r.status),
            status: r.status.clone(),
            destination: r.destination.clone(),
            age_s: now.duration_since(r.read_at).as_secs(),
        };
        let guests = inner
            .views
            .iter()
            .map(|v| {
                let mut v = v.clone();
                v.migration = inner.migrations.get(&v.name).map(migration_view);
                v
            })
            .collect();
        let departed = inner
            .migrations
            .iter()
            .filter(|(_, r)| r.departed_at.is_some())
            .map(|(name, r)| DepartedView {
                name: name.clone(),
                migration: migration_view(r),
            })
            .collect();
        Snapshot {
            time_ms: inner.time_ms,
            interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            socket_dir: self.dir.display().to_string(),
            error: inner.dir_error.clone(),
            guests,
            departed,
        }
    }

    /// Sends the current snapshot to every page.
    pub fn publish(&self) {
        let json = {
            let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            serde_json::to_string(&self.build(&inner))
        };
        // Serializing plain structs of strings and numbers cannot fail.
        if let Ok(json) = json {
            self.tx.send_replace(Arc::new(json));
        }
    }

    /// Records that this console started a migration of `name` to
    /// `destination`, and follows it.
    pub fn migration_started(self: &Arc<Self>, name: &str, socket: PathBuf, destination: String) {
        let start = {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            let record = inner
                .migrations
                .entry(name.to_string())
                .or_insert(MigrationRecord {
                    status: MigrationStatus::default(),
                    destination: None,
                    read_at: Instant::now(),
                    departed_at: None,
                    following: false,
                });
            record.destination = Some(destination);
            record.status = MigrationStatus {
                phase: MigrationPhase::Setup,
                role: Some(MigrationRole::Send),
                ..MigrationStatus::default()
            };
            record.read_at = Instant::now();
            !std::mem::replace(&mut record.following, true)
        };
        if start {
            self.clone().follow_migration(name.to_string(), socket);
        }
        self.publish();
    }

    /// Polls a running migration's status until it ends (or the VMM goes).
    fn follow_migration(self: Arc<Self>, name: String, socket: PathBuf) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(MIGRATION_POLL).await;
                let path = socket.clone();
                let status = tokio::task::spawn_blocking(move || {
                    ApiClient::new(path)
                        .with_timeout(PROBE_TIMEOUT)
                        .migration_status()
                })
                .await;
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let Some(record) = inner.migrations.get_mut(&name) else {
                    return;
                };
                let done = match status {
                    Ok(Ok(status)) => {
                        let done = !migration_running(status.phase);
                        record.status = status;
                        record.read_at = Instant::now();
                        done
                    }
                    Ok(Err(e)) => {
                        if migration_running(record.status.phase) {
                            record.status.error = Some(format!(
                                "the VMM stopped answering during the migration ({e}); \
                                 check the destination"
                            ));
                        }
                        true
                    }
                    Err(_) => true,
                };
                if done {
                    record.following = false;
                }
                drop(inner);
                self.publish();
                if done {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_and_never_negative() {
        let s = Duration::from_millis(500);
        assert_eq!(rate(Some(1000), Some(3000), s), Some(4000));
        assert_eq!(rate(Some(3000), Some(1000), s), None);
        assert_eq!(rate(None, Some(1000), s), None);
        assert_eq!(rate(Some(1), Some(2), Duration::ZERO), None);
    }

    #[test]
    fn migration_progress_follows_the_phases() {
        let mut status = MigrationStatus {
            phase: MigrationPhase::Active,
            total_bytes: 100 * 4096,
            zero_pages: 30,
            data_pages: 20,
            ..MigrationStatus::default()
        };
        assert_eq!(migration_progress(&status), Some(45.0));
        status.iterations = 2;
        assert_eq!(migration_progress(&status), Some(90.0));
        status.phase = MigrationPhase::SwitchOver;
        assert_eq!(migration_progress(&status), Some(95.0));
        status.phase = MigrationPhase::Completed;
        assert_eq!(migration_progress(&status), Some(100.0));
        status.phase = MigrationPhase::Failed;
        assert_eq!(migration_progress(&status), None);
    }
}
