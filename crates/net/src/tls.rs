//! Mutual TLS: every listener and channel of ssp authenticates both ends with a
//! certificate issued by the cluster CA.
//!
//! A [`Tls`] holds the CA certificate (the only root), this process's own
//! certificate and key (swappable, so a renewed certificate takes effect on new
//! connections without a restart) and the set of revoked serials (checked in the
//! handshake, both ways, and again on every request through [`Peer`]).
//!
//! Servers are not identified by host name: a coordinator's certificate names
//! `coordinator.ssp`, an agent's `agent.ssp`, and a client asks for the one it
//! expects. Only the cluster CA issues certificates, so "signed by the CA and
//! named `agent.ssp`" means "an agent of this cluster", wherever it runs.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use ssp_model::CertRole;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The DNS name in every coordinator's certificate (and what clients verify).
pub const COORDINATOR_NAME: &str = "coordinator.ssp";
/// The DNS name in every agent's certificate.
pub const AGENT_NAME: &str = "agent.ssp";

/// Errors reading or using certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {reason}")]
    Bad { what: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

pub(crate) fn bad(what: impl Into<String>, reason: impl fmt::Display) -> TlsError {
    TlsError::Bad {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// Who holds a certificate, read from it (never from what a request says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The subject's common name: a user or admin name, a host name, a
    /// coordinator's address, or a join token's id.
    pub name: String,
    pub role: CertRole,
    /// A join token: good only for exchanging it once for a real certificate.
    pub token: bool,
    /// The certificate's serial, lower-case hex.
    pub serial: String,
    /// Validity, seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl Identity {
    /// Reads the identity from a certificate the CA issued.
    pub fn from_der(der: &[u8]) -> Result<Identity, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| bad("certificate", format!("cannot parse it: {e}")))?;
        let subject = cert.subject();
        let cn = subject
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .ok_or_else(|| bad("certificate", "it has no common name"))?;
        let ou = subject
            .iter_organizational_unit()
            .next()
            .and_then(|a| a.as_str().ok())
            .ok_or_else(|| bad("certificate", "it names no role (organizational unit)"))?;
        let (token, role) = match ou.strip_prefix("token-") {
            Some(r) => (true, r),
            None => (false, ou),
        };
        let role = CertRole::parse(role).map_err(|e| bad("certificate", e))?;
        Ok(Identity {
            name: cn.to_string(),
            role,
            token,
            serial: hex(cert.raw_serial()),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// `role:name`, as logs and the audit log print it.
    pub fn label(&self) -> String {
        if self.token {
            format!("token:{}", self.name)
        } else {
            format!("{}:{}", self.role, self.name)
        }
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a server knows about the other end of a connection; tonic puts it in
/// every request's extensions.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub identity: Arc<Identity>,
}

/// This process's trust: the CA, its own certificate, and the revoked serials.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    ca: CertificateDer<'static>,
    roots: Arc<RootCertStore>,
    own: RwLock<Arc<CertifiedKey>>,
    identity: RwLock<Arc<Identity>>,
    revoked: Arc<RwLock<HashSet<String>>>,
    provider: Arc<CryptoProvider>,
    server: RwLock<Option<Arc<ServerConfig>>>,
    clients: RwLock<Vec<(String, Arc<ClientConfig>)>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("identity", &self.identity())
            .finish()
    }
}

/// Parses the first certificate of a PEM text.
pub fn cert_from_pem(what: &str, pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(what, format!("no PEM certificate in it: {e}")))
}

fn key_from_pem(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(what, format!("no PEM private key in it: {e}")))
}

fn certified_key(
    provider: &CryptoProvider,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(Arc<CertifiedKey>, Identity), TlsError> {
    let cert = cert_from_pem("own certificate", cert_pem)?;
    let key = key_from_pem("own key", key_pem)?;
    let identity = Identity::from_der(&cert)?;
    let ck = CertifiedKey::from_der(vec![cert], key, provider)?;
    Ok((Arc::new(ck), identity))
}

impl Tls {
    /// Trust rooted in `ca_pem`, presenting `cert_pem`/`key_pem`.
    pub fn new(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca = cert_from_pem("CA certificate", ca_pem)?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| bad("CA certificate", e))?;
        let (own, identity) = certified_key(&provider, cert_pem, key_pem)?;
        Ok(Tls {
            inner: Arc::new(Inner {
                ca,
                roots: Arc::new(roots),
                own: RwLock::new(own),
                identity: RwLock::new(Arc::new(identity)),
                revoked: Default::default(),
                provider,
                server: RwLock::new(None),
                clients: RwLock::new(Vec::new()),
            }),
        })
    }

    /// Who this process is.
    pub fn identity(&self) -> Arc<Identity> {
        self.inner
            .identity
            .read()
            .map(|i| i.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The CA certificate (DER).
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.inner.ca
    }

    /// Presents `cert_pem`/`key_pem` from now on (new connections); existing
    /// connections keep going. The new certificate must be for the same role.
    pub fn replace_own(&self, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let (own, identity) = certified_key(&self.inner.provider, cert_pem, key_pem)?;
        let old = self.identity();
        if identity.role != old.role || identity.token != old.token {
            return Err(bad(
                "renewed certificate",
                format!(
                    "it is for {}, this process is {}",
                    identity.label(),
                    old.label()
                ),
            ));
        }
        *self.inner.own.write().unwrap_or_else(|p| p.into_inner()) = own;
        *self
            .inner
            .identity
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(identity);
        Ok(())
    }

    /// Replaces the set of revoked serials (lower-case hex).
    pub fn set_revoked(&self, serials: impl IntoIterator<Item = String>) {
        let set: HashSet<String> = serials.into_iter().collect();
        *self
            .inner
            .revoked
            .write()
            .unwrap_or_else(|p| p.into_inner()) = set;
    }

    /// The revoked serials, sorted.
    pub fn revoked(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .revoked
            .read()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Whether `serial` is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.inner
            .revoked
            .read()
            .map(|s| s.contains(serial))
            .unwrap_or(true)
    }

    /// The server side: client certificates are required, must chain to the CA,
    /// be within their validity and not be revoked.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some(c) = self.inner.server.read().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let webpki = WebPkiClientVerifier::builder_with_provider(
            self.inner.roots.clone(),
            self.inner.provider.clone(),
        )
        .build()
        .map_err(|e| bad("client verifier", e))?;
        let verifier = Arc::new(RevocationAware {
            inner: webpki,
            revoked: self.inner.revoked.clone(),
        });
        let mut cfg = ServerConfig::builder_with_provider(self.inner.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(OwnCert(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let cfg = Arc::new(cfg);
        *self.inner.server.write().unwrap_or_else(|p| p.into_inner()) = Some(cfg.clone());
        Ok(cfg)
    }

    /// The client side, for servers whose certificate names `server_name`.
    pub fn client_config(&self, server_name: &str) -> Result<Arc<ClientConfig>, TlsError> {
        if let Some(c) = self.inner.clients.read().ok().and_then(|v| {
            v.iter()
                .find(|(n, _)| n == server_name)
                .map(|(_, c)| c.clone())
        }) {
            return Ok(c);
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.inner.roots.clone(),
            self.inner.provider.clone(),
        )
        .build()
        .map_err(|e| bad("server verifier", e))?;
        let verifier = Arc::new(RevocationAwareServer {
            inner: webpki,
            revoked: self.inner.revoked.clone(),
        });
        let mut cfg = ClientConfig::builder_with_provider(self.inner.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(OwnCert(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let cfg = Arc::new(cfg);
        self.inner
            .clients
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((server_name.to_string(), cfg.clone()));
        Ok(cfg)
    }

    fn own(&self) -> Arc<CertifiedKey> {
        self.inner
            .own
            .read()
            .map(|o| o.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// Presents this process's current certificate, as server and as client.
#[derive(Debug)]
struct OwnCert(Tls);

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.own())
    }
}

impl rustls::client::ResolvesClientCert for OwnCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.own())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn check_revoked(revoked: &RwLock<HashSet<String>>, der: &[u8]) -> Result<(), rustls::Error> {
    let id = Identity::from_der(der)
        .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
    let hit = revoked
        .read()
        .map(|s| s.contains(&id.serial))
        .unwrap_or(true);
    if hit {
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked,
        ));
    }
    Ok(())
}

/// The webpki client verifier plus ssp's revocation set and role parsing.
#[derive(Debug)]
struct RevocationAware {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<RwLock<HashSet<String>>>,
}

impl ClientCertVerifier for RevocationAware {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_revoked(&self.revoked, end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct RevocationAwareServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    revoked: Arc<RwLock<HashSet<String>>>,
}

impl ServerCertVerifier for RevocationAwareServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok =
            self.inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        check_revoked(&self.revoked, end_entity)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A connection's byte stream: TLS, or (only in a build with the
/// `plaintext-bench` feature, which benchmarks use to measure what TLS costs)
/// plain TCP.
pub enum Io<T> {
    Tls(T),
    #[cfg(feature = "plaintext-bench")]
    Plain(TcpStream),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Tls($s) => {
                let $s = Pin::new($s);
                $e
            }
            #[cfg(feature = "plaintext-bench")]
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
        }
    };
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tls(s) => s.is_write_vectored(),
            #[cfg(feature = "plaintext-bench")]
            Io::Plain(s) => s.is_write_vectored(),
        }
    }
}

/// One accepted, authenticated connection.
pub struct TlsConn {
    pub(crate) stream: Io<Box<tokio_rustls::server::TlsStream<TcpStream>>>,
    pub(crate) peer: Peer,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
