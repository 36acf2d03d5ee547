//! `sspctl ls`: containers with host, state, GPUs and SSH endpoint.

use serde_json::json;
use ssp_proto::ListInstancesViewRequest;

use crate::output::{self, size};
use crate::Cli;

pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    let list = crate::cmd::Conn::new(cli)?
        .call(ListInstancesViewRequest::default(), |ch, r| async move {
            ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                .list_instances(r)
                .await
        })
        .await?
        .into_inner()
        .instances;
    let rows = list
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.host.clone(),
                // Why it did not come up is too long for a cell: it follows the table.
                if i.problem.is_empty() {
                    i.state.clone()
                } else {
                    format!("{} (see below)", i.state)
                },
                i.gpu_pci.join(","),
                output::reach(i),
                i.cpus.to_string(),
                size(i.memory_bytes),
                if i.disk_used_bytes == 0 {
                    format!("?/{}", size(i.disk_bytes))
                } else {
                    format!("{}/{}", size(i.disk_used_bytes), size(i.disk_bytes))
                },
            ]
        })
        .collect();
    let js = json!(list
        .iter()
        .map(|i| json!({"name": i.name, "owner": i.owner, "host": i.host, "state": i.state, "gpus": i.gpu_pci,
                        "ssh_host": i.ssh_host, "ssh_port": i.ssh_port, "cpus": i.cpus,
                        "memory_bytes": i.memory_bytes, "disk_bytes": i.disk_bytes, "disk_used_bytes": i.disk_used_bytes, "image": i.image, "uuid": i.uuid,
                        "network": i.network, "lan": i.lan, "lan_address": i.lan_address,
                        "relay_host": i.relay_host, "relay_port": i.relay_port,
                        "desktop": i.desktop, "rdp_host": i.rdp_host, "rdp_port": i.rdp_port,
                        "problem": i.problem}))
        .collect::<Vec<_>>());
    output::print(
        cli.output,
        &[
            "NAME",
            "HOST",
            "STATE",
            "GPUS",
            "SSH",
            "CPUS",
            "MEMORY",
            "DISK USED/SIZE",
        ],
        rows,
        js,
    );
    if matches!(cli.output, output::Format::Table) {
        for i in list.iter().filter(|i| !i.problem.is_empty()) {
            crate::outln!("{} on {}: {}", i.name, i.host, i.problem);
        }
    }
    Ok(())
}
