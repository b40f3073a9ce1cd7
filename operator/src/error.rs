//! The operator's one error type and its `Result` alias.
//! Every variant says what failed and what to do, and maps to a fixed, bounded reason.

use std::{net::SocketAddr, path::PathBuf};

/// Everything that can go wrong in the operator's I/O around its pure core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0} (the operator retries; check the API server)")]
    Kube(#[source] kube::Error),
    /// The API server refused (or never answered) a write of a generated object.
    #[error(
        "could not write {kind} {name}: {} (fix what the API server names: a \
         ResourceQuota, an admission webhook, the operator's RBAC; the operator retries)",
        brief(source)
    )]
    Write {
        kind: &'static str,
        /// `namespace/name`, or `name` of a cluster-scoped object.
        name: String,
        #[source]
        source: kube::Error,
    },
    /// An object could not be (de)serialized.
    #[error("could not serialize or deserialize an object: {0}")]
    Serialization(#[source] serde_json::Error),
    /// An object lacks a field the API server always sets (name, namespace, uid).
    #[error("object is missing `{0}`")]
    MissingObjectKey(&'static str),
    /// A label selector could not be interpreted.
    #[error("invalid label selector: {0} (correct the policy's podSelector)")]
    InvalidSelector(String),
    /// Time arithmetic left the representable range.
    #[error("time out of range: {0}")]
    Time(#[source] jiff::Error),
    /// Registering or encoding metrics failed.
    #[error("metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    /// A listening socket could not be opened.
    #[error(
        "{what}: cannot listen on {addr}: {source} (is another process using it? change the flag)"
    )]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A file named by a flag could not be read.
    #[error("cannot read {}: {source} (check the flag naming it and the mount)", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A certificate, key or CA bundle is unusable.
    #[error("{what}: {detail}")]
    Certificate {
        /// Which one, and where from (`webhook certificate: ...`, a file's path).
        what: String,
        detail: String,
    },
    /// A setting given by flag or environment is not what it must be.
    #[error("{setting} is invalid: {detail}")]
    Setting {
        /// The flag or environment variable.
        setting: &'static str,
        detail: String,
    },
    /// A server stopped accepting connections.
    #[error("the {server} stopped serving: {source} (the operator exits so that it restarts)")]
    Serve {
        server: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A watch the operator reads from ended; the process must restart.
    #[error("the {0} watch stopped (the operator exits so that it restarts)")]
    WatchStopped(&'static str),
    /// A signal handler could not be installed.
    #[error(
        "cannot handle {signal}: {source} (the process cannot stop cleanly; check its seccomp profile)"
    )]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A supervised task ended; the process exits non-zero so that it restarts.
    #[error("the {task} ended: {why} (the operator exits so that it restarts)")]
    TaskEnded { task: &'static str, why: String },
    /// This replica stopped leading; it exits so that it restarts as a follower.
    #[error("leadership lost: {0} (the replica exits; another takes over)")]
    LeadershipLost(&'static str),
    /// Objects the cleanup waited for were still there when its patience ran out.
    #[error(
        "{what} still present after {}s: {} (see why with kubectl describe; \
         `helm uninstall --no-hooks` skips this cleanup)",
        waited.as_secs(), left.join(", ")
    )]
    NotGone {
        what: &'static str,
        left: Vec<String>,
        waited: std::time::Duration,
    },
}

/// What the API server said (its message and reason), or the client's error.
fn brief(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} ({})", status.message, status.reason),
        other => other.to_string(),
    }
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A fixed CamelCase word for condition reasons and Events: never an object name, never
    /// free text.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Write {
                source: kube::Error::Api(_),
                ..
            } => "WriteRejected",
            Error::Write { .. } => "WriteFailed",
            Error::Serialization(_) => "SerializationFailed",
            Error::MissingObjectKey(_) => "MissingObjectKey",
            Error::InvalidSelector(_) => "InvalidSelector",
            Error::Time(_) => "TimeOutOfRange",
            Error::Metrics(_) => "MetricsFailed",
            Error::Listen { .. } => "ListenFailed",
            Error::ReadFile { .. } => "ReadFileFailed",
            Error::Certificate { .. } => "InvalidCertificate",
            Error::Setting { .. } => "InvalidSetting",
            Error::Serve { .. } => "ServeFailed",
            Error::WatchStopped(_) => "WatchStopped",
            Error::Signal { .. } => "SignalUnavailable",
            Error::TaskEnded { .. } => "TaskEnded",
            Error::LeadershipLost(_) => "LeadershipLost",
            Error::NotGone { .. } => "NotGone",
        }
    }

    /// A fixed label for metrics: [`Error::reason`] in snake case.
    /// Every value [`Error::metric_label`] gives: the series are created at zero, so an error
    /// rate reads 0, not "no data", while nothing fails.
    pub const METRIC_LABELS: [&'static str; 18] = [
        "kube",
        "write_rejected",
        "write_failed",
        "serialization",
        "missing_object_key",
        "invalid_selector",
        "time",
        "metrics",
        "listen",
        "read_file",
        "certificate",
        "setting",
        "serve",
        "watch_stopped",
        "signal",
        "task_ended",
        "leadership_lost",
        "not_gone",
    ];

    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Write {
                source: kube::Error::Api(_),
                ..
            } => "write_rejected",
            Error::Write { .. } => "write_failed",
            Error::Serialization(_) => "serialization",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::InvalidSelector(_) => "invalid_selector",
            Error::Time(_) => "time",
            Error::Metrics(_) => "metrics",
            Error::Listen { .. } => "listen",
            Error::ReadFile { .. } => "read_file",
            Error::Certificate { .. } => "certificate",
            Error::Setting { .. } => "setting",
            Error::Serve { .. } => "serve",
            Error::WatchStopped(_) => "watch_stopped",
            Error::Signal { .. } => "signal",
            Error::TaskEnded { .. } => "task_ended",
            Error::LeadershipLost(_) => "leadership_lost",
            Error::NotGone { .. } => "not_gone",
        }
    }

    /// A write of the `kind` object `name` (`namespace/name`) that failed with `source`.
    pub fn write(kind: &'static str, name: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let name = name.into();
        move |source| Error::Write { kind, name, source }
    }
}

impl From<kube::Error> for Error {
    fn from(error: kube::Error) -> Self {
        Error::Kube(error)
    }
}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Error::Serialization(error)
    }
}

impl From<jiff::Error> for Error {
    fn from(error: jiff::Error) -> Self {
        Error::Time(error)
    }
}

impl From<prometheus::Error> for Error {
    fn from(error: prometheus::Error) -> Self {
        Error::Metrics(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected() -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure(
                "exceeded quota: none, requested: count/networkpolicies=1",
                "Forbidden",
            )
            .with_code(403)
            .boxed(),
        )
    }

    fn examples() -> Vec<Error> {
        vec![
            Error::MissingObjectKey("metadata.uid"),
            Error::InvalidSelector("policy my-secret-name".into()),
            Error::write("NetworkPolicy", "shop/my-secret-name")(rejected()),
            Error::Listen {
                what: "report intake",
                addr: ([0, 0, 0, 0], 8443).into(),
                source: std::io::ErrorKind::AddrInUse.into(),
            },
            Error::ReadFile {
                path: "/etc/secret/my-secret-name".into(),
                source: std::io::ErrorKind::NotFound.into(),
            },
            Error::Certificate {
                what: "webhook certificate".into(),
                detail: "my-secret-name".into(),
            },
            Error::Setting {
                setting: "PORTSENTRY_SENSOR_RESOURCES",
                detail: "my-secret-name".into(),
            },
            Error::WatchStopped("ban"),
            Error::LeadershipLost("lease taken by my-secret-name"),
            Error::NotGone {
                what: "the operator's pods",
                left: vec!["my-secret-name".into()],
                waited: std::time::Duration::from_secs(60),
            },
        ]
    }

    #[test]
    fn metric_labels_are_fixed_words_without_object_details() {
        for error in examples() {
            let label = error.metric_label();
            assert!(Error::METRIC_LABELS.contains(&label), "{label} not listed");
            assert!(
                label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{label}"
            );
            assert!(!label.contains("secret"));
        }
    }

    #[test]
    fn reasons_are_camel_case_words_without_object_details() {
        for error in examples() {
            let reason = error.reason();
            assert!(
                reason.starts_with(|c: char| c.is_ascii_uppercase()),
                "{reason}"
            );
            assert!(
                reason.chars().all(|c| c.is_ascii_alphanumeric()),
                "{reason}"
            );
            assert!(!reason.to_lowercase().contains("secret"));
        }
    }

    #[test]
    fn a_rejected_write_names_the_object_and_what_to_fix() {
        let error = Error::write("NetworkPolicy", "shop/portsentry-web-0")(rejected());
        assert_eq!(error.reason(), "WriteRejected");
        let message = error.to_string();
        assert!(
            message.contains("NetworkPolicy shop/portsentry-web-0"),
            "{message}"
        );
        assert!(message.contains("exceeded quota"), "{message}");
        assert!(message.contains("ResourceQuota"), "{message}");
    }

    #[test]
    fn messages_say_what_is_missing() {
        assert_eq!(
            Error::MissingObjectKey("metadata.uid").to_string(),
            "object is missing `metadata.uid`"
        );
    }
}
