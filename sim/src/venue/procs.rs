//! The venue's processes: finding the programs, one-shot commands, and the long-running
//! children, every one of which is stopped on every way out (return, error, Ctrl-C, panic).

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a child has to stop after SIGTERM before it is killed.
pub const STOP_GRACE_MS: u64 = 5_000;

/// The three programs the venue runs, found beside this one.
#[derive(Debug, Clone)]
pub struct Programs {
    pub peer: PathBuf,
    pub relay: PathBuf,
    pub reconciler: PathBuf,
}

impl Programs {
    pub fn beside_this_one() -> Result<Self> {
        let me = std::env::current_exe().context("cannot tell where halftime-sim is")?;
        let dir = me
            .parent()
            .context("halftime-sim has no parent folder")?
            .to_path_buf();
        let find = |name: &str| -> Result<PathBuf> {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                bail!(
                    "{} is missing: the venue runs the real programs built beside halftime-sim. \
                     Build them with `cargo build --release --locked --workspace --bins` (then run \
                     target/release/halftime-sim venue) or run ./scripts/venue.sh, which does both",
                    p.display()
                )
            }
        };
        Ok(Self {
            peer: find("halftime-peer")?,
            relay: find("halftime-relay")?,
            reconciler: find("halftime-reconciler")?,
        })
    }
}

/// Where the venue's ports are taken from: below the kernel's usual ephemeral range
/// (32768–60999), so no outgoing connection of any program can take one between the check
/// here and the child's bind.
const FIRST_PORT: u32 = 10_000;
const PORT_SPAN: u32 = 22_000;

/// A loopback TCP port that is free now, never handed out twice by this process.
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Each process starts somewhere else, so two venues side by side rarely meet.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % PORT_SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..PORT_SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let Ok(port) = u16::try_from(FIRST_PORT + n % PORT_SPAN) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!(
        "no free loopback port in {FIRST_PORT}..{}",
        FIRST_PORT + PORT_SPAN
    )
}

/// Run `bin args` to completion; its standard output, or an error carrying its standard error.
pub fn run(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            bin.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("a program printed something that is not UTF-8")
}

/// The last word of `out`'s line that starts with `prefix`.
pub fn field(out: &str, prefix: &str) -> Result<String> {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_owned)
        .with_context(|| format!("no `{prefix}` line in: {out}"))
}

/// A long-running child: its name, and the log its standard error goes to.
#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
}

/// Every child the venue started. Cloned handles share the list; `stop_all` (also run on
/// drop of the last handle) stops them all.
#[derive(Debug, Clone, Default)]
pub struct Children {
    procs: Arc<Mutex<Vec<Proc>>>,
}

impl Children {
    /// Start `bin args` with its standard error in `log`.
    pub fn spawn(&self, name: &str, bin: &Path, args: &[String], log: &Path) -> Result<u32> {
        let err = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "info,libp2p=warn,sqlx=warn,automerge=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let pid = child.id();
        self.lock().push(Proc {
            name: name.to_owned(),
            child,
        });
        Ok(pid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Proc>> {
        // A panic while holding the list must not keep the children running.
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Kill `name` at once (SIGKILL, as a power cut or a dropped link would), and forget it.
    pub fn kill_now(&self, name: &str) {
        let mut procs = self.lock();
        if let Some(i) = procs.iter().position(|p| p.name == name) {
            let mut p = procs.remove(i);
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Names of children that have exited on their own.
    pub fn exited(&self) -> Vec<String> {
        self.lock()
            .iter_mut()
            .filter_map(|p| matches!(p.child.try_wait(), Ok(Some(_))).then(|| p.name.clone()))
            .collect()
    }

    /// SIGTERM to every child, then SIGKILL to those still running after the grace.
    pub fn stop_all(&self) {
        let mut procs = std::mem::take(&mut *self.lock());
        for p in &mut procs {
            if !matches!(p.child.try_wait(), Ok(None)) {
                continue;
            }
            if let Ok(pid) = i32::try_from(p.child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
        while Instant::now() < deadline
            && procs
                .iter_mut()
                .any(|p| matches!(p.child.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        for p in &mut procs {
            if matches!(p.child.try_wait(), Ok(None)) {
                let _ = p.child.kill();
            }
            let _ = p.child.wait();
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        if Arc::strong_count(&self.procs) == 1 {
            self.stop_all();
        }
    }
}

/// `ip ARGS`, or an error with what it said.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("iproute2's `ip` is needed for network namespaces")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A stand LAN of network namespaces: one per device and one for the relay (the internet),
/// each with a veth port on one bridge (in a namespace of its own), and one more port from
/// this host so the run, and a person's browser, reach the pages and the admin API. Cutting
/// the internet takes the relay's port down; the stand's own ports stay up. Removed on drop.
#[derive(Debug)]
pub struct Lan {
    tag: String,
    subnet: String,
    nodes: usize,
}

impl Lan {
    /// `devices` namespaces for the stand plus one for the relay.
    pub fn new(devices: usize) -> Result<Self> {
        let pid = std::process::id() % 100_000;
        let lan = Self {
            tag: format!("hv{pid}"),
            subnet: format!("10.214.{}", pid % 250),
            nodes: devices + 1,
        };
        lan.remove();
        if let Err(e) = lan.build() {
            lan.remove();
            return Err(e);
        }
        Ok(lan)
    }

    fn build(&self) -> Result<()> {
        let br = self.bridge_ns();
        ip(&["netns", "add", &br])?;
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..self.nodes {
            let ns = self.ns(i);
            let (inner, port) = (format!("{}n{i}", self.tag), self.port(i));
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &port])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &port, "netns", &br])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.addr(i)),
                "dev",
                &inner,
            ])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        }
        let (host, port) = (format!("{}h", self.tag), format!("{}ph", self.tag));
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &port])?;
        ip(&["link", "set", &port, "netns", &br])?;
        ip(&["-n", &br, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &br, "link", "set", &port, "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", self.subnet),
            "dev",
            &host,
        ])?;
        ip(&["link", "set", &host, "up"])?;
        Ok(())
    }

    fn bridge_ns(&self) -> String {
        format!("{}b", self.tag)
    }
    fn port(&self, i: usize) -> String {
        format!("{}p{i}", self.tag)
    }
    /// Namespace of device `i` (the relay's is the last).
    pub fn ns(&self, i: usize) -> String {
        format!("{}d{i}", self.tag)
    }
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 2)
    }
    pub fn relay_index(&self) -> usize {
        self.nodes - 1
    }
    pub fn describe(&self) -> String {
        format!(
            "network namespaces {}* on a bridge, {}.0/24, this host at {}.1",
            self.tag, self.subnet, self.subnet
        )
    }

    /// The internet goes: the relay's port on the bridge is taken down.
    pub fn cut(&self) -> Result<()> {
        let port = self.port(self.relay_index());
        ip(&["-n", &self.bridge_ns(), "link", "set", &port, "down"])
    }
    pub fn heal(&self) -> Result<()> {
        let port = self.port(self.relay_index());
        ip(&["-n", &self.bridge_ns(), "link", "set", &port, "up"])
    }

    fn remove(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}h", self.tag)])
            .output();
        for ns in (0..self.nodes)
            .map(|i| self.ns(i))
            .chain([self.bridge_ns()])
        {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Whether this process may make network namespaces.
pub fn can_make_namespaces() -> bool {
    nix::unistd::geteuid().is_root()
        && Command::new("ip")
            .args(["netns", "list"])
            .output()
            .is_ok_and(|o| o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_below_the_ephemeral_range_and_never_handed_out_twice() {
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in ports {
            assert!((10_000..32_000).contains(&p), "{p}");
            assert!(TcpListener::bind(("127.0.0.1", p)).is_ok(), "{p} is taken");
        }
    }
}
