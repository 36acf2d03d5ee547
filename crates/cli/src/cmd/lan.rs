//! `sspctl lan`: the lab's LANs (the hosts on each, from their agents' `[lan]`)
//! and the pool of static addresses an admin gives one.

use serde_json::json;
use ssp_proto::{LanList, ListLansRequest, SetLanRequest};

use crate::output;
use crate::Cli;

#[derive(clap::Subcommand)]
pub enum LanCmd {
    /// List the LANs: hosts, pool, addresses given out, containers.
    Ls,
    /// Give a LAN a pool of static addresses (containers then get one each from
    /// it, never one given to another), or with `--dhcp` remove it (the LAN's DHCP
    /// server gives addresses).
    Set {
        /// The LAN's name (the agents' `[lan] name`).
        name: String,
        /// FIRST-LAST/PREFIX, e.g. 192.168.31.100-192.168.31.199/24.
        #[arg(long, conflicts_with = "dhcp")]
        pool: Option<String>,
        /// The LAN's router, for the containers' default route.
        #[arg(long, requires = "pool")]
        gateway: Option<String>,
        /// No pool: the LAN's DHCP server gives addresses.
        #[arg(long)]
        dhcp: bool,
    },
}

pub async fn run(cli: &Cli, cmd: &LanCmd) -> anyhow::Result<()> {
    let c = crate::cmd::Conn::new(cli)?;
    let list = match cmd {
        LanCmd::Ls => {
            c.call(ListLansRequest {}, |ch, r| async move {
                ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                    .list_lans(r)
                    .await
            })
            .await?
        }
        LanCmd::Set {
            name,
            pool,
            gateway,
            dhcp,
        } => {
            if pool.is_none() && !dhcp {
                anyhow::bail!("sspctl lan set {name}: give --pool FIRST-LAST/PREFIX or --dhcp");
            }
            let body = SetLanRequest {
                name: name.clone(),
                pool: pool.clone().unwrap_or_default(),
                gateway: gateway.clone().unwrap_or_default(),
                dhcp: *dhcp,
            };
            c.call(body, |ch, r| async move {
                ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                    .set_lan(r)
                    .await
            })
            .await?
        }
    }
    .into_inner();
    print(cli, &list);
    Ok(())
}

fn print(cli: &Cli, list: &LanList) {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    let rows = list
        .lans
        .iter()
        .map(|l| {
            vec![
                l.name.clone(),
                dash(&l.hosts.join(",")),
                if l.pool.is_empty() {
                    "DHCP".into()
                } else {
                    l.pool.clone()
                },
                dash(&l.gateway),
                if l.pool.is_empty() {
                    "-".into()
                } else {
                    format!("{}/{}", l.held, l.size)
                },
                l.containers.to_string(),
            ]
        })
        .collect();
    let js = json!(list
        .lans
        .iter()
        .map(
            |l| json!({"name": l.name, "hosts": l.hosts, "pool": l.pool, "gateway": l.gateway,
                        "held": l.held, "size": l.size, "containers": l.containers})
        )
        .collect::<Vec<_>>());
    output::print(
        cli.output,
        &[
            "LAN",
            "HOSTS",
            "ADDRESSES",
            "GATEWAY",
            "GIVEN",
            "CONTAINERS",
        ],
        rows,
        js,
    );
}
