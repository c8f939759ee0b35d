#![allow(clippy::unwrap_used, clippy::expect_used)]
//! A dead disk: the terminal's data folder sits on a 1 MiB tmpfs that fills up mid-event. The
//! sale that cannot be made durable is refused with a 503 and the process stops; restarted
//! elsewhere, every acknowledged sale is there and none of the refused one. Needs root (mount).

mod common;
use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_the_sale_and_loses_nothing_acknowledged() {
    let stand = make_stand(1, false, &["hotdog=Hot dog:400:100000"]);
    let mnt = stand.dir.path().join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let out = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            "size=1m",
            "tmpfs",
            mnt.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount needs root: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _guard = Mount(mnt.clone());
    let t0_small = mnt.join("t0");
    std::fs::create_dir_all(&t0_small).unwrap();
    std::fs::copy(
        stand.dir.path().join("t0/replica.redb"),
        t0_small.join("replica.redb"),
    )
    .unwrap();

    let pool_mesh = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let pool = spawn(
        "pool",
        &stand.dir.path().join("pool"),
        &pool_mesh,
        free_port(),
        &[],
        false,
        None,
    );
    let mut t0 = spawn(
        "t0",
        &t0_small,
        &format!("/ip4/127.0.0.1/tcp/{}", free_port()),
        free_port(),
        &[pool_mesh.clone()],
        false,
        None,
    );
    wait_up(&pool).await;
    wait_up(&t0).await;
    wait_available(15, &t0.api, "hotdog", 100_000).await;
    let mut acked = 0i64;
    let refusal = loop {
        let (code, body) = sell(&t0.api, "hotdog", 1).await;
        if code == 201 {
            acked += 1;
            assert!(acked < 20_000, "the disk never filled up");
        } else {
            break (code, body);
        }
    };
    assert_eq!(refusal.0, 503, "{}", refusal.1);
    assert_eq!(refusal.1["error"], "storage_unavailable");
    // The node stops rather than carry an unwritten change.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = t0.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the node kept running on a dead disk"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    assert!(
        t0.log_text()
            .contains("could not make local changes durable"),
        "{}",
        t0.log_text()
    );

    // Move the data to a disk with room and restart: every acknowledged sale is there.
    let moved = stand.dir.path().join("t0-moved");
    std::fs::create_dir_all(&moved).unwrap();
    std::fs::copy(t0_small.join("replica.redb"), moved.join("replica.redb")).unwrap();
    let t0b = spawn(
        "t0",
        &moved,
        &format!("/ip4/127.0.0.1/tcp/{}", free_port()),
        free_port(),
        &[pool_mesh.clone()],
        false,
        None,
    );
    wait_up(&t0b).await;
    assert_eq!(available(&t0b.api, "hotdog").await, Some(100_000 - acked));
    // It sells again, and the pool converges on the same count.
    assert_eq!(sell(&t0b.api, "hotdog", 1).await.0, 201);
    wait_available(20, &pool.api, "hotdog", 100_000 - acked - 1).await;
}
