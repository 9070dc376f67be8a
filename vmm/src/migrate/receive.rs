//! The receiving side: accept connections until one authenticates (TLS
//! when configured, then the token) before anything else, build the VM from the source's config, write memory
//! ranges straight into guest RAM (each checked against it), restore the
//! state, and run the guest only after `Complete`. Any error ends the
//! receiving VMM without ever running a half-received guest.

use std::sync::Arc;
use std::time::{Duration, Instant};

use api::request::{MigrationPhase, MigrationRole};
use config::VmConfig;
use migration::protocol::{
    self, Empty, ErrorMessage, Kind, PageRange, ProtocolError, RANGE_HEADER_SIZE,
};

use super::{
    call, ControlHandle, Listener, MigrationCall, MigrationError, MigrationReply, MigrationShared,
    ReceiveStream, Socket, Stream,
};
use crate::memory::{self, GuestMemoryMmap};

/// madvise advice that faults pages in writable (Linux 5.14); older kernels
/// refuse it and the read faults them as before.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// A connection that has not authenticated (TLS and token) by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ReceiveContext {
    pub listener: Listener,
    pub token: String,
    /// TLS (server side), when configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// How long to wait for an authenticated source.
    pub timeout: Duration,
    pub shared: Arc<MigrationShared>,
    pub control: ControlHandle,
}

/// Waits for an authenticated source and receives the VM. Connections that
/// do not authenticate within [`HANDSHAKE_TIMEOUT`] (port scans, health
/// checks, peers without the token or certificate) are logged and dropped,
/// and the wait goes on until `timeout`. Ends the process on failure
/// (through the control loop).
pub fn run(context: ReceiveContext) {
    let shared = context.shared.clone();
    let control = context.control.clone();
    shared.update(|s| {
        s.phase = MigrationPhase::Setup;
        s.role = Some(MigrationRole::Receive);
    });
    let until = Instant::now() + context.timeout;
    let (mut stream, peer) = loop {
        match context.listener.accept_until(until) {
            Ok(Some(socket)) => {
                let peer = socket.peer();
                match authenticate(socket, &context) {
                    Ok(stream) => {
                        log::info!("migration: source {peer} authenticated");
                        break (stream, peer);
                    }
                    Err(e) => {
                        log::warn!("migration: dropped a connection from {peer}: {e}")
                    }
                }
            }
            Ok(None) => {
                let e = MigrationError::NoSource(context.timeout.as_secs());
                fail(&shared, &control, e.to_string());
                return;
            }
            Err(e) => {
                fail(
                    &shared,
                    &control,
                    format!("accepting the migration connection: {e}"),
                );
                return;
            }
        }
    };
    // One source only: stop listening.
    drop(context.listener);
    let start = Instant::now();
    match receive(&mut stream, &shared, &control, start) {
        Ok(()) => {
            shared.update(|s| {
                s.phase = MigrationPhase::Completed;
                s.total_time_ms = start.elapsed().as_millis() as u64;
            });
            let status = shared.status();
            log::info!(
                "migration: completed: the guest arrived from {peer} and runs here \
                 ({} MiB received in {} ms)",
                status.transferred_bytes >> 20,
                status.total_time_ms
            );
        }
        Err(e) => {
            let message = e.to_string();
            // Tell the source why, if it still listens.
            if !matches!(e, MigrationError::Protocol(ProtocolError::Peer(_))) {
                let _ = protocol::send_json(
                    &mut stream,
                    Kind::Error,
                    &ErrorMessage {
                        message: message.clone(),
                    },
                );
            }
            fail(&shared, &control, message);
        }
    }
}

/// TLS (when configured), then the token, within [`HANDSHAKE_TIMEOUT`].
fn authenticate(mut socket: Socket, context: &ReceiveContext) -> Result<Stream, MigrationError> {
    socket.set_deadline(Some(Instant::now() + HANDSHAKE_TIMEOUT));
    let mut stream = match &context.tls {
        Some(config) => Stream::tls_server(socket, config.clone())?,
        None => Stream::Plain(socket),
    };
    let binding = stream.channel_binding()?;
    migration::auth::authenticate_target(&mut stream, context.token.as_bytes(), &binding)?;
    // From here only a stall bounds each read and write.
    stream.set_deadline(None);
    Ok(stream)
}

fn fail(shared: &MigrationShared, control: &ControlHandle, message: String) {
    log::error!("incoming migration failed: {message}");
    fail_quietly(shared, control, message, config::ErrorClass::Host);
}

fn fail_quietly(
    shared: &MigrationShared,
    control: &ControlHandle,
    message: String,
    class: config::ErrorClass,
) {
    shared.update(|s| {
        s.phase = MigrationPhase::Failed;
        s.error = Some(message.clone());
    });
    let _ = call(control, MigrationCall::Failed(message, class));
}

/// Restores the snapshot file `stream` (see [`migration::protocol`]): the
/// target's half of a migration with nobody to answer. Memory goes straight
/// into guest RAM as it is read; the VM state is restored, and the guest
/// runs (or stays paused, as it was), only after the checksum over the
/// whole file matched and nothing follows it. On any error nothing runs
/// (through [`MigrationCall::Failed`]).
pub fn restore(mut stream: Stream, shared: Arc<MigrationShared>, control: ControlHandle) {
    shared.update(|s| {
        s.phase = MigrationPhase::Setup;
        s.role = Some(MigrationRole::Receive);
    });
    let start = Instant::now();
    match restore_from(&mut stream, &shared, &control) {
        Ok(()) => shared.update(|s| {
            s.phase = MigrationPhase::Completed;
            s.total_time_ms = start.elapsed().as_millis() as u64;
        }),
        Err(e) => {
            let class = e.class();
            let message = match e {
                MigrationError::Protocol(ProtocolError::Eof) => {
                    "the snapshot is truncated: it ends before its last message".to_string()
                }
                MigrationError::Protocol(ProtocolError::BadMagic(_)) => {
                    format!("the file is not a snapshot: {e}")
                }
                e => e.to_string(),
            };
            log::error!("restore failed: {message}");
            fail_quietly(&shared, &control, message, class);
        }
    }
}

fn restore_from(
    stream: &mut Stream,
    shared: &MigrationShared,
    control: &ControlHandle,
) -> Result<(), MigrationError> {
    let config: VmConfig = protocol::expect_json(stream, Kind::Config)?;
    config.validate().map_err(MigrationError::InvalidConfig)?;
    let MigrationReply::Memory(memory) = call(control, MigrationCall::Build(Box::new(config)))?
    else {
        return Err(MigrationError::ShuttingDown);
    };
    // No source holds the disks: a disk locked elsewhere fails now, before
    // any memory is read.
    call(control, MigrationCall::AcquireDisks)?;
    shared.update(|s| {
        s.phase = MigrationPhase::Active;
        s.total_bytes = memory::total_size(&memory);
    });
    let mut state = None;
    loop {
        let before = stream.digest();
        let header = protocol::read_header(stream)?;
        match header.kind {
            Kind::Memory if state.is_none() => {
                receive_memory(stream, header.length, &memory, shared)?
            }
            Kind::State if state.is_none() => {
                state = Some(protocol::read_payload(stream, &header)?)
            }
            Kind::Complete => {
                let payload = protocol::read_payload(stream, &header)?;
                let complete: protocol::SnapshotComplete =
                    protocol::parse_json(&payload, "Complete")?;
                if before.as_deref() != Some(complete.sha256.as_str()) {
                    return Err(MigrationError::CorruptSnapshot(
                        "its checksum does not match its contents".into(),
                    ));
                }
                let mut extra = [0u8; 1];
                if std::io::Read::read(stream, &mut extra)? != 0 {
                    return Err(MigrationError::CorruptSnapshot(
                        "there are bytes after its last message".into(),
                    ));
                }
                let Some(state) = state else {
                    return Err(MigrationError::CorruptSnapshot("it has no VM state".into()));
                };
                call(control, MigrationCall::Restore(state))?;
                call(
                    control,
                    MigrationCall::Start {
                        run: complete.running,
                    },
                )?;
                return Ok(());
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    expected: "Memory, State or Complete",
                    got: other,
                }
                .into())
            }
        }
    }
}

/// Receives the VM from an authenticated `stream`: the source's config,
/// memory and state through `control`, until `Complete` (the guest runs) or
/// an error (nothing runs). Public for the fuzzer, which drives it with
/// bytes and a stand-in control loop.
pub fn receive<S: ReceiveStream>(
    stream: &mut S,
    shared: &MigrationShared,
    control: &ControlHandle,
    start: Instant,
) -> Result<(), MigrationError> {
    let config: VmConfig = protocol::expect_json(stream, Kind::Config)?;
    config.validate().map_err(MigrationError::InvalidConfig)?;
    let MigrationReply::Memory(memory) = call(control, MigrationCall::Build(Box::new(config)))?
    else {
        return Err(MigrationError::ShuttingDown);
    };
    protocol::send_json(stream, Kind::Ack, &Empty {})?;
    shared.update(|s| {
        s.phase = MigrationPhase::Active;
        s.total_bytes = memory::total_size(&memory);
        s.setup_time_ms = start.elapsed().as_millis() as u64;
    });

    // The guest runs only from a complete state: memory, then the state,
    // then Complete, nothing else in between.
    let mut restored = false;
    loop {
        let header = protocol::read_header(stream)?;
        match header.kind {
            Kind::Memory | Kind::Sync | Kind::State if restored => {
                return Err(ProtocolError::Unexpected {
                    expected: "Complete after State",
                    got: header.kind,
                }
                .into())
            }
            Kind::Complete if !restored => {
                return Err(ProtocolError::Unexpected {
                    expected: "State before Complete",
                    got: header.kind,
                }
                .into())
            }
            Kind::Memory => receive_memory(stream, header.length, &memory, shared)?,
            Kind::State => {
                let started = Instant::now();
                let state = protocol::read_payload(stream, &header)?;
                shared.update(|s| s.phase = MigrationPhase::SwitchOver);
                call(control, MigrationCall::Restore(state))?;
                restored = true;
                super::trace("state restored", started);
                protocol::send_json(stream, Kind::Ack, &Empty {})?;
            }
            Kind::Sync => {
                let _ = protocol::read_payload(stream, &header)?;
                protocol::send_json(stream, Kind::Ack, &Empty {})?;
            }
            Kind::Complete => {
                let _ = protocol::read_payload(stream, &header)?;
                let completed = Instant::now();
                call(control, MigrationCall::Start { run: true })?;
                protocol::send_json(stream, Kind::Running, &Empty {})?;
                super::trace("the guest runs", completed);
                return Ok(());
            }
            Kind::Abandon => {
                let payload = protocol::read_payload(stream, &header)?;
                return Err(ProtocolError::Peer(format!(
                    "the source abandoned the migration: {}",
                    protocol::peer_error(&payload)
                ))
                .into());
            }
            Kind::Error => {
                let payload = protocol::read_payload(stream, &header)?;
                return Err(protocol::peer_error(&payload).into());
            }
            other => {
                return Err(ProtocolError::Unexpected {
                    expected: "Memory, Sync, State or Complete",
                    got: other,
                }
                .into())
            }
        }
    }
}

/// Reads one Memory message of `length` payload bytes into guest RAM.
fn receive_memory<S: ReceiveStream>(
    stream: &mut S,
    length: u64,
    memory: &GuestMemoryMmap,
    shared: &MigrationShared,
) -> Result<(), MigrationError> {
    let mut left = length;
    let (mut data_pages, mut zero_pages) = (0u64, 0u64);
    while left > 0 {
        if left < RANGE_HEADER_SIZE as u64 {
            return Err(malformed(format!(
                "{left} stray bytes at the end of a memory message"
            )));
        }
        let mut raw = [0u8; RANGE_HEADER_SIZE];
        protocol::read_full(stream, &mut raw)?;
        left -= RANGE_HEADER_SIZE as u64;
        let range = PageRange::decode(&raw)?;
        let len = u64::from(range.len);
        let host = memory::host_range(memory, range.gpa, len).ok_or_else(|| {
            malformed(format!(
                "range {:#x}+{len:#x} is not inside guest RAM",
                range.gpa
            ))
        })?;
        if range.zero {
            memory::discard_range(memory, range.gpa, len).map_err(|source| {
                MigrationError::Memory {
                    what: format!("zeroing {:#x}+{len:#x}", range.gpa),
                    source,
                }
            })?;
            zero_pages += len / protocol::PAGE_SIZE;
        } else {
            if len > left {
                return Err(malformed(format!(
                    "range {:#x}+{len:#x} is longer than its message",
                    range.gpa
                )));
            }
            // Faulting the pages in one call is much cheaper than one fault
            // per page while read() copies (nested hosts: shadow page tables).
            // SAFETY: host..host+len is guest RAM (checked by host_range);
            // populating it changes no contents.
            unsafe { libc::madvise(host.cast(), len as usize, MADV_POPULATE_WRITE) };
            // SAFETY: host..host+len is guest RAM (checked by host_range) that
            // stays mapped; no vCPU runs while a migration comes in.
            unsafe { stream.read_exact_raw(host, len as usize) }.map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    ProtocolError::Eof
                } else {
                    ProtocolError::Io(e)
                }
            })?;
            left -= len;
            data_pages += len / protocol::PAGE_SIZE;
        }
    }
    shared.update(|s| {
        s.transferred_bytes += length + protocol::HEADER_SIZE as u64;
        s.data_pages += data_pages;
        s.zero_pages += zero_pages;
    });
    Ok(())
}

fn malformed(message: String) -> MigrationError {
    ProtocolError::Malformed {
        what: "memory message",
        message,
    }
    .into()
}
