//! A real Prometheus (Debian's `prometheus`) for the node suite: scrape jobs derived from the
//! chart's rendered ServiceMonitor and PodMonitor, the chart's PrometheusRule groups as its
//! rule file, and reads of its HTTP API.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Api, Client, ResourceExt, api::ListParams};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::node_net::in_netns;

/// Where Prometheus listens inside the namespace it runs in.
pub const PROMETHEUS_ADDR: &str = "127.0.0.1:19090";

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn selector_string(match_labels: &Value) -> String {
    match_labels
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, value)| format!("{name}={}", value.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",")
}

fn match_names(selector: &Value) -> Vec<String> {
    selector["matchNames"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect()
}

/// Scrape jobs for every ServiceMonitor and PodMonitor endpoint of `documents`, with the
/// targets and labels prometheus-operator's generated discovery would give them
/// (`namespace`, `service`, `pod`, `container`, `endpoint`, `job`). Debian's Prometheus is
/// built without Kubernetes service discovery, so this step reads the cluster itself: the
/// monitor's selector, namespaces and port name pick EndpointSlice endpoints (ServiceMonitor)
/// or running pods' container ports (PodMonitor), which become static targets. `interval`
/// replaces the rendered interval so a test needs seconds, not minutes.
pub async fn scrape_jobs(
    documents: &[Value],
    client: &Client,
    interval: &str,
) -> Result<Vec<Value>> {
    let mut jobs = Vec::new();
    for monitor in of_kind(documents, "ServiceMonitor") {
        let name = monitor["metadata"]["name"].as_str().unwrap_or_default();
        let spec = &monitor["spec"];
        let selector = selector_string(&spec["selector"]["matchLabels"]);
        for (i, endpoint) in spec["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let port_name = endpoint["port"].as_str().unwrap_or_default();
            let mut groups = Vec::new();
            for namespace in match_names(&spec["namespaceSelector"]) {
                let services = Api::<Service>::namespaced(client.clone(), &namespace)
                    .list(&ListParams::default().labels(&selector))
                    .await?;
                for service in services.items {
                    let service_name = service.name_any();
                    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &namespace)
                        .list(
                            &ListParams::default()
                                .labels(&format!("kubernetes.io/service-name={service_name}")),
                        )
                        .await?;
                    for slice in slices.items {
                        let port = slice
                            .ports
                            .iter()
                            .flatten()
                            .find(|p| p.name.as_deref() == Some(port_name))
                            .and_then(|p| p.port);
                        let Some(port) = port else { continue };
                        for address in slice.endpoints.iter() {
                            let pod = address
                                .target_ref
                                .as_ref()
                                .and_then(|r| r.name.clone())
                                .unwrap_or_default();
                            for ip in &address.addresses {
                                groups.push(json!({
                                    "targets": [format!("{ip}:{port}")],
                                    "labels": {"namespace": namespace, "service": service_name,
                                               "pod": pod, "endpoint": port_name,
                                               "job": service_name},
                                }));
                            }
                        }
                    }
                }
            }
            jobs.push(json!({
                "job_name": format!("serviceMonitor/{name}/{i}"),
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "metrics_path": endpoint["path"],
                "static_configs": groups,
            }));
        }
    }
    for monitor in of_kind(documents, "PodMonitor") {
        let (namespace, name) = (
            monitor["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default(),
            monitor["metadata"]["name"].as_str().unwrap_or_default(),
        );
        let spec = &monitor["spec"];
        let selector = selector_string(&spec["selector"]["matchLabels"]);
        let pods = if spec["namespaceSelector"]["any"] == true {
            Api::<Pod>::all(client.clone())
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
        } else {
            let mut pods = Vec::new();
            for namespace in match_names(&spec["namespaceSelector"]) {
                pods.extend(
                    Api::<Pod>::namespaced(client.clone(), &namespace)
                        .list(&ListParams::default().labels(&selector))
                        .await?
                        .items,
                );
            }
            pods
        };
        for (i, endpoint) in spec["podMetricsEndpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let port_name = endpoint["port"].as_str().unwrap_or_default();
            let mut groups = Vec::new();
            for pod in &pods {
                let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                    continue;
                };
                let spec = pod.spec.as_ref();
                let containers = spec
                    .into_iter()
                    .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers));
                for container in containers {
                    let port = container
                        .ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref() == Some(port_name));
                    let Some(port) = port else { continue };
                    groups.push(json!({
                        "targets": [format!("{ip}:{}", port.container_port)],
                        "labels": {"namespace": pod.namespace().unwrap_or_default(),
                                   "pod": pod.name_any(), "container": container.name,
                                   "endpoint": port_name, "job": format!("{namespace}/{name}")},
                    }));
                }
            }
            jobs.push(json!({
                "job_name": format!("podMonitor/{namespace}/{name}/{i}"),
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "metrics_path": endpoint["path"],
                "static_configs": groups,
            }));
        }
    }
    if jobs.is_empty() {
        bail!("the rendered chart has no ServiceMonitor or PodMonitor endpoint");
    }
    Ok(jobs)
}

/// The rule groups of every rendered PrometheusRule, as one rule file.
pub fn rule_file(documents: &[Value]) -> Result<Value> {
    let groups: Vec<Value> = of_kind(documents, "PrometheusRule")
        .into_iter()
        .flat_map(|rule| {
            rule["spec"]["groups"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    if groups.is_empty() {
        bail!("the rendered chart has no PrometheusRule group");
    }
    Ok(json!({"groups": groups}))
}

/// A Prometheus server running in a network namespace; killed on drop.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    netns: String,
    // Declared last: removed after the process is gone.
    dir: TempDir,
}

impl Prometheus {
    /// Starts `/usr/bin/prometheus` in network namespace `netns` with `jobs`, the `rules`
    /// file, scraping and evaluating every `interval`, and waits until it is ready.
    pub fn start(netns: &str, jobs: Vec<Value>, rules: &Value, interval: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("portsentry-prometheus-")
            .tempdir()?;
        let rules_path = dir.path().join("rules.yaml");
        std::fs::write(&rules_path, serde_yaml::to_string(rules)?)?;
        let config = json!({
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [rules_path],
            "scrape_configs": jobs,
        });
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, serde_yaml::to_string(&config)?)?;
        let check = Command::new("promtool")
            .args(["check", "config"])
            .arg(&config_path)
            .output()
            .context("running promtool (Debian's prometheus package)")?;
        if !check.status.success() {
            bail!(
                "promtool check config refused the derived configuration: {}{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            );
        }
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "/usr/bin/prometheus"])
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS_ADDR}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting /usr/bin/prometheus (Debian's prometheus package)")?;
        let prometheus = Self {
            child,
            netns: netns.to_owned(),
            dir,
        };
        for _ in 0..100 {
            if prometheus
                .get("/-/ready")
                .is_ok_and(|(status, _)| status == 200)
            {
                return Ok(prometheus);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!("Prometheus never became ready: {}", prometheus.log_tail())
    }

    /// The last lines of Prometheus's log.
    pub fn log_tail(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `GET path` (with its query string): the status code and body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        let request = format!("GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n");
        let addr: SocketAddr = PROMETHEUS_ADDR.parse()?;
        let answer = in_netns(&self.netns, move || {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            stream.write_all(request.as_bytes())?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer)?;
            Ok(String::from_utf8_lossy(&answer).into_owned())
        })?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP answer: {answer}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no status in {head}"))?;
        Ok((status, body.to_owned()))
    }

    /// `/api/v1/query` of `expr`: the result vector; an error if Prometheus refuses it.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let (status, body) = self.get(&format!("/api/v1/query?query={}", encode(expr)))?;
        let answer: Value = serde_json::from_str(&body)
            .with_context(|| format!("query {expr}: HTTP {status}: {body}"))?;
        if answer["status"] != "success" {
            bail!("query {expr}: {body}");
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// `/api/v1/alerts`: the alerts pending or firing.
    pub fn alerts(&self) -> Result<Vec<Value>> {
        let (_, body) = self.get("/api/v1/alerts")?;
        let answer: Value = serde_json::from_str(&body)?;
        Ok(answer["data"]["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes `text` for a query string (everything but unreserved characters).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_is_percent_encoded() {
        assert_eq!(
            encode("sum(x{a=\"b\"})[5m]"),
            "sum%28x%7Ba%3D%22b%22%7D%29%5B5m%5D"
        );
    }

    #[test]
    fn match_labels_become_a_label_selector() {
        let labels = json!({"app.kubernetes.io/name": "portsentry", "tier": "x"});
        assert_eq!(
            selector_string(&labels),
            "app.kubernetes.io/name=portsentry,tier=x"
        );
    }
}
