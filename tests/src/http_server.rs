//! A small real HTTP(S) server on 127.0.0.1 for tests: admission webhooks the API server
//! calls, alert hooks the operator posts to. It records each request and answers via a handler.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::certs::CertAndKey;

/// One request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What the handler answers: an HTTP status and a JSON body.
pub type Reply = (u16, Vec<u8>);

type Handler = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

/// A running server; it stops when dropped.
#[derive(Debug)]
pub struct HttpServer {
    address: SocketAddr,
    tls: bool,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl HttpServer {
    /// Serves on a free port of 127.0.0.1, over TLS with `tls` when given (sign it with
    /// `ControlPlane::issue_serving_cert(&["127.0.0.1"])` for webhooks), plain HTTP otherwise.
    /// Runs on the current tokio runtime.
    pub async fn start(
        tls: Option<&CertAndKey>,
        handler: impl Fn(&Recorded) -> Reply + Send + Sync + 'static,
    ) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding 127.0.0.1:0 for a test HTTP server")?;
        let address = listener.local_addr()?;
        let acceptor = tls.map(acceptor).transpose()?;
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let handler: Handler = Arc::new(handler);
        let task = tokio::spawn(serve(listener, acceptor, handler, requests.clone()));
        Ok(Self {
            address,
            tls: tls.is_some(),
            requests,
            task,
        })
    }

    /// `https://127.0.0.1:PORT<path>` (or `http://` without TLS).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.address)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests
            .lock()
            .map(|requests| requests.clone())
            .unwrap_or_default()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn acceptor(cert: &CertAndKey) -> Result<TlsAcceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone())),
        )
        .context("loading the test server's certificate")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn serve(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    handler: Handler,
    requests: Arc<Mutex<Vec<Recorded>>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handler = handler.clone();
                let requests = requests.clone();
                async move { answer(request, &handler, &requests).await }
            });
            let connection = http1::Builder::new();
            match acceptor {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = connection
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = connection
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    handler: &Handler,
    requests: &Mutex<Vec<Recorded>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes().to_vec();
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect(),
        body,
    };
    let (status, reply) = handler(&recorded);
    if let Ok(mut requests) = requests.lock() {
        requests.push(recorded);
    }
    let mut response = Response::new(Full::new(Bytes::from(reply)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
