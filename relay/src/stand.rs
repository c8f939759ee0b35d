//! One task per stand, the relay's driver of that stand's engine (quinn's driver pattern, as
//! in the terminal daemon): it feeds the engine the frames of every connected replica and
//! the timer, writes what the engine accepted to the store of record, and only then sends
//! what the engine wants sent. So a replica never hears the relay acknowledge (by its version
//! vector, or by passing a change on) anything that is not committed; while the database is
//! down the stand waits, retrying, and its replicas keep their changes until it is back.

use crate::store::{Batch, ChangeRow, ItemRow, Placement, StandRow, Store, StoreError};
use halftime_engine::{Elsewhere, Engine, EngineConfig, Event};
use halftime_ledger::{
    Admission, Applied, Ledger, NotAdmitted, Operation, PublicKey, ReplicaId, ReplicaKey, Role,
    SignedChange, Sku, StandId,
};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Commands queued to one stand.
pub const STAND_QUEUE_LEN: usize = 4_096;
/// Commands handled per group commit.
pub const GROUP_COMMIT_MAX: usize = 512;
/// Changes applied in one group, at most, before its commit starts (or, with one in flight,
/// before the stand checks whether it ended).
pub const GROUP_CHANGES_MAX: usize = 1_024;
/// Changes applied ahead of the commit in flight, at most, before the stand waits for it.
pub const AHEAD_MAX: usize = 4_096;
/// Frames queued to one connection before the stand stops giving it more (the engine keeps
/// the rest, and the vector exchange repairs whatever it drops).
pub const CONN_QUEUE_LEN: usize = 256;
/// Wake at least this often (a clock that jumps is noticed).
pub const TICK_MS: u64 = 200;
/// First wait before retrying a failed commit; doubles up to [`COMMIT_RETRY_MAX_MS`].
pub const COMMIT_RETRY_MS: u64 = 100;
pub const COMMIT_RETRY_MAX_MS: u64 = 5_000;
/// On Postgres, look for changes other instances stored at least this often (their
/// notifications can be missed while a listener reconnects).
pub const STORE_POLL_MS: u64 = 2_000;
/// Changes fetched per author per look.
pub const STORE_POLL_LIMIT: u32 = 1_024;
/// How often the store's refund decisions are looked for, to be written into the stand.
pub const REFUND_SCAN_MS: u64 = 1_000;
/// Decisions read per look.
pub const REFUND_SCAN_LIMIT: u32 = 256;
/// Every so often the look starts again from the first decision: ids are not committed in
/// order when several reconcilers decide at once, and writing is idempotent.
pub const REFUND_RESCAN_MS: u64 = 60_000;
/// Pause after a refund could not be written (the relay not enrolled, a store fault).
pub const REFUND_RETRY_MS: u64 = 30_000;
/// How often queued admin requests are looked for while a device stand's pool is connected.
pub const ADMIN_SCAN_MS: u64 = 1_000;
/// A request sent to the pool and not answered within this is sent again (the pool makes it
/// once; an answer or the request may have been dropped with a connection).
pub const ADMIN_RESEND_MS: u64 = 5_000;
/// Queued requests sent per look.
pub const ADMIN_SCAN_LIMIT: u32 = 64;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub enum StandCmd {
    /// A replica that proved its key wants in; the stand's ledger decides.
    Connect {
        key: PublicKey,
        conn: u64,
        out: mpsc::Sender<Vec<u8>>,
        reply: oneshot::Sender<Result<ReplicaId, NotAdmitted>>,
    },
    Frame {
        conn: u64,
        bytes: Vec<u8>,
    },
    /// The connection answered a ping.
    Heard {
        conn: u64,
    },
    Closed {
        conn: u64,
    },
    View {
        reply: oneshot::Sender<StandView>,
    },
    /// Another instance committed changes of this stand: fetch what this one lacks.
    Poll,
    /// Another instance handed on a rights request or answer (see [`RIGHTS_CHANNEL`]).
    Elsewhere(Elsewhere),
    /// An admin request was queued for this device stand's pool: send it if the pool is here.
    AdminQueued,
    /// Available per item as at `at_ms`.
    StockAt {
        at_ms: u64,
        reply: oneshot::Sender<BTreeMap<Sku, i64>>,
    },
    /// An admin operation, signed by the pool when the pool is here; answered once committed.
    Admin {
        op: AdminOp,
        reply: oneshot::Sender<Result<serde_json::Value, AdminError>>,
    },
}

pub use halftime_ledger::AdminOp;

/// Why an admin operation was not made (nothing was written).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminError {
    pub status: u16,
    pub error: &'static str,
    pub message: String,
}

impl AdminError {
    fn of(e: halftime_ledger::OpError) -> Self {
        use halftime_ledger::{OpError, Refusal};
        let (status, error) = match &e {
            OpError::Refused(Refusal::UnknownSku { .. } | Refusal::UnknownReplica { .. }) => {
                (404, "refused")
            }
            OpError::Refused(Refusal::Invalid { .. }) => (422, "refused"),
            OpError::Refused(_) => (409, "refused"),
            _ => (500, "internal"),
        };
        Self {
            status,
            error,
            message: e.to_string(),
        }
    }
}

impl std::fmt::Debug for StandCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StandCmd::Connect { conn, .. } => write!(f, "Connect({conn})"),
            StandCmd::Frame { conn, bytes } => write!(f, "Frame({conn}, {} bytes)", bytes.len()),
            StandCmd::Heard { conn } => write!(f, "Heard({conn})"),
            StandCmd::Closed { conn } => write!(f, "Closed({conn})"),
            StandCmd::View { .. } => write!(f, "View"),
            StandCmd::Admin { op, .. } => write!(f, "Admin({op:?})"),
            StandCmd::StockAt { at_ms, .. } => write!(f, "StockAt({at_ms})"),
            StandCmd::Poll => write!(f, "Poll"),
            StandCmd::Elsewhere(m) => write!(f, "Elsewhere({m:?})"),
            StandCmd::AdminQueued => write!(f, "AdminQueued"),
        }
    }
}

/// A stand at a glance, from the relay's replica.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct StandView {
    pub stand: String,
    pub placement: Placement,
    pub pool: String,
    /// Whether the relay is enrolled in the stand; null until the stand is loaded.
    pub member: Option<bool>,
    pub changes: usize,
    pub connected: Vec<String>,
    pub frames_rejected: u64,
    pub changes_rejected: u64,
    pub commit_failures: u64,
    /// Rights requests passed on to a holder for a replica that reaches it only here.
    pub rights_forwarded: u64,
    /// Rights requests no replica connected here could answer, handed to the other instances.
    pub rights_asked_elsewhere: u64,
    /// How the stand was loaded since this relay started.
    pub loaded: Loaded,
}

/// The handle other tasks hold.
#[derive(Debug, Clone)]
pub struct StandHandle {
    pub stand: StandId,
    pub tx: mpsc::Sender<StandCmd>,
    /// Each committed change of stock, as the items it moved (JSON), for live feeds.
    pub live: tokio::sync::broadcast::Sender<String>,
}

/// Live stock events buffered per subscriber.
pub const LIVE_QUEUE_LEN: usize = 256;

struct Conn {
    replica: ReplicaId,
    out: mpsc::Sender<Vec<u8>>,
}

pub struct StandTask {
    stand: StandId,
    placement: Placement,
    engine: Engine,
    store: Store,
    conns: BTreeMap<u64, Conn>,
    by_replica: BTreeMap<ReplicaId, u64>,
    commit_failures: u64,
    /// Changes fetched from the store (another instance's): not written again.
    from_store: std::collections::HashSet<(ReplicaId, u64)>,
    poll_due: bool,
    next_poll: Instant,
    live: tokio::sync::broadcast::Sender<String>,
    /// The lease on the pool's key, for a stand whose pool is here.
    lease: Option<crate::store::Lease>,
    /// Set once the lease is found lost: the task stops and says so on `stepped_down`.
    lost_lease: bool,
    stepped_down: Option<oneshot::Sender<()>>,
    /// Answers to admin operations, sent once their changes are committed.
    answers: Vec<(
        oneshot::Sender<Result<serde_json::Value, AdminError>>,
        serde_json::Value,
    )>,
    snapshot_every: usize,
    /// Changes held when the latest snapshot was written or loaded.
    snapshot_len: usize,
    loaded: Loaded,
    refunds: RefundScan,
    /// Queued admin requests sent to a device stand's pool, and when.
    admin_sent: BTreeMap<i64, Instant>,
    next_admin_scan: Instant,
    /// This instance, as named on the rights channel.
    instance: u64,
    /// Rights requests and answers for the other instances, handed on once committed.
    elsewhere: Vec<Elsewhere>,
}

/// Where writing the store's refund decisions into the stand has got to.
struct RefundScan {
    /// Decisions up to this id are written.
    after: i64,
    next: Instant,
    next_rescan: Instant,
    /// On a device stand, the lease that makes this instance the one that writes them.
    lease: Option<crate::store::Lease>,
}

/// How a stand came back from the store since the relay started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum Loaded {
    /// Its snapshot, then the changes stored after it.
    Snapshot { covered: usize, replayed: usize },
    /// Every stored change; `why` the snapshot was not used, if there was one.
    Replay { why: Option<String> },
    /// Not yet: it loads at its first uplink or admin call.
    NotYet,
}

impl std::fmt::Debug for StandTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StandTask({})", self.stand)
    }
}

/// A stand's snapshot is rewritten once this many changes were added since the last.
pub const SNAPSHOT_EVERY: usize = 20_000;

/// The Postgres channel on which the instances of a relay hand one another the rights requests
/// and answers of replicas connected to another instance ([`Elsewhere`]).
pub const RIGHTS_CHANNEL: &str = "halftime_rights";

/// Postgres refuses a notification of 8,000 bytes or more.
const MAX_NOTIFY_BYTES: usize = 7_900;

/// One message on [`RIGHTS_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Handed {
    /// The instance that sent it (each instance hears its own notifications too).
    pub instance: u64,
    pub stand: StandId,
    pub msg: Elsewhere,
}

impl Handed {
    /// The notification's text, `None` if it cannot fit even without the give it carries (the
    /// give reaches every replica as a stored change anyway).
    pub fn encode(instance: u64, stand: &StandId, msg: Elsewhere) -> Option<String> {
        let mut h = Handed {
            instance,
            stand: stand.clone(),
            msg,
        };
        let text = serde_json::to_string(&h).ok()?;
        if text.len() <= MAX_NOTIFY_BYTES {
            return Some(text);
        }
        if let Elsewhere::Answer { change, .. } = &mut h.msg {
            *change = None;
        }
        serde_json::to_string(&h)
            .ok()
            .filter(|t| t.len() <= MAX_NOTIFY_BYTES)
    }

    /// A notification another instance sent; `None` for this instance's own, or for anything
    /// too long or malformed.
    pub fn decode(payload: &str, me: u64) -> Option<Handed> {
        if payload.len() > MAX_NOTIFY_BYTES {
            return None;
        }
        serde_json::from_str::<Handed>(payload)
            .ok()
            .filter(|h| h.instance != me)
    }
}

/// Load a stand from the store (from its snapshot and the changes stored after it when the
/// snapshot is sound, else every stored change, re-checked) and start its task, which writes
/// a new snapshot every `snapshot_every` changes (0: never). The receiver fires if the task
/// stopped because it lost the pool's lease.
pub async fn start(
    store: Store,
    relay_key: ReplicaKey,
    row: StandRow,
    lease: Option<crate::store::Lease>,
    snapshot_every: usize,
    instance: u64,
) -> Result<(StandHandle, oneshot::Receiver<()>), StoreError> {
    let t0 = Instant::now();
    let (stepped_down, lost) = oneshot::channel();
    let key = match (row.placement, row.pool_secret) {
        (Placement::Relay, Some(secret)) => ReplicaKey::from_seed(secret),
        (Placement::Relay, None) => {
            return Err(StoreError::Invalid(format!(
                "stand {}: its pool is at the relay but no pool key is stored",
                row.stand
            )));
        }
        (Placement::Device, _) => relay_key,
    };
    let failed = |e: tokio::task::JoinError| {
        StoreError::Invalid(format!("loading stand {}: {e}", row.stand))
    };
    let mut loaded = Loaded::Replay { why: None };
    let mut from_snapshot = None;
    let mut read_ms = 0;
    if let Some(snap) = store.stand_snapshot(&row.stand).await? {
        // Only the changes stored after the snapshot are read; the ledger reads the others'
        // bytes from the store when a replica needs them.
        let upto = store.stand_snapshot_upto(&row.stand).await?.unwrap_or(0);
        let tail = store.load_changes_after(&row.stand, upto).await?;
        read_ms = t0.elapsed().as_millis() as u64;
        let (k, s, p) = (key.clone(), row.stand.clone(), row.pool_key);
        let bytes = Box::new(store.change_bytes(&row.stand));
        let load = tokio::task::spawn_blocking(move || {
            Ledger::from_snapshot_with(k, s, p, &snap, tail, bytes, now_ms())
        })
        .await
        .map_err(failed)?;
        match load {
            Ok((l, report, load)) => {
                loaded = Loaded::Snapshot {
                    covered: load.covered,
                    replayed: load.replayed,
                };
                from_snapshot = Some((l, report));
            }
            Err(e) => {
                tracing::warn!(stand = %row.stand, error = %e, "the stand's snapshot cannot be used; replaying every stored change");
                loaded = Loaded::Replay {
                    why: Some(e.to_string()),
                };
            }
        }
    }
    let (ledger, report) = match from_snapshot {
        Some(r) => r,
        None => {
            let t = Instant::now();
            let stored = store.load_changes(&row.stand).await?;
            read_ms += t.elapsed().as_millis() as u64;
            let (s, p) = (row.stand.clone(), row.pool_key);
            let bytes = Box::new(store.change_bytes(&row.stand));
            tokio::task::spawn_blocking(move || {
                Ledger::restore_with(key, s, p, stored, bytes, now_ms())
            })
            .await
            .map_err(failed)?
        }
    };
    let n = ledger.len();
    if !report.rejected.is_empty() || report.pending > 0 {
        tracing::error!(
            stand = %row.stand,
            rejected = report.rejected.len(),
            pending = report.pending,
            "stored changes did not all replay; the store of record needs checking"
        );
    }
    tracing::info!(
        stand = %row.stand,
        changes = n,
        placement = ?row.placement,
        loaded = ?loaded,
        read_ms,
        ms = t0.elapsed().as_millis() as u64,
        "stand loaded"
    );
    // Every instance on one Postgres serves a device stand, each reaching some of its replicas
    // (a stand whose pool is here is served by the lease holder alone).
    let elsewhere =
        store.backend() == crate::store::Backend::Postgres && row.placement == Placement::Device;
    let cfg = EngineConfig {
        hub: true,
        elsewhere,
        ..EngineConfig::default()
    };
    let task = StandTask {
        stand: row.stand.clone(),
        placement: row.placement,
        engine: Engine::new(ledger, cfg, now_ms()),
        store,
        conns: BTreeMap::new(),
        by_replica: BTreeMap::new(),
        commit_failures: 0,
        from_store: Default::default(),
        poll_due: false,
        next_poll: Instant::now(),
        lease,
        lost_lease: false,
        stepped_down: Some(stepped_down),
        live: tokio::sync::broadcast::channel(LIVE_QUEUE_LEN).0,
        answers: Vec::new(),
        snapshot_every,
        snapshot_len: match &loaded {
            Loaded::Snapshot { covered, .. } => *covered,
            Loaded::Replay { .. } | Loaded::NotYet => 0,
        },
        loaded,
        refunds: RefundScan {
            after: 0,
            next: Instant::now(),
            next_rescan: Instant::now() + Duration::from_millis(REFUND_RESCAN_MS),
            lease: None,
        },
        admin_sent: BTreeMap::new(),
        next_admin_scan: Instant::now(),
        instance,
        elsewhere: Vec::new(),
    };
    let live = task.live.clone();
    let (tx, rx) = mpsc::channel(STAND_QUEUE_LEN);
    tokio::spawn(task.run(rx));
    let handle = StandHandle {
        stand: row.stand,
        tx,
        live,
    };
    Ok((handle, lost))
}

/// A commit in flight, and what waits on it.
struct InFlight {
    /// The number of failed attempts before it went through, or the lease found lost.
    task: tokio::task::JoinHandle<Result<u64, StoreError>>,
    /// Nothing more is applied until it ends: it carries our own changes (the engine sends
    /// nothing until they are durable) or a snapshot is due (it must cover stored changes only).
    barrier: bool,
    /// Changes the ledger held when it started.
    len: usize,
    /// Our own changes up to this seq are in it.
    persisted: Option<u64>,
    held: Held,
}

/// What the relay says once a commit ends.
struct Held {
    frames: Vec<(u64, Vec<u8>)>,
    /// What the pool answered to queued admin requests, recorded once its changes are stored.
    pool_answers: Vec<(u64, Result<u64, String>)>,
    answers: Vec<(
        oneshot::Sender<Result<serde_json::Value, AdminError>>,
        serde_json::Value,
    )>,
    elsewhere: Vec<Elsewhere>,
}

/// Write one batch to the store of record, retrying with backoff until it is written or the
/// pool's lease is found lost; returns the failed attempts.
async fn write(
    store: Store,
    stand: StandId,
    batch: Batch,
    fence: Option<crate::store::Fence>,
    live: tokio::sync::broadcast::Sender<String>,
) -> Result<u64, StoreError> {
    let mut failures = 0;
    let mut backoff = COMMIT_RETRY_MS;

    loop {
        match store.commit_fenced(&stand, &batch, now_ms(), fence).await {
            Ok(()) => {
                if !batch.items.is_empty() && live.receiver_count() > 0 {
                    let ev = serde_json::json!({"stand": stand.to_string(), "items": batch.items});
                    let _ = live.send(ev.to_string());
                }
                return Ok(failures);
            }
            Err(e @ StoreError::LeaseLost(_)) => return Err(e),
            Err(e) => {
                failures += 1;
                tracing::error!(%stand, error = %e, retry_ms = backoff,
                    "could not commit to the store of record; holding every acknowledgement until it works");
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                backoff = (backoff * 2).min(COMMIT_RETRY_MAX_MS);
            }
        }
    }
}

impl StandTask {
    /// Commands are applied while the previous group's commit is in flight (on another
    /// thread), so the engine and the store work at once. What a group makes the relay say (its
    /// frames, admin answers, rights handed on) is taken from the engine when the group's
    /// commit starts and sent only once it has ended: nothing applied is acknowledged before
    /// it is stored.
    async fn run(mut self, mut rx: mpsc::Receiver<StandCmd>) {
        let mut flight: Option<InFlight> = None;
        let mut open = true;
        loop {
            let wake = self.engine.poll_timeout();
            let wait = Duration::from_millis(wake.saturating_sub(now_ms()).min(TICK_MS));
            let accepting = open
                && flight.as_ref().is_none_or(|f| {
                    !f.barrier && self.engine.ledger().len() < f.len.saturating_add(AHEAD_MAX)
                });
            let landed = async {
                match flight.as_mut() {
                    Some(f) => (&mut f.task).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = rx.recv(), if accepting => match cmd {
                    None => open = false,
                    Some(cmd) => {
                        let len = self.engine.ledger().len();
                        self.handle(cmd);
                        let mut n = 1;
                        while n < GROUP_COMMIT_MAX
                            && self.engine.ledger().len() < len.saturating_add(GROUP_CHANGES_MAX)
                        {
                            match rx.try_recv() {
                                Ok(c) => self.handle(c),
                                Err(_) => break,
                            }
                            n += 1;
                        }
                    }
                },
                done = landed => {
                    if let Some(f) = flight.take() {
                        self.landed(f, done).await;
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
            if self.lost_lease {
                break;
            }
            let now = now_ms();
            if self.engine.poll_timeout() <= now {
                self.engine.handle_timeout(now);
            }
            if self.store.backend() == crate::store::Backend::Postgres
                && (self.poll_due || Instant::now() >= self.next_poll)
            {
                self.poll_due = false;
                self.next_poll = Instant::now() + Duration::from_millis(STORE_POLL_MS);
                self.poll_store().await;
            }
            if Instant::now() >= self.next_admin_scan {
                self.next_admin_scan = Instant::now() + Duration::from_millis(ADMIN_SCAN_MS);
                self.send_admin_requests().await;
            }
            if Instant::now() >= self.refunds.next {
                self.refunds.next = Instant::now() + Duration::from_millis(REFUND_SCAN_MS);
                self.record_refunds().await;
            }
            if flight.is_none() {
                flight = self.start_commit().await;
                if flight.is_none() && !open {
                    break;
                }
            }
        }
        tracing::info!(stand = %self.stand, "stand stopped");
        if self.lost_lease {
            if let Some(tx) = self.stepped_down.take() {
                let _ = tx.send(());
            }
        }
    }

    /// A commit ended: on success, send what waited on it.
    async fn landed(
        &mut self,
        f: InFlight,
        done: Result<Result<u64, StoreError>, tokio::task::JoinError>,
    ) {
        match done {
            Ok(Ok(failures)) => self.commit_failures += failures,
            Ok(Err(_)) => {
                tracing::error!(stand = %self.stand,
                    "this instance lost the pool's lease; stepping down (nothing it signed since is stored or acknowledged)");
                self.lost_lease = true;
                return;
            }
            Err(e) => {
                // Nothing of this group was acknowledged; the stand starts again from the
                // store, where another instance (or this one) takes it up.
                tracing::error!(stand = %self.stand, error = %e,
                    "a commit to the store of record failed unexpectedly; stepping down");
                self.lost_lease = true;
                return;
            }
        }
        for (conn, frame) in f.held.frames {
            if let Some(c) = self.conns.get(&conn) {
                let _ = c.out.try_send(frame);
            }
        }
        match f.persisted {
            Some(seq) => {
                // Our own changes are durable: the engine releases what waited on them,
                // their effects for the projections among them. The answers go once those
                // are written too (the next commit, started at once).
                self.engine.persisted_through(seq);
                let mut answers = f.held.answers;
                answers.append(&mut self.answers);
                self.answers = answers;
            }
            None => {
                for (reply, answer) in f.held.answers {
                    let _ = reply.send(Ok(answer));
                }
            }
        }
        self.hand_elsewhere(f.held.elsewhere);
        self.finish_admin_requests(f.held.pool_answers).await;
    }

    fn handle(&mut self, cmd: StandCmd) {
        let now = now_ms();
        match cmd {
            StandCmd::Connect {
                key,
                conn,
                out,
                reply,
            } => {
                let admitted = self.engine.ledger().admission(&key);
                if let Ok(a) = admitted {
                    let replica = a.replica();
                    // A replica that reconnects replaces its old connection.
                    if let Some(old) = self.by_replica.insert(replica, conn) {
                        self.conns.remove(&old);
                        self.engine.peer_down(replica, now);
                    }
                    self.conns.insert(conn, Conn { replica, out });
                    match a {
                        Admission::Member(_) => {
                            self.engine.peer_up(replica, now);
                            tracing::info!(stand = %self.stand, %replica, "replica connected");
                        }
                        Admission::HandOver(_) => {
                            self.engine.peer_up_hand_over(replica, now);
                            tracing::warn!(stand = %self.stand, %replica,
                                "a retired replica connected: it may hand over what it sold before it was retired, and is sent nothing");
                        }
                    }
                }
                let _ = reply.send(admitted.map(|a| a.replica()));
            }
            StandCmd::Frame { conn, bytes } => {
                let Some(c) = self.conns.get(&conn) else {
                    return;
                };
                let replica = c.replica;
                if let Err(e) = self.engine.handle_frame(replica, &bytes, now) {
                    tracing::warn!(stand = %self.stand, %replica, error = %e, "rejected a frame");
                }
            }
            StandCmd::Heard { conn } => {
                if let Some(c) = self.conns.get(&conn) {
                    self.engine.heard(c.replica, now);
                }
            }
            StandCmd::Closed { conn } => {
                if let Some(c) = self.conns.remove(&conn) {
                    if self.by_replica.get(&c.replica) == Some(&conn) {
                        self.by_replica.remove(&c.replica);
                        self.engine.peer_down(c.replica, now);
                        tracing::info!(stand = %self.stand, replica = %c.replica, "replica disconnected");
                    }
                }
            }
            StandCmd::View { reply } => {
                let _ = reply.send(self.view());
            }
            StandCmd::Poll => self.poll_due = true,
            StandCmd::Elsewhere(msg) => self.engine.handle_elsewhere(msg, now),
            StandCmd::AdminQueued => self.next_admin_scan = Instant::now(),
            StandCmd::StockAt { at_ms, reply } => {
                let t = halftime_ledger::Hlc::new(at_ms, u16::MAX);
                let _ = reply.send(self.engine.stock_at_time(t));
            }
            StandCmd::Admin { op, reply } => match self.admin(op, now) {
                Ok(answer) => self.answers.push((reply, answer)),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
        }
    }

    /// Make an admin operation as the pool, here (a stand device's pool gets it queued over
    /// its uplink instead; there the ledger refuses this replica as not the pool).
    fn admin(&mut self, op: AdminOp, now: u64) -> Result<serde_json::Value, AdminError> {
        let done = self.engine.admin(op, None, now).map_err(AdminError::of)?;
        let mut answer =
            serde_json::json!({"stand": self.stand.to_string(), "pool_seq": done.pool_seq});
        if let Some(view) = done.reclaim {
            answer = serde_json::to_value(view).unwrap_or(answer);
        }
        Ok(answer)
    }

    fn view(&self) -> StandView {
        let l = self.engine.ledger();
        let s = self.engine.stats();
        StandView {
            stand: self.stand.to_string(),
            placement: self.placement,
            pool: l.pool().to_string(),
            member: Some(l.role().is_some()),
            changes: l.len(),
            connected: self.by_replica.keys().map(ToString::to_string).collect(),
            frames_rejected: s.frames_rejected,
            changes_rejected: s.changes_rejected,
            commit_failures: self.commit_failures,
            rights_forwarded: s.rights_requests_forwarded,
            rights_asked_elsewhere: s.rights_asked_elsewhere,
            loaded: self.loaded.clone(),
        }
    }

    fn snapshot_due(&self) -> bool {
        self.snapshot_every != 0
            && self.engine.ledger().len().saturating_sub(self.snapshot_len) >= self.snapshot_every
    }

    /// Once `snapshot_every` changes came in since the last snapshot, write one. Called only
    /// when nothing is in flight and nothing is left to write, so the snapshot covers only
    /// stored changes; a failure is logged and retried after as many changes again.
    async fn snapshot(&mut self) {
        if !self.snapshot_due() {
            return;
        }
        let held = self.engine.ledger().len();
        let t = Instant::now();
        let bytes = self.engine.snapshot();
        self.snapshot_len = held;
        match self
            .store
            .put_stand_snapshot(&self.stand, held, &bytes, now_ms())
            .await
        {
            Ok(()) => tracing::info!(stand = %self.stand, covers = held, bytes = bytes.len(),
                ms = t.elapsed().as_millis() as u64, "snapshot written"),
            Err(e) => tracing::error!(stand = %self.stand, error = %e,
                "could not write the stand's snapshot; the next start replays more"),
        }
    }

    /// Start writing everything the engine accepted or made since the last commit started,
    /// holding what it makes the relay say until the write ends. With nothing to write,
    /// everything applied is stored: send what waits, and write a snapshot when one is due.
    async fn start_commit(&mut self) -> Option<InFlight> {
        let mut batch = Batch::default();
        let mut local: Vec<SignedChange> = Vec::new();
        let mut applied: Vec<Applied> = Vec::new();
        let mut answers: Vec<(u64, Result<u64, String>)> = Vec::new();
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                Event::Persist(changes) => local.extend(changes),
                Event::Received { changes, ids } => {
                    for (change, (actor, seq)) in changes.into_iter().zip(ids) {
                        self.push_row(&mut batch, actor, seq, change);
                    }
                }
                Event::Changed(a) => applied.extend(a),
                Event::Rejected { from, rejections } => {
                    let who = from.map_or_else(|| "unknown".to_owned(), |r| r.to_string());
                    for r in &rejections {
                        tracing::warn!(stand = %self.stand, from = %who, rule = r.rule(), error = %r, "rejected a change");
                        *batch.rejections.entry((who.clone(), r.rule())).or_insert(0) += 1;
                    }
                }
                Event::PeerGone(replica) => {
                    if let Some(conn) = self.by_replica.remove(&replica) {
                        tracing::info!(stand = %self.stand, %replica, "replica silent; dropping it");
                        self.conns.remove(&conn);
                    }
                }
                Event::Fault(why) => {
                    tracing::error!(stand = %self.stand, %why, "an operation of the relay's own failed");
                }
                Event::AdminAnswered { from, id, outcome } => {
                    if from == self.engine.ledger().pool() {
                        answers.push((id, outcome));
                    }
                }
                Event::Elsewhere(msg) => self.elsewhere.push(msg),
                Event::Committed { .. } | Event::Refused { .. } => {}
            }
        }
        let pool = self.engine.ledger().pool();
        if self.placement == Placement::Device {
            answers.extend(
                applied
                    .iter()
                    .filter(|a| a.author == pool)
                    .filter_map(|a| a.req.map(|id| (id, Ok(a.seq)))),
            );
        }
        let me = self.engine.ledger().me();
        let last = self.engine.ledger().local_seq();
        let first = last.saturating_sub(local.len() as u64) + 1;
        for (change, seq) in local.iter().cloned().zip(first..) {
            self.push_row(&mut batch, me, seq, change);
        }
        self.project(&mut batch, &applied);
        self.from_store.clear();
        if batch.is_empty() {
            self.finish_admin_requests(answers).await;
            for (reply, answer) in std::mem::take(&mut self.answers) {
                let _ = reply.send(Ok(answer));
            }
            let elsewhere = std::mem::take(&mut self.elsewhere);
            self.hand_elsewhere(elsewhere);
            self.flush();
            self.snapshot().await;
            return None;
        }
        let barrier = !local.is_empty() || self.snapshot_due();
        let held = Held {
            // Polled now, before anything more is applied: they say what this batch stores.
            // With our own changes in it the engine sends nothing until they are durable.
            frames: self.poll_frames(),
            pool_answers: answers,
            answers: std::mem::take(&mut self.answers),
            elsewhere: std::mem::take(&mut self.elsewhere),
        };
        let fence = self.lease.as_ref().and_then(crate::store::Lease::fence);
        let task = tokio::spawn(write(
            self.store.clone(),
            self.stand.clone(),
            batch,
            fence,
            self.live.clone(),
        ));
        // A task spawned here waits in this worker's own slot, where no other worker takes
        // it, until this task yields: yield now, or the write waits out the next group.
        tokio::task::yield_now().await;
        Some(InFlight {
            task,
            barrier,
            len: self.engine.ledger().len(),
            persisted: (!local.is_empty()).then_some(last),
            held,
        })
    }

    /// Hand the other instances what the engine passes on to them, each message on its own
    /// (they are small, and a lost one costs what a lost ask costs: the asker asks again).
    fn hand_elsewhere(&self, msgs: Vec<Elsewhere>) {
        for msg in msgs {
            let Some(payload) = Handed::encode(self.instance, &self.stand, msg) else {
                continue;
            };
            let store = self.store.clone();
            let stand = self.stand.clone();
            tokio::spawn(async move {
                if let Err(e) = store.notify(RIGHTS_CHANNEL, &payload).await {
                    tracing::warn!(%stand, error = %e, "could not hand a rights request or answer to the other instances");
                }
            });
        }
    }

    /// Send a device stand's queued admin requests to its pool, when the pool is connected
    /// here; a request unanswered for a while is sent again.
    async fn send_admin_requests(&mut self) {
        let pool = self.engine.ledger().pool();
        if self.placement != Placement::Device || !self.by_replica.contains_key(&pool) {
            return;
        }
        let open = match self
            .store
            .open_admin_requests(&self.stand, ADMIN_SCAN_LIMIT)
            .await
        {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(stand = %self.stand, error = %e, "could not read queued admin requests");
                return;
            }
        };
        let now = Instant::now();
        self.admin_sent
            .retain(|id, _| open.iter().any(|(o, _)| o == id));
        for (id, op) in open {
            let due = self
                .admin_sent
                .get(&id)
                .is_none_or(|t| now.duration_since(*t) >= Duration::from_millis(ADMIN_RESEND_MS));
            let Ok(wire_id) = u64::try_from(id) else {
                continue;
            };
            if due && self.engine.request_admin(pool, wire_id, op) {
                tracing::info!(stand = %self.stand, id, "admin request sent to the pool");
                self.admin_sent.insert(id, now);
            }
        }
    }

    /// Record the pool's answers to admin requests.
    async fn finish_admin_requests(&mut self, answers: Vec<(u64, Result<u64, String>)>) {
        for (id, outcome) in answers {
            let Ok(id) = i64::try_from(id) else {
                continue;
            };
            self.admin_sent.remove(&id);
            match &outcome {
                Ok(seq) => {
                    tracing::info!(stand = %self.stand, id, pool_seq = seq, "the pool carried out an admin request")
                }
                Err(why) => {
                    tracing::warn!(stand = %self.stand, id, %why, "the pool refused an admin request")
                }
            }
            if let Err(e) = self
                .store
                .finish_admin_request(&self.stand, id, &outcome, now_ms())
                .await
            {
                tracing::warn!(stand = %self.stand, id, error = %e, "could not record the pool's answer; it is asked again");
            }
        }
    }

    /// Write the store's refund decisions into the stand's document, so the terminals' and the
    /// kitchen's pages show them: as the pool when it is here, else as the relay. One instance
    /// writes (the pool's lease holder, or the holder of the stand's refund lease), and only
    /// once the store holds no change of its key that it lacks; a line already recorded is
    /// skipped, so reading a decision again writes nothing.
    async fn record_refunds(&mut self) {
        if Instant::now() >= self.refunds.next_rescan {
            self.refunds.next_rescan = Instant::now() + Duration::from_millis(REFUND_RESCAN_MS);
            self.refunds.after = 0;
        }
        let retry_later = |s: &mut Self| {
            s.refunds.next = Instant::now() + Duration::from_millis(REFUND_RETRY_MS);
        };
        let rows = match self
            .store
            .refund_decisions_after(&self.stand, self.refunds.after, REFUND_SCAN_LIMIT)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(stand = %self.stand, error = %e, "could not read refund decisions");
                return retry_later(self);
            }
        };
        if rows.is_empty() {
            return;
        }
        if self.placement == Placement::Device && self.refunds.lease.is_none() {
            match self.store.try_refund_lease(&self.stand).await {
                Ok(crate::store::Lease::Elsewhere) => return,
                Ok(l) => self.refunds.lease = Some(l),
                Err(e) => {
                    tracing::warn!(stand = %self.stand, error = %e, "could not try the refund lease");
                    return retry_later(self);
                }
            }
        }
        let me = self.engine.ledger().me();
        match self.store.actor_heads(&self.stand).await {
            Ok(h) if h.get(&me).copied().unwrap_or(0) > self.engine.ledger().local_seq() => {
                self.poll_due = true;
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(stand = %self.stand, error = %e, "could not read the store's heads");
                return retry_later(self);
            }
        }
        let now = now_ms();
        // Decisions up to the first whose sale is not here yet are done; the rest are written
        // now and read again next time (writing is idempotent).
        let mut advance = true;
        for (id, sale, sku, units) in rows {
            let parsed = (
                sale.parse::<halftime_ledger::SaleId>(),
                Sku::new(sku.clone()),
                u64::try_from(units),
            );
            let (Ok(sale), Ok(sku), Ok(units)) = parsed else {
                tracing::error!(stand = %self.stand, id, %sale, %sku, units, "a stored refund decision does not parse; skipped");
                if advance {
                    self.refunds.after = id;
                }
                continue;
            };
            if self.engine.ledger().sale(sale).is_none() {
                advance = false;
                continue;
            }
            let have = self.engine.ledger().refunded_by_me(sale, &sku);
            if have < units {
                let r = self.engine.local_op(now, |l, now| {
                    Ok((l.refund(sale, &sku, units - have, now)?, ()))
                });
                if let Err(e) = r {
                    tracing::warn!(stand = %self.stand, %sale, %sku, error = %e, "could not record a refund in the stand");
                    return retry_later(self);
                }
            }
            if advance {
                self.refunds.after = id;
            }
        }
    }

    /// Fetch what other instances stored and this replica lacks, author by author.
    async fn poll_store(&mut self) {
        let heads = match self.store.actor_heads(&self.stand).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(stand = %self.stand, error = %e, "could not look for other instances' changes");
                return;
            }
        };
        let mine = self.engine.ledger().version_vector();
        let mut got = Vec::new();
        for (actor, stored) in heads {
            let have = mine.get(&actor).copied().unwrap_or(0);
            if stored <= have {
                continue;
            }
            match self
                .store
                .changes_of(&self.stand, actor, have, STORE_POLL_LIMIT)
                .await
            {
                Ok(changes) => {
                    for (seq, c) in (have + 1..).zip(changes) {
                        self.from_store.insert((actor, seq));
                        got.push(c);
                    }
                }
                Err(e) => {
                    tracing::warn!(stand = %self.stand, %actor, error = %e, "could not fetch stored changes");
                }
            }
        }
        if !got.is_empty() {
            tracing::debug!(stand = %self.stand, changes = got.len(), "changes from another instance");
            self.engine.handle_stored(got, now_ms());
        }
    }

    fn push_row(&mut self, batch: &mut Batch, actor: ReplicaId, seq: u64, change: SignedChange) {
        if self.from_store.remove(&(actor, seq)) {
            return;
        }
        match self.engine.ledger().change_info(actor, seq) {
            Some(info) => batch.changes.push(ChangeRow {
                actor,
                seq,
                info,
                change,
            }),
            None => {
                tracing::error!(stand = %self.stand, %actor, seq, "an accepted change is not held")
            }
        }
    }

    /// The projections' rows that `applied` moved: every touched item, its rights per
    /// replica, new sales and voids.
    fn project(&self, batch: &mut Batch, applied: &[Applied]) {
        let l = self.engine.ledger();
        let mut touched: BTreeSet<Sku> = BTreeSet::new();
        for a in applied {
            match &a.op {
                Operation::Sale(rec) => {
                    touched.extend(rec.lines.iter().map(|x| x.sku.clone()));
                    batch.sales.push(rec.clone());
                }
                Operation::Void { sale, units } => {
                    touched.extend(units.keys().cloned());
                    batch.voids.push(*sale);
                }
                Operation::Restock { units, .. }
                | Operation::Adjust { units, .. }
                | Operation::Give { units, .. }
                | Operation::Reclaim { units, .. } => touched.extend(units.keys().cloned()),
                Operation::Mark { sku, .. } => {
                    touched.insert(sku.clone());
                }
                Operation::Refund { .. } => {}
                Operation::Catalog { items } => touched.extend(items.iter().map(|i| i.sku.clone())),
                Operation::Genesis { .. } | Operation::Enrol { .. } | Operation::Retire { .. } => {}
            }
        }
        let holders: Vec<ReplicaId> = std::iter::once(l.pool())
            .chain(
                l.replicas()
                    .iter()
                    .filter(|(_, i)| i.role == Role::Terminal)
                    .map(|(r, _)| *r),
            )
            .collect();
        for sku in touched {
            let Some(item) = l.catalog().get(&sku) else {
                continue;
            };
            batch.items.push(ItemRow {
                name: item.name.clone(),
                price_cents: i64::try_from(item.price_cents).unwrap_or(i64::MAX),
                total_in: i64::try_from(l.total_in(&sku)).unwrap_or(i64::MAX),
                available: l.available(&sku),
                marked_off: l.is_marked_off(&sku),
                sku: sku.clone(),
            });
            for r in &holders {
                batch.rights.push((sku.clone(), *r, l.rights(*r, &sku)));
            }
        }
    }

    /// Hand each connection what the engine has for it, within its queue.
    /// What the engine has to send, as much as each connection's queue takes, not sent yet.
    fn poll_frames(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut frames = Vec::new();
        for (id, c) in &self.conns {
            for _ in 0..c.out.capacity() {
                let Some(m) = self.engine.poll_transmit_to(c.replica) else {
                    break;
                };
                frames.push((*id, m.encode(&self.stand)));
            }
        }
        frames
    }

    fn flush(&mut self) {
        let stand = self.stand.clone();
        for c in self.conns.values() {
            while c.out.capacity() > 0 {
                let Some(m) = self.engine.poll_transmit_to(c.replica) else {
                    break;
                };
                if c.out.try_send(m.encode(&stand)).is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn answer(change_len: usize) -> Elsewhere {
        Elsewhere::Answer {
            beneficiary: ReplicaKey::from_seed([3; 32]).replica_id(),
            sku: Sku::new("soda").unwrap(),
            granted: 2,
            change: Some(SignedChange {
                bytes: vec![7; change_len],
                signature: vec![9; 64],
            }),
        }
    }

    #[test]
    fn what_one_instance_hands_on_reaches_the_others_and_nothing_else_gets_in() {
        let stand = StandId::new("north").unwrap();
        let text = Handed::encode(1, &stand, answer(300)).unwrap();
        let h = Handed::decode(&text, 2).unwrap();
        assert_eq!((h.instance, &h.stand, &h.msg), (1, &stand, &answer(300)));
        // Its own notification comes back to the sender too: ignored.
        assert_eq!(Handed::decode(&text, 1), None);

        // A give too large for a notification goes without it (it is stored and fetched).
        let text = Handed::encode(1, &stand, answer(4_000)).unwrap();
        assert!(text.len() <= MAX_NOTIFY_BYTES);
        match Handed::decode(&text, 2).unwrap().msg {
            Elsewhere::Answer {
                granted, change, ..
            } => assert_eq!((granted, change), (2, None)),
            other => panic!("{other:?}"),
        }

        // Built by hand: too long, not JSON, a bad id, an unknown kind.
        let long = format!(
            "{{\"instance\":1,\"pad\":\"{}\"}}",
            "x".repeat(MAX_NOTIFY_BYTES)
        );
        let ask = |rid: &str, kind: &str| {
            format!(
                r#"{{"instance":1,"stand":"north","msg":{{"kind":"{kind}","beneficiary":"{rid}","sku":"soda","want":1,"urgent":false}}}}"#
            )
        };
        assert!(Handed::decode(&ask("0303030303030303", "ask"), 2).is_some());
        for bad in [
            long,
            "{\"instance\":".to_owned(),
            ask("not-hex", "ask"),
            ask("0303030303030303", "grab"),
            ask("0303030303030303", "ask").replace("\"north\"", "\"a/b\""),
        ] {
            assert_eq!(Handed::decode(&bad, 2), None, "{bad}");
        }
    }
}
