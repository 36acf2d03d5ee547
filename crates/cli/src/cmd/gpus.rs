//! `sspctl gpus`: every GPU and who holds it.

use serde_json::json;
use ssp_proto::ListGpusRequest;

use crate::output::{self, size};
use crate::Cli;

pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let list = crate::cmd::Conn::new(cli)?
        .call(ListGpusRequest {}, |ch, r| async move {
            ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                .list_gpus(r)
                .await
        })
        .await?
        .into_inner()
        .gpus;
    let rows = list
        .iter()
        .map(|v| {
            let g = v.gpu.clone().unwrap_or_default();
            vec![
                v.host.clone(),
                g.index.to_string(),
                g.pci_address,
                g.model,
                size(g.memory_bytes),
                g.device_node,
                if v.holder.is_empty() {
                    "-".into()
                } else {
                    v.holder.clone()
                },
            ]
        })
        .collect();
    let js = json!(list
        .iter()
        .map(|v| {
            let g = v.gpu.clone().unwrap_or_default();
            json!({"host": v.host, "index": g.index, "uuid": g.uuid, "pci_address": g.pci_address, "model": g.model,
                   "memory_bytes": g.memory_bytes, "device_node": g.device_node, "minor": g.minor,
                   "holder": if v.holder.is_empty() { serde_json::Value::Null } else { json!(v.holder) }})
        })
        .collect::<Vec<_>>());
    output::print(
        cli.output,
        &["HOST", "INDEX", "PCI", "MODEL", "MEMORY", "NODE", "HOLDER"],
        rows,
        js,
    );
    Ok(())
}
