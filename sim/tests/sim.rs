//! Whole-stand simulation tests: a CI-sized sweep over every scenario, the broken variant is
//! caught and replays to the same step, and a seed replays to a byte-identical report.

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
fn broken_variant_is_caught_and_replays_at_the_same_step() {
    let jobs: Vec<SimConfig> = (0..6)
        .map(|seed| {
            let mut c = ci_config(seed, Scenario::ALL[seed as usize % Scenario::ALL.len()], PolicyChoice::Strict);
            c.broken = Some(Broken::IgnoreRights);
            c
        })
        .collect();
    let out = sweep(&jobs, threads(), &|| {});
    let failure = out.failure.expect("the sweep must catch terminals that ignore their rights");
    assert!(failure.replay.contains(&format!("--seed {}", failure.seed)));
    assert!(failure.replay.contains("--broken ignore-rights"));
    let cfg = jobs
        .iter()
        .find(|c| c.seed == failure.seed)
        .expect("the failing seed is one of the jobs")
        .clone();
    let again = run(&cfg, &mut |_, _| {}).expect_err("the printed seed must fail again");
    assert_eq!((again.step, again.time_ms, &again.invariant), (failure.step, failure.time_ms, &failure.invariant));
    assert_eq!(again.detail, failure.detail);
}

#[test]
fn one_seed_gives_byte_identical_reports() {
    let cfg = ci_config(42, Scenario::Flapping, PolicyChoice::Optimistic);
    let a = run(&cfg, &mut |_, _| {}).expect("invariants hold").to_json();
    let b = run(&cfg, &mut |_, _| {}).expect("invariants hold").to_json();
    assert!(a.len() > 1000);
    assert!(a == b, "two runs of one seed differ");
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
