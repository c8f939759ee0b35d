//! The seeded rush: one customer queue per terminal, each sale a `POST /v1/sales` on the
//! terminal's POS API, card payments made first at the fake Stripe as a real till would. Every
//! answer is tallied as the terminal gave it; nothing here reads the ledger.

use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An item of the venue's catalog: sku, name, price, share of demand (percent), starting stock
/// per 100 expected sales.
pub const CATALOG: [(&str, &str, i64, u32, i64); 4] = [
    ("hotdog", "Hot dog", 400, 35, 90),
    ("soda", "Soda", 250, 35, 100),
    ("pretzel", "Pretzel", 350, 15, 20),
    ("nachos", "Nachos", 550, 15, 12),
];
/// Share of sales paid by card (the rest cash), percent.
pub const CARD_PCT: u32 = 80;
/// Mean pause between two customers at one terminal.
pub const THINK_MS: u64 = 1_200;

/// The phase of the run, shared with the sellers so each sale is tagged with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Online = 0,
    InternetDown = 1,
    Healed = 2,
    Settling = 3,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Online => "rush, internet up",
            Phase::InternetDown => "rush, INTERNET DOWN",
            Phase::Healed => "rush, internet back",
            Phase::Settling => "settling",
        }
    }
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Phase::Online,
            1 => Phase::InternetDown,
            2 => Phase::Healed,
            _ => Phase::Settling,
        }
    }
}

#[derive(Debug, Default)]
pub struct SharedPhase(AtomicU8);

impl SharedPhase {
    pub fn set(&self, p: Phase) {
        self.0.store(p as u8, Ordering::SeqCst);
    }
    pub fn get(&self) -> Phase {
        Phase::from_u8(self.0.load(Ordering::SeqCst))
    }
}

/// A sale a terminal acknowledged (answered 201).
#[derive(Debug, Clone)]
pub struct Acked {
    pub terminal: usize,
    pub sent: Instant,
    pub acked: Instant,
    pub units: i64,
    pub card: bool,
    /// The payment intent of a card payment.
    pub reference: String,
    pub offline: bool,
    pub phase: Phase,
}

/// Everything the terminals answered.
#[derive(Debug, Default)]
pub struct Tally {
    pub acked: BTreeMap<String, Acked>,
    /// A terminal that acknowledged one sale id twice (never expected).
    pub acked_twice: Vec<String>,
    /// Refusal reason (the API's `refusal.reason`, else its `error`) → count.
    pub refused: BTreeMap<String, u64>,
    /// Requests without an answer the terminal stood by (transport error, 5xx) → count. Such a
    /// sale may or may not have been made.
    pub failed: BTreeMap<String, u64>,
    pub units_sold: i64,
}

pub type SharedTally = Arc<Mutex<Tally>>;

pub fn lock(t: &SharedTally) -> std::sync::MutexGuard<'_, Tally> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// How the rush is paced and stocked for `terminals` tills over `rush_ms`.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    pub think_ms: u64,
    pub expected_sales: u64,
}

impl Pace {
    pub fn new(terminals: usize, rush_ms: u64) -> Self {
        let t = terminals as u64;
        let think_ms = THINK_MS;
        // About 100 ms of answer and payment per sale besides the pause.
        let expected_sales = (t * rush_ms / (think_ms + 100)).max(1);
        Self {
            think_ms,
            expected_sales,
        }
    }
    /// Starting stock of each catalog item.
    pub fn stock(&self) -> Vec<i64> {
        CATALOG
            .iter()
            .map(|c| (c.4 * self.expected_sales as i64 / 100).max(5))
            .collect()
    }
}

/// One terminal's queue of customers until `end`.
pub struct Seller {
    pub terminal: usize,
    pub api: String,
    pub stripe: String,
    pub rng: ChaCha8Rng,
    pub think_ms: u64,
    pub end: Instant,
    pub phase: Arc<SharedPhase>,
    pub tally: SharedTally,
    pub http: reqwest::Client,
}

impl Seller {
    pub fn new(seed: u64, terminal: usize) -> ChaCha8Rng {
        // One stream per terminal, all from the run's seed.
        ChaCha8Rng::seed_from_u64(seed ^ (terminal as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    pub async fn run(mut self) {
        // Terminals start out of step, as queues do.
        let first = self.rng.random_range(0..self.think_ms);
        tokio::time::sleep(Duration::from_millis(first)).await;
        while Instant::now() < self.end {
            let (lines, total, units) = self.basket();
            let card = self.rng.random_range(0..100) < CARD_PCT;
            self.sell(lines, total, units, card).await;
            let pause = self
                .rng
                .random_range(self.think_ms / 2..self.think_ms * 3 / 2);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// One or two distinct items, one to three of each.
    fn basket(&mut self) -> (Vec<Value>, i64, i64) {
        let n = if self.rng.random_range(0..100) < 60 {
            1
        } else {
            2
        };
        let mut picked: BTreeMap<usize, i64> = BTreeMap::new();
        while picked.len() < n {
            let mut roll = self.rng.random_range(0..100u32);
            let mut i = 0;
            while i + 1 < CATALOG.len() && roll >= CATALOG[i].3 {
                roll -= CATALOG[i].3;
                i += 1;
            }
            let qty = [1, 1, 1, 2, 2, 3][self.rng.random_range(0..6usize)];
            picked.insert(i, qty);
        }
        let lines = picked
            .iter()
            .map(|(i, q)| json!({"sku": CATALOG[*i].0, "qty": q}))
            .collect();
        let total = picked.iter().map(|(i, q)| CATALOG[*i].2 * q).sum();
        let units = picked.values().sum();
        (lines, total, units)
    }

    async fn sell(&mut self, lines: Vec<Value>, total: i64, units: i64, card: bool) {
        let sent = Instant::now();
        let payment = if card {
            match self.intent(total).await {
                Ok(pi) => json!({"method": "card", "reference": pi}),
                Err(e) => {
                    self.failed(format!("card payment not taken: {e}"));
                    return;
                }
            }
        } else {
            json!({"method": "cash", "reference": ""})
        };
        let reference = payment["reference"].as_str().unwrap_or("").to_owned();
        let body = json!({"lines": lines, "payment": payment});
        let r = self
            .http
            .post(format!("{}/v1/sales", self.api))
            .json(&body)
            .send()
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                self.failed(format!("no answer: {}", short(&e)));
                return;
            }
        };
        let code = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        let phase = self.phase.get();
        let mut t = lock(&self.tally);
        match code {
            201 => match v["sale_id"].as_str() {
                Some(id) => {
                    let a = Acked {
                        terminal: self.terminal,
                        sent,
                        acked: Instant::now(),
                        units,
                        card,
                        reference,
                        offline: v["sale"]["offline"].as_bool().unwrap_or(false),
                        phase,
                    };
                    t.units_sold += units;
                    if t.acked.insert(id.to_owned(), a).is_some() {
                        t.acked_twice.push(id.to_owned());
                    }
                }
                None => *t.failed.entry("201 without a sale id".into()).or_default() += 1,
            },
            409 | 422 => {
                let why = v["refusal"]["reason"]
                    .as_str()
                    .or(v["error"].as_str())
                    .unwrap_or("unknown")
                    .to_owned();
                *t.refused.entry(why).or_default() += 1;
            }
            _ => {
                let why = v["error"].as_str().unwrap_or("no body").to_owned();
                *t.failed.entry(format!("{code} {why}")).or_default() += 1;
            }
        }
    }

    fn failed(&self, why: String) {
        *lock(&self.tally).failed.entry(why).or_default() += 1;
    }

    async fn intent(&self, amount: i64) -> Result<String> {
        let v: Value = self
            .http
            .post(format!("{}/v1/payment_intents", self.stripe))
            .form(&[("amount", amount.to_string()), ("currency", "usd".into())])
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        v["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("the fake Stripe made no payment intent: {v}"))
    }
}

fn short(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    }
}
