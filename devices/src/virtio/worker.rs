//! The thread a virtio device processes its queues on: an epoll loop over
//! the queue eventfds and the device's own fds (tap, timers), stopped
//! through a kill eventfd. Stopping returns the handler, so the device gets
//! its queues back intact (for reset, pause and snapshots).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Token of the kill eventfd; handlers must not use it.
pub const KILL_TOKEN: u64 = u64::MAX;

/// The epoll set of a worker, for handlers that change their interest
/// (e.g. stop watching a tap while the guest gives no receive buffers).
pub struct EventLoop {
    epoll: Epoll,
}

impl EventLoop {
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// The device-specific part of a worker.
pub trait WorkerHandler: Send + 'static {
    /// Registers the fds to watch (called once, on the worker thread).
    fn register(&mut self, events: &EventLoop) -> io::Result<()>;
    /// Handles readiness of the fd registered with `token`.
    fn handle(&mut self, token: u64, set: EventSet, events: &EventLoop);
}

/// A running worker thread.
pub struct Worker<H: WorkerHandler> {
    thread: Option<JoinHandle<H>>,
    kill: EventFd,
}

impl<H: WorkerHandler> Worker<H> {
    /// Starts `handler` on a thread called `name`.
    pub fn spawn(name: &str, mut handler: H) -> io::Result<Worker<H>> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let thread_kill = kill.try_clone()?;
        let epoll = Epoll::new()?;
        let events = EventLoop { epoll };
        events.add(thread_kill.as_raw_fd(), KILL_TOKEN, EventSet::IN)?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Err(e) = handler.register(&events) {
                    eprintln!("vmm: device worker cannot start: {e}");
                    return handler;
                }
                let mut ready = vec![EpollEvent::default(); 16];
                loop {
                    let n = match events.epoll.wait(-1, &mut ready) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            eprintln!("vmm: device worker epoll failed: {e}");
                            return handler;
                        }
                    };
                    for event in &ready[..n] {
                        if event.data() == KILL_TOKEN {
                            return handler;
                        }
                        handler.handle(event.data(), event.event_set(), &events);
                    }
                }
            })?;
        Ok(Worker {
            thread: Some(thread),
            kill,
        })
    }

    /// Stops the thread after the event it is handling and returns the handler.
    pub fn stop(mut self) -> Option<H> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        // The thread reads the kill eventfd only to wake up; a full counter is impossible.
        let _ = self.kill.write(1);
        thread.join().ok()
    }
}

impl<H: WorkerHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    struct Counter {
        fd: EventFd,
        seen: Arc<AtomicU64>,
        total: u64,
    }

    impl WorkerHandler for Counter {
        fn register(&mut self, events: &EventLoop) -> io::Result<()> {
            events.add(self.fd.as_raw_fd(), 7, EventSet::IN)
        }
        fn handle(&mut self, token: u64, _set: EventSet, _events: &EventLoop) {
            assert_eq!(token, 7);
            let n = self.fd.read().unwrap();
            self.total += n;
            self.seen.store(self.total, Ordering::SeqCst);
        }
    }

    #[test]
    fn handles_events_and_returns_the_handler_on_stop() {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = fd.try_clone().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let worker = Worker::spawn(
            "test-worker",
            Counter {
                fd,
                seen: seen.clone(),
                total: 0,
            },
        )
        .unwrap();
        kick.write(3).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while seen.load(Ordering::SeqCst) != 3 {
            assert!(std::time::Instant::now() < deadline, "worker did not run");
            std::thread::yield_now();
        }
        let handler = worker.stop().unwrap();
        assert_eq!(handler.total, 3);
    }
}
