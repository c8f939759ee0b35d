#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The allocation planner spreads an item over the terminals and keeps the pool's reserve.

mod common;
use common::*;
use halftime_ledger::allocation::{plan_allocation_with, targets_with};
use halftime_ledger::*;

#[test]
fn the_pool_keeps_its_reserve_and_spreads_the_rest() {
    // 4 terminals, 200 hot dogs at the pool, nothing allocated yet.
    let mut st = stand(Policy::Strict, 4, 200, 0);
    let hd = sku("hotdog");
    let reserve = 10;
    let t = targets_with(&st.pool, Allocation::Proportional, &hd, 2_000, reserve);
    let spread: i64 = t.values().sum();
    assert_eq!(spread, 180);
    assert!(t.values().all(|v| *v == spread / 4), "{t:?}");
    let plans = plan_allocation_with(&st.pool, Allocation::Proportional, 2_000, reserve);
    for r in st.pool.execute_plans(&plans, 2_000) {
        r.unwrap();
    }
    assert_eq!(st.pool.rights(st.pool.me(), &hd), 20);
    // Planning again moves nothing: the reserve is not handed out at the next round.
    let again = plan_allocation_with(&st.pool, Allocation::Proportional, 3_000, reserve);
    assert!(again.iter().all(|p| p.sku != hd), "{again:?}");
}
