//! Listener and channel setup shared by every ssp binary.
//!
//! Every gRPC server and client connection in ssp is made here, so that
//! transport security is configured in exactly one place: mutual TLS with
//! certificates from the cluster CA ([`tls`], [`ca`]); there is no plaintext
//! listener or channel.

pub mod auth;
pub mod ca;
pub mod join;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tonic::transport::{Channel, Endpoint, Server, Uri};

pub use ca::{Bundle, Ca, Issued};
pub use tls::{Identity, Peer, Tls, TlsConn, TlsError, AGENT_NAME, COORDINATOR_NAME};

/// How long a peer has to finish the TLS handshake after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection may have in flight at once.
pub const MAX_CONCURRENT_PER_CONNECTION: usize = 256;

/// Errors from opening listeners or channels.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The address could not be parsed as a gRPC endpoint.
    #[error("invalid address {addr:?}: {reason} (expected http://HOST:PORT)")]
    BadAddress { addr: String, reason: String },
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Connecting to a peer failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A bound listener ready to serve gRPC; binding first lets callers learn the port.
pub struct Listener {
    inner: TcpListener,
}

impl Listener {
    /// Binds `addr` for a gRPC server.
    pub async fn bind(addr: SocketAddr) -> Result<Self, NetError> {
        let inner = TcpListener::bind(addr)
            .await
            .map_err(|source| NetError::Bind { addr, source })?;
        Ok(Self { inner })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// A server builder with ssp's transport settings.
    pub fn server() -> Server {
        Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .concurrency_limit_per_connection(MAX_CONCURRENT_PER_CONNECTION)
    }

    /// Turns the listener into the stream of authenticated connections a tonic
    /// router serves. Handshakes run concurrently (a slow or silent client holds
    /// up no one) and must finish within 10 s; a connection whose certificate is
    /// missing, from another CA, expired or revoked never reaches a service.
    ///
    /// Every accepted connection gets TCP_NODELAY: the server builder's own
    /// setting applies only to listeners it binds itself, and without it a reply
    /// split into headers and body can wait out the peer's delayed ACK (40 ms).
    pub fn incoming(
        self,
        tls: Tls,
    ) -> Result<impl tokio_stream::Stream<Item = std::io::Result<TlsConn>>, NetError> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config()?);
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsConn>>(64);
        let listener = self.inner;
        tokio::spawn(async move {
            loop {
                let (conn, addr) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = conn.set_nodelay(true);
                    #[cfg(feature = "plaintext-bench")]
                    {
                        let _ = &acceptor;
                        if let Some(peer) = plain::accept(&conn, addr).await {
                            let stream = tls::Io::Plain(conn);
                            let _ = tx.send(Ok(TlsConn { stream, peer })).await;
                        }
                        return;
                    }
                    #[allow(unreachable_code)]
                    let hs = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(conn)).await;
                    let stream = match hs {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::info!(peer = %addr, "TLS handshake refused: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::info!(peer = %addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    let identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| Identity::from_der(c));
                    let identity = match identity {
                        Some(Ok(i)) => Arc::new(i),
                        _ => {
                            tracing::info!(peer = %addr, "TLS peer without a readable certificate");
                            return;
                        }
                    };
                    let peer = Peer { addr, identity };
                    let stream = tls::Io::Tls(Box::new(stream));
                    let _ = tx.send(Ok(TlsConn { stream, peer })).await;
                });
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// Builds a lazily connecting channel to `addr` (`http://host:port` or
/// `host:port`), authenticating the server as `server_name`
/// ([`COORDINATOR_NAME`] or [`AGENT_NAME`]) and presenting `tls`'s certificate.
pub fn channel(addr: &str, tls: &Tls, server_name: &'static str) -> Result<Channel, NetError> {
    let ep = endpoint(addr)?;
    Ok(ep.connect_with_connector_lazy(connector(tls, server_name)?))
}

/// Connects to `addr` now, failing if the peer does not answer or the handshake fails.
pub async fn connect(
    addr: &str,
    tls: &Tls,
    server_name: &'static str,
) -> Result<Channel, NetError> {
    endpoint(addr)?
        .connect_with_connector(connector(tls, server_name)?)
        .await
        .map_err(|source| NetError::Connect {
            addr: addr.to_string(),
            source,
        })
}

type ClientIo = hyper_util::rt::TokioIo<tls::Io<tokio_rustls::client::TlsStream<TcpStream>>>;

type Connecting =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<ClientIo, std::io::Error>> + Send>>;

fn connector(
    tls: &Tls,
    server_name: &'static str,
) -> Result<
    impl tower::Service<Uri, Response = ClientIo, Error = std::io::Error, Future = Connecting>
        + Clone
        + Send
        + 'static,
    NetError,
> {
    let connector = tokio_rustls::TlsConnector::from(tls.client_config(server_name)?);
    let name = rustls::pki_types::ServerName::try_from(server_name)
        .map_err(|e| tls::bad("server name", e))?;
    #[cfg(feature = "plaintext-bench")]
    let me = auth::encode(&tls.identity());
    Ok(tower::service_fn(move |uri: Uri| {
        let (connector, name) = (connector.clone(), name.clone());
        #[cfg(feature = "plaintext-bench")]
        let me = me.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
            let port = uri.port_u16().unwrap_or(80);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            #[cfg(feature = "plaintext-bench")]
            {
                let _ = (&connector, &name);
                let tcp = plain::connect(tcp, &me).await?;
                return Ok(hyper_util::rt::TokioIo::new(tls::Io::Plain(tcp)));
            }
            #[allow(unreachable_code)]
            let stream = connector.connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls::Io::Tls(stream)))
        }) as Connecting
    }))
}
/// Benchmarks only: the same listeners and channels without TLS, so a benchmark
/// can measure what TLS costs. The client names itself in a first line (what its
/// certificate says, unverified); nothing in such a build is secure, and release
/// builds never have the feature.
#[cfg(feature = "plaintext-bench")]
mod plain {
    use super::*;
    use tokio::io::AsyncWriteExt;

    pub async fn connect(mut tcp: TcpStream, me: &str) -> std::io::Result<TcpStream> {
        tcp.write_all(format!("{me}\n").as_bytes()).await?;
        Ok(tcp)
    }

    pub async fn accept(conn: &TcpStream, addr: SocketAddr) -> Option<Peer> {
        // One byte at a time: HTTP/2 follows the line on the same stream.
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        let read = async {
            loop {
                conn.readable().await.ok()?;
                match conn.try_read(&mut b) {
                    Ok(0) => return None,
                    Ok(_) if b[0] == b'\n' => return Some(()),
                    Ok(_) if line.len() < 1024 => line.push(b[0]),
                    Ok(_) => return None,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return None,
                }
            }
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await.ok()??;
        let identity = auth::decode(std::str::from_utf8(&line).ok()?)?;
        Some(Peer {
            addr,
            identity: Arc::new(identity),
        })
    }
}

fn endpoint(addr: &str) -> Result<Endpoint, NetError> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ep = Endpoint::from_shared(uri).map_err(|e| NetError::BadAddress {
        addr: addr.to_string(),
        reason: e.to_string(),
    })?;
    Ok(ep
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true))
}
