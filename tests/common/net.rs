//! Small network helpers the kit's servers share.

/// A free port on 127.0.0.1 for a server a test starts (a Kafka node, Redis, the bridge),
/// each one once in this process. Taken below Linux's
/// ephemeral range (32768 and up): a port the kernel hands out for bind(0) may be taken by
/// an outgoing connection before the node binds it (after tests/abuse.rs opens tens of
/// thousands, a node then failed with "Address already in use").
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Each test process starts at a place of its own.
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (FIRST + (start + n) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until something listens on 127.0.0.1:`port`; panics naming `what` after `within`.
pub async fn wait_listening(port: u16, what: &str, within: std::time::Duration) {
    let started = std::time::Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < within,
            "{what} did not listen on {port}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A collector that accepts connections and never reads or answers them: an export to it
/// waits until its own deadline.
pub struct Blackhole {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        Blackhole { port, task }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}
