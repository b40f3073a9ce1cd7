//! A pod's network namespace as the node's root sees it: the pod's process found by its UID
//! in `/proc/*/cgroup` (as the pod-nftables agent finds it), and `nft` run inside.

use k8s_openapi::api::core::v1::Pod;

/// The table the pod-nftables agent keeps in each pod (family inet).
pub const POD_TABLE: &str = "portsentry";

/// A process of `pod` on this host, found as the pod agent finds it: its cgroup names the
/// pod's UID (the test node's kubelet uses the cgroupfs driver: `pod<uid>`).
pub fn pod_process(pod: &Pod) -> Option<u32> {
    let uid = pod.metadata.uid.as_deref()?;
    let wanted = format!("pod{uid}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|text| text.contains(&wanted))
        })
        .min()
}

/// `nft ARGS` inside `pod`'s network namespace (nsenter), as the node's root sees it.
pub fn nft_in_pod(pod: &Pod, args: &[&str]) -> Option<std::process::Output> {
    let pid = pod_process(pod)?;
    std::process::Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("nft")
        .args(args)
        .output()
        .ok()
}

/// The pod's `portsentry` table as `nft list` prints it, if it has one.
pub fn pod_table(pod: &Pod) -> Option<String> {
    let output = nft_in_pod(pod, &["list", "table", "inet", POD_TABLE])?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}
