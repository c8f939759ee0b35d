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

const ITEMS: [&str; 2] = ["hotdog=Hot dog:400:100", "soda=Soda:250:60"];

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
        "--window-size=1024,640".into(),
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

async fn scenario(c: &Client, pos: &str, kitchen: &str, shot: &Path) {
    // The POS page: the item buttons appear with what the stand has left.
    c.goto(&format!("{pos}/")).await.unwrap();
    const HOTDOG: &str = r#"button.item[data-sku="hotdog"]"#;
    let before: i64 = eventually(15, "the hot dog button, sellable", move || async move {
        let b = c.find(Locator::Css(HOTDOG)).await.ok()?;
        if !b.is_enabled().await.ok()? {
            return None;
        }
        b.find(Locator::Css(".available"))
            .await
            .ok()?
            .text()
            .await
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await;
    assert_eq!(before, 100, "the page shows the starting stock");
    assert!(text(c, HOTDOG).await.unwrap().contains("Hot dog"));
    assert!(
        text(c, r#"button.item[data-sku="soda"]"#)
            .await
            .unwrap()
            .contains("Soda")
    );

    // Sell one by clicking; the page says so and the count on the button falls by one.
    click(c, HOTDOG, "clicking the hot dog button").await;
    let message = eventually(10, "the sale message", move || async move {
        let class = attr(c, "#message", "class").await?;
        let t = text(c, "#message").await?;
        (class.split_whitespace().any(|k| k == "sold") && t.starts_with("Sold Hot dog"))
            .then_some(t)
    })
    .await;
    let sale_id = message
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("no sale id in the message {message:?}"))
        .to_owned();
    let avail = format!("{HOTDOG} .available");
    let avail: &str = &avail;
    eventually(
        10,
        "the button's count to fall by one",
        move || async move {
            (text(c, avail).await?.trim().parse::<i64>().ok()? == before - 1).then_some(())
        },
    )
    .await;
    // The page agrees with the API.
    assert_eq!(available(pos, "hotdog").await, Some(before - 1));
    let png = c.screenshot().await.unwrap();
    std::fs::write(shot, &png).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");

    // The kitchen page: the order arrives, "done" marks it done, and it stays done on reload.
    c.goto(&format!("{kitchen}/kitchen")).await.unwrap();
    let order = format!(r#".order[data-sale="{sale_id}"]"#);
    let order: &str = &order;
    let sale: &str = &sale_id;
    eventually(
        15,
        &format!("order {sale_id} on the kitchen page"),
        move || async move {
            let h = text(c, &format!("{order} h3")).await?;
            let lines = text(c, &format!("{order} ul")).await?;
            (h == sale && lines.contains("1 × hotdog")).then_some(())
        },
    )
    .await;
    let classes = attr(c, order, "class").await.unwrap_or_default();
    assert!(
        !classes.split_whitespace().any(|k| k == "done"),
        "a new order is open: {classes}"
    );
    click(c, &format!("{order} button"), "clicking done").await;
    let is_done = move || async move {
        let class = attr(c, order, "class").await?;
        class.split_whitespace().any(|k| k == "done").then_some(())
    };
    eventually(10, "the order marked done", is_done).await;
    assert_eq!(text(c, "#count").await.as_deref(), Some("0 open"));
    c.refresh().await.unwrap();
    eventually(10, "the order still done after a reload", is_done).await;
    std::fs::write(
        shot.with_file_name("browser-kitchen.png"),
        c.screenshot().await.unwrap(),
    )
    .unwrap();

    // The fryer is down: the kitchen 86s the soda on its page; the mark crosses the mesh and
    // the cashier's page greys the item out without a reload.
    const SODA_MENU: &str = r#".menu-item[data-sku="soda"]"#;
    click(c, &format!("{SODA_MENU} button"), "clicking 86 on the soda").await;
    eventually(10, "the soda marked off on the kitchen page", move || async move {
        let class = attr(c, SODA_MENU, "class").await?;
        class.split_whitespace().any(|k| k == "off").then_some(())
    })
    .await;
    c.goto(&format!("{pos}/")).await.unwrap();
    const SODA: &str = r#"button.item[data-sku="soda"]"#;
    let greyed = move |off: bool| async move {
        let b = c.find(Locator::Css(SODA)).await.ok()?;
        let class = b.attr("class").await.ok()??;
        let is_off = class.split_whitespace().any(|k| k == "off");
        (is_off == off && b.is_enabled().await.ok()? != off).then_some(())
    };
    eventually(15, "the soda greyed out on the POS page", move || greyed(true)).await;
    let (status, body) = sell(pos, "soda", 1).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["refusal"]["reason"], "marked_off", "{body}");
    // Back on from the kitchen's API: the open POS page follows live.
    let res = client()
        .put(format!("{kitchen}/v1/items/soda/availability"))
        .json(&serde_json::json!({ "available": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    eventually(15, "the soda sellable again on the open POS page", move || greyed(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selling_on_the_pos_page_reaches_the_kitchen_page() {
    // Before starting anything: without the browser this test fails, it does not skip.
    let chromium = binary("CHROMIUM", "chromium");
    let chromedriver = binary("CHROMEDRIVER", "chromedriver");

    // Pool, one terminal and a kitchen display, each dialling the ones started before it.
    let stand = make_stand(1, true, &ITEMS);
    let procs = start_chain(&stand, &["pool", "t0", "kitchen"]);
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
    let outcome = AssertUnwindSafe(scenario(&c, &procs[1].api, &procs[2].api, &shot))
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
