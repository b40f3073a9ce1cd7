//! The plain-HTTP operations endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//! Deliberately tiny: GET only, one request per connection, bounded request head.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::debug;

use crate::metrics::Metrics;

/// Largest request head read before answering 431.
const MAX_HEAD: usize = 8 * 1024;
/// A client that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// An HTTP answer: status, content type, body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

fn text(status: u16, body: &str) -> Answer {
    Answer {
        status,
        content_type: "text/plain; charset=utf-8",
        body: body.to_owned(),
    }
}

/// Answers a request given its head (request line and headers).
pub fn respond(head: &str, metrics: &Metrics) -> Answer {
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != "GET" {
        return text(405, "only GET\n");
    }
    match path.split('?').next().unwrap_or_default() {
        "/metrics" => match metrics.encode() {
            Ok(body) => Answer {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body,
            },
            Err(error) => text(500, &format!("{error}\n")),
        },
        "/healthz" | "/readyz" => text(200, "ok\n"),
        _ => text(404, "not found\n"),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    }
}

async fn handle(mut stream: TcpStream, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    let answer = loop {
        let read = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buffer))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break respond(&String::from_utf8_lossy(&head), &metrics);
        }
        if head.len() > MAX_HEAD {
            break text(431, "request head too large\n");
        }
    };
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        answer.status,
        reason(answer.status),
        answer.content_type,
        answer.body.len(),
        answer.body
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Serves until the listener fails; each connection in its own task.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    loop {
        let (stream, peer) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(error) = handle(stream, metrics).await {
                debug!(%peer, %error, "metrics connection");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_served_in_prometheus_text_format() {
        let metrics = Metrics::new().unwrap();
        metrics.bans_expired(1);
        let answer = respond("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &metrics);
        assert_eq!(answer.status, 200);
        assert!(answer.content_type.starts_with("text/plain; version=0.0.4"));
        assert!(
            answer
                .body
                .contains("portsentry_operator_bans_expired_total 1")
        );
    }

    #[test]
    fn health_endpoints_answer_ok_and_others_404_or_405() {
        let metrics = Metrics::new().unwrap();
        assert_eq!(
            respond("GET /healthz HTTP/1.1\r\n\r\n", &metrics).status,
            200
        );
        assert_eq!(
            respond("GET /readyz HTTP/1.1\r\n\r\n", &metrics).status,
            200
        );
        assert_eq!(respond("GET /nope HTTP/1.1\r\n\r\n", &metrics).status, 404);
        assert_eq!(
            respond("POST /metrics HTTP/1.1\r\n\r\n", &metrics).status,
            405
        );
    }

    #[tokio::test]
    async fn a_real_client_gets_the_metrics_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let server = tokio::spawn(serve(listener, metrics));
        let mut client = TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_string(&mut response))
            .await
            .unwrap()
            .unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains("portsentry_operator_bans_active 0"));
        server.abort();
    }
}
