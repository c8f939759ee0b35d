//! # halftime-relay
//!
//! The cloud side of Halftime: a validating replica of every stand it serves, their store of
//! record (Postgres, or a SQLite file by default, through one sqlx code path), their uplink
//! (a WebSocket per replica carrying the same frames as the stand mesh) and the admins' door.
//!
//! Each stand runs as one task driving that stand's `halftime_engine::Engine`, the same
//! engine the terminals run: every frame is checked by the ledger's own receive path, and
//! the relay adds no rule of its own. `store` keeps the append-only `changes` table and the
//! projections; `stand` is the driver; `uplink` the WebSocket end; `server` the routes.

pub mod audit;
pub mod held;
pub mod openapi;
pub mod server;
pub mod stand;
pub mod store;
pub mod uplink;
