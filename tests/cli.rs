//! The command line: `sign` in every scheme, `send` to a TLS bridge.

mod common;

use common::signing::*;
use common::tls::*;
use common::*;

#[test]
fn sign_speaks_every_scheme() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.json");
    std::fs::write(&file, r#"{"test": 2432232314}"#).unwrap();
    let file = file.to_str().unwrap();
    // The example of the Standard Webhooks reference libraries.
    let (code, stdout, stderr) = run_to_exit(
        &[],
        &[
            "sign",
            "--scheme",
            "standard-webhooks",
            "--secret",
            SW_SECRET,
            "--id",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "--timestamp",
            "1614265330",
            file,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        stdout,
        "webhook-id: msg_p5jXN8AQM9LWM0D4loKWxJek\nwebhook-timestamp: 1614265330\n\
         webhook-signature: v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=\n"
    );
    // Python: hmac.new(b"key", b'{"test": 2432232314}', "sha256"), hex and base64.
    for (encoding, expected) in [
        (
            "hex",
            "ad1a616fa5d45e0552fd84752e21f775525a9caa345c9b14fa23d8435584f7e9",
        ),
        ("base64", "rRphb6XUXgVS/YR1LiH3dVJanKo0XJsU+iPYQ1WE9+k="),
    ] {
        let (code, stdout, stderr) = run_to_exit(
            &[],
            &[
                "sign",
                "--scheme",
                "hmac-sha256",
                "--encoding",
                encoding,
                "--secret",
                "key",
                file,
            ],
        );
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(stdout.trim(), expected);
    }
    let (code, _, stderr) = run_to_exit(
        &[],
        &[
            "sign",
            "--scheme",
            "standard-webhooks",
            "--secret",
            "plain",
            file,
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("whsec_"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_reaches_a_tls_bridge_in_each_scheme() {
    let pki = Pki::new();
    pki.issue("server");
    let topic = unique_topic("send-tls");
    create_topic(&topic, 3).await;
    let config = format!(
        r#"
[signature.endpoints."ep-standard"]
scheme = "standard-webhooks"
secrets = ["{SW_SECRET}"]
"#
    );
    let (cert, key) = (pki.path("server.crt"), pki.path("server.key"));
    let bridge = Bridge::start_ready(settings_with_file(
        &topic,
        &config,
        &[
            (
                "TAMIO_BRIDGE__SERVER__TLS_CERT_FILE",
                cert.to_str().unwrap(),
            ),
            ("TAMIO_BRIDGE__SERVER__TLS_KEY_FILE", key.to_str().unwrap()),
        ],
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://127.0.0.1:{}/webhooks/tamio", bridge.addr.port());
    let ca = pki.ca_file();
    let cases = [
        ("ep-tamio", "whev_send_1", "tamio", SECRET, 0),
        (
            "ep-standard",
            "whev_send_2",
            "standard-webhooks",
            SW_SECRET,
            0,
        ),
        (
            "ep-standard",
            "whev_send_3",
            "standard-webhooks",
            "whsec_AAEC",
            1,
        ),
    ];
    for (endpoint, id, scheme, secret, expected) in cases {
        let file = dir.path().join(format!("{id}.json"));
        std::fs::write(&file, event_from(endpoint, id, 0)).unwrap();
        let args: Vec<String> = [
            "send",
            "--url",
            &url,
            "--ca-file",
            ca.to_str().unwrap(),
            "--scheme",
            scheme,
            "--secret",
            secret,
            file.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec();
        let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_to_exit(&[], &args)
        })
        .await
        .unwrap();
        assert_eq!(code, expected, "{id}: {stdout} {stderr}");
        let status = if expected == 0 { "200" } else { "401" };
        assert!(stdout.starts_with(status), "{id}: {stdout}");
    }
    bridge.stop().await;
    let records = read_topic(&topic, 2).await;
    assert_eq!(records.len(), 2);
}
