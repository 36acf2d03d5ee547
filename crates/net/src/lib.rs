//! Listener and channel setup shared by every ssp binary.
//!
//! Every gRPC server and client connection in ssp is made here, so that
//! transport security is configured in exactly one place.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Endpoint, Server};

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
    }

    /// Turns the listener into the incoming stream a tonic router serves.
    ///
    /// Every accepted connection gets TCP_NODELAY: the server builder's own
    /// setting applies only to listeners it binds itself, and without it a reply
    /// split into headers and body can wait out the peer's delayed ACK (40 ms).
    pub fn incoming(
        self,
    ) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
        use tokio_stream::StreamExt;
        TcpListenerStream::new(self.inner).map(|conn| {
            let conn = conn?;
            conn.set_nodelay(true)?;
            Ok(conn)
        })
    }
}

/// Builds a lazily connecting channel to `addr` (`http://host:port` or `host:port`).
pub fn channel(addr: &str) -> Result<Channel, NetError> {
    Ok(endpoint(addr)?.connect_lazy())
}

/// Connects to `addr` now, failing if the peer does not answer.
pub async fn connect(addr: &str) -> Result<Channel, NetError> {
    endpoint(addr)?
        .connect()
        .await
        .map_err(|source| NetError::Connect {
            addr: addr.to_string(),
            source,
        })
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
