//! Host inventory: CPUs, memory and storage from the daemon; GPUs from NVML or a static file.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use ssp_lxd::Client;
use ssp_model::{Gpu, Inventory, PciAddress, Pool};

/// Where GPU facts come from.
#[derive(Debug, Clone)]
pub enum GpuSource {
    /// NVML, loaded at run time; keeps the last list it read, for when it fails.
    Nvml(Arc<Mutex<Option<GpuReport>>>),
    /// A static TOML file listing the GPUs (hosts without NVML, tests).
    Static(PathBuf),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticFile {
    #[serde(default)]
    driver_version: String,
    #[serde(default)]
    gpu: Vec<StaticGpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticGpu {
    index: u32,
    uuid: String,
    pci: String,
    model: String,
    memory: String,
    minor: u32,
}

/// GPUs plus the driver version, and a line saying where they came from.
#[derive(Debug, Clone)]
pub struct GpuReport {
    pub gpus: Vec<Gpu>,
    pub driver_version: String,
    pub source: String,
}

impl GpuSource {
    pub fn nvml() -> Self {
        GpuSource::Nvml(Arc::default())
    }

    /// Reads the GPUs (NVML off the async workers: its calls block, for seconds
    /// without persistence mode).
    pub async fn read(&self) -> anyhow::Result<GpuReport> {
        match self {
            GpuSource::Static(path) => read_static(path),
            GpuSource::Nvml(last) => {
                let now = tokio::task::spawn_blocking(read_nvml)
                    .await
                    .unwrap_or_else(|e| Err(format!("NVML task failed: {e}")));
                Ok(nvml_or_last(now, last))
            }
        }
    }
}

/// What NVML gave, remembered; when it fails, the list it gave last time. Only a
/// host where NVML never worked has no GPUs: a failure after a driver upgrade
/// ("Driver/library version mismatch") must not make the GPUs of running
/// containers vanish from the host and their containers unhealable.
fn nvml_or_last(now: Result<GpuReport, String>, last: &Mutex<Option<GpuReport>>) -> GpuReport {
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    match now {
        Ok(r) => {
            *last = Some(r.clone());
            r
        }
        Err(why) => match last.as_ref() {
            Some(r) => {
                tracing::warn!(
                    gpus = r.gpus.len(),
                    "NVML failed: {why}; keeping the GPUs it reported before"
                );
                GpuReport {
                    source: format!("nvml (failing now: {why}; GPUs as last read)"),
                    ..r.clone()
                }
            }
            None => {
                tracing::warn!("no GPUs reported: NVML unavailable: {why}");
                GpuReport {
                    gpus: vec![],
                    driver_version: String::new(),
                    source: format!("none: NVML unavailable: {why}"),
                }
            }
        },
    }
}

fn read_static(path: &Path) -> anyhow::Result<GpuReport> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading GPU inventory {}", path.display()))?;
    let f: StaticFile = toml::from_str(&text)
        .with_context(|| format!("parsing GPU inventory {}", path.display()))?;
    let mut gpus = Vec::new();
    for g in f.gpu {
        gpus.push(Gpu {
            index: g.index,
            uuid: g.uuid,
            pci: PciAddress::parse(&g.pci)?,
            model: g.model,
            memory_bytes: ssp_model::ByteSize::parse(&g.memory)?.0,
            minor: g.minor,
            device_node: format!("/dev/nvidia{}", g.minor),
        });
    }
    gpus.sort_by_key(|g| g.index);
    Ok(GpuReport {
        gpus,
        driver_version: f.driver_version,
        source: format!("static:{}", path.display()),
    })
}

fn read_nvml() -> Result<GpuReport, String> {
    use nvml_wrapper::Nvml;
    let nvml = Nvml::init().map_err(|e| e.to_string())?;
    let driver_version = nvml.sys_driver_version().map_err(|e| e.to_string())?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut gpus = Vec::new();
    for i in 0..count {
        let d = nvml
            .device_by_index(i)
            .map_err(|e| format!("GPU {i}: {e}"))?;
        let pci = d.pci_info().map_err(|e| format!("GPU {i} PCI info: {e}"))?;
        let minor = d
            .minor_number()
            .map_err(|e| format!("GPU {i} minor number: {e}"))?;
        gpus.push(Gpu {
            index: d.index().unwrap_or(i),
            uuid: d.uuid().map_err(|e| format!("GPU {i} uuid: {e}"))?,
            pci: PciAddress::parse(&pci.bus_id).map_err(|e| e.to_string())?,
            model: d.name().unwrap_or_default(),
            memory_bytes: d.memory_info().map(|m| m.total).unwrap_or(0),
            minor,
            device_node: format!("/dev/nvidia{minor}"),
        });
    }
    Ok(GpuReport {
        gpus,
        driver_version,
        source: "nvml".into(),
    })
}

/// Builds the full inventory from the daemon and the GPU source; also returns
/// the PCI addresses of the GPUs the daemon itself detects.
pub async fn collect(
    client: &Client,
    gpus: &GpuSource,
    ssp_pool: &str,
) -> anyhow::Result<(Inventory, Vec<String>)> {
    let res = client.get("/1.0/resources").await?;
    let daemon_gpus = daemon_gpus(&res);
    let cpus = res["cpu"]["total"].as_u64().unwrap_or(0) as u32;
    let memory_bytes = res["memory"]["total"].as_u64().unwrap_or(0);
    let pools = pools(client, ssp_pool).await?;
    let report = gpus.read().await?;
    let inv = Inventory {
        cpus,
        memory_bytes,
        pools,
        gpus: report.gpus,
        gpu_source: report.source,
        daemon: client.kind().as_str().into(),
        daemon_version: client.info().version.clone(),
        driver_version: report.driver_version,
        // Read per registration, not cached with the facts (see `HostState::inventory`).
        images: None,
    };
    Ok((inv, daemon_gpus))
}

/// The daemon's storage pools with their size and use; `ssp_pool` is the one
/// containers are made in.
pub async fn pools(client: &Client, ssp_pool: &str) -> anyhow::Result<Vec<Pool>> {
    let mut pools = Vec::new();
    let list = client.get("/1.0/storage-pools?recursion=1").await?;
    for p in list.as_array().cloned().unwrap_or_default() {
        let name = p["name"].as_str().unwrap_or_default().to_string();
        let space = client
            .get(&format!("/1.0/storage-pools/{name}/resources"))
            .await
            .ok()
            .map(|r| r["space"].clone())
            .unwrap_or_default();
        let total_bytes = space["total"].as_u64().unwrap_or(0);
        let used_bytes = space["used"].as_u64().unwrap_or(0);
        pools.push(Pool {
            driver: p["driver"].as_str().unwrap_or_default().to_string(),
            total_bytes,
            used_bytes,
            ssp: name == ssp_pool,
            name,
        });
    }
    Ok(pools)
}

/// PCI addresses of GPUs the daemon itself detects (from `/1.0/resources`), normalised.
fn daemon_gpus(res: &serde_json::Value) -> Vec<String> {
    res["gpu"]["cards"]
        .as_array()
        .map(|cards| {
            cards
                .iter()
                .filter_map(|c| c["pci_address"].as_str())
                .filter_map(|p| PciAddress::parse(p).ok())
                .map(|p| p.to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_failing_after_it_worked_keeps_the_last_gpus() {
        let last = Mutex::new(None);
        let none = nvml_or_last(Err("NVML shared library not found".into()), &last);
        assert!(none.gpus.is_empty());
        assert!(none.source.starts_with("none: NVML unavailable"));
        let read = GpuReport {
            gpus: vec![Gpu {
                index: 0,
                uuid: "GPU-0".into(),
                pci: PciAddress::parse("0000:17:00.0").unwrap(),
                model: "H200".into(),
                memory_bytes: 141 << 30,
                minor: 0,
                device_node: "/dev/nvidia0".into(),
            }],
            driver_version: "570.1".into(),
            source: "nvml".into(),
        };
        assert_eq!(nvml_or_last(Ok(read.clone()), &last).gpus, read.gpus);
        let kept = nvml_or_last(Err("Driver/library version mismatch".into()), &last);
        assert_eq!(kept.gpus, read.gpus);
        assert_eq!(kept.driver_version, "570.1");
        assert!(kept
            .source
            .contains("failing now: Driver/library version mismatch"));
    }
}
