#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A real stand LAN: pool and three terminals in four network namespaces on one bridge.
//! Discovery by mDNS alone (no static peers); then a terminal is cut off, hard (link down) and
//! silently (bridge port blocked, link up), both sides sell, the link heals, and everything
//! converges without oversell. Needs root and iproute2; namespaces are removed on drop.

mod common;
use common::*;
use std::process::Command;
use std::time::Instant;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2 `ip` is required for this test");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ns_ip(ns: &str, args: &[&str]) {
    let mut a = vec!["netns", "exec", ns, "ip"];
    a.extend_from_slice(args);
    ip(&a);
}

fn bridge(ns: &str, args: &[&str]) {
    let mut a = vec!["netns", "exec", ns, "bridge"];
    a.extend_from_slice(args);
    let out = Command::new("ip").args(&a).output().unwrap();
    assert!(
        out.status.success(),
        "bridge {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one test run; removed on drop.
struct Lan {
    tag: String,
    nodes: usize,
    subnet: String,
}

impl Lan {
    fn new(nodes: usize) -> Self {
        let pid = std::process::id() % 100_000;
        let tag = format!("ht{pid}");
        let subnet = format!("10.213.{}", pid % 250);
        let lan = Lan { tag, nodes, subnet };
        lan.cleanup();
        let br = lan.bridge_ns();
        ip(&["netns", "add", &br]);
        ns_ip(
            &br,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ],
        );
        ns_ip(&br, &["link", "set", "br0", "up"]);
        for i in 0..nodes {
            let ns = lan.node_ns(i);
            let (inner, port) = (format!("{}n{i}", lan.tag), format!("{}p{i}", lan.tag));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &port]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &port, "netns", &br]);
            ns_ip(&br, &["link", "set", &port, "master", "br0"]);
            ns_ip(&br, &["link", "set", &port, "up"]);
            ns_ip(&ns, &["link", "set", "lo", "up"]);
            ns_ip(
                &ns,
                &[
                    "addr",
                    "add",
                    &format!("{}.{}/24", lan.subnet, i + 1),
                    "dev",
                    &inner,
                ],
            );
            ns_ip(&ns, &["link", "set", &inner, "up"]);
        }
        // The test itself reaches the APIs through one more port on the bridge.
        let (host, port) = (format!("{}h", lan.tag), format!("{}hp", lan.tag));
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &port]);
        ip(&["link", "set", &port, "netns", &br]);
        ns_ip(&br, &["link", "set", &port, "master", "br0"]);
        ns_ip(&br, &["link", "set", &port, "up"]);
        ip(&[
            "addr",
            "add",
            &format!("{}.254/24", lan.subnet),
            "dev",
            &host,
        ]);
        ip(&["link", "set", &host, "up"]);
        lan
    }
    fn bridge_ns(&self) -> String {
        format!("{}-br", self.tag)
    }
    fn node_ns(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }
    fn hard_cut(&self, i: usize, up: bool) {
        ns_ip(
            &self.node_ns(i),
            &[
                "link",
                "set",
                &format!("{}n{i}", self.tag),
                if up { "up" } else { "down" },
            ],
        );
    }
    fn silent_cut(&self, i: usize, blocked: bool) {
        bridge(
            &self.bridge_ns(),
            &[
                "link",
                "set",
                "dev",
                &format!("{}p{i}", self.tag),
                "state",
                if blocked { "0" } else { "3" },
            ],
        );
    }
    fn cleanup(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}h", self.tag)])
            .output();
        for ns in (0..self.nodes)
            .map(|i| self.node_ns(i))
            .chain([self.bridge_ns()])
        {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// HTTP to a replica's API on 127.0.0.1 inside its namespace (reachable even when its LAN
/// link is cut): (status, body).
fn ns_http(ns: &str, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let url = format!("http://127.0.0.1:8080{path}");
    let mut args = vec![
        "netns",
        "exec",
        ns,
        "curl",
        "-s",
        "-m",
        "5",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
        "-H",
        "content-type: application/json",
    ];
    if let Some(b) = body {
        args.push("-d");
        args.push(b);
    }
    args.push(&url);
    let out = Command::new("ip").args(&args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (json, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        code.trim().parse().unwrap_or(0),
        serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    )
}

fn ns_available(ns: &str, sku: &str) -> Option<i64> {
    let (_, v) = ns_http(ns, "GET", "/v1/stock", None);
    v.as_array()?
        .iter()
        .find(|r| r["sku"] == sku)
        .and_then(|r| r["available"].as_i64())
}

fn ns_peers(ns: &str) -> usize {
    ns_http(ns, "GET", "/v1/status", None).1["peers"]
        .as_array()
        .map_or(usize::MAX, |a| a.len())
}

fn converged(nss: &[String], sku: &str) -> Option<i64> {
    let vals: Option<Vec<i64>> = nss.iter().map(|n| ns_available(n, sku)).collect();
    let vals = vals?;
    vals.windows(2).all(|w| w[0] == w[1]).then(|| vals[0])
}

fn sell_n(ns: &str, sku: &str, n: usize) -> usize {
    let body = format!(
        r#"{{"lines":[{{"sku":"{sku}","qty":1}}],"payment":{{"method":"cash","reference":""}}}}"#
    );
    (0..n)
        .filter(|_| ns_http(ns, "POST", "/v1/sales", Some(&body)).0 == 201)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mdns_discovery_and_cuts_converge_without_oversell() {
    let stand = make_stand(3, false, &["hotdog=Hot dog:400:40"]);
    let lan = Lan::new(4);
    let names = ["pool", "t0", "t1", "t2"];
    // Each replica's API listens on its LAN address so the test reaches it from outside.
    let mut procs: Vec<Proc> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let data = stand.dir.path().join(name);
            let log = data.join("peer.log");
            let child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &lan.node_ns(i),
                    BIN,
                    "run",
                    "--data",
                    data.to_str().unwrap(),
                ])
                .args([
                    "--listen",
                    "/ip4/0.0.0.0/tcp/4001",
                    "--api",
                    "127.0.0.1:8080",
                    "--sync-interval-ms",
                    "500",
                ])
                .env("RUST_LOG", "info,libp2p=warn,automerge=warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap();
            Proc {
                name: name.to_string(),
                child,
                api: String::new(),
                mesh: String::new(),
                data,
                log,
            }
        })
        .collect();
    let nss: Vec<String> = (0..names.len()).map(|i| lan.node_ns(i)).collect();
    for ns in &nss {
        let ns = ns.clone();
        eventually(20, "API up", || {
            let ns = ns.clone();
            async move { (ns_http(&ns, "GET", "/v1/status", None).0 == 200).then_some(()) }
        })
        .await;
    }
    // Discovery with no static peers: everyone finds everyone.
    let t = Instant::now();
    for ns in &nss {
        let ns = ns.clone();
        eventually(30, "mDNS full mesh", || {
            let ns = ns.clone();
            async move { (ns_peers(&ns) == 3).then_some(()) }
        })
        .await;
    }
    eprintln!("full mesh by mDNS after {:?}", t.elapsed());
    eventually(15, "stand everywhere", || {
        let nss = nss.clone();
        async move { (converged(&nss, "hotdog") == Some(40)).then_some(()) }
    })
    .await;

    for (round, silent) in [(0usize, false), (1, true)] {
        let cut = 3 - round; // t2, then t1
        if silent {
            lan.silent_cut(cut, true);
        } else {
            lan.hard_cut(cut, false);
        }
        // The cut terminal notices within seconds (ping timeout) and sells offline on its own
        // rights; the others sell too, and ask each other for rights.
        let ns = nss[cut].clone();
        let t = Instant::now();
        eventually(15, "the cut terminal notices it is alone", || {
            let ns = ns.clone();
            async move { (ns_peers(&ns) == 0).then_some(()) }
        })
        .await;
        eprintln!("round {round}: cut noticed after {:?}", t.elapsed());
        let sold_cut = sell_n(&nss[cut], "hotdog", 25);
        let sold_other = sell_n(&nss[1], "hotdog", 25);
        eprintln!(
            "round {round}: cut terminal sold {sold_cut}, connected terminal sold {sold_other}"
        );
        assert!(
            sold_cut > 0,
            "the cut terminal could not sell offline at all"
        );
        let cut_at = Instant::now();
        if silent {
            lan.silent_cut(cut, false);
        } else {
            lan.hard_cut(cut, true);
        }
        let left = eventually(40, "convergence after the heal", || {
            let nss = nss.clone();
            async move { converged(&nss, "hotdog") }
        })
        .await;
        eprintln!(
            "round {round}: converged {:?} after the heal, available {left}",
            cut_at.elapsed()
        );
        assert!(left >= 0, "strict policy oversold: available {left}");
    }
    // Every acknowledged sale reached the pool: 40 minus what was sold equals what it shows.
    let status = ns_http(&nss[0], "GET", "/v1/status", None).1;
    assert_eq!(status["pending"], 0);
    let sales: usize = ns_http(&nss[0], "GET", "/v1/orders", None)
        .1
        .as_array()
        .map_or(0, |a| a.len());
    assert_eq!(
        sales as i64,
        40 - ns_available(&nss[0], "hotdog").unwrap(),
        "every acknowledged sale is at the pool"
    );
    for p in &mut procs {
        p.kill9();
    }
    drop(procs);
    drop(lan);
}
