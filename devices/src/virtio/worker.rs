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
    /// Whose seccomp list the worker thread runs under.
    const THREAD_KIND: confine::ThreadKind;
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
        let builder = std::thread::Builder::new().name(name.to_string());
        let thread = confine::spawn(H::THREAD_KIND, builder, move || {
            if let Err(e) = handler.register(&events) {
                log::error!("device worker cannot start: {e}");
                return handler;
            }
            let mut ready = vec![EpollEvent::default(); 16];
            loop {
                let n = match events.epoll.wait(-1, &mut ready) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("device worker epoll failed: {e}");
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

enum State<H: WorkerHandler> {
    Inactive,
    Running(Worker<H>),
    Paused(Box<H>),
}

/// A device's worker through the device lifecycle: inactive (never
/// started, reset, or lost), running on its thread, or paused with the
/// handler (and so the queues) kept on the device.
pub struct DeviceWorker<H: WorkerHandler> {
    state: State<H>,
    /// The thread name (at most 15 bytes for Linux to keep all of it).
    name: String,
    /// What log messages say the device is ("disk /path", "net id").
    label: String,
    /// Starts the thread: [`Worker::spawn`], or a failing one in tests.
    spawner: fn(&str, H) -> io::Result<Worker<H>>,
}

impl<H: WorkerHandler> DeviceWorker<H> {
    /// An inactive worker whose thread will be called `name`; `label`
    /// names the device in log messages.
    pub fn new(name: impl Into<String>, label: impl Into<String>) -> DeviceWorker<H> {
        DeviceWorker {
            state: State::Inactive,
            name: name.into(),
            label: label.into(),
            spawner: Worker::spawn,
        }
    }

    /// Whether the thread runs.
    pub fn is_running(&self) -> bool {
        matches!(self.state, State::Running(_))
    }

    /// Whether there is a handler (running or paused).
    pub fn is_active(&self) -> bool {
        matches!(self.state, State::Running(_) | State::Paused(_))
    }

    /// Starts `handler` on a new thread, stopping the previous worker if
    /// there is one. If the thread cannot start, the handler (and with it
    /// the queues) is gone: the worker is left inactive and the device
    /// needs a reset.
    pub fn start(&mut self, handler: H) -> io::Result<()> {
        self.stop();
        self.spawn(handler)
    }

    /// Stops the thread if it runs and takes the handler out, leaving the
    /// worker inactive (for reset). None if there was no handler, or the
    /// thread panicked.
    pub fn stop(&mut self) -> Option<H> {
        match std::mem::replace(&mut self.state, State::Inactive) {
            State::Running(worker) => worker.stop(),
            State::Paused(handler) => Some(*handler),
            State::Inactive => None,
        }
    }

    /// Stops the thread if it runs, keeping the handler; no guest memory
    /// is written after this returns. A thread that panicked leaves the
    /// worker inactive.
    pub fn pause(&mut self) {
        if self.is_running() {
            if let Some(handler) = self.stop() {
                self.state = State::Paused(Box::new(handler));
            }
        }
    }

    /// Restarts the thread if paused; a thread that cannot start is logged
    /// and leaves the worker inactive.
    pub fn resume(&mut self) {
        if let State::Paused(_) = self.state {
            if let Some(handler) = self.stop() {
                self.restart(handler);
            }
        }
    }

    /// Runs `f` on the handler, stopping the thread around it if it runs
    /// (and restarting it after, as [`DeviceWorker::resume`] does). None
    /// if there is no handler.
    pub fn with_handler<T>(&mut self, f: impl FnOnce(&mut H) -> T) -> Option<T> {
        let was_running = self.is_running();
        let mut handler = self.stop()?;
        let result = f(&mut handler);
        if was_running {
            self.restart(handler);
        } else {
            self.state = State::Paused(Box::new(handler));
        }
        Some(result)
    }

    /// The handler while paused (for snapshots).
    pub fn handler(&self) -> Option<&H> {
        match &self.state {
            State::Paused(handler) => Some(&**handler),
            State::Running(_) | State::Inactive => None,
        }
    }

    fn spawn(&mut self, handler: H) -> io::Result<()> {
        match (self.spawner)(&self.name, handler) {
            Ok(worker) => {
                self.state = State::Running(worker);
                Ok(())
            }
            Err(e) => {
                // The handler (and with it the queues) went with the
                // failed spawn: the device needs a reset.
                self.state = State::Inactive;
                Err(e)
            }
        }
    }

    fn restart(&mut self, handler: H) {
        if let Err(e) = self.spawn(handler) {
            log::error!("{}: cannot restart the worker: {e}", self.label);
        }
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
        const THREAD_KIND: confine::ThreadKind = confine::ThreadKind::Blk;

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

    fn counter() -> (Counter, EventFd, Arc<AtomicU64>) {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = fd.try_clone().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let handler = Counter {
            fd,
            seen: seen.clone(),
            total: 0,
        };
        (handler, kick, seen)
    }

    fn wait_for(seen: &AtomicU64, value: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while seen.load(Ordering::SeqCst) != value {
            assert!(std::time::Instant::now() < deadline, "worker did not run");
            std::thread::yield_now();
        }
    }

    fn refuse_spawn(_name: &str, _handler: Counter) -> io::Result<Worker<Counter>> {
        Err(io::Error::other("no thread for you"))
    }

    #[test]
    fn device_worker_lifecycle() {
        let (handler, kick, seen) = counter();
        let mut worker = DeviceWorker::new("test-dev", "test device");
        assert!(!worker.is_running() && !worker.is_active());
        assert!(worker.handler().is_none());
        // Nothing to pause, resume or stop yet.
        worker.pause();
        worker.resume();
        assert!(!worker.is_active());
        assert!(worker.stop().is_none());

        worker.start(handler).unwrap();
        assert!(worker.is_running() && worker.is_active());
        assert!(
            worker.handler().is_none(),
            "no handler to look at while running"
        );
        kick.write(2).unwrap();
        wait_for(&seen, 2);

        worker.pause();
        assert!(!worker.is_running() && worker.is_active());
        assert_eq!(worker.handler().unwrap().total, 2);
        // Paused: kicks wait for the resume.
        kick.write(1).unwrap();
        worker.pause();
        assert_eq!(worker.handler().unwrap().total, 2);

        worker.resume();
        assert!(worker.is_running());
        wait_for(&seen, 3);
        worker.resume();
        assert!(worker.is_running());

        let handler = worker.stop().unwrap();
        assert_eq!(handler.total, 3);
        assert!(!worker.is_running() && !worker.is_active());
        assert!(worker.stop().is_none());
    }

    #[test]
    fn device_worker_start_replaces_the_previous_worker() {
        let (first, _, first_seen) = counter();
        let (second, _, _) = counter();
        let mut worker = DeviceWorker::new("test-dev", "test device");
        worker.start(first).unwrap();
        assert_eq!(Arc::strong_count(&first_seen), 2);
        worker.start(second).unwrap();
        assert!(worker.is_running());
        // The first thread was stopped and its handler dropped.
        assert_eq!(Arc::strong_count(&first_seen), 1);
        assert_eq!(worker.stop().unwrap().total, 0);
    }

    #[test]
    fn device_worker_with_handler_keeps_the_state() {
        let (handler, kick, seen) = counter();
        let mut worker = DeviceWorker::<Counter>::new("test-dev", "test device");
        assert_eq!(worker.with_handler(|h| h.total), None);
        assert!(!worker.is_active());

        worker.start(handler).unwrap();
        kick.write(4).unwrap();
        wait_for(&seen, 4);
        // Running: stopped around `f`, running again after.
        assert_eq!(worker.with_handler(|h| h.total), Some(4));
        assert!(worker.is_running());
        kick.write(1).unwrap();
        wait_for(&seen, 5);

        // Paused: stays paused.
        worker.pause();
        assert_eq!(
            worker.with_handler(|h| {
                h.total += 10;
                h.total
            }),
            Some(15)
        );
        assert!(!worker.is_running() && worker.is_active());
        assert_eq!(worker.handler().unwrap().total, 15);
    }

    #[test]
    fn device_worker_a_failed_spawn_leaves_it_inactive() {
        let mut worker = DeviceWorker::new("test-dev", "test device");
        worker.spawner = refuse_spawn;
        let (handler, _, _) = counter();
        assert!(worker.start(handler).is_err());
        assert!(!worker.is_running() && !worker.is_active());
        assert!(worker.stop().is_none());

        // A resume that cannot start the thread loses the handler.
        let mut worker = DeviceWorker::new("test-dev", "test device");
        let (handler, _, _) = counter();
        worker.start(handler).unwrap();
        worker.pause();
        worker.spawner = refuse_spawn;
        worker.resume();
        assert!(!worker.is_running() && !worker.is_active());

        // So does the restart after `with_handler`, which still ran `f`.
        let mut worker = DeviceWorker::new("test-dev", "test device");
        let (handler, _, _) = counter();
        worker.start(handler).unwrap();
        worker.spawner = refuse_spawn;
        assert_eq!(worker.with_handler(|h| h.total), Some(0));
        assert!(!worker.is_running() && !worker.is_active());
    }

    struct Panicker {
        fd: EventFd,
        panicking: Arc<std::sync::atomic::AtomicBool>,
    }

    impl WorkerHandler for Panicker {
        const THREAD_KIND: confine::ThreadKind = confine::ThreadKind::Blk;

        fn register(&mut self, events: &EventLoop) -> io::Result<()> {
            events.add(self.fd.as_raw_fd(), 1, EventSet::IN)
        }
        fn handle(&mut self, _token: u64, _set: EventSet, _events: &EventLoop) {
            self.panicking.store(true, Ordering::SeqCst);
            panic!("handler panics (on purpose, in a test)");
        }
    }

    fn panicked_worker() -> DeviceWorker<Panicker> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = fd.try_clone().unwrap();
        let panicking = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut worker = DeviceWorker::new("test-panic", "test device");
        worker
            .start(Panicker {
                fd,
                panicking: panicking.clone(),
            })
            .unwrap();
        kick.write(1).unwrap();
        // Once the flag is up the thread cannot see a stop request any more.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !panicking.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "worker did not run");
            std::thread::yield_now();
        }
        worker
    }

    #[test]
    fn device_worker_a_panicked_thread_leaves_it_inactive() {
        let mut worker = panicked_worker();
        worker.pause();
        assert!(!worker.is_running() && !worker.is_active());

        let mut worker = panicked_worker();
        assert!(worker.stop().is_none());
        assert!(!worker.is_active());

        let mut worker = panicked_worker();
        assert_eq!(worker.with_handler(|_| ()), None);
        assert!(!worker.is_active());
    }
}
