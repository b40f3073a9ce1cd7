//! The plain-HTTP operations endpoint: `/metrics` (Prometheus text), `/healthz`, and
//! `/readyz`, which is true only while every condition of [`Readiness`] holds.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;

use crate::{
    http::{self, Answer, Limits},
    metrics::Metrics,
};

/// What this replica needs before its Service may route to it: named conditions, each met
/// or not with the reason. Cloned handles share one state.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<Mutex<BTreeMap<&'static str, Option<String>>>>);

impl Readiness {
    fn update(&self, what: &'static str, state: Option<String>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(what, state);
    }

    /// `what` is needed and not met yet, because `why`.
    pub fn not_ready(&self, what: &'static str, why: impl Into<String>) {
        self.update(what, Some(why.into()));
    }

    /// `what` is met.
    pub fn ready(&self, what: &'static str) {
        self.update(what, None);
    }

    /// Every condition not met, as `what: why`, in name order (empty: ready).
    pub fn unmet(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(|(what, why)| Some(format!("{what}: {}", why.as_ref()?)))
            .collect()
    }
}

/// Answers one request of the operations endpoint.
pub fn respond<B>(request: &Request<B>, metrics: &Metrics, readiness: &Readiness) -> Answer {
    if request.method() != Method::GET {
        return http::text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match request.uri().path() {
        "/metrics" => match metrics.encode() {
            Ok(body) => http::answer(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                body,
            ),
            Err(error) => http::text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
        },
        "/healthz" => http::text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let unmet = readiness.unmet();
            if unmet.is_empty() {
                http::text(StatusCode::OK, "ok\n")
            } else {
                let body = format!("not ready:\n{}\n", unmet.join("\n"));
                http::text(StatusCode::SERVICE_UNAVAILABLE, body)
            }
        }
        _ => http::text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Limits of the operations endpoint: GETs only, so no body is ever read.
pub fn limits() -> Limits {
    Limits::new(64, 0, 0)
}

/// Serves until the listener fails.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Readiness,
) -> std::io::Result<()> {
    http::serve(listener, None, limits(), move |request, _| {
        let answer = respond(&request, &metrics, &readiness);
        async move { answer }
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use http_body_util::BodyExt;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    async fn body(answer: Answer) -> String {
        let bytes = answer.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn metrics_are_served_in_prometheus_text_format() {
        let metrics = Metrics::new().unwrap();
        metrics.bans_expired(1);
        let answer = respond(&get("/metrics"), &metrics, &Readiness::default());
        assert_eq!(answer.status(), StatusCode::OK);
        let content_type = answer.headers()[hyper::header::CONTENT_TYPE].to_str();
        assert!(
            content_type
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        assert!(
            body(answer)
                .await
                .contains("portsentry_operator_bans_expired_total 1")
        );
    }

    #[test]
    fn health_answers_ok_and_other_paths_404_or_405() {
        let (metrics, ready) = (Metrics::new().unwrap(), Readiness::default());
        assert_eq!(
            respond(&get("/healthz"), &metrics, &ready).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&get("/nope"), &metrics, &ready).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(
            respond(&post, &metrics, &ready).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[tokio::test]
    async fn readyz_names_every_unmet_condition_until_all_are_met() {
        let (metrics, readiness) = (Metrics::new().unwrap(), Readiness::default());
        readiness.not_ready("webhook", "not listening yet");
        readiness.not_ready("intake", "certificate not loaded");
        let answer = respond(&get("/readyz"), &metrics, &readiness);
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        let text = body(answer).await;
        assert!(text.contains("webhook: not listening yet"), "{text}");
        assert!(text.contains("intake: certificate not loaded"), "{text}");
        readiness.ready("webhook");
        readiness.ready("intake");
        assert_eq!(
            respond(&get("/readyz"), &metrics, &readiness).status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_real_client_gets_the_metrics_twice_on_one_kept_alive_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new().unwrap());
        let server = tokio::spawn(serve(listener, metrics, Readiness::default()));
        let mut client = tokio::net::TcpStream::connect(address).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\nGET /metrics HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.read_to_string(&mut response),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert_eq!(response.matches("HTTP/1.1 200 OK").count(), 2, "{response}");
        assert!(response.contains("portsentry_operator_bans_active 0"));
        server.abort();
    }
}
