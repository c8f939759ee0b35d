//! Paying a decision back through Stripe's refund API (async-stripe), one attempt at a time.

use crate::db::{Job, Outcome};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use stripe::{Client, CreateRefund, PaymentIntentId, Refund, RequestStrategy, StripeError};

/// Stripe's client, pointed at `base_url` (Stripe itself, or the fake in this repository).
#[derive(Clone)]
pub struct Payer {
    client: Client,
    timeout: Duration,
}

impl std::fmt::Debug for Payer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Payer(timeout {:?})", self.timeout)
    }
}

impl Payer {
    /// `base_url` must parse as a URL (checked by the caller: async-stripe panics otherwise).
    pub fn new(base_url: &str, secret_key: &str, timeout: Duration) -> Self {
        Self {
            client: Client::from_url(base_url, secret_key),
            timeout,
        }
    }

    /// One attempt at refunding `job`, with its idempotency key; how long Stripe took.
    pub async fn refund(&self, job: &Job) -> (Outcome, Duration) {
        let started = Instant::now();
        let outcome = self.attempt(job).await;
        (outcome, started.elapsed())
    }

    async fn attempt(&self, job: &Job) -> Outcome {
        let Ok(intent) = job.reference.parse::<PaymentIntentId>() else {
            return Outcome::Refused {
                why: format!("{:?} is not a payment intent", job.reference),
            };
        };
        let client = self
            .client
            .clone()
            .with_strategy(RequestStrategy::Idempotent(job.idempotency_key()));
        let mut params = CreateRefund::new();
        params.payment_intent = Some(intent);
        params.amount = Some(job.amount_cents);
        params.metadata = Some(HashMap::from([
            ("stand".to_owned(), job.stand.clone()),
            ("sale_id".to_owned(), job.sale_id.clone()),
            ("sku".to_owned(), job.sku.clone()),
        ]));
        match tokio::time::timeout(self.timeout, Refund::create(&client, params)).await {
            Err(_) => Outcome::Retry {
                why: format!("no answer within {} ms", self.timeout.as_millis()),
            },
            Ok(Ok(refund)) => Outcome::Done {
                refund: refund.id.to_string(),
            },
            Ok(Err(StripeError::Stripe(e))) if e.http_status >= 500 || e.http_status == 429 => {
                Outcome::Retry {
                    why: format!(
                        "Stripe answered {}: {}",
                        e.http_status,
                        e.message.unwrap_or_default()
                    ),
                }
            }
            Ok(Err(StripeError::Stripe(e))) => Outcome::Refused {
                why: format!(
                    "Stripe answered {} ({:?}): {}",
                    e.http_status,
                    e.error_type,
                    e.message.unwrap_or_default()
                ),
            },
            Ok(Err(e)) => Outcome::Retry { why: e.to_string() },
        }
    }
}
