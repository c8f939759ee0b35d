//! Ports for the processes a test starts. A port is handed out once per test process and is
//! taken below the kernel's ephemeral range, so neither a test running alongside nor an
//! outgoing connection can take it between the check and the child's bind, nor after a
//! child is killed and restarted on the same port.

use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 10_000;
const SPAN: u32 = 22_000;

pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = u16::try_from(FIRST + n % SPAN).unwrap();
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}
