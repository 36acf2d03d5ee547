//! One module per subcommand, and the connection to the coordinators they share.

pub mod adopt;
pub mod cluster;
pub mod common;
pub mod gpus;
pub mod hosts;
pub mod image;
pub mod lan;
pub mod ls;
pub mod migrate;
pub mod relay;
pub mod snapshot;
pub mod ssh_config;
pub mod trust;
pub mod user;

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// How long a command keeps retrying while coordinators are unreachable or
/// electing a leader.
const RETRY_FOR: Duration = Duration::from_secs(20);

/// The coordinators named on the command line, tried in turn.
pub struct Conn {
    addrs: Vec<String>,
    stale: bool,
    /// Sent with every attempt of this command, so a retried write applies once.
    request_id: String,
    tls: ssp_net::Tls,
}

/// Where the credential bundle is: `--bundle`/`SSP_BUNDLE`, else
/// `~/.config/ssp/bundle.pem`.
pub fn bundle_path(cli: &crate::Cli) -> std::path::PathBuf {
    if let Some(p) = &cli.bundle {
        return p.clone();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    std::path::Path::new(&home).join(".config/ssp/bundle.pem")
}

/// The credential bundle, or an error saying how to get one.
pub fn load_bundle(cli: &crate::Cli) -> anyhow::Result<ssp_net::Bundle> {
    let path = bundle_path(cli);
    if !path.exists() {
        anyhow::bail!(
            "no credentials at {}: run `sspctl login BUNDLE` with the bundle an admin gave you (the first admin's is data_dir/tls/admin.bundle on the coordinator that formed the cluster), or pass --bundle",
            path.display()
        );
    }
    Ok(ssp_net::Bundle::load(&path)?)
}

impl Conn {
    pub fn new(cli: &crate::Cli) -> anyhow::Result<Self> {
        let bundle = load_bundle(cli)?;
        Self::with_bundle(cli, &bundle)
    }

    /// A connection presenting `bundle`'s certificate.
    pub fn with_bundle(cli: &crate::Cli, bundle: &ssp_net::Bundle) -> anyhow::Result<Self> {
        let list = cli.coordinator.clone().unwrap_or_else(|| {
            if bundle.coordinators.is_empty() {
                "http://127.0.0.1:7400".into()
            } else {
                bundle.coordinators.join(",")
            }
        });
        let addrs: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
        if addrs.is_empty() {
            anyhow::bail!(
                "--coordinator is empty: give one or more http://HOST:PORT, comma-separated"
            );
        }
        Ok(Conn {
            addrs,
            stale: cli.stale,
            request_id: request_id()?,
            tls: bundle.tls()?,
        })
    }

    /// The coordinators this connection tries.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// This connection's trust.
    pub fn tls(&self) -> &ssp_net::Tls {
        &self.tls
    }

    /// Calls `f` on the first coordinator that answers; a coordinator that is down,
    /// not the leader's peer, or between leaders is skipped, and the whole list
    /// retried until [`RETRY_FOR`] passes.
    pub async fn call<T, R, F, Fut>(&self, body: T, f: F) -> anyhow::Result<Response<R>>
    where
        T: Clone,
        F: Fn(Channel, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let start = Instant::now();
        let mut last = String::new();
        let mut round = 0u32;
        loop {
            // A coordinator not in a cluster yet cannot serve; if none of them is,
            // say so now instead of retrying.
            let mut outside: Option<Status> = None;
            let mut others_failed = false;
            for addr in &self.addrs {
                let ch = match tokio::time::timeout(
                    Duration::from_secs(2),
                    ssp_net::connect(addr, &self.tls, ssp_net::COORDINATOR_NAME),
                )
                .await
                {
                    Ok(Ok(ch)) => ch,
                    Ok(Err(e)) => {
                        last = format!("{e:#}");
                        if handshake_refused(&e) {
                            anyhow::bail!("{addr} refused this client's certificate: {last}");
                        }
                        others_failed = true;
                        continue;
                    }
                    Err(_) => {
                        last = format!("{addr} did not answer in 2s");
                        others_failed = true;
                        continue;
                    }
                };
                let mut req = Request::new(body.clone());
                if let Ok(v) = self.request_id.parse() {
                    req.metadata_mut().insert("ssp-request-id", v);
                }
                if self.stale {
                    req.metadata_mut().insert(
                        "ssp-read",
                        tonic::metadata::MetadataValue::from_static("stale"),
                    );
                }
                match f(ch, req).await {
                    Ok(r) => {
                        note_read(&r, addr);
                        return Ok(r);
                    }
                    Err(s) if s.metadata().get("ssp-not-in-cluster").is_some() => {
                        last = format!("{addr}: {}", s.message());
                        outside = Some(s);
                    }
                    Err(s) if retryable(&s) => {
                        last = format!("{addr}: {}", s.message());
                        others_failed = true;
                    }
                    Err(s) => return Err(s.into()),
                }
            }
            if let (Some(s), false) = (outside, others_failed) {
                return Err(s.into());
            }
            if start.elapsed() > RETRY_FOR {
                anyhow::bail!(
                    "no coordinator could serve the request within {}s; last error: {last} (is ssp-coordinator running? set --coordinator or SSP_COORDINATOR)",
                    RETRY_FOR.as_secs()
                );
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(100 * round.min(5) as u64)).await;
        }
    }
}

fn retryable(s: &Status) -> bool {
    // A refused certificate stays refused: say so at once.
    let m = s.message();
    if m.contains("certificate") || m.contains("alert") {
        return false;
    }
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
    ) || (s.code() == Code::Unknown && s.message().contains("transport"))
}

/// Whether connecting failed in the TLS handshake over a certificate.
fn handshake_refused(e: &ssp_net::NetError) -> bool {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(x) = src {
        let m = x.to_string();
        if m.contains("certificate") || m.contains("received fatal alert") {
            return true;
        }
        src = x.source();
    }
    false
}

/// Says on stderr when a read came from one coordinator's own replica.
fn note_read<R>(r: &Response<R>, addr: &str) {
    let md = r.metadata();
    if md.get("ssp-read").and_then(|v| v.to_str().ok()) == Some("local") {
        let by = md
            .get("ssp-served-by")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        eprintln!(
            "sspctl: note: served locally by coordinator {by} ({addr}) from its own replica, without asking the leader; it may lag behind"
        );
    }
}

fn request_id() -> anyhow::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// An error on one line: gRPC errors show just their message.
pub fn one_line(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        if s.code() == Code::Unimplemented {
            return format!(
                "the coordinator does not know this request; it runs an older ssp than this sspctl ({})",
                env!("CARGO_PKG_VERSION")
            );
        }
        if s.message().is_empty() {
            return format!("the coordinator answered {:?} without a message", s.code());
        }
        return s.message().replace('\n', " ");
    }
    format!("{e:#}").replace('\n', " ")
}
