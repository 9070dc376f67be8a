//! The sending side: connect, authenticate, send the config, pre-copy
//! memory in rounds until the remaining dirty memory fits the downtime
//! budget, then pause, send the last pages and the state, and hand over.
//!
//! Round 0 sends only pages the host ever backed and that are not zero
//! (the target's memory starts zeroed). Later rounds send the pages KVM's
//! dirty log and the VMM's own bitmap report; a page that became zero goes
//! as a zero marker, and only if the target ever got data for it.
//!
//! Pages in the balloon are not sent (nor read: reading a punched-out memfd
//! page would allocate it again) when the driver negotiated MUST_TELL_HOST:
//! the guest does not touch them, and the balloon's state, which the target
//! restores, lists them. A ballooned page the target got data for earlier
//! goes as a zero marker, as it reads as zero here. The balloon's map is
//! read after each harvest and read again after the dirty log of a run was
//! cleared if pages left the balloon meanwhile, so a page deflated and
//! written is never skipped (see `device_manager::migration_skippable_pages`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::request::{MigrationParameters, MigrationPhase, MigrationRole, TimeoutAction};
use config::VmConfig;
use kvm_ioctls::VmFd;
use migration::bitmap::DirtyBitmap;
use migration::protocol::{
    self, Empty, Kind, PageRange, ProtocolError, HEADER_SIZE, MAX_MEMORY_PAYLOAD, PAGE_SIZE,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{
    call, connect, stream, trace, ControlHandle, IoVecs, MigrationCall, MigrationError,
    MigrationReply, MigrationShared, Stream,
};
use crate::device_manager::migration_skippable_pages;
use crate::dirty_log::DirtyLog;
use crate::memory::{self, GuestMemoryMmap};
use crate::vcpu::Throttle;

/// Pages per contiguous run handled at once (4 MiB).
const RUN_PAGES: usize = 1024;
/// Auto-converge: first throttle, step, ceiling (QEMU's figures).
const THROTTLE_INITIAL: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;
/// The downtime limit is a ceiling, not a goal: once the dirty set fits it,
/// pre-copy goes on towards this pause while rounds still shrink the dirty
/// set by a fifth or more, or (with auto-converge) throttling can push it
/// down, for at most [`GOAL_ROUNDS`] rounds. A few milliseconds of total
/// time buy a pause several times shorter.
const DOWNTIME_GOAL_MS: u64 = 5;
const GOAL_ROUNDS: u32 = 5;
/// With timeout action force, the forced switch-over may take this long
/// past the timeout before the migration fails.
const FORCE_GRACE: Duration = Duration::from_secs(30);
/// Telling a failing target to give up waits at most this long.
const ABANDON_TIMEOUT: Duration = Duration::from_millis(500);
/// Under a bandwidth cap, pages go out in chunks of this much of a second's
/// allowance, each followed by the pause it asks for: the rate is smooth,
/// not bursts at full speed followed by long sleeps.
const PACE_CHUNKS_PER_S: u64 = 50;
const PACE_CHUNK_MIN: u64 = 16 << 10;
const PACE_CHUNK_MAX: u64 = 4 << 20;

/// Everything the sending thread needs.
pub struct SendContext {
    pub destination: String,
    pub token: String,
    /// TLS (client side), when configured.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub config: VmConfig,
    pub memory: Arc<GuestMemoryMmap>,
    pub vm_fd: Arc<VmFd>,
    pub throttle: Arc<Throttle>,
    pub shared: Arc<MigrationShared>,
    pub control: ControlHandle,
    /// The VM's balloon: its pages need not be sent.
    pub balloon: Option<devices::virtio::balloon::BalloonHandle>,
}

/// Where the switch-over stands, to know what undoing a failure takes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    /// Connecting and proving: nothing goes to an unproven target.
    Authenticating,
    Running,
    /// Paused, state taken, disks released.
    Released,
    /// `Complete` went out: the target may run the guest.
    Committed,
}

struct Sender_ {
    memory: Arc<GuestMemoryMmap>,
    shared: Arc<MigrationShared>,
    /// Pages the target holds data for (it needs zero markers only for these).
    sent_data: Vec<DirtyBitmap>,
    /// Bytes written since `window_start`, for bandwidth capping.
    window_bytes: u64,
    window_start: Instant,
    balloon: Option<devices::virtio::balloon::BalloonHandle>,
    /// Pages in the balloon that are not sent, as last read (per region).
    ballooned: Option<Vec<DirtyBitmap>>,
    /// The balloon's removal generation when `ballooned` was read.
    ballooned_generation: u64,
}

/// Runs a migration to its end. On failure before `Complete` the source
/// runs on; the status says what happened.
pub fn run(context: SendContext) {
    let start = Instant::now();
    let shared = context.shared.clone();
    let control = context.control.clone();
    let throttle = context.throttle.clone();
    shared.update(|s| {
        *s = api::request::MigrationStatus {
            phase: MigrationPhase::Setup,
            role: Some(MigrationRole::Send),
            total_bytes: memory::total_size(&context.memory),
            ..Default::default()
        }
    });
    let mut stage = Stage::Authenticating;
    let result = migrate(context, &mut stage, start);
    throttle.set(0);
    let total_time_ms = start.elapsed().as_millis() as u64;
    match result {
        Ok(()) => {
            shared.update(|s| {
                s.phase = MigrationPhase::Completed;
                s.total_time_ms = total_time_ms;
                s.remaining_bytes = 0;
                s.throttle_percent = 0;
            });
            let _ = call(&control, MigrationCall::Finished);
        }
        Err(e) => {
            // A cancel cuts the connection: whatever error that caused, it
            // was the cancel.
            let cancelled = matches!(e, MigrationError::Cancelled)
                || (shared.cancelled() && stage < Stage::Committed);
            let e = if cancelled {
                MigrationError::Cancelled
            } else {
                e
            };
            let message = if stage == Stage::Committed {
                format!(
                    "{e}; the target may already run the guest, so this one stays paused \
                     (check the target before resuming)"
                )
            } else {
                e.to_string()
            };
            // Before `Complete` the guest runs on here; after it, it may run
            // on the target, so it stays paused for the operator to decide.
            let undo = if stage == Stage::Committed {
                MigrationCall::Undecided
            } else {
                MigrationCall::Abort
            };
            log::error!("migration failed: {message}");
            if let Err(undo) = call(&control, undo) {
                log::error!("migration: cannot resume the guest: {undo}");
            }
            shared.update(|s| {
                s.phase = if cancelled {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                };
                s.total_time_ms = total_time_ms;
                s.throttle_percent = 0;
                s.error = Some(message);
            });
        }
    }
}

/// When the whole migration must have ended: the timeout with action
/// cancel; with force, the timeout plus [`FORCE_GRACE`] for the forced
/// switch-over. None without a timeout (then only a stall of
/// [`stream::IO_TIMEOUT`] fails it).
fn hard_deadline(parameters: &MigrationParameters, start: Instant) -> Option<Instant> {
    let timeout = Duration::from_secs(parameters.timeout_s?);
    Some(match parameters.timeout_action {
        TimeoutAction::Cancel => start + timeout,
        TimeoutAction::Force => start + timeout + FORCE_GRACE,
    })
}

/// Connects, then TLS when configured. A TLS peer whose certificate does
/// not verify failed authentication.
fn open(context: &SendContext, deadline: Option<Instant>) -> Result<Stream, MigrationError> {
    let connect_error = |source| MigrationError::Connect {
        destination: context.destination.clone(),
        source,
    };
    let socket = connect(&context.destination, deadline).map_err(connect_error)?;
    context.shared.start(socket.handle().ok());
    let Some(config) = &context.tls else {
        return Ok(Stream::Plain(socket));
    };
    let name = stream::tls_server_name(&context.destination).map_err(connect_error)?;
    Stream::tls_client(socket, config.clone(), name).map_err(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            ProtocolError::TargetAuthentication(e.to_string()).into()
        } else {
            MigrationError::from(e)
        }
    })
}

fn migrate(context: SendContext, stage: &mut Stage, start: Instant) -> Result<(), MigrationError> {
    let parameters = context.shared.parameters();
    let mut stream = open(&context, hard_deadline(&parameters, start))?;
    let shared = context.shared.clone();
    let mut result = migrate_on(&mut stream, context, stage, start);
    if let Err(e) = &result {
        // Whatever call hit the deadline, the migration timed out.
        let deadline = stream.socket().deadline();
        if deadline.is_some_and(|d| Instant::now() + Duration::from_millis(100) >= d)
            && !matches!(e, MigrationError::Cancelled)
            && !shared.cancelled()
        {
            let timeout = shared.parameters().timeout_s.unwrap_or_default();
            result = Err(MigrationError::TimedOut(timeout));
        }
    }
    // Neither the goodbye nor closing may block on a stalled target.
    stream.set_deadline(Some(Instant::now() + ABANDON_TIMEOUT));
    if let Err(e) = &result {
        if *stage > Stage::Authenticating
            && *stage < Stage::Committed
            && !shared.cancelled()
            && !matches!(e, MigrationError::Protocol(ProtocolError::Peer(_)))
        {
            // Tell a live target to drop everything; it may be gone already.
            let _ = protocol::send_json(
                &mut stream,
                Kind::Abandon,
                &protocol::ErrorMessage {
                    message: e.to_string(),
                },
            );
        }
    }
    shared.start(None);
    stream.shutdown();
    result
}

fn check_cancel(shared: &MigrationShared) -> Result<(), MigrationError> {
    if shared.cancelled() {
        Err(MigrationError::Cancelled)
    } else {
        Ok(())
    }
}

fn migrate_on(
    stream: &mut Stream,
    context: SendContext,
    stage: &mut Stage,
    start: Instant,
) -> Result<(), MigrationError> {
    let shared = context.shared.clone();
    // Nothing about the guest goes out before the target proved the token.
    let binding = stream.channel_binding()?;
    migration::auth::authenticate_source(stream, context.token.as_bytes(), &binding)?;
    *stage = Stage::Running;
    check_cancel(&shared)?;
    protocol::send_json(stream, Kind::Config, &context.config)?;
    protocol::expect_json::<Empty>(stream, Kind::Ack)?;
    check_cancel(&shared)?;

    let mut dirty_log = DirtyLog::start(context.vm_fd.clone(), context.memory.clone())?;
    let result = precopy_and_switch(stream, &context, &mut dirty_log, stage, start);
    dirty_log.stop();
    result
}

fn precopy_and_switch(
    stream: &mut Stream,
    context: &SendContext,
    dirty_log: &mut DirtyLog,
    stage: &mut Stage,
    start: Instant,
) -> Result<(), MigrationError> {
    let shared = context.shared.clone();
    let mut sender = Sender_::new(
        context.memory.clone(),
        context.shared.clone(),
        context.balloon.clone(),
    );
    shared.update(|s| {
        s.phase = MigrationPhase::Active;
        s.setup_time_ms = start.elapsed().as_millis() as u64;
    });

    // Round 0: every page the host ever backed (but the balloon's).
    let mut round0: Vec<DirtyBitmap> = context
        .memory
        .iter()
        .map(memory::touched_pages)
        .collect::<Result<_, _>>()?;
    sender.apply_balloon(&mut round0);
    let mut round_start = Instant::now();
    let mut round_bytes = sender.send_round(stream, &round0, None)?;
    let mut convergence = Convergence {
        bandwidth: estimate_bandwidth(round_bytes, round_start.elapsed(), &shared, None),
        previous_dirty: u64::MAX,
        high_dirty_rounds: 0,
        throttle: 0,
        rounds_fitting: 0,
    };

    loop {
        check_cancel(&shared)?;
        let parameters = shared.parameters();
        // The parameters may have changed: so may the deadline.
        stream.set_deadline(hard_deadline(&parameters, start));
        let mut dirty = dirty_log.harvest()?;
        // After the harvest: see `Sender_::apply_balloon`.
        let dirty_bytes = sender.apply_balloon(&mut dirty) * PAGE_SIZE;
        let expected_downtime_ms = dirty_bytes.saturating_mul(1000) / convergence.bandwidth;
        report_round(
            &shared,
            dirty_bytes,
            round_start.elapsed(),
            expected_downtime_ms,
            convergence.bandwidth,
            start,
        );
        let timed_out = parameters
            .timeout_s
            .is_some_and(|t| start.elapsed() >= Duration::from_secs(t));
        if timed_out && parameters.timeout_action == TimeoutAction::Cancel {
            // Put the harvested pages back: nothing harvested may be lost.
            for (slot, b) in dirty.iter().enumerate() {
                dirty_log.carry(slot, b);
            }
            return Err(MigrationError::TimedOut(
                parameters.timeout_s.unwrap_or_default(),
            ));
        }
        let fits = expected_downtime_ms <= parameters.downtime_ms;
        let shrinking = shrinks(dirty_bytes, convergence.previous_dirty);
        let can_throttle = parameters.auto_converge && convergence.throttle < THROTTLE_MAX;
        if timed_out
            || fits
                && settled(
                    expected_downtime_ms,
                    shrinking,
                    can_throttle,
                    convergence.rounds_fitting,
                )
        {
            // Let the target catch up with what is still in flight, while
            // the guest runs, so the pause does not wait for it.
            let synced = Instant::now();
            protocol::send_json(stream, Kind::Sync, &Empty {})?;
            protocol::expect_json::<Empty>(stream, Kind::Ack)?;
            super::trace("the target caught up", synced);
            return switch_over(&mut sender, stream, context, dirty_log, dirty, stage, start);
        }
        if fits {
            convergence.rounds_fitting += 1;
        }
        let throttle = if parameters.auto_converge {
            convergence.auto_converge(dirty_bytes, round_bytes, fits && !shrinking)
        } else {
            0
        };
        if throttle != convergence.throttle {
            context.throttle.set(throttle);
        }
        convergence.throttle = throttle;
        shared.update(|s| s.throttle_percent = u64::from(throttle));
        convergence.previous_dirty = dirty_bytes;

        round_start = Instant::now();
        round_bytes = match sender.send_round(stream, &dirty, Some(dirty_log)) {
            Ok(bytes) => bytes,
            Err(e) => {
                for (slot, b) in dirty.iter().enumerate() {
                    dirty_log.carry(slot, b);
                }
                return Err(e);
            }
        };
        convergence.bandwidth = estimate_bandwidth(
            round_bytes,
            round_start.elapsed(),
            &shared,
            Some(convergence.bandwidth),
        );
        shared.update(|s| s.iterations += 1);
    }
}

/// Pre-copy's state from round to round.
struct Convergence {
    /// The link bandwidth the downtime estimate uses (bytes/s).
    bandwidth: u64,
    /// Bytes dirty after the round before.
    previous_dirty: u64,
    /// Consecutive rounds where the guest dirtied more than half of what a
    /// round drained.
    high_dirty_rounds: u32,
    /// The vCPU throttle in percent.
    throttle: u32,
    /// Rounds whose dirty set fitted the downtime limit.
    rounds_fitting: u32,
}

impl Convergence {
    /// Auto-converge: the throttle for the next round. The vCPUs slow down
    /// when the guest dirties more than half of what a round drains twice in
    /// a row, or when the dirty set fits the limit but no longer shrinks on
    /// its own (`stalled`).
    fn auto_converge(&mut self, dirty_bytes: u64, round_bytes: u64, stalled: bool) -> u32 {
        if dirty_bytes * 2 > round_bytes && dirty_bytes >= self.previous_dirty / 2 {
            self.high_dirty_rounds += 1;
        } else {
            self.high_dirty_rounds = 0;
        }
        if self.high_dirty_rounds >= 2 || stalled {
            self.high_dirty_rounds = 0;
            return if self.throttle == 0 {
                THROTTLE_INITIAL
            } else {
                (self.throttle + THROTTLE_STEP).min(THROTTLE_MAX)
            };
        }
        self.throttle
    }
}

/// Publishes a round's figures in the migration status (and the trace).
fn report_round(
    shared: &MigrationShared,
    dirty_bytes: u64,
    round_time: Duration,
    expected_downtime_ms: u64,
    bandwidth: u64,
    start: Instant,
) {
    let dirty_pages = dirty_bytes / PAGE_SIZE;
    shared.update(|s| {
        s.remaining_bytes = dirty_bytes;
        s.expected_downtime_ms = expected_downtime_ms.min(u64::from(u32::MAX));
        s.dirty_pages_rate = (dirty_pages as f64 / round_time.as_secs_f64().max(1e-6)) as u64;
        s.throughput_bytes_per_s = bandwidth;
        s.total_time_ms = start.elapsed().as_millis() as u64;
    });
    trace(
        &format!(
            "harvested {} KiB dirty, expected downtime {expected_downtime_ms} ms at {} MB/s",
            dirty_bytes >> 10,
            bandwidth / 1_000_000
        ),
        start,
    );
}

fn switch_over(
    sender: &mut Sender_,
    stream: &mut Stream,
    context: &SendContext,
    dirty_log: &mut DirtyLog,
    mut dirty: Vec<DirtyBitmap>,
    stage: &mut Stage,
    start: Instant,
) -> Result<(), MigrationError> {
    let shared = context.shared.clone();
    shared.update(|s| s.phase = MigrationPhase::SwitchOver);
    let paused_at = Instant::now();
    let MigrationReply::Snapshot(snapshot) = call(&context.control, MigrationCall::SwitchOver)?
    else {
        return Err(MigrationError::ShuttingDown);
    };
    *stage = Stage::Released;
    trace("paused, state taken, disks released", paused_at);
    context.throttle.set(0);
    // The last round: everything dirtied up to the pause.
    let last = dirty_log.harvest()?;
    for (d, l) in dirty.iter_mut().zip(&last) {
        d.merge(l);
    }
    trace("last harvest", paused_at);
    // The balloon is paused with the devices: its map is the one in the snapshot.
    sender.apply_balloon(&mut dirty);
    sender.window_bytes = 0;
    sender.window_start = Instant::now();
    // Nothing writes guest memory now: no need to re-protect pages.
    let last_bytes = sender.send_round_unlimited(stream, &dirty, None)?;
    trace(&format!("last round sent ({last_bytes} bytes)"), paused_at);
    // Complete goes out only after the target acknowledged the state: until
    // then a broken connection means the guest cannot run there, so this
    // side may resume it safely.
    protocol::send_raw(stream, Kind::State, &snapshot)?;
    protocol::expect_json::<Empty>(stream, Kind::Ack)?;
    trace(
        &format!("state ({} bytes) restored on the target", snapshot.len()),
        paused_at,
    );
    // From here a cancel no longer cuts the connection: the answer to
    // Complete says where the guest runs.
    shared.commit()?;
    *stage = Stage::Committed;
    protocol::send_json(stream, Kind::Complete, &Empty {})?;
    protocol::expect_json::<Empty>(stream, Kind::Running)?;
    let downtime = paused_at.elapsed();
    trace("the guest runs on the target", paused_at);
    shared.update(|s| {
        s.downtime_ms = downtime.as_millis() as u64;
        s.total_time_ms = start.elapsed().as_millis() as u64;
        s.iterations += 1;
    });
    Ok(())
}

/// What a snapshot to a file needs: the VM paused, its devices paused and
/// their state taken (`state`, encoded), so nothing writes guest memory.
pub struct SnapshotJob {
    pub config: VmConfig,
    pub memory: Arc<GuestMemoryMmap>,
    pub shared: Arc<MigrationShared>,
    pub balloon: Option<devices::virtio::balloon::BalloonHandle>,
    pub state: Vec<u8>,
    /// Whether the guest ran before the snapshot paused it.
    pub running: bool,
}

/// Writes a paused VM to `stream` (a file) as the source half of a
/// migration: Config, one round of every page the host ever backed that
/// is not zero (the balloon's skipped as in a migration), State, and
/// Complete with the checksum of all that. Returns the bytes written.
pub fn write_snapshot(stream: &mut Stream, job: SnapshotJob) -> Result<u64, MigrationError> {
    protocol::send_json(stream, Kind::Config, &job.config)?;
    let mut sender = Sender_::new(job.memory.clone(), job.shared.clone(), job.balloon);
    let mut pages: Vec<DirtyBitmap> = job
        .memory
        .iter()
        .map(memory::touched_pages)
        .collect::<Result<_, _>>()?;
    sender.apply_balloon(&mut pages);
    let mut written = sender.send_round_unlimited(stream, &pages, None)?;
    protocol::send_raw(stream, Kind::State, &job.state)?;
    let sha256 = stream.digest().ok_or_else(|| {
        MigrationError::from(std::io::Error::other("a snapshot is written to a file"))
    })?;
    protocol::send_json(
        stream,
        Kind::Complete,
        &protocol::SnapshotComplete {
            sha256,
            running: job.running,
        },
    )?;
    written += job.state.len() as u64;
    Ok(written)
}

/// Whether pre-copy, with the dirty set under the downtime limit, should
/// stop chasing [`DOWNTIME_GOAL_MS`] and switch over.
fn settled(
    expected_downtime_ms: u64,
    shrinking: bool,
    can_throttle: bool,
    rounds_fitting: u32,
) -> bool {
    expected_downtime_ms <= DOWNTIME_GOAL_MS
        || rounds_fitting >= GOAL_ROUNDS
        || !(shrinking || can_throttle)
}

/// Whether a round's dirty set is at least a fifth smaller than the one
/// before: pre-copy still converges on its own.
fn shrinks(dirty_bytes: u64, previous_dirty: u64) -> bool {
    dirty_bytes.saturating_mul(5) < previous_dirty.saturating_mul(4)
}

/// Assumed link bandwidth before a round big enough to measure it (bytes/s).
const DEFAULT_BANDWIDTH: u64 = 1 << 30;
/// Rounds smaller than this say nothing reliable about the link.
const MEASURABLE_ROUND: u64 = 1 << 20;

/// The bandwidth the downtime estimate uses: measured over the last round
/// when it was big enough, else the previous estimate, capped by the limit.
fn estimate_bandwidth(
    bytes: u64,
    elapsed: Duration,
    shared: &MigrationShared,
    previous: Option<u64>,
) -> u64 {
    let measured = if bytes >= MEASURABLE_ROUND {
        Some(rate(bytes, elapsed))
    } else {
        previous
    };
    let cap = shared.parameters().bandwidth_bytes_per_s.filter(|&c| c > 0);
    match (measured, cap) {
        (Some(m), Some(c)) => m.min(c),
        (Some(m), None) => m,
        (None, Some(c)) => c,
        (None, None) => DEFAULT_BANDWIDTH,
    }
    .max(1)
}

fn rate(bytes: u64, elapsed: Duration) -> u64 {
    (bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64
}

/// What to send for one page.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageClass {
    Data,
    Zero,
    Skip,
}

impl Sender_ {
    fn new(
        memory: Arc<GuestMemoryMmap>,
        shared: Arc<MigrationShared>,
        balloon: Option<devices::virtio::balloon::BalloonHandle>,
    ) -> Sender_ {
        Sender_ {
            sent_data: memory
                .iter()
                .map(|r| DirtyBitmap::new((r.len() / PAGE_SIZE) as usize))
                .collect(),
            memory,
            shared,
            window_bytes: 0,
            window_start: Instant::now(),
            balloon,
            ballooned: None,
            ballooned_generation: 0,
        }
    }

    fn send_round(
        &mut self,
        stream: &mut Stream,
        pages: &[DirtyBitmap],
        dirty_log: Option<&DirtyLog>,
    ) -> Result<u64, MigrationError> {
        self.send_pages(stream, pages, dirty_log, true)
    }

    fn send_round_unlimited(
        &mut self,
        stream: &mut Stream,
        pages: &[DirtyBitmap],
        dirty_log: Option<&DirtyLog>,
    ) -> Result<u64, MigrationError> {
        self.send_pages(stream, pages, dirty_log, false)
    }

    /// Sends every page set in `pages` (per region); returns bytes written.
    fn send_pages(
        &mut self,
        stream: &mut Stream,
        pages: &[DirtyBitmap],
        dirty_log: Option<&DirtyLog>,
        limited: bool,
    ) -> Result<u64, MigrationError> {
        let mut total = 0u64;
        let mut batch = Batch::default();
        let regions: Vec<(u64, *mut u8)> = self
            .memory
            .iter()
            .map(|r| (r.start_addr().0, r.as_ptr()))
            .collect();
        for (slot, bitmap) in pages.iter().enumerate() {
            let (base, host) = regions[slot];
            for (first, count) in bitmap.runs(RUN_PAGES) {
                if let Some(log) = dirty_log {
                    // Re-protect before copying so later writes show up next round.
                    log.clear(slot, bitmap, first, count)?;
                }
                // After the clear: a page deflated and written before it
                // must not be skipped as ballooned.
                self.recheck_balloon();
                let mut page = first;
                while page < first + count {
                    let class = self.classify(slot, host, page);
                    let mut end = page + 1;
                    while end < first + count && self.classify(slot, host, end) == class {
                        end += 1;
                    }
                    if class != PageClass::Skip {
                        let range = PageRange {
                            gpa: base + page as u64 * PAGE_SIZE,
                            len: ((end - page) as u64 * PAGE_SIZE) as u32,
                            zero: class == PageClass::Zero,
                        };
                        // SAFETY: page..end lies inside this region's mapping.
                        let data = unsafe { host.add(page * PAGE_SIZE as usize) };
                        if batch.wire_size() + range.wire_size() > MAX_MEMORY_PAYLOAD {
                            total += self.flush(stream, &mut batch, limited)?;
                        }
                        batch.push(range, data);
                        let sent = &mut self.sent_data[slot];
                        for p in page..end {
                            if class == PageClass::Data {
                                sent.set(p);
                            }
                        }
                        if class == PageClass::Zero {
                            let mut cleared = DirtyBitmap::new(sent.pages());
                            for p in page..end {
                                cleared.set(p);
                            }
                            sent.subtract(&cleared);
                        }
                        self.shared.update(|s| {
                            if class == PageClass::Data {
                                s.data_pages += (end - page) as u64;
                            } else {
                                s.zero_pages += (end - page) as u64;
                            }
                        });
                    } else {
                        self.shared.update(|s| s.zero_pages += (end - page) as u64);
                    }
                    page = end;
                }
            }
            if batch.wire_size() > 8 << 20 {
                total += self.flush(stream, &mut batch, limited)?;
            }
        }
        total += self.flush(stream, &mut batch, limited)?;
        Ok(total)
    }

    /// Reads the balloon's page map (after a harvest: a page deflated and
    /// written before it is no longer in the map, one written after it is
    /// in the next harvest), and adds to `pages` the ballooned pages the
    /// target holds data for (zero markers: they read as zero here).
    /// Returns how many pages of `pages` are not ballooned.
    fn apply_balloon(&mut self, pages: &mut [DirtyBitmap]) -> u64 {
        self.read_balloon();
        match &self.ballooned {
            Some(ballooned) => add_stale_ballooned(pages, ballooned, &self.sent_data),
            None => pages.iter().map(|b| b.count() as u64).sum(),
        }
    }

    fn read_balloon(&mut self) {
        if let Some(balloon) = &self.balloon {
            // The generation first: a removal during the read shows next time.
            self.ballooned_generation = balloon.removal_generation();
            self.ballooned = migration_skippable_pages(balloon);
        }
    }

    /// Reads the balloon's map again if pages left the balloon since.
    fn recheck_balloon(&mut self) {
        if let Some(balloon) = &self.balloon {
            if balloon.removal_generation() != self.ballooned_generation {
                self.read_balloon();
            }
        }
    }

    fn classify(&self, slot: usize, host: *mut u8, page: usize) -> PageClass {
        if self
            .ballooned
            .as_ref()
            .is_some_and(|b| b[slot].is_set(page))
        {
            // Not read: the guest does not use it, and it reads as zero.
            return if self.sent_data[slot].is_set(page) {
                PageClass::Zero
            } else {
                PageClass::Skip
            };
        }
        // SAFETY: the page is inside the region mapping that `host` starts.
        let zero = unsafe { memory::is_zero_page(host.add(page * PAGE_SIZE as usize)) };
        if !zero {
            PageClass::Data
        } else if self.sent_data[slot].is_set(page) {
            PageClass::Zero
        } else {
            // The target's memory starts zeroed: nothing to say.
            PageClass::Skip
        }
    }

    /// Writes the batch as one Memory message (paced under a bandwidth cap).
    fn flush(
        &mut self,
        stream: &mut Stream,
        batch: &mut Batch,
        limited: bool,
    ) -> Result<u64, MigrationError> {
        if batch.ranges.is_empty() {
            return Ok(0);
        }
        let payload = batch.wire_size();
        let header = protocol::Header {
            kind: Kind::Memory,
            length: payload,
        }
        .encode();
        let headers: Vec<[u8; protocol::RANGE_HEADER_SIZE]> =
            batch.ranges.iter().map(|(r, _)| r.encode()).collect();
        let mut iov = Vec::with_capacity(1 + 2 * batch.ranges.len());
        iov.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: HEADER_SIZE,
        });
        for ((range, data), h) in batch.ranges.iter().zip(&headers) {
            iov.push(libc::iovec {
                iov_base: h.as_ptr() as *mut libc::c_void,
                iov_len: h.len(),
            });
            if !range.zero {
                iov.push(libc::iovec {
                    iov_base: (*data).cast(),
                    iov_len: range.len as usize,
                });
            }
        }
        let mut iov = IoVecs::new(iov);
        let mut written = 0;
        while !iov.is_empty() {
            let cap = if limited {
                self.shared
                    .parameters()
                    .bandwidth_bytes_per_s
                    .filter(|&c| c > 0)
            } else {
                None
            };
            let chunk = cap.map_or(u64::MAX, |c| {
                (c / PACE_CHUNKS_PER_S).clamp(PACE_CHUNK_MIN, PACE_CHUNK_MAX)
            });
            let n = stream.write_iov(&mut iov, chunk)?;
            written += n;
            self.shared.update(|s| s.transferred_bytes += n);
            self.pace(n, cap, stream.socket().deadline());
            check_cancel(&self.shared)?;
        }
        batch.ranges.clear();
        batch.size = 0;
        Ok(written)
    }

    /// Sleeps as long as the bandwidth cap asks after `written` more bytes,
    /// in short naps so a cancel or the deadline is not kept waiting.
    fn pace(&mut self, written: u64, cap: Option<u64>, deadline: Option<Instant>) {
        let Some(cap) = cap else {
            self.window_bytes = 0;
            self.window_start = Instant::now();
            return;
        };
        self.window_bytes += written;
        let due =
            self.window_start + Duration::from_secs_f64(self.window_bytes as f64 / cap as f64);
        // Behind schedule (a pause between rounds, a slow link): start
        // afresh rather than catch up in a burst.
        if Instant::now() > due + Duration::from_secs(1) / PACE_CHUNKS_PER_S as u32 {
            self.window_bytes = 0;
            self.window_start = Instant::now();
            return;
        }
        loop {
            let now = Instant::now();
            if now >= due || self.shared.cancelled() || deadline.is_some_and(|d| now >= d) {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
        }
        // A fresh window now and then: a slow patch of the link is not
        // made up for later by a burst.
        if self.window_start.elapsed() > Duration::from_secs(1) {
            self.window_bytes = 0;
            self.window_start = Instant::now();
        }
    }
}

/// Adds to `pages` the pages of `ballooned` that the target holds data for
/// (`sent`); returns how many pages of `pages` are not ballooned. Per region.
fn add_stale_ballooned(
    pages: &mut [DirtyBitmap],
    ballooned: &[DirtyBitmap],
    sent: &[DirtyBitmap],
) -> u64 {
    let mut not_ballooned = 0;
    for ((p, b), sent) in pages.iter_mut().zip(ballooned).zip(sent) {
        // b AND sent = b - (b - sent)
        let mut unsent = b.clone();
        unsent.subtract(sent);
        let mut stale = b.clone();
        stale.subtract(&unsent);
        p.merge(&stale);
        let mut rest = p.clone();
        rest.subtract(b);
        not_ballooned += rest.count() as u64;
    }
    not_ballooned
}

/// Page ranges waiting to go out in one message, with their host addresses.
#[derive(Default)]
struct Batch {
    ranges: Vec<(PageRange, *mut u8)>,
    size: u64,
}

impl Batch {
    fn push(&mut self, range: PageRange, data: *mut u8) {
        self.size += range.wire_size();
        self.ranges.push((range, data));
    }

    fn wire_size(&self) -> u64 {
        if self.ranges.is_empty() {
            0
        } else {
            self.size
        }
    }
}

#[cfg(test)]
mod balloon_tests {
    use super::*;

    fn bitmap(pages: usize, set: &[usize]) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(pages);
        for &p in set {
            b.set(p);
        }
        b
    }

    #[test]
    fn ballooned_pages_are_skipped_or_zeroed() {
        // Region 0: pages 1-3 dirty; 2, 3 and 5 ballooned; the target has
        // data for 3 and 5. Region 1: nothing ballooned.
        let mut pages = vec![bitmap(8, &[1, 2, 3]), bitmap(4, &[0, 1])];
        let ballooned = vec![bitmap(8, &[2, 3, 5]), bitmap(4, &[])];
        let sent = vec![bitmap(8, &[1, 3, 5, 7]), bitmap(4, &[0])];
        let not_ballooned = add_stale_ballooned(&mut pages, &ballooned, &sent);
        // 1 in region 0, 0 and 1 in region 1.
        assert_eq!(not_ballooned, 3);
        // 5 joins the round (a zero marker); 2 stays for `classify` to skip.
        assert_eq!(pages[0], bitmap(8, &[1, 2, 3, 5]));
        assert_eq!(pages[1], bitmap(4, &[0, 1]));
    }
}

#[cfg(test)]
mod convergence_tests {
    use super::*;

    #[test]
    fn pre_copy_chases_the_goal_only_while_it_pays() {
        const MIB: u64 = 1 << 20;
        // A fifth smaller is shrinking; less is not.
        assert!(shrinks(39 * MIB, 50 * MIB));
        assert!(!shrinks(41 * MIB, 50 * MIB));
        assert!(shrinks(50 * MIB, u64::MAX), "the first round after round 0");
        // At the goal: switch.
        assert!(settled(DOWNTIME_GOAL_MS, true, true, 0));
        // Above it, still converging or throttleable: one more round.
        assert!(!settled(30, true, false, 0));
        assert!(!settled(30, false, true, 0));
        // Stuck with no throttle left: switch now.
        assert!(settled(30, false, false, 0));
        // Never more than GOAL_ROUNDS extra rounds.
        assert!(settled(30, true, true, GOAL_ROUNDS));
    }
}
