//! The receiving side: accept one connection, check the token before
//! anything else, build the VM from the source's config, write memory
//! ranges straight into guest RAM (each checked against it), restore the
//! state, and run the guest only after `Complete`. Any error ends the
//! receiving VMM without ever running a half-received guest.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use api::request::{MigrationPhase, MigrationRole};
use config::VmConfig;
use migration::protocol::{
    self, Empty, ErrorMessage, Hello, Kind, PageRange, ProtocolError, RANGE_HEADER_SIZE,
};

use super::{
    call, read_exact_raw, ControlHandle, Listener, MigrationCall, MigrationError, MigrationReply,
    MigrationShared, Stream,
};
use crate::memory::{self, GuestMemoryMmap};

/// madvise advice that faults pages in writable (Linux 5.14); older kernels
/// refuse it and the read faults them as before.
const MADV_POPULATE_WRITE: libc::c_int = 23;

pub struct ReceiveContext {
    pub listener: Listener,
    pub token: String,
    pub shared: Arc<MigrationShared>,
    pub control: ControlHandle,
}

/// Waits for the source and receives the VM. Ends the process on failure
/// (through the control loop).
pub fn run(context: ReceiveContext) {
    let shared = context.shared.clone();
    let control = context.control.clone();
    shared.update(|s| {
        s.phase = MigrationPhase::Setup;
        s.role = Some(MigrationRole::Receive);
    });
    let stream = match context.listener.accept() {
        Ok(s) => s,
        Err(e) => {
            fail(
                &shared,
                &control,
                format!("accepting the migration connection: {e}"),
            );
            return;
        }
    };
    // One source only: stop listening.
    drop(context.listener);
    let start = Instant::now();
    let mut stream = stream;
    match receive(&mut stream, &context.token, &shared, &control, start) {
        Ok(()) => shared.update(|s| {
            s.phase = MigrationPhase::Completed;
            s.total_time_ms = start.elapsed().as_millis() as u64;
        }),
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

fn fail(shared: &MigrationShared, control: &ControlHandle, message: String) {
    eprintln!("vmm: incoming migration failed: {message}");
    shared.update(|s| {
        s.phase = MigrationPhase::Failed;
        s.error = Some(message.clone());
    });
    let _ = call(control, MigrationCall::Failed(message));
}

fn receive(
    stream: &mut Stream,
    token: &str,
    shared: &MigrationShared,
    control: &ControlHandle,
    start: Instant,
) -> Result<(), MigrationError> {
    let hello: Hello = protocol::expect_json(stream, Kind::Hello)?;
    if !protocol::token_matches(token, &hello.token) {
        return Err(ProtocolError::BadToken.into());
    }
    protocol::send_json(stream, Kind::Ack, &Empty {})?;

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

    loop {
        let header = protocol::read_header(stream)?;
        match header.kind {
            Kind::Memory => receive_memory(stream, header.length, &memory, shared)?,
            Kind::State => {
                let started = Instant::now();
                let state = protocol::read_payload(stream, &header)?;
                shared.update(|s| s.phase = MigrationPhase::SwitchOver);
                call(control, MigrationCall::Restore(state))?;
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
                call(control, MigrationCall::Start)?;
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
fn receive_memory(
    stream: &mut Stream,
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
            unsafe { read_exact_raw(stream.as_raw_fd(), host, len as usize) }.map_err(|e| {
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
