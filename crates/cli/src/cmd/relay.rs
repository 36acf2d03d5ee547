//! `sspctl relay`: the relay for access from outside the LAN. Each host's agent
//! keeps a tunnel there per container, from the container's relay port to its
//! SSH (an OpenSSH reverse tunnel, or a proxy of the host's frpc to the relay's
//! frps); `sspctl ssh-config NAME --outside` points there.

use serde_json::json;
use ssp_proto::{GetRelayRequest, RelayView, SetRelayRequest};

use crate::Cli;

#[derive(clap::Subcommand)]
pub enum RelayCmd {
    /// The relay, the ports given out, and the lines its account's
    /// ~/.ssh/authorized_keys needs (each host agent's key, allowed to forward
    /// ports and nothing else).
    Show,
    /// Name the relay: every container gets a port there. With OpenSSH (the
    /// default) its sshd needs `GatewayPorts clientspecified` (or `yes`), so the
    /// ports listen for users outside, and the agents' keys (`sspctl relay show`)
    /// in USER's authorized_keys. With `--frp`, the relay runs frps (with
    /// `auth.token`, and allowing the ports), and each host needs frpc.
    Set {
        /// Where users and the agents reach the relay.
        host: String,
        /// OpenSSH: the account the agents log in as.
        #[arg(long, required_unless_present = "frp")]
        user: Option<String>,
        /// The relay ports, FIRST-LAST, one per container.
        #[arg(long)]
        ports: String,
        /// The port the agents connect to: the relay's sshd (default 22), or
        /// frps's bindPort (default 7000).
        #[arg(long)]
        port: Option<u16>,
        /// The relay runs frps; the hosts' frpc carries the ports.
        #[arg(long)]
        frp: bool,
        /// With --frp: a file holding frps's auth.token.
        #[arg(long, requires = "frp", value_name = "FILE")]
        token_file: Option<std::path::PathBuf>,
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
            port,
            frp,
            token_file,
        } => {
            let token = match token_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| {
                        anyhow::anyhow!("reading the frp token from {}: {e}", f.display())
                    })?
                    .trim()
                    .to_string(),
                None => String::new(),
            };
            let (first, last) = ports
                .split_once('-')
                .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
                .ok_or_else(|| {
                    anyhow::anyhow!("--ports {ports:?}: expected FIRST-LAST, e.g. 30000-30999")
                })?;
            set(SetRelayRequest {
                host: host.clone(),
                port: port.map(u32::from).unwrap_or(0),
                user: user.clone().unwrap_or_default(),
                ports_first: first,
                ports_last: last,
                remove: false,
                kind: if *frp { "frp" } else { "ssh" }.into(),
                token,
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
            json!({"set": v.set, "kind": v.kind, "host": v.host, "port": v.port, "user": v.user,
                   "ports_first": v.ports_first, "ports_last": v.ports_last, "held": v.held,
                   "authorized_keys": v.authorized_keys})
        ),
        crate::output::Format::Table if !v.set => {
            crate::outln!("no relay (`sspctl relay set HOST --user USER --ports FIRST-LAST`)")
        }
        crate::output::Format::Table if v.kind == "frp" => crate::outln!(
            "relay frps at {}:{}, ports {}-{} ({} given out); each host needs frpc",
            v.host,
            v.port,
            v.ports_first,
            v.ports_last,
            v.held
        ),
        crate::output::Format::Table => {
            crate::outln!(
                "relay {}@{}:{}, ports {}-{} ({} given out)",
                v.user,
                v.host,
                v.port,
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
