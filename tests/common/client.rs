//! A small HTTP client: requests, answers, readiness polls and metric samples.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    let exchange = async {
        let resp = client().request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    };
    // A stuck request fails the test instead of hanging the run: no answer the bridge gives
    // takes this long (its own deadlines are shorter).
    tokio::time::timeout(ANSWER_WITHIN, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {ANSWER_WITHIN:?}")))
}

/// The longest any request of the tests may wait for its answer.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(90);

/// A delivery of `body` to `url`, signed with `secret` (the `tamio` scheme) at time `t`.
pub async fn post_signed(url: &str, body: &str, secret: &str, t: i64) -> Reply {
    let sig =
        tamio_kafka_bridge::ingest::verify::header_value(secret.as_bytes(), t, body.as_bytes());
    post(
        url,
        &[
            ("content-type", "application/json"),
            ("tamio-signature", &sig),
        ],
        body.as_bytes().to_vec(),
    )
    .await
}

pub async fn post(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Reply {
    request("POST", url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request("GET", &format!("http://{addr}{path}"), &[], Vec::new())
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// Polls /readyz until it answers `status`; returns how long that took, or panics after
/// `within`.
pub async fn wait_for_readyz(admin: SocketAddr, status: StatusCode, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let reply = get(admin, "/readyz").await;
        if reply.status == status {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "/readyz still {} after {within:?}: {}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of one sample in a Prometheus text exposition, e.g.
/// `tamio_bridge_requests_total{outcome="accepted"}`.
pub fn sample(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().unwrap())
        })
        .unwrap_or_else(|| panic!("series {series} not in the exposition"))
}
