//! One module per subcommand.

pub mod gpus;
pub mod hosts;
pub mod ls;
pub mod ssh_config;
pub mod user;

use ssp_proto::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

/// Connects to the coordinator named on the command line.
pub async fn coordinator(cli: &crate::Cli) -> anyhow::Result<CoordinatorClient<Channel>> {
    let ch = ssp_net::connect(&cli.coordinator).await.map_err(|e| {
        anyhow::anyhow!("{e} (is ssp-coordinator running? set --coordinator or SSP_COORDINATOR)")
    })?;
    Ok(CoordinatorClient::new(ch))
}

/// An error on one line: gRPC errors show just their message.
pub fn one_line(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return s.message().replace('\n', " ");
    }
    format!("{e:#}").replace('\n', " ")
}
