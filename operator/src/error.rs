//! The operator's one error type and its `Result` alias.
//! Every variant maps to a fixed, bounded metric label.

/// Everything that can go wrong in the operator's I/O around its pure core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the Kubernetes API failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[source] kube::Error),
    /// An object could not be (de)serialized.
    #[error("could not serialize or deserialize an object: {0}")]
    Serialization(#[source] serde_json::Error),
    /// An object lacks a field the API server always sets (name, namespace, uid).
    #[error("object is missing `{0}`")]
    MissingObjectKey(&'static str),
    /// A label selector could not be interpreted.
    #[error("invalid label selector: {0}")]
    InvalidSelector(String),
    /// Time arithmetic left the representable range.
    #[error("time out of range: {0}")]
    Time(#[source] jiff::Error),
    /// Registering or encoding metrics failed.
    #[error("metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    /// The operator's own configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// A server could not listen on its address.
    #[error("{what}: cannot listen on {addr}: {source} (is another process using the port?)")]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A server stopped accepting connections.
    #[error("{what} stopped serving: {source}")]
    Served {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The operator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A fixed label for metrics: never an object name, never free text.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serialization(_) => "serialization",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::InvalidSelector(_) => "invalid_selector",
            Error::Time(_) => "time",
            Error::Metrics(_) => "metrics",
            Error::Config(_) => "config",
            Error::Listen { .. } => "listen",
            Error::Served { .. } => "served",
        }
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

    #[test]
    fn metric_labels_are_fixed_words_without_object_details() {
        let errors = [
            Error::MissingObjectKey("metadata.uid"),
            Error::InvalidSelector("policy my-secret-name".into()),
            Error::Config("anything".into()),
        ];
        for error in errors {
            let label = error.metric_label();
            assert!(
                label.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{label}"
            );
            assert!(!label.contains("secret"));
        }
    }

    #[test]
    fn messages_say_what_is_missing() {
        assert_eq!(
            Error::MissingObjectKey("metadata.uid").to_string(),
            "object is missing `metadata.uid`"
        );
    }
}
