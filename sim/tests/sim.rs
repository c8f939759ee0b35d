//! Whole-stand simulation tests: a CI-sized sweep over every scenario, a rogue terminal is
//! rejected, each planted bug (in the terminals, the ledger and the engine) is caught and
//! replays to the same step, a seed replays to a byte-identical report, and the
//! shrink, replacement, partial-partition and clock-skew faults take effect.

#![allow(clippy::expect_used)]
use halftime_sim::{Broken, PolicyChoice, Scenario, SimConfig, run, sweep};

/// A shortened game with a few terminals: big enough to hit every fault, small enough for CI.
fn ci_config(seed: u64, scenario: Scenario, policy: PolicyChoice) -> SimConfig {
    let mut c = SimConfig::new(seed, scenario);
    c.policy = policy;
    c.terminals = 3;
    c.game_minutes = 30;
    c.skus = 4;
    c
}

fn threads() -> usize {
    halftime_sim::default_threads().min(4)
}

#[test]
fn offline_overdrafts_commit_on_replicas_that_build_their_document_when_read() {
    // An overdraft claim is checked against the document at the sale's dependencies, which
    // a simulated replica builds only when read: with the WAN down from the start, terminals
    // overdraw (the baseline's 1/N caps at once, optimistic once their rights run out).
    for (baseline, policy, minutes) in [
        (true, PolicyChoice::Strict, 120),
        (false, PolicyChoice::Optimistic, 120),
    ] {
        let mut c = SimConfig::new(19, Scenario::WanDown);
        c.baseline = baseline;
        c.policy = policy;
        c.game_minutes = minutes;
        if let Err(f) = run(&c, &mut |_, _| {}) {
            panic!("{f}");
        }
    }
}

#[test]
fn ci_sweep_every_scenario_holds_invariants() {
    let mut jobs = Vec::new();
    for seed in 0..12 {
        for s in Scenario::ALL {
            for p in [PolicyChoice::Strict, PolicyChoice::Optimistic] {
                jobs.push(ci_config(seed, s, p));
            }
        }
        let mut b = ci_config(seed, Scenario::WanDown, PolicyChoice::Strict);
        b.baseline = true;
        jobs.push(b);
    }
    let out = sweep(&jobs, threads(), &|| {});
    if let Some(f) = out.failure {
        panic!("{f}");
    }
    assert_eq!(out.runs, jobs.len());
}

#[test]
fn a_rogue_terminals_forged_sale_is_rejected_by_every_replica() {
    for (seed, s) in Scenario::ALL.into_iter().enumerate() {
        let mut c = ci_config(seed as u64, s, PolicyChoice::Strict);
        c.rogue = true;
        let r = run(&c, &mut |_, _| {}).unwrap_or_else(|f| panic!("{f}"));
        // One rejection per replica alive at the attack: the pool and most terminals.
        assert!(r.rogue_rejections >= 2, "{s:?}: {}", r.rogue_rejections);
        assert_eq!(r.rejected_changes, 0, "{s:?}: only the rogue is rejected");
    }
}

/// A sweep over `jobs` (all with one planted bug) must fail, and its printed seed must fail
/// again at the same step with the same figures.
fn assert_caught_and_replayed(jobs: &[SimConfig], flag: &str) {
    let out = sweep(jobs, threads(), &|| {});
    let failure = out
        .failure
        .unwrap_or_else(|| panic!("the sweep must catch --broken {flag}"));
    assert!(failure.replay.contains(&format!("--seed {}", failure.seed)));
    assert!(failure.replay.contains(&format!("--broken {flag}")));
    let cfg = jobs
        .iter()
        .find(|c| {
            c.seed == failure.seed
                && c.scenario.name() == failure.scenario
                && c.label() == failure.config
        })
        .expect("the failing run is one of the jobs")
        .clone();
    let again = run(&cfg, &mut |_, _| {}).expect_err("the printed seed must fail again");
    assert_eq!(
        (again.step, again.time_ms, &again.invariant),
        (failure.step, failure.time_ms, &failure.invariant)
    );
    assert_eq!(again.detail, failure.detail);
}

#[test]
fn terminals_that_ignore_their_rights_are_caught() {
    let jobs: Vec<SimConfig> = (0..6)
        .map(|seed| {
            let mut c = ci_config(
                seed,
                Scenario::ALL[seed as usize % Scenario::ALL.len()],
                PolicyChoice::Strict,
            );
            c.broken = Some(Broken::IgnoreRights);
            c
        })
        .collect();
    assert_caught_and_replayed(&jobs, "ignore-rights");
}

#[test]
fn a_ledger_that_drops_its_carry_forward_is_caught() {
    // Two terminals and one item over a whole game: their cells roll over to new epochs, and
    // gives between them leave counters a broken rollover would drop.
    let jobs: Vec<SimConfig> = (0..4)
        .flat_map(|seed| {
            Scenario::ALL.into_iter().map(move |s| {
                let mut c = SimConfig::new(seed, s);
                c.terminals = 2;
                c.game_minutes = 120;
                c.skus = 1;
                c.broken = Some(Broken::DropCarryForward);
                c
            })
        })
        .collect();
    assert_caught_and_replayed(&jobs, "drop-carry-forward");
}

/// The CI sweep's configurations with one planted bug, over every scenario.
fn broken_sweep(seeds: u64, broken: Broken) -> Vec<SimConfig> {
    (0..seeds)
        .flat_map(|seed| {
            Scenario::ALL.into_iter().map(move |s| {
                let mut c = ci_config(seed, s, PolicyChoice::Strict);
                c.broken = Some(broken);
                c
            })
        })
        .collect()
}

#[test]
fn a_ledger_that_believes_a_writer_past_its_floor_is_caught() {
    assert_caught_and_replayed(
        &broken_sweep(1, Broken::SkipFloorOnReceive),
        "skip-floor-on-receive",
    );
}

#[test]
fn a_ledger_that_counts_a_void_twice_is_caught() {
    assert_caught_and_replayed(
        &broken_sweep(1, Broken::DoubleCountVoid),
        "double-count-void",
    );
}

#[test]
fn an_engine_that_answers_a_request_twice_is_caught() {
    assert_caught_and_replayed(&broken_sweep(2, Broken::AnswerTwice), "answer-twice");
}

#[test]
fn one_seed_gives_byte_identical_reports() {
    // Flapping has partial partitions and relays; terminal-dies enrols a replacement whose key,
    // customers and clock skew come from the seed.
    for s in [Scenario::Flapping, Scenario::TerminalDies] {
        let cfg = ci_config(42, s, PolicyChoice::Optimistic);
        let a = run(&cfg, &mut |_, _| {})
            .expect("invariants hold")
            .to_json();
        let b = run(&cfg, &mut |_, _| {})
            .expect("invariants hold")
            .to_json();
        assert!(a.len() > 1000);
        assert!(a == b, "two runs of one seed differ ({s})");
    }
}

#[test]
fn strict_never_oversells_through_a_long_outage() {
    let mut cfg = ci_config(7, Scenario::WanDown, PolicyChoice::Strict);
    cfg.terminals = 4;
    let r = run(&cfg, &mut |_, _| {}).expect("invariants hold");
    assert_eq!(r.oversell_units, 0);
    assert!(r.sales > 0);
    assert!(r.convergence_ms.is_some());
}

#[test]
fn shrink_replacement_partitions_and_skew_take_effect() {
    let mut jobs = Vec::new();
    for seed in 0..2 {
        for s in [
            Scenario::Normal,
            Scenario::Halftime,
            Scenario::Flapping,
            Scenario::TerminalDies,
        ] {
            jobs.push(ci_config(seed, s, PolicyChoice::Strict));
        }
    }
    let mut unskewed = ci_config(0, Scenario::Halftime, PolicyChoice::Strict);
    unskewed.clock_skew_ms = 0;
    jobs.push(unskewed);
    let reports: Vec<_> = halftime_sim::run_all(&jobs, threads(), &|| {})
        .into_iter()
        .map(|r| r.unwrap_or_else(|f| panic!("{f}")))
        .collect();
    for (cfg, r) in jobs.iter().zip(&reports) {
        let what = format!("seed {} {}", cfg.seed, cfg.scenario);
        assert!(
            r.clock_skew_max_ms <= cfg.clock_skew_ms,
            "{what}: skew {} over the bound",
            r.clock_skew_max_ms
        );
        if cfg.clock_skew_ms == 0 {
            assert_eq!(r.clock_skew_max_ms, 0, "{what}: skew disabled");
            continue;
        }
        assert!(
            r.clock_skew_max_ms > 0,
            "{what}: clocks are skewed by default"
        );
        match cfg.scenario {
            Scenario::Normal | Scenario::Halftime => {
                assert!(
                    r.shrunk_units > 0,
                    "{what}: the shrink adjustment wrote off nothing"
                );
                let per_sku: u64 = r.per_sku.iter().map(|k| k.shrunk).sum();
                assert_eq!(per_sku, r.shrunk_units);
                assert!((1..=2).contains(&r.per_sku.iter().filter(|k| k.shrunk > 0).count()));
            }
            Scenario::Flapping => assert!(
                r.relayed_changes > 0,
                "{what}: nothing went round a cut link"
            ),
            Scenario::TerminalDies => {
                assert_eq!(r.replacement_terminals, 1, "{what}");
                assert!(
                    r.replacement_sales > 0,
                    "{what}: the replacement terminal never sold"
                );
                assert_eq!(
                    r.sales_never_at_pool, 0,
                    "{what}: the lost terminal was in sync before it died"
                );
            }
            _ => {}
        }
    }
}

/// A stand of 20 terminals, where each replica's invariants are checked at most every 100 ms
/// of virtual time: a clean game holds them, and terminals that ignore their rights are still
/// caught and replay to the same step.
#[test]
fn a_large_stand_checked_every_100_ms_still_catches_a_planted_bug() {
    let large = |seed: u64| {
        let mut c = ci_config(seed, Scenario::ALL[0], PolicyChoice::Strict);
        c.terminals = 20;
        c.game_minutes = 4;
        c.skus = 2;
        c
    };
    run(&large(1), &mut |_, _| {}).expect("a clean large stand holds every invariant");
    let mut broken = large(1);
    broken.broken = Some(Broken::IgnoreRights);
    assert_caught_and_replayed(&[broken], "ignore-rights");
}
