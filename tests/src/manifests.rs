//! Applying YAML manifests (the chart's CRDs, examples, rendered templates) with server-side
//! apply, and waiting for conditions such as a CRD becoming `Established`.

use std::{fs, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{
    Api, Client, ResourceExt,
    api::{DynamicObject, GroupVersionKind, Patch, PatchParams},
    discovery::{self, Scope},
};

use serde::Deserialize;

use crate::wait::wait_for;

use crate::{binaries::repo_root, control_plane::FIELD_MANAGER};

/// The generated CRD files of the chart, `charts/portsentry/crds/*.yaml`, sorted.
pub fn chart_crd_files() -> Result<Vec<PathBuf>> {
    let dir = repo_root().join("charts/portsentry/crds");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    if files.is_empty() {
        bail!(
            "no CRDs in {}: run `cargo run -p portsentry-crds --bin crdgen`",
            dir.display()
        );
    }
    Ok(files)
}

/// Every YAML document of `text` that is not empty.
pub fn parse_documents(text: &str) -> Result<Vec<DynamicObject>> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document).context("parsing YAML")?;
        if value.is_null() {
            continue;
        }
        objects.push(serde_yaml::from_value(value).context("reading a Kubernetes object")?);
    }
    Ok(objects)
}
/// An `Api<DynamicObject>` for `object`'s kind, found by discovery; namespaced kinds use
/// the object's namespace, else `default_namespace`.
pub async fn api_for(
    client: &Client,
    object: &DynamicObject,
    default_namespace: &str,
) -> Result<Api<DynamicObject>> {
    let types = object
        .types
        .as_ref()
        .context("object without apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(types)?;
    let (resource, capabilities) = discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {}/{}", types.api_version, types.kind))?;
    Ok(match capabilities.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            object.namespace().as_deref().unwrap_or(default_namespace),
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    })
}

/// Server-side applies each object (field manager [`FIELD_MANAGER`]) and returns what the
/// API server stored.
pub async fn apply_documents(
    client: &Client,
    objects: &[DynamicObject],
    default_namespace: &str,
) -> Result<Vec<DynamicObject>> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut stored = Vec::new();
    for object in objects {
        let api = api_for(client, object, default_namespace).await?;
        let name = object.name_any();
        let applied = api
            .patch(&name, &params, &Patch::Apply(object))
            .await
            .with_context(|| format!("server-side apply of {name}"))?;
        stored.push(applied);
    }
    Ok(stored)
}

/// Applies the chart's CRDs and waits until each is `Established`.
pub async fn install_crds(client: &Client, timeout: Duration) -> Result<Vec<String>> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for file in chart_crd_files()? {
        let text = fs::read_to_string(&file)?;
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text)
            .with_context(|| format!("reading the CRD in {}", file.display()))?;
        let name = crd.name_any();
        crds.patch(&name, &params, &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying the CRD in {}", file.display()))?;
        names.push(name);
    }
    for name in &names {
        wait_for(timeout, &format!("CRD {name} to be Established"), || {
            let crds = crds.clone();
            let name = name.clone();
            Box::pin(async move {
                let crd = crds.get(&name).await?;
                Ok(crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True"))
            })
        })
        .await?;
    }
    Ok(names)
}
