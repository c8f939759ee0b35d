//! The game day: the demand profile of each scenario and its schedule of faults.

use crate::config::Scenario;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Start of the halftime rush, as a fraction of the game.
pub const RUSH_START: f64 = 0.5;
/// End of the halftime rush, as a fraction of the game.
pub const RUSH_END: f64 = 0.625;

/// Customers per minute per terminal during the first half (the reference rate).
pub const BASE_RATE_PER_MIN: f64 = 0.6;

/// Customers per minute arriving at one terminal at `frac` of the game.
pub fn rate_per_min(scenario: Scenario, frac: f64) -> f64 {
    let rush = if scenario == Scenario::Normal {
        1.5
    } else {
        10.0
    };
    let m = if frac < 0.125 {
        0.5 // quiet: gates just opened
    } else if frac < 0.25 {
        1.6 // pre-game
    } else if frac < RUSH_START {
        1.0 // first half
    } else if frac < RUSH_END {
        rush // halftime
    } else {
        1.0 // second half
    };
    BASE_RATE_PER_MIN * m
}

/// The next fraction of the game at which the rate changes.
pub fn next_phase_boundary(frac: f64) -> f64 {
    [0.125, 0.25, RUSH_START, RUSH_END, 1.0]
        .into_iter()
        .find(|b| *b > frac)
        .unwrap_or(f64::INFINITY)
}

/// Expected customers per terminal over a whole game of `game_minutes`.
pub fn expected_customers_per_terminal(scenario: Scenario, game_minutes: u64) -> f64 {
    let mut total = 0.0;
    let mut f = 0.0;
    while f < 1.0 {
        let next = next_phase_boundary(f).min(1.0);
        total += rate_per_min(scenario, f) * (next - f) * game_minutes as f64;
        f = next;
    }
    total
}

/// Something that happens to the stand at a given time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The internet goes down: terminals cannot reach the pool.
    WanDown,
    /// The internet is back.
    WanUp,
    /// The stand LAN (and with it the uplink) goes down: everyone is isolated.
    LanDown,
    /// The stand LAN is back.
    LanUp,
    /// A terminal's Wi-Fi drops (all its links).
    WifiDown(usize),
    /// A terminal's Wi-Fi is back.
    WifiUp(usize),
    /// The link between two nodes fails while both still reach everyone else (a partial
    /// partition: a flaky access point, a firewall rule, a relay route).
    LinkDown(usize, usize),
    /// That link is back.
    LinkUp(usize, usize),
    /// A terminal crashes; it keeps its durable changes.
    Crash(usize),
    /// A crashed terminal restarts from its durable changes.
    Restart(usize),
    /// A terminal is lost for good (dropped, stolen, battery gone).
    Die(usize),
    /// The admin retires a lost terminal and takes its rights back at the pool.
    Reclaim(usize),
    /// The admin records a delivery at the pool: this percentage of the expected demand.
    Restock(u64),
    /// The admin records shrink at the pool (spoiled or damaged units in the store room): for
    /// one or two items, this percentage of their opening stock, at most what the pool holds.
    Adjust(u64),
    /// The admin enrols a replacement for a lost terminal: a new device with a new key joins
    /// from nothing, links to every replica and sells for the rest of the game.
    Replace(usize),
    /// End of the game: every fault clears, crashed terminals restart.
    Heal,
}

/// Percentage of the expected demand delivered by the mid-event restock.
pub const RESTOCK_PCT: u64 = 10;
/// Percentage of an item's opening stock written off by the shrink adjustment.
pub const SHRINK_PCT: u64 = 5;
/// When the mid-event delivery arrives (and the shrink adjustment is recorded), as a fraction of
/// the game.
pub const RESTOCK_AT: f64 = 0.45;

/// The faults of `scenario` for a stand of `terminals` (node ids 1..=terminals), sorted by time.
pub fn schedule(
    scenario: Scenario,
    terminals: usize,
    game_ms: u64,
    rng: &mut ChaCha8Rng,
) -> Vec<(u64, Fault)> {
    let at = |f: f64| (game_ms as f64 * f) as u64;
    // Minutes of a two-hour game, scaled to the simulated length.
    let minutes = |m: f64| (game_ms as f64 * m / 120.0) as u64;
    let mut v = vec![(at(RESTOCK_AT), Fault::Restock(RESTOCK_PCT))];
    let t = |i: usize| i.clamp(1, terminals);
    match scenario {
        Scenario::Normal => {
            // Checking the delivery in, the admin finds spoiled units and writes them off at
            // once, while the pool still holds them (an instant later the planner spreads them;
            // by the second half the pool holds nothing of its own to write off).
            v.push((at(RESTOCK_AT), Fault::Adjust(SHRINK_PCT)));
        }
        Scenario::Halftime => {
            let c = at(0.55);
            v.push((c, Fault::Crash(t(2))));
            v.push((c + minutes(2.0), Fault::Restart(t(2))));
            v.push((at(RESTOCK_AT), Fault::Adjust(SHRINK_PCT)));
        }
        Scenario::WanDown => {
            v.push((1, Fault::WanDown));
            v.push((game_ms, Fault::WanUp));
        }
        Scenario::AllDown => {
            let d = at(RUSH_START) - minutes(10.0);
            v.push((d, Fault::LanDown));
            v.push((d + minutes(30.0), Fault::LanUp));
        }
        Scenario::Flapping => {
            for i in 1..=terminals.min(3) {
                let mut now = minutes(1.0);
                while now < game_ms {
                    let up =
                        (-(1.0 - rng.random::<f64>()).ln() * minutes(3.0) as f64) as u64 + 1_000;
                    let down =
                        (-(1.0 - rng.random::<f64>()).ln() * minutes(0.5) as f64) as u64 + 500;
                    now += up;
                    if now >= game_ms {
                        break;
                    }
                    v.push((now, Fault::WifiDown(i)));
                    now += down;
                    v.push((now.min(game_ms), Fault::WifiUp(i)));
                }
            }
            let c = at(0.4);
            v.push((c, Fault::Crash(t(4))));
            v.push((c + minutes(1.0), Fault::Restart(t(4))));
            // Partial partitions: one link fails while both ends still reach everyone else, so
            // what crosses it must go round through a third replica.
            for (a, b, from, mins) in [
                (0, t(1), 0.2, 10.0),
                (t(2), t(3), 0.3, 15.0),
                (0, t(3), 0.75, 6.0),
            ] {
                if a != b {
                    v.push((at(from), Fault::LinkDown(a, b)));
                    v.push((at(from) + minutes(mins), Fault::LinkUp(a, b)));
                }
            }
        }
        Scenario::TerminalDies => {
            let d = at((RUSH_START + RUSH_END) / 2.0);
            v.push((d, Fault::Die(t(1))));
            // The admin retires the lost device and enrols the spare in one go, so the planner
            // counts the spare among the terminals when it spreads the reclaimed rights.
            v.push((d + minutes(5.0), Fault::Reclaim(t(1))));
            v.push((d + minutes(5.0), Fault::Replace(t(1))));
        }
    }
    v.push((game_ms, Fault::Heal));
    // Stable: equal times keep their insertion order.
    v.sort_by_key(|(t, _)| *t);
    v
}
