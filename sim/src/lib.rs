//! # halftime-sim
//!
//! A deterministic simulation of one concession stand over the real ledger code, in the manner
//! of TigerBeetle's VOPR: the pool and every terminal are [`halftime_ledger::Ledger`] state
//! machines on a virtual clock (milliseconds), talking through [`halftime_ledger::PeerSync`]
//! over a seeded virtual network.
//!
//! ## Flow
//!
//! 1. [`World::new`] builds the stand exactly as production does: the pool creates the
//!    document, sets the catalog (Zipf-skewed popularity, stock sized to run low near the end),
//!    enrols the terminals, records the opening stock and spreads rights with the allocation
//!    planner. Every terminal starts holding those changes. Each terminal's clock is off by a
//!    fixed skew drawn from the seed (± 3 minutes by default, `--clock-skew-ms`): every ledger
//!    operation sees that device's wall clock, while sync timers, the network and every figure
//!    run on the virtual clock.
//! 2. [`World::step`] jumps the clock to the next event and, in a fixed order: fires the
//!    scenario's faults (WAN/LAN outages, flapping Wi-Fi, single links cut while both ends
//!    still reach everyone else, crash and restart from durable changes, terminal death, admin
//!    reclaim and a replacement device that joins from nothing, admin restock and shrink);
//!    delivers due messages, batching all changes that reach one replica into one
//!    `apply_remote` and relaying accepted changes whose author is not linked to the receiver
//!    (as the peer does); runs the anti-entropy timers; serves arriving customers (a Poisson
//!    process following the game-day profile); lets the pool top terminals up and terminals
//!    return surplus or ask peers for rights; encodes every outgoing
//!    [`halftime_ledger::WireMessage`] and hands its bytes to the [`net::Network`] (latency,
//!    jitter, loss, duplication, stragglers); and finally checks the safety invariants of every
//!    replica whose state changed: Σ rights = available, every unit that came in was sold,
//!    written off as shrink or is still available, no negative rights and no oversell under
//!    strict, oversell within the granted overdraft under optimistic.
//! 3. At the end of the game every fault heals; the run continues until all live replicas hold
//!    the same changes (within [`world::CONVERGENCE_BOUND_MS`]), then checks liveness: every
//!    acknowledged sale of a live terminal (a replacement's included) reached the pool and the
//!    pool's stock equals the ground truth (opening + deliveries − sales − shrink).
//! 4. The [`Report`] gives lost sales, stranded stock, oversell and refunds, propagation
//!    latency, convergence time and traffic; [`plots`] draws it.
//!
//! One `u64` seed decides everything through one ChaCha RNG (customer streams are derived from
//! it per terminal, so policies compared on one seed see the same customers; clock skews come
//! from a second stream of the same seed, so changing `--clock-skew-ms` leaves every other
//! random draw as it was), maps are `BTreeMap`s, and nothing reads the wall clock: a seed
//! replays bit for bit.
//!
//! ```no_run
//! use halftime_sim::{Scenario, SimConfig, run};
//! let report = run(&SimConfig::new(7, Scenario::Halftime), &mut |_, _| {}).expect("invariants hold");
//! println!("{}", report.table());
//! ```

pub mod config;
pub mod net;
pub mod plots;
pub mod report;
pub mod scenario;
pub mod world;

pub use config::{AllocationChoice, Broken, PolicyChoice, Scenario, SimConfig};
pub use report::{Failure, Report};
pub use world::{World, run, run_traced};

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Outcome of a sweep.
#[derive(Debug)]
pub struct SweepOutcome {
    /// Runs completed.
    pub runs: usize,
    /// The failure with the lowest job index, if any.
    pub failure: Option<Box<Failure>>,
}

/// Run every config of `jobs` on `threads` threads; stop handing out work at the first failure.
/// `progress` is called after each finished run.
pub fn sweep(jobs: &[SimConfig], threads: usize, progress: &(dyn Fn() + Sync)) -> SweepOutcome {
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let failure: Mutex<Option<(usize, Box<Failure>)>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(cfg) = jobs.get(i) else { return };
                    let r = run(cfg, &mut |_, _| {});
                    done.fetch_add(1, Ordering::SeqCst);
                    progress();
                    if let Err(f) = r {
                        stop.store(true, Ordering::SeqCst);
                        if let Ok(mut g) = failure.lock() {
                            if g.as_ref().is_none_or(|(j, _)| i < *j) {
                                *g = Some((i, f));
                            }
                        }
                    }
                }
            });
        }
    });
    let failure = failure.into_inner().ok().flatten().map(|(_, f)| f);
    SweepOutcome {
        runs: done.load(Ordering::SeqCst),
        failure,
    }
}

/// Run every config of `jobs` on `threads` threads and return the results in job order.
pub fn run_all(
    jobs: &[SimConfig],
    threads: usize,
    progress: &(dyn Fn() + Sync),
) -> Vec<Result<Report, Box<Failure>>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Report, Box<Failure>>>>> =
        Mutex::new(jobs.iter().map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(cfg) = jobs.get(i) else { return };
                    let r = run(cfg, &mut |_, _| {});
                    progress();
                    if let Ok(mut g) = results.lock() {
                        g[i] = Some(r);
                    }
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect()
}

/// Threads to use: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
