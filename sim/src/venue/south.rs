//! The venue's second stand, `south`: its pool at the relay (made through the admin API), the
//! optimistic policy, and terminals with no stand network of their own — each reaches the
//! others only through the relay, as tills on cellular would. When the internet drops each one
//! sells alone into its bounded overdraft, so the stand can oversell; after the heal the
//! reconciler refunds what was oversold, and the report checks that against the relay's store
//! and the fake Stripe.

use super::rush::{CATALOG, Pace, SharedTally, lock};
use super::{
    Device, NS_API_PORT, RELAY_MAX_LISTED, START_TIMEOUT_MS, Venue, VenueArgs, check_exactly_once,
    relay_stock, run_cmd, s, spawn_in,
};
use crate::venue::procs::{field, free_port};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const SOUTH: &str = "south";
/// Mean units in one basket of the rush (one or two items, one to three each).
const UNITS_PER_SALE: f64 = 2.3;

#[derive(Debug)]
pub struct South {
    pub tills: Vec<Device>,
    pub stock: Vec<i64>,
}

/// Starting stock: about what the rush asks for until the middle of the outage, so the stand
/// runs short while its terminals are cut off.
fn stock(a: &VenueArgs) -> Vec<i64> {
    let rush_ms = a.rush_secs * 1000;
    let pace = Pace::new(a.south_terminals, rush_ms);
    let mid_outage_ms = (rush_ms - a.outage_secs() * 1000) / 2 + a.outage_secs() * 500;
    let units = pace.expected_sales as f64 * UNITS_PER_SALE * mid_outage_ms as f64 / rush_ms as f64;
    CATALOG
        .iter()
        .map(|c| ((units * f64::from(c.3) / 100.0) as i64).max(5))
        .collect()
}

/// Make the stand at the relay, enrol and join its terminals, start them; wait until each
/// holds the stand.
pub async fn start(v: &Venue, a: &VenueArgs, first_index: usize) -> Result<South> {
    let stock = stock(a);
    let items: Vec<Value> = CATALOG
        .iter()
        .zip(&stock)
        .map(|(c, n)| json!({"sku": c.0, "name": c.1, "price_cents": c.2, "stock": n}))
        .collect();
    let made = v
        .http
        .post(format!("{}/v1/stands", v.relay_url()))
        .bearer_auth(&v.admin)
        .json(&json!({
            "stand": SOUTH, "event": format!("rush-seed-{}", a.seed), "venue": "Halftime demo venue",
            "policy": "optimistic", "items": items,
        }))
        .send()
        .await
        .context("the relay does not answer")?;
    if made.status().as_u16() != 201 {
        bail!(
            "the relay did not make stand {SOUTH}: {}",
            made.text().await.unwrap_or_default()
        );
    }
    let mut tills = Vec::new();
    for i in 0..a.south_terminals {
        let name = format!("south{}", i + 1);
        let (host, ns, mesh, api) = match &v.lan {
            Some(l) => (
                l.addr(first_index + i),
                Some(l.ns(first_index + i)),
                0,
                NS_API_PORT,
            ),
            None => (s("127.0.0.1"), None, free_port()?, free_port()?),
        };
        let data = v.dir.join(&name);
        let out = run_cmd(
            &v.programs.peer,
            vec![s("init"), s("--data"), data.display().to_string()],
        )
        .await?;
        let key = field(&out, "public key:")?;
        let r = v
            .http
            .post(format!("{}/v1/stands/{SOUTH}/replicas", v.relay_url()))
            .bearer_auth(&v.admin)
            .json(&json!({"public_key": key, "name": name, "role": "terminal"}))
            .send()
            .await?;
        let code = r.status().as_u16();
        let joined: Value = r.json().await.unwrap_or(Value::Null);
        let (Some(pool_key), Some(psk)) = (joined["pool_key"].as_str(), joined["psk"].as_str())
        else {
            bail!("the relay did not enrol {name} ({code}): {joined}");
        };
        run_cmd(
            &v.programs.peer,
            vec![
                s("join"),
                s("--data"),
                data.display().to_string(),
                s("--stand"),
                s(SOUTH),
                s("--pool-key"),
                s(pool_key),
                s("--psk"),
                s(psk),
            ],
        )
        .await?;
        let d = Device {
            name,
            data,
            host,
            ns,
            mesh,
            api,
            key,
        };
        // No stand network: no discovery, no peers; the uplink is its only link.
        let args = vec![
            s("run"),
            s("--data"),
            d.data.display().to_string(),
            s("--api"),
            format!("{}:{}", d.host, d.api),
            s("--relay"),
            format!("ws://{}:{}", v.relay_host, v.relay_port),
            s("--no-mdns"),
        ];
        spawn_in(
            &v.children,
            &d.name,
            d.ns.as_deref(),
            &v.programs.peer,
            args,
            &v.dir.join("logs").join(format!("{}.log", d.name)),
        )?;
        tills.push(d);
    }
    let want: BTreeMap<&str, i64> = CATALOG
        .iter()
        .map(|c| c.0)
        .zip(stock.iter().copied())
        .collect();
    for d in &tills {
        let url = d.url();
        v.until(
            START_TIMEOUT_MS,
            &format!("{} to hold rights from the relay's pool", d.name),
            || async {
                let stock = v.get(&format!("{url}/v1/stock"), None).await?;
                let rows = stock.as_array()?;
                let have: BTreeMap<&str, i64> = rows
                    .iter()
                    .filter_map(|i| Some((i["sku"].as_str()?, i["available"].as_i64()?)))
                    .collect();
                let rights = rows.iter().any(|i| i["rights"].as_i64().unwrap_or(0) > 0);
                (have == want && rights).then_some(())
            },
        )
        .await?;
    }
    Ok(South { tills, stock })
}

/// The stand's part of the report; whether it passed.
pub async fn report(
    v: &Venue,
    south: &South,
    tally: &SharedTally,
    lines: &mut Vec<String>,
) -> Result<bool> {
    let t = lock(tally);
    lines.push(format!(
        "south: policy optimistic, pool at the relay, {} terminals with no stand network (each reaches the others only through the relay)",
        south.tills.len()
    ));
    let down = t
        .acked
        .values()
        .filter(|x| x.phase == super::rush::Phase::InternetDown)
        .count();
    let offline = t.acked.values().filter(|x| x.offline).count();
    let refused: Vec<String> = t.refused.iter().map(|(k, n)| format!("{k} {n}")).collect();
    lines.push(format!(
        "  sales: {} acknowledged ({} units), {down} while the internet was down, {offline} marked offline; refusals: {}",
        t.acked.len(),
        t.units_sold,
        if refused.is_empty() { s("none") } else { refused.join(", ") },
    ));
    let failed: u64 = t.failed.values().sum();
    let (line, once_ok) = check_exactly_once(v, SOUTH, &t, failed).await?;
    lines.push(format!("  {line}"));

    let (oversold, left) = relay_stock(v, SOUTH, &south.stock).await?;
    lines.push(format!(
        "  stock at the relay (start→now): {}",
        left.join(", ")
    ));

    let refunds = v
        .relay_get(&format!(
            "/v1/stands/{SOUTH}/refunds?limit={RELAY_MAX_LISTED}"
        ))
        .await
        .context("the relay does not list south's refunds")?;
    let rows = refunds.as_array().cloned().unwrap_or_default();
    let units: i64 = rows.iter().map(|r| r["units"].as_i64().unwrap_or(0)).sum();
    let mut by_status: BTreeMap<String, i64> = BTreeMap::new();
    for r in &rows {
        *by_status
            .entry(r["status"].as_str().unwrap_or("?").to_owned())
            .or_default() += r["units"].as_i64().unwrap_or(0);
    }
    let stats = v
        .get(&format!("{}/_stats", v.stripe_url()), None)
        .await
        .context("the fake Stripe does not answer")?;
    // Per acknowledged card payment: what the reconciler decided to pay back, and what Stripe
    // says it refunded. Each must match, and no other payment may have been touched.
    let mut owed: BTreeMap<&str, (u64, i64)> = BTreeMap::new();
    let mut unknown_sales = 0;
    for r in rows
        .iter()
        .filter(|r| r["method"] == "card" && r["status"] == "done")
    {
        let Some(sale) = r["sale_id"].as_str().and_then(|id| t.acked.get(id)) else {
            unknown_sales += 1;
            continue;
        };
        let e = owed.entry(sale.reference.as_str()).or_default();
        e.0 += 1;
        e.1 += r["amount_cents"].as_i64().unwrap_or(0);
    }
    let mut mismatched = 0;
    for x in t.acked.values().filter(|x| x.card) {
        let paid = &stats["by_payment_intent"][x.reference.as_str()];
        let got = (
            paid["refunds"].as_u64().unwrap_or(0),
            paid["amount"].as_i64().unwrap_or(0),
        );
        if owed.get(x.reference.as_str()).copied().unwrap_or((0, 0)) != got {
            mismatched += 1;
        }
    }
    let stripe_refunds = stats["refunds"].as_u64().unwrap_or(0);
    let done_card = owed.values().map(|x| x.0).sum::<u64>();
    let refunds_ok = units == oversold
        && by_status.get("pending").is_none()
        && by_status.get("dead").is_none()
        && mismatched == 0
        && unknown_sales == 0
        && stripe_refunds == done_card;
    lines.push(format!(
        "  oversell: {oversold} units; refunds decided: {units} units ({})",
        if by_status.is_empty() {
            s("none")
        } else {
            by_status
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    lines.push(format!(
        "  refunds exactly once: {} — {units} units refunded of {oversold} oversold; the fake Stripe made {stripe_refunds} refunds for {done_card} card refunds decided; {mismatched} card payments refunded other than decided, {unknown_sales} refunds of sales never acknowledged",
        if refunds_ok { "ok" } else { "FAILED" },
    ));
    Ok(once_ok && refunds_ok)
}
