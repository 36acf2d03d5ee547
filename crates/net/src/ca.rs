//! The cluster CA (rcgen) and the credential bundle every ssp process and user holds.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};
use ssp_model::CertRole;

use crate::tls::{bad, cert_from_pem, Identity, Tls, TlsError, AGENT_NAME, COORDINATOR_NAME};

/// The longest validity ssp issues (the CA itself lives longer).
pub const MAX_TTL: Duration = Duration::from_secs(400 * 24 * 3600);
const CA_TTL: Duration = Duration::from_secs(20 * 365 * 24 * 3600);
/// Certificates start a little in the past, so clocks a few minutes apart agree.
pub const SKEW: Duration = Duration::from_secs(300);

/// The cluster's certificate authority: the only issuer any ssp process trusts.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca { .. }")
    }
}

/// A certificate and its key, as issued.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub identity: Identity,
}

fn rc(what: &str) -> impl Fn(rcgen::Error) -> TlsError + '_ {
    move |e| bad(what, e)
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, TlsError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| bad("clock", e))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).map_err(|e| bad("clock", e))
}

/// A positive serial derived from the new public key (random) and the time.
fn serial(key: &KeyPair) -> SerialNumber {
    let mut h = Sha256::new();
    h.update(key.public_key_raw());
    h.update(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_be_bytes(),
    );
    let mut bytes: Vec<u8> = h.finalize()[..16].to_vec();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// A new CA for a new cluster.
    pub fn generate(cluster: &str) -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(rc("CA key"))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, format!("ssp cluster CA {cluster}"));
        p.distinguished_name.push(DnType::OrganizationName, "ssp");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        p.not_before = offset(now - SKEW)?;
        p.not_after = offset(now + CA_TTL)?;
        p.serial_number = Some(serial(&key));
        let cert = p.self_signed(&key).map_err(rc("CA certificate"))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Checks that `cert_pem` and `key_pem` form a CA that can sign.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Ca, TlsError> {
        let ca = Ca {
            cert_pem: cert_pem.to_string(),
            key_pem: key_pem.to_string(),
        };
        ca.issuer()?;
        Ok(ca)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, TlsError> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(rc("CA key"))?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(rc("CA certificate"))
    }

    /// Issues a certificate for `name` in `role`, valid for `ttl` (at most
    /// [`MAX_TTL`]). `token` makes it a join token: good only to exchange once.
    pub fn issue(
        &self,
        name: &str,
        role: CertRole,
        token: bool,
        ttl: Duration,
    ) -> Result<Issued, TlsError> {
        if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control()) {
            return Err(bad(
                format!("certificate name {name:?}"),
                "expected 1 to 128 printable characters",
            ));
        }
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(bad(
                format!("validity {}s", ttl.as_secs()),
                format!("expected 1s to {} days", MAX_TTL.as_secs() / 86400),
            ));
        }
        let server = !token && matches!(role, CertRole::Coordinator | CertRole::Agent);
        let sans: Vec<String> = match (server, role) {
            (true, CertRole::Coordinator) => vec![COORDINATOR_NAME.into()],
            (true, CertRole::Agent) => vec![AGENT_NAME.into()],
            _ => vec![],
        };
        let key = KeyPair::generate().map_err(rc("key"))?;
        let mut p = CertificateParams::new(sans).map_err(rc("certificate"))?;
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        let ou = if token {
            format!("token-{role}")
        } else {
            role.to_string()
        };
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, ou);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = if server {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        let now = SystemTime::now();
        p.not_before = offset(now - SKEW)?;
        p.not_after = offset(now + ttl)?;
        p.serial_number = Some(serial(&key));
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&key, &self.issuer()?)
            .map_err(rc("certificate"))?;
        let identity = Identity::from_der(cert.der())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            identity,
        })
    }
}

/// What a process or a person needs to talk to ssp: their certificate and key,
/// the CA, and where the coordinators are.
///
/// On disk it is one PEM text: comment lines (`# coordinator: ADDR`), then the
/// holder's certificate, its key, and the CA certificate, in that order.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    pub coordinators: Vec<String>,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("coordinators", &self.coordinators)
            .finish_non_exhaustive()
    }
}

/// The PEM blocks of `text`, in order: (label, whole block).
fn pem_blocks(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            cur = Some((label.to_string(), format!("{line}\n")));
        } else if let Some((label, mut body)) = cur.take() {
            body.push_str(line);
            body.push('\n');
            if line.starts_with("-----END ") {
                out.push((label, body));
            } else {
                cur = Some((label, body));
            }
        }
    }
    out
}

impl Bundle {
    /// The bundle's text.
    pub fn render(&self) -> String {
        let who = Identity::from_der(
            cert_from_pem("certificate", &self.cert_pem)
                .map(|c| c.to_vec())
                .unwrap_or_default()
                .as_slice(),
        )
        .map(|i| {
            format!(
                "# ssp credentials of {} (serial {}), valid until {}\n",
                i.label(),
                i.serial,
                time::OffsetDateTime::from_unix_timestamp(i.not_after)
                    .map(|t| t.to_string())
                    .unwrap_or_default()
            )
        })
        .unwrap_or_default();
        let mut s = who;
        s.push_str("# keep this file private: it is a login to ssp\n");
        for c in &self.coordinators {
            s.push_str(&format!("# coordinator: {c}\n"));
        }
        for block in [&self.cert_pem, &self.key_pem, &self.ca_pem] {
            s.push_str(block.trim_end());
            s.push('\n');
        }
        s
    }

    /// Parses a bundle's text.
    pub fn parse(text: &str) -> Result<Bundle, TlsError> {
        let coordinators = text
            .lines()
            .filter_map(|l| l.strip_prefix("# coordinator: "))
            .map(|a| a.trim().to_string())
            .collect();
        let blocks = pem_blocks(text);
        let certs: Vec<&String> = blocks
            .iter()
            .filter(|(l, _)| l == "CERTIFICATE")
            .map(|(_, b)| b)
            .collect();
        let key = blocks
            .iter()
            .find(|(l, _)| l.ends_with("PRIVATE KEY"))
            .map(|(_, b)| b.clone());
        let (Some(cert), Some(ca), Some(key), 2) = (certs.first(), certs.get(1), key, certs.len())
        else {
            return Err(bad(
                "credential bundle",
                format!(
                    "expected two certificates (the holder's, then the CA's) and one private key; found {} certificate(s) and {} key(s)",
                    certs.len(),
                    blocks.iter().filter(|(l, _)| l.ends_with("PRIVATE KEY")).count()
                ),
            ));
        };
        let b = Bundle {
            coordinators,
            cert_pem: cert.to_string(),
            key_pem: key,
            ca_pem: ca.to_string(),
        };
        // Fails on a key that does not fit, a certificate without a role, etc.
        b.tls()?;
        b.check_signed()?;
        Ok(b)
    }

    /// The holder's certificate must be signed by the bundle's CA (a certificate
    /// edited by hand, or from another cluster, is refused here with a clear
    /// reason instead of at the first handshake). Validity dates are the
    /// handshake's business: an expired bundle still loads, and is refused there.
    fn check_signed(&self) -> Result<(), TlsError> {
        use rustls::pki_types::UnixTime;
        let ca = cert_from_pem("CA certificate", &self.ca_pem)?;
        let cert = cert_from_pem("certificate", &self.cert_pem)?;
        let id = Identity::from_der(&cert)?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).map_err(|e| bad("CA certificate", e))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| bad("CA certificate", e))?;
        // Checked as of the certificate's own start, so only the chain counts.
        let at = UnixTime::since_unix_epoch(Duration::from_secs(
            (id.not_before.max(0) as u64).saturating_add(1),
        ));
        verifier
            .verify_client_cert(&cert, &[], at)
            .map_err(|e| bad("certificate", format!("not signed by the bundle's CA: {e}")))?;
        Ok(())
    }

    /// Reads a bundle file.
    pub fn load(path: &Path) -> Result<Bundle, TlsError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| bad(format!("credential bundle {}", path.display()), e))?;
        Self::parse(&text).map_err(|e| bad(format!("credential bundle {}", path.display()), e))
    }

    /// Writes the bundle readable by its owner only (a new file renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), TlsError> {
        write_private(path, &self.render())
    }

    /// Who the bundle is for.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        Identity::from_der(&cert_from_pem("certificate", &self.cert_pem)?)
    }

    /// The trust this bundle gives.
    pub fn tls(&self) -> Result<Tls, TlsError> {
        Tls::new(&self.ca_pem, &self.cert_pem, &self.key_pem)
    }
}

/// Writes `text` to `path` with mode 0600, atomically (temporary file + rename).
pub fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| bad(format!("writing {}", path.display()), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_name_role_and_validity() {
        let ca = Ca::generate("t").unwrap();
        let i = ca
            .issue("alice", CertRole::User, false, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(i.identity.name, "alice");
        assert_eq!(i.identity.role, CertRole::User);
        assert!(!i.identity.token);
        assert_eq!(i.identity.serial.len(), 32);
        let span = i.identity.not_after - i.identity.not_before;
        assert_eq!(span, 3600 + 300);
        let t = ca
            .issue("tok1", CertRole::Agent, true, Duration::from_secs(60))
            .unwrap();
        assert!(t.identity.token);
        assert_eq!(t.identity.role, CertRole::Agent);
        assert_eq!(t.identity.label(), "token:tok1");
        assert_ne!(i.identity.serial, t.identity.serial);
    }

    #[test]
    fn bad_names_and_validities_are_refused() {
        let ca = Ca::generate("t").unwrap();
        for (name, ttl) in [
            ("", 60),
            ("a\nb", 60),
            ("ok", 0),
            ("ok", MAX_TTL.as_secs() + 1),
        ] {
            assert!(
                ca.issue(name, CertRole::User, false, Duration::from_secs(ttl))
                    .is_err(),
                "{name:?} {ttl}"
            );
        }
    }

    #[test]
    fn a_bundle_round_trips_and_a_broken_one_is_named() {
        let ca = Ca::generate("t").unwrap();
        let i = ca
            .issue("root", CertRole::Admin, false, Duration::from_secs(3600))
            .unwrap();
        let b = Bundle {
            coordinators: vec!["http://127.0.0.1:7400".into()],
            cert_pem: i.cert_pem.clone(),
            key_pem: i.key_pem.clone(),
            ca_pem: ca.cert_pem.clone(),
        };
        let text = b.render();
        assert!(text.contains("admin:root"), "{text}");
        let back = Bundle::parse(&text).unwrap();
        assert_eq!(back, b);
        assert_eq!(back.identity().unwrap().name, "root");
        let e = Bundle::parse(&i.cert_pem).unwrap_err().to_string();
        assert!(e.contains("found 1 certificate(s) and 0 key(s)"), "{e}");
        // Someone else's key with this certificate.
        let other = ca
            .issue("bob", CertRole::User, false, Duration::from_secs(3600))
            .unwrap();
        let mixed = Bundle {
            key_pem: other.key_pem,
            ..b
        };
        assert!(Bundle::parse(&mixed.render()).is_err());
    }
}
