#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]
//! Calls to the fake Stripe; `base` is its URL, with or without a trailing slash.

use serde_json::Value;
use std::time::Duration;

fn url(base: &str, path: &str) -> String {
    format!("{}/{path}", base.trim_end_matches('/'))
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// A card payment of `amount` cents the fake knows: its payment intent id.
pub async fn intent(base: &str, amount: i64) -> String {
    let v: Value = client()
        .post(url(base, "v1/payment_intents"))
        .form(&[("amount", amount.to_string()), ("currency", "usd".into())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// What the fake did (`None` while it cannot be reached).
pub async fn try_stats(base: &str) -> Option<Value> {
    client()
        .get(url(base, "_stats"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

pub async fn stats(base: &str) -> Value {
    try_stats(base).await.expect("the fake Stripe answers")
}

/// Set a fault (`None`: clear it).
pub async fn fault(base: &str, f: Option<Value>) {
    let r = match f {
        Some(f) => client().post(url(base, "_faults")).json(&f).send().await,
        None => client().delete(url(base, "_faults")).send().await,
    };
    assert!(r.unwrap().status().is_success());
}
