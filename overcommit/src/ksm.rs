//! ksmd under the policy (`--ksm`): running while guests with mergeable
//! memory run, stopped when none does, and paced by how much there is to
//! merge and how short of memory the host is. Pure (no I/O), so the pacing
//! is tested here; main.rs reads and writes `/sys/kernel/mm/ksm`.
//!
//! The pace is a full scan of all mergeable guest memory every `scan_s`
//! seconds: `slow_scan_s` while the host has room (at least twice its
//! target available), `fast_scan_s` when it is short (at or below its
//! target, or under memory pressure), in between linearly. ksmd scans
//! `pages_to_scan` pages every `sleep_millisecs`: the pace is met with the
//! kernel's default 20 ms sleep and as many pages as needed (at most
//! `max_pages`), or, when even `MIN_PAGES` per 20 ms would be faster than
//! needed (little to merge), with `MIN_PAGES` and a longer sleep (at most
//! `MAX_SLEEP_MS`). A new pace is written only when it differs by more than
//! a fifth from the current one, so that small changes in memory do not
//! rewrite the knobs every round.
//!
//! Stopping writes `run` 0, never 2: merged pages stay merged (2 would
//! unmerge them all, a burst of memory use when the host may be short).

use crate::policy::Mib;

/// ksmd's sleep between batches when there is enough to scan (the
/// kernel's default).
pub const BASE_SLEEP_MS: u32 = 20;
/// The longest sleep the policy sets.
pub const MAX_SLEEP_MS: u32 = 1000;
/// The fewest pages per batch.
pub const MIN_PAGES: u32 = 64;
/// Pages per MiB.
const PAGES_PER_MIB: u64 = 256;

/// The knobs of `/sys/kernel/mm/ksm` the policy sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Knobs {
    /// `run`: 0 stopped, 1 running, 2 unmerging.
    pub run: u32,
    pub pages_to_scan: u32,
    pub sleep_millisecs: u32,
}

/// How fast ksmd may go.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pacing {
    /// A full scan takes this long when the host is short of memory.
    pub fast_scan_s: u32,
    /// And this long when it has room.
    pub slow_scan_s: u32,
    /// The most pages per batch (ksmd's CPU use grows with it).
    pub max_pages: u32,
}

impl Default for Pacing {
    fn default() -> Self {
        Pacing {
            fast_scan_s: 10,
            slow_scan_s: 300,
            max_pages: 5000,
        }
    }
}

/// What the round saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Seen {
    /// Running guests with mergeable memory, and their memory.
    pub mergeable_guests: usize,
    pub mergeable: Mib,
    /// 0 (room: twice the target or more available) to 1 (short).
    pub urgency: f64,
}

/// How short of memory the host is, from 0 to 1: 1 at or below the
/// target (or under pressure), 0 from twice the target up.
pub fn urgency(available: Mib, target: Mib, pressure: bool) -> f64 {
    if pressure || available <= target {
        return 1.0;
    }
    if target == 0 {
        return 0.0;
    }
    let room = (available - target) as f64 / target as f64;
    (1.0 - room).clamp(0.0, 1.0)
}

/// The pace for `mergeable` MiB to be scanned in full every `scan_s`.
pub fn pace(mergeable: Mib, scan_s: f64, pacing: &Pacing) -> (u32, u32) {
    let pages = (mergeable * PAGES_PER_MIB) as f64;
    let per_second = pages / scan_s.max(1.0);
    let batches_per_second = 1000.0 / f64::from(BASE_SLEEP_MS);
    let per_batch = per_second / batches_per_second;
    if per_batch >= f64::from(MIN_PAGES) {
        let pages = (per_batch.ceil() as u32).min(pacing.max_pages.max(MIN_PAGES));
        (pages, BASE_SLEEP_MS)
    } else if per_second > 0.0 {
        let sleep = (f64::from(MIN_PAGES) * 1000.0 / per_second).floor() as u32;
        (MIN_PAGES, sleep.clamp(BASE_SLEEP_MS, MAX_SLEEP_MS))
    } else {
        (MIN_PAGES, MAX_SLEEP_MS)
    }
}

/// The scan period for an urgency (see the module's comment).
pub fn scan_seconds(urgency: f64, pacing: &Pacing) -> f64 {
    let (fast, slow) = (
        f64::from(pacing.fast_scan_s),
        f64::from(pacing.slow_scan_s.max(pacing.fast_scan_s)),
    );
    slow - (slow - fast) * urgency.clamp(0.0, 1.0)
}

/// Whether `new` differs from `old` by more than a fifth.
fn differs(old: u32, new: u32) -> bool {
    u64::from(old.abs_diff(new)) * 5 > u64::from(old.max(1))
}

/// A change to ksmd and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub to: Knobs,
    pub why: String,
}

impl Change {
    pub fn verb(&self, from: &Knobs) -> &'static str {
        match (from.run == 1, self.to.run == 1) {
            (false, true) => "start",
            (true, false) => "stop",
            _ => "pace",
        }
    }
}

/// What to change this round, if anything. `pace_managed`: false when
/// the kernel's own advisor sets `pages_to_scan` (then only `run` is
/// set).
pub fn decide(now: Knobs, seen: Seen, pacing: &Pacing, pace_managed: bool) -> Option<Change> {
    if seen.mergeable_guests == 0 {
        // Only a running ksmd is stopped: 2 (unmerging) is someone's
        // deliberate choice, 0 is where it should be.
        return (now.run == 1).then(|| Change {
            to: Knobs { run: 0, ..now },
            why: "no guest with mergeable memory runs".into(),
        });
    }
    let scan_s = scan_seconds(seen.urgency, pacing);
    let (pages, sleep) = if pace_managed {
        pace(seen.mergeable, scan_s, pacing)
    } else {
        (now.pages_to_scan, now.sleep_millisecs)
    };
    let start = now.run != 1;
    if !start && !differs(now.pages_to_scan, pages) && !differs(now.sleep_millisecs, sleep) {
        return None;
    }
    let guests = match seen.mergeable_guests {
        1 => "1 guest".to_string(),
        n => format!("{n} guests"),
    };
    let how = if pace_managed {
        format!(
            "a full scan every {scan_s:.0} s (urgency {:.2})",
            seen.urgency
        )
    } else {
        "the kernel's advisor sets the pace".into()
    };
    Some(Change {
        to: Knobs {
            run: 1,
            pages_to_scan: pages,
            sleep_millisecs: sleep,
        },
        why: format!(
            "{guests} with mergeable memory, {} MiB: {how}",
            seen.mergeable
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOPPED: Knobs = Knobs {
        run: 0,
        pages_to_scan: 100,
        sleep_millisecs: 20,
    };

    fn seen(guests: usize, mergeable: Mib, urgency: f64) -> Seen {
        Seen {
            mergeable_guests: guests,
            mergeable,
            urgency,
        }
    }

    #[test]
    fn ksmd_starts_with_mergeable_guests_and_stops_with_run_0_when_none_runs() {
        let pacing = Pacing::default();
        let change = decide(STOPPED, seen(2, 1024, 0.0), &pacing, true).unwrap();
        assert_eq!(change.to.run, 1);
        assert_eq!(change.verb(&STOPPED), "start");
        assert!(change.why.contains("2 guests"), "{}", change.why);
        let running = change.to;
        // Nothing new: nothing written.
        assert_eq!(decide(running, seen(2, 1024, 0.0), &pacing, true), None);
        // None left: run 0 (not 2, which unmerges).
        let stop = decide(running, seen(0, 0, 1.0), &pacing, true).unwrap();
        assert_eq!(stop.to.run, 0);
        assert_eq!(stop.verb(&running), "stop");
        assert_eq!(
            (stop.to.pages_to_scan, stop.to.sleep_millisecs),
            (running.pages_to_scan, running.sleep_millisecs)
        );
        // Stopped, or unmerging on someone's request: left alone.
        assert_eq!(decide(STOPPED, seen(0, 0, 0.0), &pacing, true), None);
        let unmerging = Knobs { run: 2, ..STOPPED };
        assert_eq!(decide(unmerging, seen(0, 0, 0.0), &pacing, true), None);
    }

    #[test]
    fn the_pace_scans_everything_in_the_period_and_quickens_with_urgency() {
        let pacing = Pacing::default();
        // 8 GiB with room: a full scan in 300 s = 6991 pages/s = 140 per 20 ms.
        assert_eq!(pace(8192, 300.0, &pacing), (140, 20));
        // Short of memory: 10 s = 209716 pages/s = 4195 per 20 ms.
        assert_eq!(pace(8192, 10.0, &pacing), (4195, 20));
        // More than the cap allows: the cap.
        assert_eq!(pace(65536, 10.0, &pacing), (5000, 20));
        // Little to scan: the fewest pages, sleeping longer (256 MiB in
        // 300 s = 218 pages/s: 64 every 292 ms).
        assert_eq!(pace(256, 300.0, &pacing), (64, 292));
        // Tiny: the longest sleep.
        assert_eq!(pace(1, 300.0, &pacing), (64, 1000));
        assert_eq!(pace(0, 300.0, &pacing), (64, 1000));

        assert_eq!(scan_seconds(0.0, &pacing), 300.0);
        assert_eq!(scan_seconds(1.0, &pacing), 10.0);
        assert_eq!(scan_seconds(0.5, &pacing), 155.0);
        // More urgency, more pages; the pace only grows with it.
        let mut last = 0;
        for u in 0..=10 {
            let (pages, _) = pace(8192, scan_seconds(f64::from(u) / 10.0, &pacing), &pacing);
            assert!(pages >= last, "{u}: {pages} < {last}");
            last = pages;
        }
    }

    #[test]
    fn urgency_follows_the_hosts_available_memory_and_pressure() {
        assert_eq!(urgency(500, 1000, false), 1.0);
        assert_eq!(urgency(1000, 1000, false), 1.0);
        assert_eq!(urgency(1500, 1000, false), 0.5);
        assert_eq!(urgency(2000, 1000, false), 0.0);
        assert_eq!(urgency(9000, 1000, false), 0.0);
        assert_eq!(urgency(9000, 1000, true), 1.0);
        assert_eq!(urgency(9000, 0, false), 0.0);
    }

    #[test]
    fn the_pace_is_rewritten_only_when_it_moves_by_more_than_a_fifth() {
        let pacing = Pacing::default();
        let running = decide(STOPPED, seen(1, 8192, 0.0), &pacing, true)
            .unwrap()
            .to;
        assert_eq!(running.pages_to_scan, 140);
        // A little more memory to merge: 10% more pages, not rewritten.
        assert_eq!(decide(running, seen(2, 9000, 0.0), &pacing, true), None);
        // The host gets short: much faster.
        let faster = decide(running, seen(2, 8192, 1.0), &pacing, true).unwrap();
        assert_eq!(faster.verb(&running), "pace");
        assert_eq!(faster.to.pages_to_scan, 4195);
        assert!(faster.why.contains("every 10 s"), "{}", faster.why);
        // Room again: back to the slow pace.
        let slower = decide(faster.to, seen(2, 8192, 0.0), &pacing, true).unwrap();
        assert_eq!(slower.to.pages_to_scan, 140);
        // Someone else set it far off: the policy takes it back.
        let changed = Knobs {
            pages_to_scan: 10,
            ..running
        };
        assert!(decide(changed, seen(1, 8192, 0.0), &pacing, true).is_some());
    }

    #[test]
    fn with_the_kernels_advisor_only_run_is_managed() {
        let pacing = Pacing::default();
        let change = decide(STOPPED, seen(1, 8192, 1.0), &pacing, false).unwrap();
        assert_eq!(change.to, Knobs { run: 1, ..STOPPED });
        assert!(change.why.contains("advisor"), "{}", change.why);
        assert_eq!(decide(change.to, seen(1, 8192, 0.0), &pacing, false), None);
    }
}
