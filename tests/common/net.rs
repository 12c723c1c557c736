//! Small network helpers the kit's servers share.

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
