//! Waiting in tests: conditions polled with a deadline (never a fixed sleep standing in for
//! one), and loopback ports free for a server to bind. The one copy every suite uses.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How often a condition is polled.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// A TCP port on `ip` that was free a moment ago (the kernel picked it).
pub fn free_port_on(ip: IpAddr) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0))
        .with_context(|| format!("binding {ip}:0 to find a free port: is the address up?"))?;
    Ok(listener.local_addr()?.port())
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// Polls `check` until it gives a value, or an error (the last one is reported); fails
/// after `timeout` naming `what`.
pub async fn wait_result<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => "condition false".to_owned(),
            Err(err) => format!("{err:#}"),
        };
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last: {last})");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `check` until it returns true (errors count as false, the last one is reported);
/// fails after `timeout` naming `what`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    wait_result(timeout, what, || {
        let checked = check();
        async move { Ok(checked.await?.then_some(())) }
    })
    .await
}

/// Polls `check` until it gives a value; fails after `timeout` naming `what`.
pub async fn wait_value<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_result(timeout, what, || {
        let checked = check();
        async move { Ok(checked.await) }
    })
    .await
}

/// Polls `check` until it returns true; fails after `timeout` naming `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_value(timeout, what, || {
        let checked = check();
        async move { checked.await.then_some(()) }
    })
    .await
}
