//! The receiving side of a live migration after the handshake: a hostile
//! (authenticated but broken or compromised) source sends the fuzz input as
//! its stream; a stand-in control loop builds nothing but hands out small
//! guest memory with a hole, decodes the VM state as the real one does, and
//! records whether the guest was started. Nothing may panic, memory writes
//! stay inside guest RAM (ASan), and the guest starts only after a State
//! was restored.
#![no_main]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use vmm::migrate::{receive, ControlHandle, MigrationCall, MigrationError, MigrationReply};
use vmm::migrate::{MigrationReplySender, MigrationShared};
use vmm::snapshot::VmSnapshot;
use vmm_fuzz::{memory, FuzzStream};

fuzz_target!(|data: &[u8]| {
    let memory = Arc::new(memory());
    let restored = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let control: ControlHandle = {
        let (restored, started) = (restored.clone(), started.clone());
        Arc::new(move |call: MigrationCall, reply: MigrationReplySender| {
            let answer = match call {
                MigrationCall::Build(config) => {
                    config
                        .validate()
                        .expect("the receiver validated the config");
                    Ok(MigrationReply::Memory(memory.clone()))
                }
                MigrationCall::Restore(bytes) => match VmSnapshot::decode(&bytes) {
                    Ok(_) => {
                        restored.store(true, Ordering::SeqCst);
                        Ok(MigrationReply::Done)
                    }
                    Err(e) => Err(MigrationError::Snapshot(e)),
                },
                MigrationCall::Start { .. } => {
                    assert!(
                        restored.load(Ordering::SeqCst),
                        "the guest was started without a restored state"
                    );
                    started.store(true, Ordering::SeqCst);
                    Ok(MigrationReply::Done)
                }
                MigrationCall::Failed(..) => Ok(MigrationReply::Done),
                _ => panic!("the receiver made a source-side call"),
            };
            reply.send(answer).is_ok()
        })
    };
    let shared = MigrationShared::default();
    let mut stream = FuzzStream::new(data);
    let result = receive::receive(&mut stream, &shared, &control, Instant::now());
    assert_eq!(result.is_ok(), started.load(Ordering::SeqCst));
});
