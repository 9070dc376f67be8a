//! Minimal synchronisation for ring 3: a spinlock and a write-once cell.

use core::cell::UnsafeCell;
use core::hint::spin_loop;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};

/// A test-and-test-and-set spinlock (for drivers' shared state).
#[allow(dead_code)]
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: access to `value` is serialised by `locked`.
unsafe impl<T: Send> Sync for SpinLock<T> {}

#[allow(dead_code)]
impl<T> SpinLock<T> {
    pub const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    pub fn lock(&self) -> SpinGuard<'_, T> {
        loop {
            if !self.locked.swap(true, Ordering::Acquire) {
                return SpinGuard { lock: self };
            }
            while self.locked.load(Ordering::Relaxed) {
                spin_loop();
            }
        }
    }
}

#[allow(dead_code)]
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard holds the lock.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

/// A value written once by the BSP during single-threaded boot and read-only
/// afterwards (boot information, options).
pub struct BootCell<T> {
    set: AtomicBool,
    value: UnsafeCell<Option<T>>,
}

// SAFETY: written once before any other CPU runs, then only read.
unsafe impl<T: Sync> Sync for BootCell<T> {}

impl<T> BootCell<T> {
    pub const fn new() -> Self {
        Self {
            set: AtomicBool::new(false),
            value: UnsafeCell::new(None),
        }
    }

    /// Store the value. Panics if called twice.
    pub fn set(&self, value: T) -> &T {
        assert!(!self.set.swap(true, Ordering::AcqRel), "BootCell set twice");
        // SAFETY: only the first caller gets here, before any reader exists.
        unsafe {
            *self.value.get() = Some(value);
            (*self.value.get()).as_ref().unwrap()
        }
    }

    pub fn get(&self) -> Option<&T> {
        if self.set.load(Ordering::Acquire) {
            // SAFETY: set and never written again.
            unsafe { (*self.value.get()).as_ref() }
        } else {
            None
        }
    }
}
