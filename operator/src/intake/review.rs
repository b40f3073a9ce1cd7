//! What a TokenReview says about a report's sender: the pod a projected service account
//! token was bound to, checked against the live pod, as an intake `Authentication`.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};

use crate::{
    intake::authentic::{self, Expected},
    intake::checks::{Authentication, Reporter},
    labels::{NODE_SENSOR_LABEL, TOKEN_AUDIENCE},
};

/// How long a reviewed sensor identity is trusted without asking the API server again.
/// The API server's own webhook token authenticator caches for 2 minutes; a pod deleted
/// meanwhile can report for at most this long.
pub const REVIEW_TTL: Duration = Duration::from_secs(10);
/// Reviewed tokens remembered at most.
const REVIEW_CACHE: usize = 10_000;

/// Sensor identities of recently reviewed tokens, keyed by the token's SHA-256 (the token
/// itself is not kept; a weak hash would let a forged token collide with a cached one).
/// Only authenticated sensors are remembered: every refusal is reviewed again.
#[derive(Debug, Default)]
pub struct ReviewCache {
    entries: HashMap<[u8; 32], (Instant, Reporter)>,
}

fn token_digest(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

impl ReviewCache {
    pub fn get(&self, token: &str, now: Instant) -> Option<Reporter> {
        let (at, reporter) = self.entries.get(&token_digest(token))?;
        (now.saturating_duration_since(*at) < REVIEW_TTL).then(|| reporter.clone())
    }

    pub fn put(&mut self, token: &str, reporter: Reporter, now: Instant) {
        if self.entries.len() >= REVIEW_CACHE {
            self.entries
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < REVIEW_TTL);
            if self.entries.len() >= REVIEW_CACHE {
                self.entries.clear();
            }
        }
        self.entries.insert(token_digest(token), (now, reporter));
    }
}

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";

/// The TokenReview to create for a bearer token.
pub fn request(token: &str) -> TokenReview {
    TokenReview {
        metadata: Default::default(),
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![TOKEN_AUDIENCE.to_owned()]),
        },
        status: None,
    }
}

/// A token bound to a pod, as the API server vouches for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodToken {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// What the review says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenIdentity {
    /// Not authenticated, or not for our audience.
    Invalid,
    /// Authenticated, but not a pod-bound service account token.
    NotAPod,
    Pod(PodToken),
}

/// Reads a TokenReview's status.
pub fn identity(status: Option<&TokenReviewStatus>) -> TokenIdentity {
    let Some(status) = status else {
        return TokenIdentity::Invalid;
    };
    let audience_ok = status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|a| a == TOKEN_AUDIENCE));
    if status.authenticated != Some(true) || !audience_ok {
        return TokenIdentity::Invalid;
    }
    let Some(user) = &status.user else {
        return TokenIdentity::NotAPod;
    };
    let extra = |key: &str| {
        user.extra
            .as_ref()
            .and_then(|e| e.get(key))
            .and_then(|v| v.first())
            .cloned()
    };
    let account = user
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix(SERVICE_ACCOUNT_PREFIX))
        .and_then(|rest| rest.split_once(':'));
    match (account, extra(POD_NAME), extra(POD_UID)) {
        (Some((namespace, service_account)), Some(pod_name), Some(pod_uid)) => {
            TokenIdentity::Pod(PodToken {
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
                pod_name,
                pod_uid,
            })
        }
        _ => TokenIdentity::NotAPod,
    }
}

fn forged(token: &PodToken, why: String) -> Authentication {
    Authentication::Forged {
        namespace: token.namespace.clone(),
        pod: token.pod_name.clone(),
        why,
    }
}

/// The sender, given the live pod the token names (absent: deleted) and the labels of its
/// namespace and node. A pod whose uid differs is a different pod under a reused name. A
/// node-sensor pod of the operator's namespace reports for its node. Either must run the
/// sensor as the operator built it ([`authentic`]), else the report is forged.
pub fn reporter(
    token: &PodToken,
    pod: Option<&Pod>,
    namespace_labels: &BTreeMap<String, String>,
    expected: &Expected,
    node_labels: Option<&BTreeMap<String, String>>,
) -> Authentication {
    let operator_namespace = expected.operator_namespace.as_str();
    let Some(pod) = pod else {
        return Authentication::Invalid;
    };
    if pod.metadata.uid.as_deref() != Some(token.pod_uid.as_str())
        || pod.metadata.namespace.as_deref() != Some(token.namespace.as_str())
    {
        return Authentication::Invalid;
    }
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let (key, value) = NODE_SENSOR_LABEL;
    let node_sensor =
        token.namespace == operator_namespace && labels.get(key).map(String::as_str) == Some(value);
    if node_sensor {
        if let Err(forgery) = authentic::check_node_sensor(pod, expected) {
            return forged(token, forgery.to_string());
        }
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        return match (node, node_labels) {
            (Some(name), Some(labels)) => Authentication::Sensor(Reporter::Node {
                name,
                labels: labels.clone(),
            }),
            _ => Authentication::NotASensor,
        };
    }
    if token.namespace == "node" {
        // Evidence names a sidecar "namespace/pod" and a node sensor "node/name".
        return forged(
            token,
            "pods of a namespace named `node` cannot report: their evidence would read as a \
             node sensor's"
                .into(),
        );
    }
    if let Err(forgery) = authentic::check_sidecar(pod, expected) {
        return forged(token, forgery.to_string());
    }
    Authentication::Sensor(Reporter::Pod {
        namespace: token.namespace.clone(),
        name: token.pod_name.clone(),
        labels,
        namespace_labels: namespace_labels.clone(),
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;
    use crate::intake::authentic::fixtures;

    fn status(
        authenticated: bool,
        audiences: &[&str],
        username: &str,
        pod: bool,
    ) -> TokenReviewStatus {
        let mut extra = BTreeMap::new();
        if pod {
            extra.insert(POD_NAME.to_owned(), vec!["web-0".to_owned()]);
            extra.insert(POD_UID.to_owned(), vec!["uid-web-0".to_owned()]);
        }
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect()),
            error: None,
            user: Some(UserInfo {
                username: Some(username.to_owned()),
                uid: None,
                groups: None,
                extra: Some(extra),
            }),
        }
    }

    fn token() -> PodToken {
        PodToken {
            namespace: "shop".into(),
            service_account: "default".into(),
            pod_name: "web-0".into(),
            pod_uid: "uid-web-0".into(),
        }
    }

    /// A pod as injected (a node sensor of the DaemonSet when labelled as one).
    fn pod(namespace: &str, uid: &str, labels: &[(&str, &str)]) -> Pod {
        let mut pod = if labels.contains(&NODE_SENSOR_LABEL) && namespace == "portsentry-system" {
            fixtures::node_pod(true)
        } else {
            fixtures::injected()
        };
        pod.metadata.name = Some("web-0".into());
        pod.metadata.namespace = Some(namespace.into());
        pod.metadata.uid = Some(uid.into());
        pod.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        );
        pod.spec.as_mut().unwrap().node_name = Some("node-1".into());
        pod
    }

    #[test]
    fn the_review_asks_for_our_audience() {
        assert_eq!(
            request("t").spec.audiences,
            Some(vec!["portsentry.io".to_owned()])
        );
    }

    #[test]
    fn a_pod_bound_token_for_our_audience_names_the_pod() {
        let s = status(
            true,
            &[TOKEN_AUDIENCE],
            "system:serviceaccount:shop:default",
            true,
        );
        assert_eq!(identity(Some(&s)), TokenIdentity::Pod(token()));
    }

    #[test]
    fn an_unauthenticated_token_or_another_audience_is_invalid() {
        let s = status(
            false,
            &[TOKEN_AUDIENCE],
            "system:serviceaccount:shop:default",
            true,
        );
        assert_eq!(identity(Some(&s)), TokenIdentity::Invalid);
        let s = status(
            true,
            &["https://kubernetes.default.svc"],
            "system:serviceaccount:shop:default",
            true,
        );
        assert_eq!(identity(Some(&s)), TokenIdentity::Invalid);
        assert_eq!(identity(None), TokenIdentity::Invalid);
    }

    #[test]
    fn a_user_or_an_unbound_service_account_token_is_not_a_pod() {
        let s = status(true, &[TOKEN_AUDIENCE], "alice", false);
        assert_eq!(identity(Some(&s)), TokenIdentity::NotAPod);
        let s = status(
            true,
            &[TOKEN_AUDIENCE],
            "system:serviceaccount:shop:default",
            false,
        );
        assert_eq!(identity(Some(&s)), TokenIdentity::NotAPod);
    }

    #[test]
    fn the_live_pod_gives_the_reporter_its_labels() {
        let p = pod("shop", "uid-web-0", &[("app", "web")]);
        let ns = BTreeMap::from([("team".to_owned(), "shop".to_owned())]);
        match reporter(&token(), Some(&p), &ns, &fixtures::expected(), None) {
            Authentication::Sensor(Reporter::Pod {
                namespace,
                labels,
                namespace_labels,
                ..
            }) => {
                assert_eq!(namespace, "shop");
                assert_eq!(labels["app"], "web");
                assert_eq!(namespace_labels["team"], "shop");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_deleted_pod_or_a_reused_name_is_invalid() {
        let ns = BTreeMap::new();
        assert_eq!(
            reporter(&token(), None, &ns, &fixtures::expected(), None),
            Authentication::Invalid
        );
        let other = pod("shop", "uid-someone-else", &[]);
        assert_eq!(
            reporter(&token(), Some(&other), &ns, &fixtures::expected(), None),
            Authentication::Invalid
        );
    }

    #[test]
    fn a_node_sensor_pod_reports_for_its_node() {
        let mut t = token();
        t.namespace = "portsentry-system".into();
        let p = pod("portsentry-system", "uid-web-0", &[NODE_SENSOR_LABEL]);
        let node_labels = BTreeMap::from([("edge".to_owned(), "true".to_owned())]);
        assert_eq!(
            reporter(
                &t,
                Some(&p),
                &BTreeMap::new(),
                &fixtures::expected(),
                Some(&node_labels)
            ),
            Authentication::Sensor(Reporter::Node {
                name: "node-1".into(),
                labels: node_labels
            })
        );
    }

    #[test]
    fn a_pod_without_the_injected_sensor_is_forged() {
        let mut p = pod("shop", "uid-web-0", &[("app", "web")]);
        p.spec.as_mut().unwrap().init_containers = None;
        assert!(matches!(
            reporter(&token(), Some(&p), &BTreeMap::new(), &fixtures::expected(), None),
            Authentication::Forged { why, .. } if why.contains("no portsentry-sensor container")
        ));
    }

    #[test]
    fn a_labelled_pod_of_the_operator_namespace_not_owned_by_the_daemon_set_is_forged() {
        let mut t = token();
        t.namespace = "portsentry-system".into();
        let mut p = pod("portsentry-system", "uid-web-0", &[NODE_SENSOR_LABEL]);
        p.metadata.owner_references = None;
        assert!(matches!(
            reporter(&t, Some(&p), &BTreeMap::new(), &fixtures::expected(), None),
            Authentication::Forged { .. }
        ));
    }

    #[test]
    fn a_sidecar_of_a_namespace_named_node_cannot_pass_for_a_node_sensor() {
        let mut t = token();
        t.namespace = "node".into();
        let p = pod("node", "uid-web-0", &[("app", "web")]);
        assert!(matches!(
            reporter(&t, Some(&p), &BTreeMap::new(), &fixtures::expected(), None),
            Authentication::Forged { .. }
        ));
    }

    #[test]
    fn the_node_sensor_label_counts_only_in_the_operator_namespace() {
        let p = pod("shop", "uid-web-0", &[NODE_SENSOR_LABEL]);
        assert!(matches!(
            reporter(
                &token(),
                Some(&p),
                &BTreeMap::new(),
                &fixtures::expected(),
                None
            ),
            Authentication::Sensor(Reporter::Pod { .. })
        ));
    }
}
