//! Supervision of the process's long-lived tasks: each is named, and the first to end (with
//! an error, a panic, or even success) is reported so the process can stop, never limp on.

use std::{future::Future, panic::AssertUnwindSafe};

use futures::FutureExt;
use tokio::task::JoinSet;

use crate::Result;

/// How a supervised task ended.
#[derive(Debug)]
pub enum Ended {
    /// It returned `Ok`: a server or controller that should run forever stopped anyway.
    Returned,
    Failed(crate::Error),
    Panicked(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Returned => write!(
                f,
                "it returned, though it should run until the process ends"
            ),
            Ended::Failed(error) => write!(f, "{error}"),
            Ended::Panicked(message) => write!(f, "it panicked: {message}"),
        }
    }
}

/// The named tasks of the process.
#[derive(Debug, Default)]
pub struct Supervisor {
    tasks: JoinSet<(&'static str, Ended)>,
}

impl Supervisor {
    /// Runs `task` as `name` until it ends or the supervisor is dropped.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<()>> + Send + 'static,
    {
        self.tasks.spawn(async move {
            let ended = match AssertUnwindSafe(task).catch_unwind().await {
                Ok(Ok(())) => Ended::Returned,
                Ok(Err(error)) => Ended::Failed(error),
                Err(panic) => Ended::Panicked(
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "no message".into()),
                ),
            };
            (name, ended)
        });
    }

    /// Runs `task`, which never fails (a watch loop, a worker), as `name`.
    pub fn spawn_infallible<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, task.map(Ok));
    }

    /// Waits for the first task to end: its name and how (None: there are no tasks).
    pub async fn first_end(&mut self) -> Option<(&'static str, Ended)> {
        loop {
            match self.tasks.join_next().await? {
                Ok(ended) => return Some(ended),
                // Only aborted tasks fail to join (panics are caught above); none is.
                Err(_) => continue,
            }
        }
    }

    /// Stops every task (at its next await point) and waits until they are gone.
    pub async fn stop_all(&mut self) {
        self.tasks.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_its_reason() {
        let mut tasks = Supervisor::default();
        tasks.spawn_infallible("forever", std::future::pending());
        tasks.spawn("failing", async {
            Err(crate::Error::Certificate {
                what: "webhook certificate".into(),
                detail: "no certificate".into(),
            })
        });
        let (name, ended) = tasks.first_end().await.unwrap();
        assert_eq!(name, "failing");
        assert!(ended.to_string().contains("no certificate"), "{ended}");
    }

    #[tokio::test]
    async fn a_task_that_returns_or_panics_counts_as_ended() {
        let mut tasks = Supervisor::default();
        tasks.spawn_infallible("returns", async {});
        assert!(matches!(
            tasks.first_end().await,
            Some(("returns", Ended::Returned))
        ));
        tasks.spawn_infallible("panics", async { panic!("boom") });
        let (name, ended) = tasks.first_end().await.unwrap();
        assert_eq!(name, "panics");
        assert!(ended.to_string().contains("boom"), "{ended}");
    }
}
