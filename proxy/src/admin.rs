//! The two admin endpoints, each on its own port as in Istio: readiness (15021) and
//! Prometheus metrics (15090). A few lines of HTTP/1.0-style request/response suffice.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use crate::drain::Stop;
use crate::metrics::Metrics;
use crate::socket::{self, AcceptFailures};

pub const READY_PATH: &str = "/healthz/ready";
pub const METRICS_PATH: &str = "/stats/prometheus";

/// Which endpoint a port serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Health,
    Metrics,
}

impl Endpoint {
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Health => "health",
            Endpoint::Metrics => "metrics",
        }
    }
}

/// What the endpoints report.
pub struct State {
    /// True while the proxy listeners accept connections.
    pub ready: AtomicBool,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

/// Answers admin requests on `listener` until `stop`.
pub async fn serve(listener: TcpListener, endpoint: Endpoint, state: Arc<State>, mut stop: Stop) {
    let mut failures = AcceptFailures::default();
    loop {
        let accepted = tokio::select! {
            () = stop.stopped() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                failures.accepted(endpoint.label());
                tokio::spawn(answer(stream, endpoint, state.clone()));
            }
            Err(error) => {
                failures.failed(endpoint.label(), &error);
                tokio::time::sleep(socket::ACCEPT_BACKOFF).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, endpoint: Endpoint, state: Arc<State>) {
    let head = match tokio::time::timeout(Duration::from_secs(5), read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        _ => return,
    };
    let request_line = head.lines().next().unwrap_or_default();
    let response = route(endpoint, request_line, &state);
    debug!(request = request_line, status = response.status, "admin");
    let reply = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        response.status,
        response.content_type,
        response.body.len(),
        response.body
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Reads up to the blank line that ends the request head (8 KiB at most).
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let read = stream.read(&mut buf).await.ok().filter(|&n| n > 0)?;
        head.extend_from_slice(&buf[..read]);
        if head.len() > 8192 {
            return None;
        }
    }
    String::from_utf8(head).ok()
}

/// The response to `request_line` (e.g. `GET /healthz/ready HTTP/1.1`) on `endpoint`.
pub fn route(endpoint: Endpoint, request_line: &str, state: &State) -> Response {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let text = |status, body: &str| Response { status, content_type: "text/plain; charset=utf-8", body: body.to_string() };
    if method != "GET" {
        return text("405 Method Not Allowed", "only GET\n");
    }
    match (endpoint, path) {
        (Endpoint::Health, READY_PATH) if state.ready.load(Relaxed) => text("200 OK", "ready\n"),
        (Endpoint::Health, READY_PATH) => text("503 Service Unavailable", "not ready\n"),
        (Endpoint::Metrics, METRICS_PATH) => {
            Response { status: "200 OK", content_type: "text/plain; version=0.0.4; charset=utf-8", body: state.metrics.render() }
        }
        _ => text("404 Not Found", "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ready: bool) -> State {
        State { ready: AtomicBool::new(ready), metrics: Arc::default() }
    }

    #[test]
    fn readiness_follows_the_listeners() {
        let get = "GET /healthz/ready HTTP/1.1";
        assert_eq!(route(Endpoint::Health, get, &state(true)).status, "200 OK");
        assert_eq!(route(Endpoint::Health, get, &state(false)).status, "503 Service Unavailable");
        assert_eq!(route(Endpoint::Health, "GET /healthz/ready?x=1 HTTP/1.0", &state(true)).status, "200 OK");
    }

    #[test]
    fn each_port_serves_only_its_endpoint() {
        let ready = state(true);
        let metrics = route(Endpoint::Metrics, "GET /stats/prometheus HTTP/1.1", &ready);
        assert_eq!(metrics.status, "200 OK");
        assert!(metrics.body.contains("capture_proxy_connections_total{direction=\"inbound\"} 0"), "{}", metrics.body);
        assert_eq!(route(Endpoint::Health, "GET /stats/prometheus HTTP/1.1", &ready).status, "404 Not Found");
        assert_eq!(route(Endpoint::Metrics, "GET /healthz/ready HTTP/1.1", &ready).status, "404 Not Found");
        assert_eq!(route(Endpoint::Metrics, "POST /stats/prometheus HTTP/1.1", &ready).status, "405 Method Not Allowed");
        assert_eq!(route(Endpoint::Health, "", &ready).status, "405 Method Not Allowed");
    }
}
