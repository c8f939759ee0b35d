#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The allocation planner spreads an item over the terminals and keeps the pool's reserve.

mod common;
use common::*;
use halftime_ledger::allocation::{plan_allocation_with, plan_returns, targets_with};
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

#[test]
fn the_stand_total_counts_the_pool_and_active_terminals_only() {
    // 4 terminals with 10 hot dogs each, 200 in all; one oversells offline, one is retired.
    let mut st = stand(Policy::Optimistic, 4, 200, 10);
    let hd = sku("hotdog");
    let sold = st.terminals[0].sell(sale_req("hotdog", 12, false), 2_000);
    let SaleOutcome::Committed { change, .. } = sold else {
        panic!("an offline terminal sells past its rights under optimistic: {sold:?}")
    };
    assert!(
        st.pool
            .apply_remote(vec![change], 2_000)
            .rejected
            .is_empty()
    );
    assert_eq!(st.pool.rights(key(10).replica_id(), &hd), -2);
    st.pool.retire(key(13).replica_id(), 3_000).unwrap();
    // Every replica's positive rights: the pool's 160 and three terminals' 10.
    assert_eq!(st.pool.positive_rights(&hd), 190);
    // The stand's: the pool and the two active terminals that hold any, shared by three.
    let t = targets_with(&st.pool, Allocation::Proportional, &hd, 4_000, 0);
    assert_eq!(t.len(), 3, "{t:?}");
    assert!(t.values().all(|v| *v == 180 / 3), "{t:?}");
}

#[test]
fn a_terminals_own_returns_are_what_the_whole_plan_gives_it() {
    let mut st = stand(Policy::Strict, 4, 200, 10);
    let t0 = key(10).replica_id();
    // The pool hands one terminal far more than its share of hot dogs.
    st.pool
        .give(
            t0,
            std::collections::BTreeMap::from([(sku("hotdog"), 150)]),
            2_000,
        )
        .unwrap();
    for allocation in [Allocation::Proportional, Allocation::Velocity] {
        let whole = plan_allocation(&st.pool, allocation, 3_000);
        let mut returned = 0;
        for t in st.terminals.iter().map(Ledger::me) {
            let own: Vec<GivePlan> = whole.iter().filter(|p| p.from == t).cloned().collect();
            assert_eq!(plan_returns(&st.pool, allocation, 3_000, t), own, "{t}");
            returned += own.len();
        }
        assert!(
            returned > 0,
            "the terminal holding too much returns some: {whole:?}"
        );
    }
}
