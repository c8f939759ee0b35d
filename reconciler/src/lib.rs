//! # halftime-reconciler
//!
//! When a stand sold more of an item than it had (optimistic overdrafts, or a reclaimed
//! device that was in fact still selling), the customers of the sales that could not be
//! served get their money back, exactly once, however often processes crash, Stripe fails or
//! several reconcilers run at once.
//!
//! `decide` is the rule of who is refunded; `db` decides in the relay's store of record and
//! keeps the outbox; `pay` calls Stripe's refund API; `worker` is the loop; `fake_stripe` is a
//! stand-in for Stripe's API with its rules and injectable faults, for tests and the demo.

pub mod db;
pub mod decide;
pub mod fake_stripe;
pub mod pay;
pub mod worker;
