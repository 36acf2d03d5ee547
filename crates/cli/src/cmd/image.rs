//! `sspctl image`: images made from users' containers, on every host.

use std::collections::BTreeMap;

use clap::Subcommand;
use serde_json::json;
use ssp_proto::coordinator_client::CoordinatorClient;
use ssp_proto::*;

use crate::cmd::Conn;
use crate::output;
use crate::Cli;

#[derive(Subcommand)]
pub enum ImageCmd {
    /// Make image ALIAS of USER's container, without their home, keys, shell
    /// history or SSH host keys, and copy it to every ready host.
    Publish {
        user: String,
        alias: String,
        /// From this snapshot instead of the container as it is now.
        #[arg(long)]
        from_snapshot: Option<String>,
    },
    /// Every image and the hosts that have it.
    List,
    /// Delete an image (alias or fingerprint) from every host; containers made
    /// from it keep running.
    Delete { image: String },
}

fn print_hosts(cli: &Cli, what: &str, r: &ImageHosts) {
    for w in &r.warnings {
        eprintln!("sspctl: warning: {w}");
    }
    match cli.output {
        output::Format::Json => crate::outln!(
            "{}",
            json!({"image": r.image, "fingerprint": r.fingerprint, "hosts": r.hosts, "warnings": r.warnings})
        ),
        output::Format::Table => crate::outln!(
            "{}: {what} on {}{}",
            r.image,
            r.hosts.join(", "),
            if r.fingerprint.is_empty() {
                String::new()
            } else {
                format!(
                    " (fingerprint {})",
                    &r.fingerprint[..r.fingerprint.len().min(12)]
                )
            }
        ),
    }
}

pub async fn run(cli: &Cli, c: &ImageCmd) -> anyhow::Result<()> {
    let conn = Conn::new(cli)?;
    match c {
        ImageCmd::Publish {
            user,
            alias,
            from_snapshot,
        } => {
            let r = conn
                .call(
                    PublishImageRequest {
                        name: user.clone(),
                        alias: alias.clone(),
                        snapshot: from_snapshot.clone().unwrap_or_default(),
                    },
                    |ch, r| async move { CoordinatorClient::new(ch).publish_image(r).await },
                )
                .await?
                .into_inner();
            print_hosts(cli, "published", &r);
        }
        ImageCmd::Delete { image } => {
            let r = conn
                .call(
                    DeleteImageRequest {
                        image: image.clone(),
                    },
                    |ch, r| async move { CoordinatorClient::new(ch).delete_image(r).await },
                )
                .await?
                .into_inner();
            print_hosts(cli, "deleted", &r);
        }
        ImageCmd::List => {
            let hosts = conn
                .call(ListHostsRequest {}, |ch, r| async move {
                    CoordinatorClient::new(ch).list_hosts(r).await
                })
                .await?
                .into_inner()
                .hosts;
            // fingerprint -> (aliases, hosts)
            let mut images: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
            for h in &hosts {
                for i in h.inventory.iter().flat_map(|inv| &inv.images) {
                    let e = images.entry(i.fingerprint.clone()).or_default();
                    for a in &i.aliases {
                        if !e.0.contains(a) {
                            e.0.push(a.clone());
                        }
                    }
                    e.1.push(h.name.clone());
                }
            }
            let rows = images
                .iter()
                .map(|(fp, (aliases, hosts))| {
                    vec![
                        if aliases.is_empty() {
                            "-".into()
                        } else {
                            aliases.join(",")
                        },
                        fp[..fp.len().min(12)].to_string(),
                        hosts.join(","),
                    ]
                })
                .collect();
            let js = json!(images
                .iter()
                .map(|(fp, (aliases, hosts))| json!({"fingerprint": fp, "aliases": aliases, "hosts": hosts}))
                .collect::<Vec<_>>());
            output::print(cli.output, &["ALIASES", "FINGERPRINT", "HOSTS"], rows, js);
        }
    }
    Ok(())
}
