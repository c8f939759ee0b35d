//! What one simulated run is: scenario, policy, allocation, size, seed.

use clap::ValueEnum;
use halftime_ledger::{Allocation, Policy};
use serde::Serialize;
use std::fmt;

/// Default number of terminals in the stand.
pub const DEFAULT_TERMINALS: usize = 10;
/// Default length of the simulated game.
pub const DEFAULT_GAME_MINUTES: u64 = 120;
/// Default number of items in the catalog.
pub const DEFAULT_SKUS: usize = 8;
/// Most terminals a stand may have in the simulator (keys are derived from the index).
pub const MAX_TERMINALS: usize = 200;
/// Default largest wall-clock offset of a terminal: each one is set uniformly within ± this.
pub const DEFAULT_CLOCK_SKEW_MS: u64 = 3 * 60 * 1000;

/// A game-day story: the demand profile and the faults that hit the stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// A steady crowd, no rush, no outage; one admin restock, part of it written off as shrink.
    Normal,
    /// The game-day profile with a 10x halftime rush; one terminal crashes and restarts mid-rush;
    /// part of the mid-event delivery is written off as shrink.
    Halftime,
    /// The internet is down for two hours (the whole game): the pool is unreachable, the LAN works.
    WanDown,
    /// Everything (LAN and internet) is down for 30 minutes across halftime.
    AllDown,
    /// Three terminals' Wi-Fi flaps up and down all game; single links between two replicas
    /// fail while both still reach everyone else; one terminal crashes and restarts.
    Flapping,
    /// A terminal dies mid-rush and never comes back; the admin reclaims its rights and enrols
    /// a replacement device, which joins from nothing and sells for the rest of the game.
    TerminalDies,
}

impl Scenario {
    /// Every scenario, in a fixed order.
    pub const ALL: [Scenario; 6] = [
        Scenario::Normal,
        Scenario::Halftime,
        Scenario::WanDown,
        Scenario::AllDown,
        Scenario::Flapping,
        Scenario::TerminalDies,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Normal => "normal",
            Scenario::Halftime => "halftime",
            Scenario::WanDown => "wan-down",
            Scenario::AllDown => "all-down",
            Scenario::Flapping => "flapping",
            Scenario::TerminalDies => "terminal-dies",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The selling policy of the stand (see DESIGN.md, "Policies").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyChoice {
    /// Sell only against own rights: zero oversell by construction.
    Strict,
    /// Offline terminals may overdraw down to 1/N of the last known stock (LOW_STOCK excepted).
    Optimistic,
}

impl PolicyChoice {
    /// The ledger's policy.
    pub fn policy(self) -> Policy {
        match self {
            PolicyChoice::Strict => Policy::Strict,
            PolicyChoice::Optimistic => Policy::Optimistic,
        }
    }
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            PolicyChoice::Strict => "strict",
            PolicyChoice::Optimistic => "optimistic",
        }
    }
}

/// How rights are spread ahead of a disconnect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocationChoice {
    /// Each terminal gets 1/N of what is left.
    Proportional,
    /// Shares weighted by each terminal's recent sales rate.
    Velocity,
}

impl AllocationChoice {
    /// The ledger's allocation.
    pub fn allocation(self) -> Allocation {
        match self {
            AllocationChoice::Proportional => Allocation::Proportional,
            AllocationChoice::Velocity => Allocation::Velocity,
        }
    }
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            AllocationChoice::Proportional => "proportional",
            AllocationChoice::Velocity => "velocity",
        }
    }
}

/// Deliberately wrong terminal behaviour, for proving that the checks catch bugs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Broken {
    /// Terminals sell past their own rights (the stand is run optimistic and every sale is
    /// made as if offline) while the checks hold the run to the strict policy's invariants.
    IgnoreRights,
    /// Inside the ledger: a writer's new epoch map drops the counters its change does not
    /// write (the carry-forward at rollover is lost).
    DropCarryForward,
    /// Inside the ledger: a received change is not held to the policy floor (the run has a
    /// rogue terminal forging a sale past its rights).
    SkipFloorOnReceive,
    /// Inside the ledger: applying a void returns its units to the stand's totals twice.
    DoubleCountVoid,
    /// Inside the engine: every rights request is answered twice.
    AnswerTwice,
}

impl Broken {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Broken::IgnoreRights => "ignore-rights",
            Broken::DropCarryForward => "drop-carry-forward",
            Broken::SkipFloorOnReceive => "skip-floor-on-receive",
            Broken::DoubleCountVoid => "double-count-void",
            Broken::AnswerTwice => "answer-twice",
        }
    }
}

/// Everything that decides a run. Two runs with equal configs are identical.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// The one seed every random choice derives from.
    pub seed: u64,
    /// The story.
    pub scenario: Scenario,
    /// Selling policy.
    pub policy: PolicyChoice,
    /// Allocation planner.
    pub allocation: AllocationChoice,
    /// Run the original central design instead (optimistic policy, no escrow, online sales
    /// consult the pool).
    pub baseline: bool,
    /// Terminals in the stand.
    pub terminals: usize,
    /// Simulated game length in minutes.
    pub game_minutes: u64,
    /// Catalog size.
    pub skus: usize,
    /// Deliberate bug, if any.
    pub broken: Option<Broken>,
    /// Largest wall-clock offset of a terminal (each draws one uniformly within ± this from the
    /// seed; the pool keeps true time). 0: every clock agrees.
    pub clock_skew_ms: u64,
    /// An extra enrolled terminal that serves no customers and, a third into the game, sends
    /// every replica a forged sale far past its rights: the honest ones must reject it.
    pub rogue: bool,
}

impl SimConfig {
    /// The default game for a scenario and seed.
    pub fn new(seed: u64, scenario: Scenario) -> Self {
        Self {
            seed,
            scenario,
            policy: PolicyChoice::Strict,
            allocation: AllocationChoice::Proportional,
            baseline: false,
            terminals: DEFAULT_TERMINALS,
            game_minutes: DEFAULT_GAME_MINUTES,
            skus: DEFAULT_SKUS,
            broken: None,
            clock_skew_ms: DEFAULT_CLOCK_SKEW_MS,
            rogue: false,
        }
    }

    /// Whether the run has a rogue terminal (asked for, or needed by the planted bug).
    pub fn has_rogue(&self) -> bool {
        self.rogue || self.broken == Some(Broken::SkipFloorOnReceive)
    }

    /// The policy the stand document is created with.
    pub fn ledger_policy(&self) -> Policy {
        if self.baseline || self.broken == Some(Broken::IgnoreRights) {
            Policy::Optimistic
        } else {
            self.policy.policy()
        }
    }

    /// The policy whose invariants the checks enforce.
    pub fn checked_policy(&self) -> Policy {
        if self.broken == Some(Broken::IgnoreRights) {
            Policy::Strict
        } else {
            self.ledger_policy()
        }
    }

    /// A short label: `strict/proportional`, `baseline`.
    pub fn label(&self) -> String {
        if self.baseline {
            "baseline".to_owned()
        } else {
            format!("{}/{}", self.policy.name(), self.allocation.name())
        }
    }

    /// Game length in milliseconds.
    pub fn game_ms(&self) -> u64 {
        self.game_minutes * 60_000
    }

    /// The command line that replays this run.
    pub fn replay_command(&self) -> String {
        let mut s = format!(
            "halftime-sim replay --seed {} --scenario {} --policy {} --allocation {} --terminals {} --game-minutes {} --skus {} --clock-skew-ms {}",
            self.seed,
            self.scenario.name(),
            self.policy.name(),
            self.allocation.name(),
            self.terminals,
            self.game_minutes,
            self.skus,
            self.clock_skew_ms
        );
        if self.baseline {
            s.push_str(" --baseline");
        }
        if self.rogue {
            s.push_str(" --rogue");
        }
        if let Some(b) = self.broken {
            s.push_str(" --broken ");
            s.push_str(b.name());
        }
        s
    }
}
