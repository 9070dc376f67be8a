//! How the VMM process ends: its exit code tells a cluster manager what
//! happened to the guest.

/// The VMM's exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest powered off, or shut down after a graceful request; or
    /// there was no guest and the VMM was asked to exit.
    PoweredOff,
    /// The VMM failed (could not build or run the VM).
    Error,
    /// Bad command line or config file.
    Usage,
    /// The guest reset itself (i8042, 0xCF9, triple fault) and `on_reset` is `exit`.
    Reset,
    /// The guest crashed (KVM emulation failure, failed entry, internal error).
    Crashed,
    /// A running guest was stopped by request (forced shutdown, `vmm.shutdown`,
    /// SIGTERM/SIGINT, graceful shutdown timeout).
    Stopped,
    /// The guest was live-migrated away and runs elsewhere now.
    Migrated,
}

impl ExitStatus {
    /// How a VMM that could not start ends, by whose fault: the caller's
    /// (bad flags or config) is a usage error, anything else a VMM error.
    pub fn of_class(class: config::ErrorClass) -> ExitStatus {
        match class {
            config::ErrorClass::Caller => ExitStatus::Usage,
            config::ErrorClass::Conflict | config::ErrorClass::Host => ExitStatus::Error,
        }
    }

    pub fn code(self) -> i32 {
        match self {
            ExitStatus::PoweredOff => 0,
            ExitStatus::Error => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Reset => 3,
            ExitStatus::Crashed => 4,
            ExitStatus::Stopped => 5,
            ExitStatus::Migrated => 6,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ExitStatus::PoweredOff => "guest powered off",
            ExitStatus::Error => "VMM error",
            ExitStatus::Usage => "usage error",
            ExitStatus::Reset => "guest reset",
            ExitStatus::Crashed => "guest crashed",
            ExitStatus::Stopped => "guest stopped by request",
            ExitStatus::Migrated => "guest migrated",
        }
    }
}
