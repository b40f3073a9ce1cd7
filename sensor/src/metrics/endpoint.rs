//! The `/metrics`, `/healthz` and `/readyz` endpoints, served by hyper's HTTP/1.1 server with
//! keep-alive and [`Limits`]: a connection cap, header and body deadlines, a body cap.
//!
//! Idle or slow clients cannot hold the endpoint: a connection that has not sent a whole
//! request head within [`Limits::header_read`] is closed (hyper's own deadline, which also
//! ends idle keep-alive connections), and past [`Limits::connections`] open connections new
//! ones wait in the kernel's accept queue until one of those deadlines frees a slot.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Body, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};

use super::registry::Metrics;
use crate::error::{Error, Result};

/// What one client may cost the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait to be accepted.
    pub connections: usize,
    /// Longest wait for a request head (also how long an idle keep-alive connection lives).
    pub header_read: Duration,
    /// Longest wait for a request body once its head has arrived.
    pub body_read: Duration,
    /// Largest request body read (GET needs none); a larger one is refused with 413.
    pub body_bytes: usize,
}

impl Default for Limits {
    /// A scrape every few seconds from one or two Prometheus servers and the kubelet's probes
    /// need a handful of connections; 64 leaves room without letting clients pin memory.
    fn default() -> Self {
        Self {
            connections: 64,
            header_read: Duration::from_secs(5),
            body_read: Duration::from_secs(5),
            body_bytes: 4096,
        }
    }
}

/// Binds `addr` and serves the endpoints with the default [`Limits`] until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<JoinHandle<()>> {
    serve_with(addr, metrics, Limits::default()).await
}

/// Binds `addr` and serves the endpoints with `limits`.
pub async fn serve_with(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Metrics {
            addr: addr.to_string(),
            source,
        })?;
    Ok(tokio::spawn(accept_loop(listener, metrics, limits)))
}

async fn accept_loop(listener: TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true);
    loop {
        // Never closed, so acquiring only waits for a slot.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let connection = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |request| answer(request, metrics.clone(), limits)),
        );
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "metrics endpoint: connection ended with an error");
            }
            drop(slot);
        });
    }
}

/// Reads (and drops) the request body within the limits, then answers the route.
async fn answer(
    request: Request<hyper::body::Incoming>,
    metrics: Arc<Metrics>,
    limits: Limits,
) -> std::result::Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let (head, body) = request.into_parts();
    let too_large =
        body.size_hint().upper().unwrap_or(body.size_hint().lower()) > limits.body_bytes as u64;
    if too_large {
        return Ok(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large: send GET without a body\n",
        ));
    }
    let read = Limited::new(body, limits.body_bytes).collect();
    match tokio::time::timeout(limits.body_read, read).await {
        Ok(Ok(_)) => Ok(route(&metrics, &head.method, head.uri.path())),
        Ok(Err(_)) => Ok(text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body too large: send GET without a body\n",
        )),
        Err(_) => Ok(text(StatusCode::REQUEST_TIMEOUT, "request body too slow\n")),
    }
}

/// The response for a request path.
fn route(metrics: &Metrics, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use GET\n",
        );
    }
    match path {
        "/metrics" => with_type(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if metrics.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: decoys not bound yet\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_type(status, "text/plain", body.to_owned())
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use hyper::client::conn::http1 as client;
    use tokio::{io::AsyncWriteExt, net::TcpStream};

    use super::*;

    async fn endpoint(limits: Limits) -> (SocketAddr, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::per_port(&[1], &[]).expect("metrics"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(accept_loop(listener, metrics.clone(), limits));
        (addr, metrics)
    }

    /// One keep-alive client connection.
    async fn connect(addr: SocketAddr) -> client::SendRequest<http_body_util::Empty<Bytes>> {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, connection) = client::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        sender
    }

    async fn get(
        sender: &mut client::SendRequest<http_body_util::Empty<Bytes>>,
        method: Method,
        path: &str,
    ) -> (StatusCode, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "sensor")
            .body(http_body_util::Empty::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        let status = response.status();
        let body = response.into_body().collect().await.expect("body");
        (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        )
    }

    #[tokio::test]
    async fn the_endpoint_answers_scrapes_over_one_kept_alive_connection() {
        let (addr, _) = endpoint(Limits::default()).await;
        let mut sender = connect(addr).await;
        for _ in 0..3 {
            let (status, body) = get(&mut sender, Method::GET, "/metrics").await;
            assert_eq!(status, StatusCode::OK);
            assert!(body.contains("portsentry_sensor_hits_total"), "{body}");
        }
    }

    #[tokio::test]
    async fn readyz_fails_until_decoys_are_bound_and_other_routes_keep_their_statuses() {
        let (addr, metrics) = endpoint(Limits::default()).await;
        let mut sender = connect(addr).await;
        assert_eq!(get(&mut sender, Method::GET, "/readyz").await.0, 503);
        metrics.set_ready(true);
        assert_eq!(get(&mut sender, Method::GET, "/readyz").await.0, 200);
        assert_eq!(get(&mut sender, Method::GET, "/healthz").await.0, 200);
        assert_eq!(get(&mut sender, Method::GET, "/nope").await.0, 404);
        assert_eq!(get(&mut sender, Method::POST, "/metrics").await.0, 405);
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_refused_without_being_read() {
        let (addr, _) = endpoint(Limits::default()).await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: s\r\nContent-Length: 100000000\r\n\r\n")
            .await
            .expect("write");
        let mut reply = vec![0u8; 64];
        let n = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut stream, &mut reply),
        )
        .await
        .expect("an answer before the body")
        .expect("read");
        let reply = String::from_utf8_lossy(&reply[..n]);
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    }

    #[tokio::test]
    async fn idle_and_slow_connections_beyond_the_cap_do_not_stop_a_scrape() {
        let limits = Limits {
            connections: 8,
            header_read: Duration::from_secs(1),
            ..Limits::default()
        };
        let (addr, _) = endpoint(limits).await;
        let mut hogs = Vec::new();
        for i in 0..40 {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            if i % 2 == 0 {
                // Slow: a request head that never ends.
                stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: s\r\n")
                    .await
                    .expect("write");
            }
            hogs.push(stream);
        }
        let scrape = async {
            let mut sender = connect(addr).await;
            get(&mut sender, Method::GET, "/metrics").await
        };
        // Each hog is cut after `header_read`; a scrape waits at most a few of those rounds.
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), scrape)
            .await
            .expect("a scrape is answered while 40 idle or slow connections are open");
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("portsentry_sensor_hits_total"), "{body}");
        drop(hogs);
    }
}
