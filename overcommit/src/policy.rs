//! The decision of one round: from the host's available memory and each
//! guest's balloon and statistics, which balloon targets to change. Pure
//! (no I/O), so every rule is tested here.
//!
//! Rules, in order:
//! 1. **A guest's floor comes first.** A guest keeps outside its balloon at
//!    least what it uses plus a margin: its balloon target may be at most
//!    `actual + free - margin` (MiB; `free` from its own statistics, which
//!    do not count ballooned pages). A guest whose target is above that
//!    (its use grew) is deflated at once to it, whatever the host's state.
//! 2. **The host's target next.** When the host's available memory is
//!    below the target (or memory pressure stalls tasks), guests with room
//!    above their target are inflated, the most room first, by at most
//!    `step` each, until the shortfall is covered.
//! 3. **Room again.** When the host has more than target + hysteresis
//!    available and no pressure, balloons are deflated, the guests with the
//!    least free memory first, by at most `step` each, within the surplus.
//!
//! A guest is left alone while its balloon moves (actual != target), when
//! its statistics are missing or stale, or older than the last change this
//! policy made to it: it acts on what the guest says after each change,
//! never twice on the same figures.

/// MiB.
pub type Mib = u64;

/// What the policy knows about one guest.
#[derive(Clone, Debug, PartialEq)]
pub struct Guest {
    pub name: String,
    /// Guest memory size.
    pub memory: Mib,
    /// Balloon target and what the guest gave (actual).
    pub target: Mib,
    pub actual: Mib,
    /// The guest's free memory from its last statistics, if fresh enough
    /// and newer than this policy's last change to the guest.
    pub free: Option<Mib>,
}

/// The host's side.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Host {
    /// Available memory (MemAvailable, or a budget minus what the VMMs use).
    pub available: Mib,
    /// Memory pressure over the limit (PSI `some avg10`).
    pub pressure: bool,
}

/// Settings of the policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Keep at least this much available on the host.
    pub host_target: Mib,
    /// Deflate only when more than `host_target + hysteresis` is available.
    pub hysteresis: Mib,
    /// Leave each guest at least this much free memory (its floor is what
    /// it uses plus this).
    pub guest_margin: Mib,
    /// Most a balloon moves in one round for the host's sake.
    pub step: Mib,
}

/// One balloon change, with the figures that led to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    pub guest: String,
    pub from: Mib,
    pub to: Mib,
    pub why: String,
}

impl Action {
    pub fn verb(&self) -> &'static str {
        if self.to > self.from {
            "inflate"
        } else {
            "deflate"
        }
    }
}

/// The largest balloon target that leaves `guest` its floor, if its
/// statistics are usable.
pub fn max_target(guest: &Guest, settings: &Settings) -> Option<Mib> {
    let free = guest.free?;
    Some(
        (guest.actual + free)
            .saturating_sub(settings.guest_margin)
            .min(guest.memory),
    )
}

/// The changes of one round.
pub fn decide(host: Host, guests: &[Guest], settings: &Settings) -> Vec<Action> {
    let mut actions = Vec::new();
    // Guests that can be judged now: balloon settled, fresh statistics.
    let ready: Vec<(&Guest, Mib)> = guests
        .iter()
        .filter(|g| g.actual == g.target)
        .filter_map(|g| Some((g, max_target(g, settings)?)))
        .collect();
    // Memory the host gets or gives once balloons in flight settle.
    let inflating: Mib = guests
        .iter()
        .map(|g| g.target.saturating_sub(g.actual))
        .sum();

    // 1. Floors.
    for (g, max) in &ready {
        if g.target > *max {
            actions.push(Action {
                guest: g.name.clone(),
                from: g.target,
                to: *max,
                why: format!(
                    "guest below its floor: {} MiB free < margin {} MiB",
                    g.free.unwrap_or(0),
                    settings.guest_margin
                ),
            });
        }
    }
    let changed = |name: &str, actions: &[Action]| actions.iter().any(|a| a.guest == name);

    let available = host.available + inflating;
    if available < settings.host_target || host.pressure {
        // 2. The host is short.
        let mut short = settings
            .host_target
            .saturating_sub(available)
            .max(if host.pressure { settings.step } else { 0 });
        let mut candidates: Vec<(&Guest, Mib)> = ready
            .iter()
            .filter(|(g, max)| *max > g.target && !changed(&g.name, &actions))
            .map(|(g, max)| (*g, max - g.target))
            .collect();
        candidates.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.name.cmp(&b.0.name)));
        for (g, room) in candidates {
            if short == 0 {
                break;
            }
            let by = room.min(settings.step).min(short);
            short -= by;
            actions.push(Action {
                guest: g.name.clone(),
                from: g.target,
                to: g.target + by,
                why: format!(
                    "host {} MiB available < target {} MiB{}; guest {} MiB free, floor leaves {} MiB",
                    host.available,
                    settings.host_target,
                    if host.pressure { ", memory pressure" } else { "" },
                    g.free.unwrap_or(0),
                    room
                ),
            });
        }
    } else if host.available > settings.host_target + settings.hysteresis {
        // 3. The host has room: give memory back, neediest guest first.
        let mut spare = host.available - settings.host_target - settings.hysteresis;
        let mut candidates: Vec<&Guest> = ready
            .iter()
            .map(|(g, _)| *g)
            .filter(|g| g.target > 0 && !changed(&g.name, &actions))
            .collect();
        candidates.sort_by(|a, b| a.free.cmp(&b.free).then(a.name.cmp(&b.name)));
        for g in candidates {
            if spare == 0 {
                break;
            }
            let by = g.target.min(settings.step).min(spare);
            spare -= by;
            actions.push(Action {
                guest: g.name.clone(),
                from: g.target,
                to: g.target - by,
                why: format!(
                    "host {} MiB available > target {} + {} MiB",
                    host.available, settings.host_target, settings.hysteresis
                ),
            });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: Settings = Settings {
        host_target: 100,
        hysteresis: 50,
        guest_margin: 20,
        step: 32,
    };

    fn guest(name: &str, target: Mib, actual: Mib, free: Option<Mib>) -> Guest {
        Guest {
            name: name.into(),
            memory: 256,
            target,
            actual,
            free,
        }
    }

    fn host(available: Mib) -> Host {
        Host {
            available,
            pressure: false,
        }
    }

    fn targets(actions: &[Action]) -> Vec<(&str, Mib, Mib)> {
        actions
            .iter()
            .map(|a| (a.guest.as_str(), a.from, a.to))
            .collect()
    }

    #[test]
    fn a_short_host_inflates_the_guests_with_most_room_within_their_floors() {
        let guests = [
            guest("a", 0, 0, Some(50)),
            guest("b", 0, 0, Some(200)),
            guest("c", 0, 0, Some(10)),
        ];
        let actions = decide(host(40), &guests, &SETTINGS);
        // 60 MiB short: b (180 room) gives a step of 32, a (30) the rest;
        // c (under its margin) nothing.
        assert_eq!(targets(&actions), [("b", 0, 32), ("a", 0, 28)]);
        assert!(actions[0].why.contains("40 MiB available < target 100"));
        for a in &actions {
            let g = guests.iter().find(|g| g.name == a.guest).unwrap();
            assert!(a.to <= max_target(g, &SETTINGS).unwrap());
        }
    }

    #[test]
    fn a_guest_below_its_floor_is_deflated_even_when_the_host_is_short() {
        let guests = [guest("a", 100, 100, Some(5)), guest("b", 0, 0, Some(100))];
        let actions = decide(host(10), &guests, &SETTINGS);
        assert_eq!(targets(&actions), [("a", 100, 85), ("b", 0, 32)]);
        assert!(actions[0].why.contains("below its floor"));
    }

    #[test]
    fn a_host_with_room_deflates_the_neediest_guest_first() {
        let guests = [guest("a", 64, 64, Some(100)), guest("b", 64, 64, Some(30))];
        let actions = decide(host(170), &guests, &SETTINGS);
        // 20 MiB over target + hysteresis: b (least free) gets it.
        assert_eq!(targets(&actions), [("b", 64, 44)]);
        // Within the hysteresis: nothing.
        assert!(decide(host(140), &guests, &SETTINGS).is_empty());
    }

    #[test]
    fn moving_balloons_and_stale_statistics_are_left_alone() {
        let guests = [
            guest("moving", 64, 32, Some(200)),
            guest("stale", 0, 0, None),
            guest("ok", 0, 0, Some(200)),
        ];
        // 60 short, but 32 MiB are on their way from "moving".
        let actions = decide(host(40), &guests, &SETTINGS);
        assert_eq!(targets(&actions), [("ok", 0, 28)]);
    }

    #[test]
    fn pressure_inflates_even_with_memory_available() {
        let guests = [guest("a", 0, 0, Some(200))];
        let pressed = Host {
            available: 500,
            pressure: true,
        };
        assert_eq!(
            targets(&decide(pressed, &guests, &SETTINGS)),
            [("a", 0, 32)]
        );
    }
}
