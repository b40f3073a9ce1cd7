//! The addresses never banned that the cluster tells: its nodes and the API server, read at
//! start and kept current in the background for every controller and the intake.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, api::ListParams};
use tracing::warn;

use crate::{Result, enforce::bans::Guards};

/// Parses every address in `texts`, skipping what is not an address.
fn addresses<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<IpAddr> {
    texts.into_iter().filter_map(|t| t.parse().ok()).collect()
}

/// Reads node and API server addresses from the cluster.
pub async fn discover_guards(client: &Client, operator_addrs: &[IpAddr]) -> Result<Guards> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let node_addrs = addresses(
        nodes
            .items
            .iter()
            .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
            .flatten()
            .map(|a| a.address.as_str()),
    );
    let service = Api::<Service>::namespaced(client.clone(), "default")
        .get_opt("kubernetes")
        .await?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels("kubernetes.io/service-name=kubernetes"))
        .await?;
    let mut apiserver_addrs = addresses(
        service
            .iter()
            .filter_map(|s| s.spec.as_ref()?.cluster_ips.as_ref())
            .flatten()
            .map(String::as_str),
    );
    apiserver_addrs.extend(addresses(
        slices
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .flat_map(|e| e.addresses.iter())
            .map(String::as_str),
    ));
    Ok(Guards {
        node_addrs,
        apiserver_addrs,
        operator_addrs: operator_addrs.to_vec(),
    })
}

/// Keeps `guards` current: nodes come and go, the API server may move.
pub async fn refresh_guards(
    client: Client,
    guards: Arc<RwLock<Guards>>,
    operator_addrs: Vec<IpAddr>,
    every: Duration,
) {
    loop {
        match discover_guards(&client, &operator_addrs).await {
            Ok(fresh) => {
                if let Ok(mut current) = guards.write() {
                    *current = fresh;
                }
            }
            Err(error) => warn!(%error, "could not refresh protected addresses"),
        }
        tokio::time::sleep(every).await;
    }
}
