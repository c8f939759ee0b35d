//! # halftime-peer
//!
//! The daemon each terminal, kitchen display and (on a stand without the relay) the pool runs:
//! a thin driver around the stand engine (`halftime-engine`). It keeps every change in a redb
//! file, meshes with the stand's other replicas over libp2p (private-network key, noise, mDNS),
//! keeps a WebSocket uplink to the relay when given one (`--relay`), and serves the local POS
//! API and pages.
//!
//! Flow of a sale: `POST /v1/sales` → command to the node task → the engine commits and signs
//! (or waits while it asks other replicas for rights) → the change is written durably (group
//! commit) → 201 → the change is pushed to every peer.

pub mod api;
pub mod net;
pub mod node;
pub mod store;
pub mod uplink;
