//! The one way the operator serves HTTP/1.1 (hyper), used by the webhook, the intake and the
//! operations endpoint: keep-alive, a cap on connections, deadlines, a body cap and budget.
//!
//! Limits, per server ([`Limits`]):
//! - **Connections**: at most `max_connections` are served at once. Excess connections *wait*
//!   in the kernel's accept queue (the listener is not polled while every slot is taken)
//!   rather than being closed: a burst of the API server's connections is delayed, never
//!   refused, and a slot frees within `header_timeout` of a client going quiet.
//! - **Deadlines**: the TLS handshake (`handshake_timeout`), each request's headers
//!   (`header_timeout`, hyper's `header_read_timeout`; it also runs while a kept-alive
//!   connection waits for its next request, so it is the idle timeout too) and each body
//!   (`body_timeout`, from the first byte asked for to the last).
//! - **Bodies**: a body larger than `max_body` is refused (413) by its `Content-Length`
//!   before a byte of it is read (or as soon as it outgrows the cap); the bodies being read
//!   at once share `body_budget` bytes, charged as bytes arrive, so many clients promising
//!   large bodies and trickling them cost at most that much memory. A body the budget cannot
//!   take is answered 503 (`Retry-After: 1`) at once, never queued.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, Response, StatusCode, body::Incoming, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{OwnedSemaphorePermit, Semaphore, watch},
    time::Instant,
};
use tokio_rustls::{TlsAcceptor, rustls};
use tracing::{debug, warn};

/// The answer every handler gives: a complete body.
pub type Answer = Response<Full<Bytes>>;

/// The limits one server runs with (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_body: usize,
    pub body_budget: usize,
}

impl Limits {
    /// Largest request head (request line and headers) hyper buffers.
    pub const MAX_HEAD: usize = 64 * 1024;

    /// Limits for a server whose bodies are at most `max_body` bytes, `connections` at once.
    pub fn new(max_connections: usize, max_body: usize, body_budget: usize) -> Self {
        Self {
            max_connections,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_body,
            body_budget: body_budget.max(max_body),
        }
    }
}

/// Why a body was not read (a refusal answered to the client, not an operator error).
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    TooLarge(usize),
    TimedOut(Duration),
    Busy,
    Broken(String),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(max) => write!(f, "the body exceeds {max} bytes"),
            BodyError::TimedOut(within) => write!(f, "the body did not arrive within {within:?}"),
            BodyError::Busy => write!(f, "too many bodies are being read at once; retry"),
            BodyError::Broken(why) => write!(f, "the body could not be read: {why}"),
        }
    }
}

impl BodyError {
    /// 413, 408, 503 (with `Retry-After`) or 400.
    pub fn answer(&self) -> Answer {
        let status = match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::TimedOut(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::Broken(_) => StatusCode::BAD_REQUEST,
        };
        let mut answer = text(status, format!("{self}\n"));
        if matches!(self, BodyError::Busy) {
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(1));
        }
        answer
    }
}

/// Reads request bodies within one server's body cap, deadline and shared budget.
#[derive(Clone, Debug)]
pub struct Bodies {
    max: usize,
    timeout: Duration,
    budget: Arc<Semaphore>,
}

impl Bodies {
    pub fn new(limits: &Limits) -> Self {
        Self {
            max: limits.max_body,
            timeout: limits.body_timeout,
            budget: Arc::new(Semaphore::new(limits.body_budget.max(limits.max_body))),
        }
    }

    /// The whole body of `request`, or why not. Its bytes are charged to the budget as they
    /// arrive (a client trickling a body holds only what it sent) and released when this
    /// returns; a body the budget cannot take is refused at once (Busy) rather than queued
    /// behind others, so small requests never wait on large ones.
    pub async fn read(&self, request: Request<Incoming>) -> Result<Bytes, BodyError> {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max as u64) {
            return Err(BodyError::TooLarge(self.max));
        }
        let deadline = Instant::now() + self.timeout;
        let mut body = request.into_body();
        let mut chunks = Vec::new();
        let mut held: Option<OwnedSemaphorePermit> = None;
        let mut length = 0usize;
        loop {
            let frame = tokio::time::timeout_at(deadline, body.frame())
                .await
                .map_err(|_| BodyError::TimedOut(self.timeout))?;
            let data = match frame {
                None => break,
                Some(Err(error)) => return Err(BodyError::Broken(error.to_string())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue, // trailers
                },
            };
            length += data.len();
            if length > self.max {
                return Err(BodyError::TooLarge(self.max));
            }
            let permits = u32::try_from(data.len()).map_err(|_| BodyError::TooLarge(self.max))?;
            if permits > 0 {
                let permit = self
                    .budget
                    .clone()
                    .try_acquire_many_owned(permits)
                    .map_err(|_| BodyError::Busy)?;
                match held.as_mut() {
                    Some(held) => held.merge(permit),
                    None => held = Some(permit),
                }
            }
            chunks.push(data);
        }
        Ok(match chunks.len() {
            1 => chunks.swap_remove(0),
            _ => chunks.concat().into(),
        })
    }
}

/// What a handler knows of the connection a request came on.
#[derive(Clone, Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// Read the body with this (never with `collect` alone): cap, deadline and budget.
    pub bodies: Bodies,
}

/// An answer with `status`, `content_type` and `body`.
pub fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<String>) -> Answer {
    answer(status, "text/plain; charset=utf-8", body.into())
}

/// How long [`bind`] waits for an address in use to be free before giving up.
pub const BIND_PATIENCE: Duration = Duration::from_secs(10);

/// Binds `addr` for the server `what`, retrying for `patience` while the address is in use
/// (a previous process may still hold it); the error says which server and address.
pub async fn bind(
    what: &'static str,
    addr: SocketAddr,
    patience: Duration,
) -> crate::Result<TcpListener> {
    let deadline = Instant::now() + patience;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => return Ok(listener),
            Err(error)
                if error.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline =>
            {
                warn!(what, %addr, %error, "address in use; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(source) => {
                return Err(crate::Error::Listen { what, addr, source });
            }
        }
    }
}

/// Serves `handler` on `listener` (over TLS with the latest config of `tls` when given)
/// within `limits`, until accepting fails for good. Each connection runs in a task of its
/// own that ends with the connection (a panic there ends only that connection).
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<watch::Receiver<Arc<rustls::ServerConfig>>>,
    limits: Limits,
    handler: H,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, Connection) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let bodies = Bodies::new(&limits);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return Ok(());
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) if transient(&error) => {
                debug!(%error, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(error) => return Err(error),
        };
        let _ = tcp.set_nodelay(true);
        // The latest certificate: a rotated one is served without a restart.
        let acceptor = tls
            .as_ref()
            .map(|tls| TlsAcceptor::from(tls.borrow().clone()));
        let connection = Connection {
            peer,
            bodies: bodies.clone(),
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let result = match acceptor {
                None => serve_connection(tcp, connection, &limits, handler).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await
                    {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, connection, &limits, handler).await
                        }
                        Ok(Err(error)) => return debug!(%peer, %error, "TLS handshake"),
                        Err(_) => return debug!(%peer, "TLS handshake timed out"),
                    }
                }
            };
            if let Err(error) = result {
                debug!(%peer, %error, "connection");
            }
        });
    }
}

/// Errors of `accept` that concern one connection or a passing shortage, not the listener.
fn transient(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock
    ) || matches!(error.raw_os_error(), Some(23 | 24 | 105 | 12)) // ENFILE EMFILE ENOBUFS ENOMEM
}

async fn serve_connection<S, H, F>(
    stream: S,
    connection: Connection,
    limits: &Limits,
    handler: H,
) -> hyper::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Connection) -> F + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let service = service_fn(move |request| {
        let answered = handler(request, connection.clone());
        async move { Ok::<_, Infallible>(answered.await) }
    });
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true)
        .max_buf_size(Limits::MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A plain server within `limits` that answers each POST with its body's length.
    async fn server(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            None,
            limits,
            |request, connection| async move {
                match connection.bodies.read(request).await {
                    Ok(body) => text(StatusCode::OK, body.len().to_string()),
                    Err(refusal) => refusal.answer(),
                }
            },
        ));
        address
    }

    fn limits(max_body: usize, budget: usize) -> Limits {
        Limits {
            body_timeout: Duration::from_millis(300),
            ..Limits::new(8, max_body, budget)
        }
    }

    async fn status_line(stream: &mut tokio::net::TcpStream) -> String {
        let mut buffer = vec![0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        let text = String::from_utf8_lossy(&buffer[..read]).into_owned();
        text.lines().next().unwrap_or_default().to_owned()
    }

    async fn post(address: SocketAddr, length: usize, sent: &[u8]) -> tokio::net::TcpStream {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let head = format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(sent).await.unwrap();
        stream
    }

    #[tokio::test]
    async fn a_body_promised_beyond_the_cap_is_refused_before_it_is_sent() {
        let address = server(limits(1024, 4096)).await;
        let mut stream = post(address, 100_000_000, b"").await;
        assert_eq!(
            status_line(&mut stream).await,
            "HTTP/1.1 413 Payload Too Large"
        );
    }

    #[tokio::test]
    async fn a_trickled_body_is_cut_off_at_its_deadline() {
        let address = server(limits(1024, 4096)).await;
        let mut stream = post(address, 100, b"x").await;
        assert_eq!(
            status_line(&mut stream).await,
            "HTTP/1.1 408 Request Timeout"
        );
    }

    #[tokio::test]
    async fn a_body_the_budget_cannot_take_is_refused_at_once_and_others_go_on() {
        let address = server(limits(1000, 1000)).await;
        let _holding = post(address, 1000, &[b'x'; 900]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut refused = post(address, 200, &[b'y'; 200]).await;
        assert_eq!(
            status_line(&mut refused).await,
            "HTTP/1.1 503 Service Unavailable"
        );
        let mut small = post(address, 50, &[b'z'; 50]).await;
        assert_eq!(status_line(&mut small).await, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn one_kept_alive_connection_serves_request_after_request() {
        let address = server(limits(1024, 4096)).await;
        let mut stream = post(address, 3, b"abc").await;
        assert_eq!(status_line(&mut stream).await, "HTTP/1.1 200 OK");
        stream
            .write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nab")
            .await
            .unwrap();
        assert_eq!(status_line(&mut stream).await, "HTTP/1.1 200 OK");
    }
}
