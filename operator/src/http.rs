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
//!   before a byte of it is read; the bodies being read at once share `body_budget` bytes, so
//!   many clients promising large bodies and trickling them cost at most that much memory.
//!   Excess readers wait (within their body deadline) for a share, then get 503.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::{
    Request, Response, StatusCode, body::Incoming, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
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

    /// The whole body of `request`, or why not.
    pub async fn read(&self, request: Request<Incoming>) -> Result<Bytes, BodyError> {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|length| length > self.max as u64) {
            return Err(BodyError::TooLarge(self.max));
        }
        // What this body may occupy: its declared length, or the cap when chunked.
        let share = declared.map_or(self.max, |l| l as usize);
        let deadline = Instant::now() + self.timeout;
        let _share = match u32::try_from(share) {
            Ok(0) => None,
            Ok(permits) => Some(
                tokio::time::timeout_at(deadline, self.budget.acquire_many(permits))
                    .await
                    .map_err(|_| BodyError::Busy)?
                    .map_err(|_| BodyError::Busy)?,
            ),
            Err(_) => return Err(BodyError::TooLarge(self.max)),
        };
        let collected = tokio::time::timeout_at(
            deadline,
            Limited::new(request.into_body(), self.max).collect(),
        )
        .await
        .map_err(|_| BodyError::TimedOut(self.timeout))?;
        match collected {
            Ok(body) => Ok(body.to_bytes()),
            Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
                Err(BodyError::TooLarge(self.max))
            }
            Err(error) => Err(BodyError::Broken(error.to_string())),
        }
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
