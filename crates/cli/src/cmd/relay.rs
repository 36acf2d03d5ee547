//! `sspctl relay`: the relay for access from outside the LAN. Each host's agent
//! keeps an OpenSSH reverse tunnel there per container, from the container's
//! relay port to its SSH; `sspctl ssh-config NAME --outside` points there.

use serde_json::json;
use ssp_proto::{GetRelayRequest, RelayView, SetRelayRequest};

use crate::Cli;

#[derive(clap::Subcommand)]
pub enum RelayCmd {
    /// The relay, the ports given out, and the lines its account's
    /// ~/.ssh/authorized_keys needs (each host agent's key, allowed to forward
    /// ports and nothing else).
    Show,
    /// Name the relay: every container gets a port there. Its sshd needs
    /// `GatewayPorts clientspecified` (or `yes`), so the ports listen for users
    /// outside, and the agents' keys (`sspctl relay show`) in USER's authorized_keys.
    Set {
        /// Where users and the agents reach the relay's sshd.
        host: String,
        /// The account the agents log in as.
        #[arg(long)]
        user: String,
        /// The relay ports, FIRST-LAST, one per container.
        #[arg(long)]
        ports: String,
        /// The relay's SSH port.
        #[arg(long, default_value_t = 22)]
        ssh_port: u16,
    },
    /// No relay: the tunnels stop and the ports are given back.
    Remove,
}

pub async fn run(cli: &Cli, cmd: &RelayCmd) -> anyhow::Result<()> {
    let c = crate::cmd::Conn::new(cli)?;
    let set = |body: SetRelayRequest| {
        let c = &c;
        async move {
            c.call(body, |ch, r| async move {
                ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                    .set_relay(r)
                    .await
            })
            .await
        }
    };
    let view = match cmd {
        RelayCmd::Show => {
            c.call(GetRelayRequest {}, |ch, r| async move {
                ssp_proto::coordinator_client::CoordinatorClient::new(ch)
                    .get_relay(r)
                    .await
            })
            .await?
        }
        RelayCmd::Set {
            host,
            user,
            ports,
            ssh_port,
        } => {
            let (first, last) = ports
                .split_once('-')
                .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
                .ok_or_else(|| {
                    anyhow::anyhow!("--ports {ports:?}: expected FIRST-LAST, e.g. 30000-30999")
                })?;
            set(SetRelayRequest {
                host: host.clone(),
                ssh_port: (*ssh_port).into(),
                user: user.clone(),
                ports_first: first,
                ports_last: last,
                remove: false,
            })
            .await?
        }
        RelayCmd::Remove => {
            set(SetRelayRequest {
                remove: true,
                ..Default::default()
            })
            .await?
        }
    }
    .into_inner();
    print(cli, &view);
    Ok(())
}

fn print(cli: &Cli, v: &RelayView) {
    match cli.output {
        crate::output::Format::Json => crate::outln!(
            "{}",
            json!({"set": v.set, "host": v.host, "ssh_port": v.ssh_port, "user": v.user,
                   "ports_first": v.ports_first, "ports_last": v.ports_last, "held": v.held,
                   "authorized_keys": v.authorized_keys})
        ),
        crate::output::Format::Table if !v.set => {
            crate::outln!("no relay (`sspctl relay set HOST --user USER --ports FIRST-LAST`)")
        }
        crate::output::Format::Table => {
            crate::outln!(
                "relay {}@{}:{}, ports {}-{} ({} given out)",
                v.user,
                v.host,
                v.ssh_port,
                v.ports_first,
                v.ports_last,
                v.held
            );
            crate::outln!("for ~{}/.ssh/authorized_keys there:", v.user);
            for k in &v.authorized_keys {
                crate::outln!("{k}");
            }
        }
    }
}
