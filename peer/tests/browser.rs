#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The POS and kitchen pages in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), driven over WebDriver against real `halftime-peer` processes on loopback.
//!
//! The browser is not optional: when `chromium` or `chromedriver` is missing the test fails and
//! says how to install them (`scripts/test.sh` does it on a fresh machine). `CHROMIUM` and
//! `CHROMEDRIVER` may name other binaries.

mod common;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt as _;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const ITEMS: [&str; 3] = [
    "hotdog=Hot dog:400:100",
    "soda=Soda:250:60",
    "pretzel=Pretzel:350:12",
];

/// A binary named by `env`, else found on PATH; a failure that says what to install.
fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env}={} does not exist", p.display());
        return p;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "`{name}` is not on PATH: the browser test needs Debian's chromium and chromium-driver \
             (`apt-get install -y chromium chromium-driver`, as scripts/test.sh does), or set {env}"
        )
    })
}

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Driver {
    async fn start(exe: &Path, dir: &Path) -> Self {
        let port = free_port();
        let log = dir.join("chromedriver.log");
        let child = Command::new(exe)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let d = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        };
        let status = format!("{}/status", d.url);
        eventually(
            20,
            &format!("chromedriver ready (log: {})", d.log.display()),
            || {
                let status = status.clone();
                async move {
                    let v: serde_json::Value =
                        client().get(&status).send().await.ok()?.json().await.ok()?;
                    (v["value"]["ready"] == true).then_some(())
                }
            },
        )
        .await;
        d
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let args = [
        "--headless".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-quic".into(),
        "--no-first-run".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--disable-dev-shm-usage".into(),
        "--no-proxy-server".into(),
        "--window-size=1024,768".into(),
        format!("--user-data-dir={}", profile.display()),
    ];
    let caps = serde_json::json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": chromium.to_str().unwrap(), "args": args },
    });
    let serde_json::Value::Object(caps) = caps else {
        unreachable!()
    };
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "cannot open a Chromium session: {e} (chromedriver log: {})",
                driver.log.display()
            )
        })
}

/// The text of the first element matching `css`, None while there is none (or it was re-rendered).
async fn text(c: &Client, css: &str) -> Option<String> {
    c.find(Locator::Css(css)).await.ok()?.text().await.ok()
}

async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    c.find(Locator::Css(css))
        .await
        .ok()?
        .attr(name)
        .await
        .ok()?
}

/// Wait for `css`, then click it. The pages re-render on every live event, so a click on an
/// element that was just replaced is retried on the new one.
async fn click(c: &Client, css: &str, what: &str) {
    eventually(15, what, move || async move {
        let e = c.find(Locator::Css(css)).await.ok()?;
        (e.is_enabled().await.ok()? && e.click().await.is_ok()).then_some(())
    })
    .await
}

/// Whether the element matching `css` has class `class` (None while there is none).
async fn has_class(c: &Client, css: &str, class: &str) -> Option<bool> {
    let classes = attr(c, css, "class").await?;
    Some(classes.split_whitespace().any(|k| k == class))
}

async fn wait_class(c: &Client, css: &str, class: &str, want: bool, what: &str) {
    eventually(15, what, move || async move {
        (has_class(c, css, class).await? == want).then_some(())
    })
    .await
}

async fn wait_text(c: &Client, css: &str, want: &str, what: &str) -> String {
    eventually(15, what, move || async move {
        let t = text(c, css).await?;
        t.contains(want).then_some(t)
    })
    .await
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(Path::new(env!("CARGO_TARGET_TMPDIR")).join(name), &png).unwrap();
}

async fn scenario(c: &Client, procs: &mut [Proc]) {
    let pos: &str = &procs[1].api.clone();
    let kitchen: &str = &procs[2].api.clone();
    // The POS page: a button per item with what the stand has left, the till's name on top.
    c.goto(&format!("{pos}/")).await.unwrap();
    const HOTDOG: &str = r#"button.item[data-sku="hotdog"]"#;
    const SODA: &str = r#"button.item[data-sku="soda"]"#;
    const PRETZEL: &str = r#"button.item[data-sku="pretzel"]"#;
    let before: i64 = eventually(15, "the hot dog button, sellable", move || async move {
        if attr(c, HOTDOG, "aria-disabled").await? != "false" {
            return None;
        }
        text(c, &format!("{HOTDOG} .available"))
            .await?
            .trim()
            .parse()
            .ok()
    })
    .await;
    assert_eq!(before, 100, "the page shows the starting stock");
    wait_text(c, "#title", "till0", "the till's name in the header").await;
    assert!(text(c, PRETZEL).await.unwrap().contains("Pretzel"));

    // A cart of three lines: 2 hot dogs, a soda and a pretzel (added twice, one taken off).
    click(c, HOTDOG, "adding a hot dog").await;
    click(c, HOTDOG, "adding a second hot dog").await;
    click(c, SODA, "adding a soda").await;
    click(c, PRETZEL, "adding a pretzel").await;
    click(
        c,
        r#".cart-line[data-sku="pretzel"] .inc"#,
        "one more pretzel",
    )
    .await;
    wait_text(
        c,
        r#".cart-line[data-sku="pretzel"] .qty"#,
        "2",
        "two pretzels",
    )
    .await;
    click(
        c,
        r#".cart-line[data-sku="pretzel"] .dec"#,
        "one pretzel less",
    )
    .await;
    wait_text(
        c,
        r#".cart-line[data-sku="pretzel"] .qty"#,
        "1",
        "one pretzel",
    )
    .await;
    assert_eq!(
        c.find_all(Locator::Css(".cart-line")).await.unwrap().len(),
        3
    );
    assert_eq!(
        text(c, r#".cart-line[data-sku="hotdog"] .qty"#)
            .await
            .as_deref(),
        Some("2")
    );
    wait_text(c, "#total", "$14.00", "the running total").await;
    // Cash: $20 tendered, $6.00 change due, one sale with all lines.
    c.find(Locator::Css("#method"))
        .await
        .unwrap()
        .select_by_value("cash")
        .await
        .unwrap();
    c.find(Locator::Css("#tendered"))
        .await
        .unwrap()
        .send_keys("20")
        .await
        .unwrap();
    wait_text(c, "#change", "Change due $6.00", "the change due").await;
    click(c, "#charge", "charging").await;
    let message = wait_text(c, "#message", "Sold till0-001", "the sale message").await;
    assert!(
        message.contains("$14.00") && message.contains("change due $6.00"),
        "{message}"
    );
    assert_eq!(
        c.find_all(Locator::Css(".cart-line")).await.unwrap().len(),
        0
    );
    let recent = get(pos, "/v1/sales").await;
    assert_eq!(recent[0]["order_no"], "till0-001", "{recent}");
    assert_eq!(recent[0]["sale"]["lines"].as_array().map(Vec::len), Some(3));
    let sale_id = recent[0]["sale_id"].as_str().unwrap().to_owned();
    eventually(10, "the hot dog count to fall by two", move || async move {
        let n: i64 = text(c, &format!("{HOTDOG} .available"))
            .await?
            .trim()
            .parse()
            .ok()?;
        (n == before - 2).then_some(())
    })
    .await;
    assert_eq!(available(pos, "hotdog").await, Some(before - 2));
    screenshot(c, "browser-pos.png").await;

    // The kitchen: the ticket by order number, till and item names, and the all-day strip.
    c.goto(&format!("{kitchen}/kitchen")).await.unwrap();
    let order = format!(r#".order[data-sale="{sale_id}"]"#);
    let order: &str = &order;
    wait_text(
        c,
        &format!("{order} h3"),
        "till0-001",
        "the ticket on the kitchen page",
    )
    .await;
    let lines = text(c, &format!("{order} ul")).await.unwrap();
    for want in ["2 × Hot dog", "1 × Soda", "1 × Pretzel"] {
        assert!(lines.contains(want), "{lines}");
    }
    assert_eq!(
        text(c, &format!("{order} .terminal")).await.as_deref(),
        Some("till0")
    );
    assert!(
        has_class(c, order, "age-new").await.unwrap(),
        "a fresh ticket"
    );
    wait_text(
        c,
        r#".allday-item[data-sku="hotdog"]"#,
        "2 × Hot dog",
        "all-day totals",
    )
    .await;
    assert_eq!(text(c, "#count").await.as_deref(), Some("1 open"));
    screenshot(c, "browser-kitchen.png").await;
    // The same ticket as if it had waited four, then seven minutes: orange, then red.
    for (minutes, class) in [(4, "age-warn"), (3, "age-late")] {
        c.execute(
            "orders.get(arguments[0]).received_ms -= arguments[1] * 60000;",
            vec![serde_json::json!(sale_id), serde_json::json!(minutes)],
        )
        .await
        .unwrap();
        wait_class(
            c,
            order,
            class,
            true,
            &format!("the ticket turning {class}"),
        )
        .await;
    }
    let age = text(c, &format!("{order} .age")).await.unwrap();
    assert!(age.starts_with("7:"), "its age in minutes: {age}");
    // Bump, then recall it.
    click(c, &format!("{order} .bump"), "bumping the ticket").await;
    wait_class(c, order, "done", true, "the ticket bumped").await;
    assert_eq!(text(c, "#count").await.as_deref(), Some("0 open"));
    assert!(
        c.find(Locator::Css(".allday-item")).await.is_err(),
        "nothing left to make"
    );
    click(c, "#recall", "recalling the last bumped").await;
    wait_class(c, order, "done", false, "the ticket back").await;
    c.refresh().await.unwrap();
    wait_class(
        c,
        order,
        "done",
        false,
        "the ticket still open after a reload",
    )
    .await;

    // The cashier voids the sale (with the manager's confirmation); the ticket is struck.
    c.goto(&format!("{pos}/")).await.unwrap();
    let line = format!(r#".recent[data-sale="{sale_id}"]"#);
    let line: &str = &line;
    click(c, &format!("{line} button.void"), "voiding the sale").await;
    wait_class(c, "#confirm", "open", true, "the manager's confirmation").await;
    click(c, "#confirm-yes", "confirming the void").await;
    wait_text(c, "#message", "Voided till0-001", "the void message").await;
    wait_class(c, line, "voided", true, "the sale struck in the list").await;
    assert_eq!(available(pos, "hotdog").await, Some(before));
    c.goto(&format!("{kitchen}/kitchen")).await.unwrap();
    wait_class(
        c,
        order,
        "voided",
        true,
        "the ticket struck on the kitchen page",
    )
    .await;

    // The fryer is down: the kitchen 86s the soda; the POS greys it out live and says why.
    const SODA_MENU: &str = r#".menu-item[data-sku="soda"]"#;
    click(c, &format!("{SODA_MENU} button"), "clicking 86 on the soda").await;
    wait_class(
        c,
        SODA_MENU,
        "off",
        true,
        "the soda marked off on the kitchen page",
    )
    .await;
    c.goto(&format!("{pos}/")).await.unwrap();
    let greyed = move |off: bool| async move {
        let is_off = has_class(c, SODA, "off").await?;
        let disabled = attr(c, SODA, "aria-disabled").await? == "true";
        (is_off == off && disabled == off).then_some(())
    };
    eventually(15, "the soda greyed out on the POS page", move || {
        greyed(true)
    })
    .await;
    click(c, SODA, "tapping the 86'd soda").await;
    wait_text(c, "#message", "Soda is 86'd", "the reason on tap").await;
    assert_eq!(
        c.find_all(Locator::Css(".cart-line")).await.unwrap().len(),
        0
    );
    let (status, body) = sell(pos, "soda", 1).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["refusal"]["reason"], "marked_off", "{body}");
    let res = client()
        .put(format!("{kitchen}/v1/items/soda/availability"))
        .json(&serde_json::json!({ "available": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    eventually(
        15,
        "the soda sellable again on the open POS page",
        move || greyed(false),
    )
    .await;

    // Cut off: the pool goes, then the kitchen; the banner says how the till sells now, and it
    // still sells within its own stock.
    assert!(text(c, "#banner").await.unwrap_or_default().is_empty());
    procs[0].kill9();
    wait_text(
        c,
        "#banner",
        "Internet down — selling over the stand network",
        "the mesh banner",
    )
    .await;
    procs[2].kill9();
    wait_text(
        c,
        "#banner",
        "Alone — selling within this till's stock",
        "the alone banner",
    )
    .await;
    click(c, HOTDOG, "adding a hot dog offline").await;
    click(c, "#charge", "charging offline").await;
    wait_text(c, "#message", "Sold till0-002", "an offline sale").await;
    screenshot(c, "browser-pos-offline.png").await;
    // A desktop till: "1" adds the first item (the hot dog), Enter charges.
    c.execute("document.activeElement.blur();", vec![])
        .await
        .unwrap();
    let body = c.find(Locator::Css("body")).await.unwrap();
    body.send_keys("1").await.unwrap();
    wait_text(
        c,
        r#".cart-line[data-sku="hotdog"] .qty"#,
        "1",
        "a hot dog by key",
    )
    .await;
    body.send_keys("\u{e007}").await.unwrap();
    wait_text(c, "#message", "Sold till0-003", "a sale by keyboard").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selling_on_the_pos_page_reaches_the_kitchen_page() {
    // Before starting anything: without the browser this test fails, it does not skip.
    let chromium = binary("CHROMIUM", "chromium");
    let chromedriver = binary("CHROMEDRIVER", "chromedriver");

    // Pool, one terminal and a kitchen display, each dialling the ones started before it.
    let stand = make_stand(1, true, &ITEMS);
    let mut procs = start_chain(&stand, &["pool", "t0", "kitchen"]);
    for p in &procs {
        wait_up(p).await;
    }
    for p in &procs[1..] {
        let api = p.api.clone();
        eventually(
            20,
            &format!(
                "the stand document at {} (log: {})",
                p.name,
                p.log.display()
            ),
            || {
                let api = api.clone();
                async move { (available(&api, "hotdog").await == Some(100)).then_some(()) }
            },
        )
        .await;
        eventually(20, &format!("{} connected to both others", p.name), || {
            let api = api.clone();
            async move { (peers(&api).await.len() == 2).then_some(()) }
        })
        .await;
    }

    let driver = Driver::start(&chromedriver, stand.dir.path()).await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, &chromium, profile.path()).await;
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser-pos.png");
    let outcome = AssertUnwindSafe(scenario(&c, &mut procs))
        .catch_unwind()
        .await;
    // Close the browser even when an assertion failed, so no Chromium outlives the test.
    let _ = c.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        for p in &procs {
            eprintln!("--- {} log ---\n{}", p.name, p.log_text());
        }
        std::panic::resume_unwind(panic);
    }
    println!(
        "screenshots: {} and browser-kitchen.png beside it",
        shot.display()
    );
}

/// The relay, built beside this daemon by `cargo test --workspace`.
fn relay_bin() -> PathBuf {
    let p = Path::new(BIN).with_file_name("halftime-relay");
    assert!(
        p.exists(),
        "{} is missing: run the workspace's tests (./scripts/test.sh) or `cargo build -p halftime-relay`",
        p.display()
    );
    p
}

/// End a relay browser test: close the browser, stop the relay, and on a failure show the
/// till's and the relay's logs before passing the panic on.
async fn finish(
    outcome: std::thread::Result<()>,
    c: Client,
    driver: Driver,
    mut relay: Child,
    till: &Proc,
    relay_log: &Path,
) {
    let _ = c.close().await;
    drop(driver);
    let _ = relay.kill();
    let _ = relay.wait();
    if let Err(panic) = outcome {
        eprintln!("--- till log ---\n{}", till.log_text());
        eprintln!(
            "--- relay log ---\n{}",
            std::fs::read_to_string(relay_log).unwrap_or_default()
        );
        std::panic::resume_unwind(panic);
    }
}

/// `halftime-relay serve` on `db` at 127.0.0.1:`port`, logging to `log`.
fn serve_relay(db: &str, port: u16, log: &Path) -> Child {
    Command::new(relay_bin())
        .args(["--database", db, "serve", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn relay_cli(db: &str, args: &[&str]) -> String {
    let out = Command::new(relay_bin())
        .args(["--database", db])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn admin_scenario(c: &Client, pos: &str, relay: &str, token: &str, db: &str) {
    const POS_HOTDOG: &str = r#"button.item[data-sku="hotdog"] .available"#;
    const ROW: &str = r#"section.stand[data-stand="east"] .item[data-sku="hotdog"]"#;
    let number = |t: Option<String>| t.and_then(|t| t.trim().parse::<i64>().ok());
    c.goto(&format!("{pos}/")).await.unwrap();
    eventually(15, "the POS page shows 40 hot dogs", move || async move {
        (number(text(c, POS_HOTDOG).await)? == 40).then_some(())
    })
    .await;
    let pos_window = c.window().await.unwrap();

    // The admin page, in a second window, with a manager's token.
    let admin_window = c.new_window(false).await.unwrap().handle;
    c.switch_to_window(admin_window).await.unwrap();
    c.goto(&format!("{relay}/admin")).await.unwrap();
    let field = c.find(Locator::Css("#token")).await.unwrap();
    field.send_keys(token).await.unwrap();
    click(c, "#save-token", "using the token").await;
    let row_available = format!("{ROW} .available");
    let row_available: &str = &row_available;
    eventually(
        15,
        "the admin page shows the stand's hot dogs",
        move || async move { (number(text(c, row_available).await)? == 40).then_some(()) },
    )
    .await;
    restock_on_admin_page(c, ROW, "15").await;
    wait_text(
        c,
        "#banner",
        "Restocked 15 Hot dog",
        "the admin page confirms",
    )
    .await;
    eventually(15, "the admin page's bar rises", move || async move {
        (number(text(c, row_available).await)? == 55).then_some(())
    })
    .await;
    screenshot(c, "browser-admin.png").await;

    // A cash sale at the till, then a refund of it the reconciler decided (written into the
    // relay's store as it does): the page lists it as owed; the manager marks it paid out,
    // naming who handed the cash back.
    let sale: serde_json::Value = client()
        .post(format!("{pos}/v1/sales"))
        .json(&serde_json::json!({"lines": [{"sku": "hotdog", "qty": 1}],
            "payment": {"method": "cash", "reference": ""}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sale_id = sale["sale_id"].as_str().unwrap().to_owned();
    {
        use sqlx::Connection as _;
        let mut conn = sqlx::SqliteConnection::connect(db).await.unwrap();
        sqlx::query(
            "INSERT INTO refund_decisions (stand, sale_id, sku, units, amount_cents, method, \
             reference, available, decided_at) VALUES ('east', $1, 'hotdog', 1, 400, \
             'cash', '', -1, 1)",
        )
        .bind(&sale_id)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO refund_outbox (decision_id, status, next_attempt_at, updated_at) \
             VALUES (last_insert_rowid(), 'manual', 1, 1)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    const REFUND: &str = r#"section.stand[data-stand="east"] tr.refund"#;
    let manual = format!("{REFUND}.manual td.status");
    let manual: &str = &manual;
    wait_text(
        c,
        manual,
        "cash: pay out by hand",
        "the refund listed as owed",
    )
    .await;
    click(
        c,
        &format!("{REFUND}.manual button.paid-out"),
        "marking it paid out",
    )
    .await;
    c.send_alert_text("Jo").await.unwrap();
    c.accept_alert().await.unwrap();
    let paid = format!("{REFUND}.paid_out td.status");
    wait_text(c, &paid, "paid out by Jo", "the refund shown paid out").await;

    // Back on the till: the POS page has risen by itself (less the one sold), and the relay
    // wrote the refund into the stand, so the till's recent sales show it.
    c.switch_to_window(pos_window).await.unwrap();
    eventually(
        15,
        "the POS page rises after the restock",
        move || async move { (number(text(c, POS_HOTDOG).await)? == 54).then_some(()) },
    )
    .await;
    let row = format!(r#"#recent li[data-sale="{sale_id}"] .refund"#);
    wait_text(
        c,
        &row,
        "Refunded: 1 × Hot dog",
        "the POS page shows the refund on the sale",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restocking_on_the_relays_admin_page_raises_the_pos_page() {
    let chromium = binary("CHROMIUM", "chromium");
    let chromedriver = binary("CHROMEDRIVER", "chromedriver");
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("relay.db").display());
    let admin = relay_cli(&db, &["token", "create", "--role", "admin"])
        .trim()
        .to_owned();
    let manager = relay_cli(&db, &["token", "create", "--role", "manager"])
        .trim()
        .to_owned();
    let rport = free_port();
    let relay_log = dir.path().join("relay.log");
    let relay = serve_relay(&db, rport, &relay_log);
    let relay_url = format!("http://127.0.0.1:{rport}");
    let post = |path: &str, body: serde_json::Value| {
        client()
            .post(format!("{relay_url}{path}"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    let made = eventually(15, "the relay takes a new stand", || async {
        let body = serde_json::json!({"stand": "east", "event": "game", "items": [
            {"sku": "hotdog", "name": "Hot dog", "price_cents": 400, "stock": 40}]});
        let r = post("/v1/stands", body).await.ok()?;
        (r.status() == 201).then_some(())
    })
    .await;
    let _ = made;
    let data = dir.path().join("t0");
    let key = init(&data);
    let joined: serde_json::Value = post(
        "/v1/stands/east/replicas",
        serde_json::json!({"public_key": key, "name": "till0", "role": "terminal"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    cli(&[
        "join",
        "--data",
        data.to_str().unwrap(),
        "--stand",
        "east",
        "--pool-key",
        joined["pool_key"].as_str().unwrap(),
        "--psk",
        joined["psk"].as_str().unwrap(),
    ]);
    let api_port = free_port();
    let log = data.join("peer.log");
    let child = Command::new(BIN)
        .args([
            "run",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ])
        .args(["--api", &format!("127.0.0.1:{api_port}"), "--no-mdns"])
        .args(["--relay", &format!("ws://127.0.0.1:{rport}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let till = Proc {
        name: "t0".into(),
        child,
        api: format!("http://127.0.0.1:{api_port}"),
        mesh: String::new(),
        data: data.clone(),
        log,
    };
    let api = till.api.clone();
    eventually(
        30,
        "the till learns the stand from the relay's pool",
        || {
            let api = api.clone();
            async move { (available(&api, "hotdog").await == Some(40)).then_some(()) }
        },
    )
    .await;

    let driver = Driver::start(&chromedriver, dir.path()).await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, &chromium, profile.path()).await;
    let outcome = AssertUnwindSafe(admin_scenario(&c, &till.api, &relay_url, &manager, &db))
        .catch_unwind()
        .await;
    finish(outcome, c, driver, relay, &till, &relay_log).await;
}

/// On the admin page, type `units` into the restock field of `row` and press its Restock
/// button. The page redraws every second unless something in it has focus: the field is
/// focused first, and typed into again if a redraw replaced it meanwhile.
async fn restock_on_admin_page(c: &Client, row: &str, units: &str) {
    let units_css = format!("{row} .restock-units");
    let units_css: &str = &units_css;
    eventually(15, "typing the units", move || async move {
        let f = c.find(Locator::Css(units_css)).await.ok()?;
        f.click().await.ok()?;
        f.clear().await.ok()?;
        f.send_keys(units).await.ok()?;
        (f.prop("value").await.ok()??.as_str() == units).then_some(())
    })
    .await;
    click(
        c,
        &format!("{row} button.restock"),
        "restocking on the admin page",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_restocks_a_device_stands_pool_at_once_or_when_it_is_back() {
    let chromium = binary("CHROMIUM", "chromium");
    let chromedriver = binary("CHROMEDRIVER", "chromedriver");
    let stand = make_stand(1, false, &ITEMS[..1]);
    let dir = stand.dir.path();
    let db = format!("sqlite:{}", dir.join("relay.db").display());
    let relay_key = field_of(&relay_cli(&db, &["key"]), "public key:");
    let pool_dir = dir.join("pool");
    cli(&[
        "enrol",
        "--data",
        pool_dir.to_str().unwrap(),
        "--replica",
        &format!("{relay_key}=relay"),
        "--role",
        "relay",
    ]);
    relay_cli(
        &db,
        &[
            "stand",
            "add",
            "--stand",
            "north",
            "--pool-key",
            &stand.pool_key,
        ],
    );
    let manager = relay_cli(&db, &["token", "create", "--role", "manager"])
        .trim()
        .to_owned();
    let rport = free_port();
    let relay_log = dir.join("relay.log");
    let relay = serve_relay(&db, rport, &relay_log);
    let relay_url = format!("http://127.0.0.1:{rport}");
    let uplink = format!("ws://127.0.0.1:{rport}");
    let extra = [
        "--relay",
        uplink.as_str(),
        "--relay-key",
        relay_key.as_str(),
    ];
    let (pool_port, till_port) = (free_port(), free_port());
    let pool = |port| {
        spawn_with(
            "pool",
            &pool_dir,
            "/ip4/127.0.0.1/tcp/0",
            port,
            &[],
            false,
            None,
            &extra,
        )
    };
    let mut first_pool = pool(pool_port);
    let till = spawn_with(
        "t0",
        &dir.join("t0"),
        "/ip4/127.0.0.1/tcp/0",
        till_port,
        &[],
        false,
        None,
        &extra,
    );
    let till_api = till.api.clone();
    let till_api: &str = &till_api;
    eventually(
        30,
        "the till learns the stand through the relay",
        move || async move { (available(till_api, "hotdog").await == Some(100)).then_some(()) },
    )
    .await;

    let driver = Driver::start(&chromedriver, dir).await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, &chromium, profile.path()).await;
    let scenario = async {
        const ROW: &str = r#"section.stand[data-stand="north"] .item[data-sku="hotdog"]"#;
        let c = &c;
        c.goto(&format!("{relay_url}/admin")).await.unwrap();
        c.find(Locator::Css("#token"))
            .await
            .unwrap()
            .send_keys(&manager)
            .await
            .unwrap();
        click(c, "#save-token", "using the token").await;
        wait_text(
            c,
            &format!("{ROW} .available"),
            "100",
            "the device stand's hot dogs",
        )
        .await;

        // The pool is connected: the restock is made by it and the till rises.
        restock_on_admin_page(c, ROW, "15").await;
        wait_text(c, "#banner", "Restocked 15 Hot dog", "the page confirms").await;
        eventually(15, "the till rises", move || async move {
            (available(till_api, "hotdog").await == Some(115)).then_some(())
        })
        .await;

        // The pool is away: the page says the restock is queued and lists it until the pool,
        // back, makes it.
        first_pool.kill9();
        restock_on_admin_page(c, ROW, "5").await;
        let queued = eventually(15, "the page says it is queued", move || async move {
            let t = text(c, "#banner").await?;
            t.contains("queued for the stand's pool").then_some(t)
        })
        .await;
        assert!(queued.contains("Restocked 5 Hot dog"), "{queued}");
        let waiting = r#"section.stand[data-stand="north"] li.request.queued"#;
        wait_text(
            c,
            waiting,
            "restock: queued",
            "the queued request is listed",
        )
        .await;
        screenshot(c, "browser-admin-queued.png").await;
        let _pool = pool(pool_port);
        eventually(30, "the pool, back, makes it", move || async move {
            (available(till_api, "hotdog").await == Some(120)).then_some(())
        })
        .await;
        eventually(15, "the page no longer lists it", move || async move {
            c.find(Locator::Css(waiting)).await.is_err().then_some(())
        })
        .await;
    };
    let outcome = AssertUnwindSafe(scenario).catch_unwind().await;
    finish(outcome, c, driver, relay, &till, &relay_log).await;
}

fn field_of(out: &str, label: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix(label))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {label:?} in {out}"))
}
