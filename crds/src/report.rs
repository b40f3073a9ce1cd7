//! The sensor-to-operator wire format: `POST /v1/reports` with a JSON [`Report`], answered
//! with a JSON [`ReportOutcome`]. The sender's identity comes from its token, never the body.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{PolicyRef, ProbeKind, Protocol};

/// Most detections a single report may carry; larger batches are refused with 413.
pub const MAX_DETECTIONS_PER_REPORT: usize = 256;

/// A batch of detections from one sensor.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Report {
    /// The policy the sensor runs for; the operator checks it governs the sender.
    pub policy: PolicyRef,
    /// Sensors' detections, oldest first.
    pub detections: Vec<Detection>,
}

/// A source that crossed the policy's scan trigger, with the probes that showed it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Detection {
    pub source: IpAddr,
    pub probes: Vec<Probe>,
}

/// One probe seen by the sensor.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    pub port: u16,
    pub protocol: Protocol,
    pub kind: ProbeKind,
    /// True when the source address is proven (completed TCP handshake).
    pub verified: bool,
    /// Unix time in milliseconds when the sensor saw the probe.
    pub observed_at_ms: u64,
}

/// The operator's answer: what it did with each detection, in order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ReportOutcome {
    pub results: Vec<DetectionOutcome>,
}

/// What became of one detection.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "outcome", content = "detail")]
pub enum DetectionOutcome {
    /// A ban was created or extended; the ban object's name.
    Banned(String),
    /// Recorded as an alert only (policy action, unverified evidence, or ban cap reached).
    Alerted(String),
    /// Never banned (ignore list, loopback, node, API server, operator).
    Protected(String),
}
