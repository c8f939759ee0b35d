//! `halftime-sim`: run, sweep, compare and replay seeded simulations of a Halftime stand.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use halftime_sim::{
    AllocationChoice, Broken, PolicyChoice, Scenario, SimConfig, config, default_threads, plots,
    run, run_all, run_traced, sweep, world,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

mod venue;

/// Deterministic simulation of a Halftime stand: the real ledger code on a virtual clock and a
/// seeded virtual network with outages, partial partitions, crashes, lost devices and their
/// replacements, shrink, skewed clocks and rushes. Every run checks the safety
/// invariants at every step and convergence after the final heal; a failure prints the seed and
/// the command that replays it.
#[derive(Parser, Debug)]
#[command(name = "halftime-sim", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one scenario with one seed and print the report.
    Run(RunArgs),
    /// Run many seeds on every core; stop at the first failure and print it.
    Sweep(SweepArgs),
    /// Compare policies × allocations (and the central baseline) across scenarios.
    Compare(CompareArgs),
    /// Run one seed again; on failure print the steps leading to the failing step.
    Replay(RunArgs),
    /// Run a whole venue as real processes (relay, reconciler, fake Stripe, a stand's pool,
    /// terminals and kitchen display) through a seeded rush and an internet cut, and check every
    /// acknowledged sale against the relay's store.
    Venue(venue::VenueArgs),
}

#[derive(Args, Debug, Clone)]
struct StandArgs {
    /// Number of terminals in the stand.
    #[arg(long, default_value_t = config::DEFAULT_TERMINALS)]
    terminals: usize,
    /// Simulated game length in minutes.
    #[arg(long, default_value_t = config::DEFAULT_GAME_MINUTES)]
    game_minutes: u64,
    /// Items in the catalog.
    #[arg(long, default_value_t = config::DEFAULT_SKUS)]
    skus: usize,
    /// Largest wall-clock offset of a terminal's clock, in ms (each terminal draws one within ±
    /// this from the seed; the pool keeps true time). 0 disables clock skew.
    #[arg(long, default_value_t = config::DEFAULT_CLOCK_SKEW_MS)]
    clock_skew_ms: u64,
    /// Deliberately broken terminals (for testing the checks).
    #[arg(long, value_enum, hide = true)]
    broken: Option<Broken>,
    /// Add a hostile terminal that forges a sale far past its rights a third into the game;
    /// every honest replica must reject it and the run must still pass every check.
    #[arg(long)]
    rogue: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Game-day story.
    #[arg(long, value_enum, default_value_t = Scenario::Halftime)]
    scenario: Scenario,
    /// Seed that decides every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Selling policy.
    #[arg(long, value_enum, default_value_t = PolicyChoice::Strict)]
    policy: PolicyChoice,
    /// Allocation planner.
    #[arg(long, value_enum, default_value_t = AllocationChoice::Proportional)]
    allocation: AllocationChoice,
    /// Run the original central design instead (every online sale asks the pool; offline 1/N caps).
    #[arg(long)]
    baseline: bool,
    #[command(flatten)]
    stand: StandArgs,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write SVG plots into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Replay only: print the trace from this step on (default: a few steps before the failure).
    #[arg(long)]
    trace_from: Option<u64>,
}

#[derive(Args, Debug)]
struct SweepArgs {
    /// Seeds per scenario and policy.
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// First seed.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Only this scenario (default: all).
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Only this policy (default: both).
    #[arg(long, value_enum)]
    policy: Option<PolicyChoice>,
    /// Allocation planner.
    #[arg(long, value_enum, default_value_t = AllocationChoice::Proportional)]
    allocation: AllocationChoice,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    stand: StandArgs,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// Seed shared by every configuration (same customers everywhere).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run this many seeds from `--seed` on and report the totals over them.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Compare only strict/proportional (the defaults) with the central baseline.
    #[arg(long)]
    default_only: bool,
    /// Only this scenario (default: all).
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Worker threads (default: every core).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    stand: StandArgs,
    /// Write every report as one JSON array to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write SVG plots of every run into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
}

fn base_config(seed: u64, scenario: Scenario, stand: &StandArgs) -> SimConfig {
    let mut c = SimConfig::new(seed, scenario);
    c.terminals = stand.terminals.clamp(1, config::MAX_TERMINALS);
    c.game_minutes = stand.game_minutes.max(1);
    c.skus = stand.skus.max(1);
    c.broken = stand.broken;
    c.clock_skew_ms = stand.clock_skew_ms;
    c.rogue = stand.rogue;
    c
}

fn run_config(a: &RunArgs) -> SimConfig {
    let mut c = base_config(a.seed, a.scenario, &a.stand);
    c.policy = a.policy;
    c.allocation = a.allocation;
    c.baseline = a.baseline;
    c
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style);
    }
    pb
}

fn cmd_run(a: &RunArgs) -> Result<ExitCode> {
    let cfg = run_config(a);
    let pb = bar(
        cfg.game_minutes,
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} game min {msg}",
    );
    let started = Instant::now();
    let result = run(&cfg, &mut |now, game| {
        pb.set_length(game / 60_000);
        pb.set_position((now / 60_000).min(game / 60_000));
        if now > game {
            pb.set_message("healing");
        }
    });
    pb.finish_and_clear();
    let wall = started.elapsed();
    match result {
        Ok(report) => {
            print!("{}", report.table());
            println!("  wall time: {:.2} s", wall.as_secs_f64());
            if let Some(p) = &a.json {
                std::fs::write(p, report.to_json())
                    .with_context(|| format!("writing {}", p.display()))?;
                println!("  JSON report: {}", p.display());
            }
            if let Some(dir) = &a.plots {
                for p in plots::write(&report, dir).map_err(anyhow::Error::msg)? {
                    println!("  plot: {}", p.display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            eprintln!("{f}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn cmd_replay(a: &RunArgs) -> Result<ExitCode> {
    let cfg = run_config(a);
    let first = match a.trace_from {
        Some(s) => run_traced(&cfg, s),
        None => run(&cfg, &mut |_, _| {}),
    };
    let failure = match first {
        Ok(report) => {
            print!("{}", report.table());
            println!("  replay: no invariant violated with this seed");
            return Ok(ExitCode::SUCCESS);
        }
        Err(f) => f,
    };
    let failure = if a.trace_from.is_some() {
        failure
    } else {
        match run_traced(&cfg, failure.step.saturating_sub(world::TRACE_STEPS_BEFORE)) {
            Err(f) => f,
            Ok(_) => bail!("replay diverged: the seed failed once and then passed"),
        }
    };
    println!("steps leading to the failure:");
    for line in &failure.trace {
        println!("  {line}");
    }
    println!("{failure}");
    Ok(ExitCode::FAILURE)
}

fn cmd_sweep(a: &SweepArgs) -> Result<ExitCode> {
    let scenarios: Vec<Scenario> = a.scenario.map_or(Scenario::ALL.to_vec(), |s| vec![s]);
    let policies: Vec<PolicyChoice> = a
        .policy
        .map_or(vec![PolicyChoice::Strict, PolicyChoice::Optimistic], |p| {
            vec![p]
        });
    let mut jobs = Vec::new();
    for seed in a.first_seed..a.first_seed + a.seeds {
        for s in &scenarios {
            for p in &policies {
                let mut c = base_config(seed, *s, &a.stand);
                c.policy = *p;
                c.allocation = a.allocation;
                jobs.push(c);
            }
        }
    }
    let threads = a.threads.unwrap_or_else(default_threads);
    let pb = bar(
        jobs.len() as u64,
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} runs ({per_sec}, eta {eta})",
    );
    let started = Instant::now();
    let out = sweep(&jobs, threads, &|| pb.inc(1));
    pb.finish_and_clear();
    println!(
        "sweep: {} of {} runs on {threads} threads in {:.1} s",
        out.runs,
        jobs.len(),
        started.elapsed().as_secs_f64()
    );
    match out.failure {
        None => {
            println!("all invariants held");
            Ok(ExitCode::SUCCESS)
        }
        Some(f) => {
            println!("{f}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Totals of one configuration over every seed of a comparison.
#[derive(Default)]
struct Totals {
    runs: u64,
    customers: u64,
    sales: u64,
    lost: u64,
    lost_units: u64,
    stranded: u64,
    oversell: u64,
    refunds_cents: u64,
    held: u64,
    waits: Vec<u64>,
    lost_at: Vec<u64>,
    messages: u64,
    game_minutes: u64,
}

fn cmd_compare(a: &CompareArgs) -> Result<ExitCode> {
    let scenarios: Vec<Scenario> = a.scenario.map_or(Scenario::ALL.to_vec(), |s| vec![s]);
    let configs: Vec<(PolicyChoice, AllocationChoice)> = if a.default_only {
        vec![(PolicyChoice::Strict, AllocationChoice::Proportional)]
    } else {
        vec![
            (PolicyChoice::Strict, AllocationChoice::Proportional),
            (PolicyChoice::Strict, AllocationChoice::Velocity),
            (PolicyChoice::Optimistic, AllocationChoice::Proportional),
            (PolicyChoice::Optimistic, AllocationChoice::Velocity),
        ]
    };
    let mut jobs = Vec::new();
    for seed in a.seed..a.seed.saturating_add(a.seeds.max(1)) {
        for s in &scenarios {
            for (p, al) in &configs {
                let mut c = base_config(seed, *s, &a.stand);
                c.policy = *p;
                c.allocation = *al;
                jobs.push(c);
            }
            let mut c = base_config(seed, *s, &a.stand);
            c.baseline = true;
            jobs.push(c);
        }
    }
    let threads = a.threads.unwrap_or_else(default_threads);
    let pb = bar(
        jobs.len() as u64,
        "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} runs",
    );
    let results = run_all(&jobs, threads, &|| pb.inc(1));
    pb.finish_and_clear();
    let mut reports = Vec::new();
    let mut failed = false;
    let mut totals: std::collections::BTreeMap<(usize, String), Totals> = Default::default();
    for (cfg, r) in jobs.iter().zip(results) {
        match r {
            Ok(r) => {
                let order = scenarios
                    .iter()
                    .position(|s| *s == cfg.scenario)
                    .unwrap_or(0);
                let t = totals.entry((order, r.config.clone())).or_default();
                t.runs += 1;
                t.customers += r.customers;
                t.sales += r.sales;
                t.lost += r.lost_sales;
                t.lost_units += r.lost_units;
                t.stranded += r.stranded_units;
                t.oversell += r.oversell_units;
                t.refunds_cents += r.refunds_owed_cents;
                t.held += r.held_sales;
                t.waits.extend(&r.sale_waits_ms);
                t.lost_at.extend(&r.lost_sale_times_ms);
                t.messages += r.net.messages_sent;
                t.game_minutes = r.game_minutes;
                reports.push(r);
            }
            Err(f) => {
                failed = true;
                println!(
                    "{:<14} {:<24} FAILED: {}",
                    cfg.scenario.name(),
                    cfg.label(),
                    f.invariant
                );
                println!("{f}");
            }
        }
    }
    println!(
        "{} seed(s) from {}, totals over them; 'refused w/ stock' = customers refused while the stand still had what they wanted",
        a.seeds.max(1),
        a.seed
    );
    println!(
        "{:<14} {:<24} {:>9} {:>8} {:>16} {:>8} {:>9} {:>9} {:>9} {:>7} {:>11} {:>11} {:>10}",
        "scenario",
        "config",
        "customers",
        "sales",
        "refused w/ stock",
        "% cust",
        "lost u",
        "stranded",
        "oversell",
        "waited",
        "wait p50 ms",
        "wait p99 ms",
        "msgs/run"
    );
    for ((order, config), t) in &totals {
        let w = halftime_sim::report::Latencies::from_samples(&t.waits);
        println!(
            "{:<14} {:<24} {:>9} {:>8} {:>16} {:>7.2}% {:>9} {:>9} {:>9} {:>7} {:>11} {:>11} {:>10}",
            scenarios[*order].name(),
            config,
            t.customers,
            t.sales,
            t.lost,
            100.0 * t.lost as f64 / t.customers.max(1) as f64,
            t.lost_units,
            t.stranded,
            t.oversell,
            t.held,
            w.p50,
            w.p99,
            t.messages / t.runs.max(1)
        );
    }
    // The targets: with the network up, refusals while stock was left at most the baseline's
    // plus 0.5 % of customers; with the WAN down, at most half the baseline's lost sales;
    // stranded stock never above the baseline's.
    println!();
    for (order, s) in scenarios.iter().enumerate() {
        let Some(base) = totals.get(&(order, "baseline".to_string())) else {
            continue;
        };
        for ((o, config), t) in &totals {
            if *o != order || config == "baseline" {
                continue;
            }
            let (bound, rule) = match s {
                Scenario::WanDown => (base.lost / 2, "≤ baseline / 2"),
                Scenario::AllDown => (u64::MAX, "no target (stand LAN down too)"),
                _ => (
                    base.lost + (t.customers as f64 * 0.005).floor() as u64,
                    "≤ baseline + 0.5 % of customers",
                ),
            };
            let lost_ok = t.lost <= bound;
            let stranded_ok = t.stranded <= base.stranded;
            println!(
                "target {:<14} {:<24} refused w/ stock {} {} (baseline {}): {}; stranded {} ≤ baseline {}: {}",
                s.name(),
                config,
                t.lost,
                rule,
                base.lost,
                if lost_ok { "met" } else { "NOT met" },
                t.stranded,
                base.stranded,
                if stranded_ok { "met" } else { "NOT met" },
            );
        }
    }
    if let Some(p) = &a.json {
        let json = serde_json::to_string_pretty(&reports)?;
        std::fs::write(p, json).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(dir) = &a.plots {
        if a.seeds <= 1 {
            for r in &reports {
                plots::write(r, dir).map_err(anyhow::Error::msg)?;
            }
        }
        for (order, s) in scenarios.iter().enumerate() {
            let series: Vec<plots::RefusalSeries> = totals
                .iter()
                .filter(|((o, _), _)| *o == order)
                .map(|((_, c), t)| (c.clone(), t.lost_at.clone()))
                .collect();
            let minutes = totals
                .iter()
                .find(|((o, _), _)| *o == order)
                .map_or(1, |(_, t)| t.game_minutes);
            plots::write_refusals(s.name(), minutes, &series, dir).map_err(anyhow::Error::msg)?;
        }
    }
    if failed {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Run(a) => cmd_run(a),
        Command::Replay(a) => cmd_replay(a),
        Command::Sweep(a) => cmd_sweep(a),
        Command::Compare(a) => cmd_compare(a),
        Command::Venue(a) => venue::cmd_venue(a),
    }
}
