//! DICOM TLS (PS3.15 B.1, the BCP 195 profile: TLS 1.2 and 1.3 only), with rustls and
//! the ring provider as the repository uses: the server configuration of the SCP's TLS
//! listener, the client configuration towards the local PACS, an association over either
//! plain TCP or TLS, and handshake failures told in words an admin can act on.
//!
//! dicom-ul opens and accepts associations on a concrete TCP or TLS stream only, so an
//! association here is a [`Link`] of the two, with the methods the SCP and the SCU use.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use dicom_ul::Pdu;
use dicom_ul::association::{
    Association, AsyncAssociation, AsyncClientAssociation, AsyncPDataWriter,
    AsyncServerAssociation, Error as UlError, client, server,
};
use dicom_ul::pdu::{PresentationContextNegotiated, UserVariableItem};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use zeroize::Zeroizing;

use crate::config::{DicomTlsConfig, PacsTlsConfig};

/// Why a DICOM TLS configuration cannot be built; names the key and the file to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DicomTlsError {
    /// The file cannot be read.
    #[error("{key} = {}: cannot read the file ({source})", path.display())]
    Unreadable {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A PEM block is malformed.
    #[error("{key} = {}: not a valid PEM file ({reason}); write it as PEM (-----BEGIN ...-----)", path.display())]
    NotPem {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        reason: String,
    },
    /// The file has no certificate.
    #[error(
        "{key} = {}: no certificate in the file (no -----BEGIN CERTIFICATE----- block); \
         give the PEM certificate(s), e.g. convert a DER file with `openssl x509 -inform der \
         -in FILE -out FILE.pem`", path.display()
    )]
    NoCertificate {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The file has no private key.
    #[error(
        "{key} = {}: no private key in the file (no -----BEGIN PRIVATE KEY----- or \
         -----BEGIN RSA/EC PRIVATE KEY----- block)", path.display()
    )]
    NoKey {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The private key is encrypted: the daemon starts unattended, with no one to type
    /// a passphrase.
    #[error(
        "{key} = {}: the private key is encrypted (-----BEGIN ENCRYPTED PRIVATE KEY-----); \
         the gateway starts without anyone to type its passphrase: decrypt it, `openssl pkey \
         -in {0} -out {0}.plain` (then chmod 600 and point {key} at it)", path.display()
    )]
    EncryptedKey {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The private key is not the certificate's.
    #[error(
        "{key} = {}: this private key does not match the certificate in {}: give the key \
         the certificate was issued for", key_path.display(), certificate.display()
    )]
    KeyMismatch {
        /// The key's configuration key.
        key: &'static str,
        /// The key file.
        key_path: PathBuf,
        /// The certificate file.
        certificate: PathBuf,
    },
    /// rustls refused a certificate or key (unsupported algorithm, malformed DER).
    #[error("{key} = {}: cannot be used for TLS: {reason}", path.display())]
    Unusable {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What rustls said.
        reason: String,
    },
    /// The name to check the PACS's certificate against is not a DNS name or IP address.
    #[error(
        "{from}: {name:?} is not a DNS name or IP address; set inbound.pacs_tls.server_name \
         to a name in the PACS's certificate"
    )]
    ServerName {
        /// The name.
        name: String,
        /// Where it came from: `inbound.pacs_tls.server_name`, or the host of `inbound.pacs`.
        from: String,
    },
}

/// The SCP's TLS settings, loaded: the rustls configuration and the files it came from
/// (named in handshake failures).
#[derive(Debug)]
pub struct ServerTls {
    /// The rustls server configuration.
    pub config: Arc<rustls::ServerConfig>,
    /// The `[dicom.tls]` settings.
    pub settings: DicomTlsConfig,
}

impl ServerTls {
    /// Loads `[dicom.tls]`: TLS 1.2 and 1.3, the gateway's certificate, and when
    /// `client_ca` is set a client certificate from it required.
    ///
    /// # Errors
    /// [`DicomTlsError`] naming the file that cannot be used and why.
    pub fn load(settings: &DicomTlsConfig) -> Result<ServerTls, DicomTlsError> {
        let certs = certificates("dicom.tls.certificate", &settings.certificate)?;
        let key = private_key("dicom.tls.key", &settings.key)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| unusable("dicom.tls.certificate", &settings.certificate, &e))?;
        let builder = match &settings.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = roots("dicom.tls.client_ca", ca)?;
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| unusable("dicom.tls.client_ca", ca, &e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| key_error("dicom.tls.key", &settings.key, &settings.certificate, &e))?;
        Ok(ServerTls {
            config: Arc::new(config),
            settings: settings.clone(),
        })
    }

    /// Why the TLS handshake with a client failed, for the log line of that connection;
    /// `None` when `error` is not a TLS failure.
    pub fn handshake_failure(&self, error: &UlError) -> Option<String> {
        let tls = rustls_error(error)?;
        let client_ca = self
            .settings
            .client_ca
            .as_deref()
            .unwrap_or_else(|| Path::new(""));
        Some(explain(
            tls,
            &Sides {
                peer: "the client",
                purpose: ("client", "clientAuth"),
                trusted: ("dicom.tls.client_ca", client_ca),
                own: ("dicom.tls.certificate", &self.settings.certificate),
            },
        ))
    }
}

/// TLS towards the local PACS, loaded.
#[derive(Debug, Clone)]
pub struct PacsTls {
    /// The rustls client configuration.
    pub config: Arc<rustls::ClientConfig>,
    /// Name the PACS's certificate must carry.
    pub server_name: String,
    /// The `[inbound.pacs_tls]` settings (files named in failures).
    pub settings: PacsTlsConfig,
}

impl PacsTls {
    /// Loads `[inbound.pacs_tls]` for the PACS at `pacs` (`host:port`): TLS 1.2 and 1.3,
    /// the PACS's certificate checked against `ca` and `server_name` (default: the host of
    /// `pacs`), and the client certificate when one is set.
    ///
    /// # Errors
    /// [`DicomTlsError`] naming the file or name that cannot be used and why.
    pub fn load(settings: &PacsTlsConfig, pacs: &str) -> Result<PacsTls, DicomTlsError> {
        let (server_name, from) = match &settings.server_name {
            Some(name) => (name.clone(), "inbound.pacs_tls.server_name".to_owned()),
            None => (
                host_of(pacs).to_owned(),
                format!(
                    "the host of inbound.pacs = {pacs:?} (the default of \
                     inbound.pacs_tls.server_name)"
                ),
            ),
        };
        if ServerName::try_from(server_name.clone()).is_err() {
            return Err(DicomTlsError::ServerName {
                name: server_name,
                from,
            });
        }
        let roots = roots("inbound.pacs_tls.ca", &settings.ca)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| unusable("inbound.pacs_tls.ca", &settings.ca, &e))?
            .with_root_certificates(roots);
        let config = match (&settings.certificate, &settings.key) {
            (Some(certificate), Some(key_path)) => {
                let certs = certificates("inbound.pacs_tls.certificate", certificate)?;
                let key = private_key("inbound.pacs_tls.key", key_path)?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| key_error("inbound.pacs_tls.key", key_path, certificate, &e))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(PacsTls {
            config: Arc::new(config),
            server_name,
            settings: settings.clone(),
        })
    }

    /// Why opening the association to the PACS failed at the TLS level, in words an admin
    /// can act on; `None` when `error` is not a TLS failure.
    pub fn failure(&self, error: &UlError) -> Option<String> {
        if let UlError::TlsHandshake { .. } = error
            && rustls_error(error).is_none()
        {
            return Some(
                "TLS: the PACS closed the connection during the TLS handshake: is \
                 inbound.pacs its DICOM TLS port, and does it accept the gateway (a client \
                 certificate in inbound.pacs_tls.certificate, if it asks for one)?"
                    .into(),
            );
        }
        Some(self.explain(rustls_error(error)?))
    }

    /// A rustls error met with the PACS, told with the files and names to fix.
    fn explain(&self, tls: &rustls::Error) -> String {
        if let rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) = tls
        {
            return format!(
                "TLS: the PACS's certificate is not valid for the name {:?}: set \
                 inbound.pacs_tls.server_name to a name its certificate carries",
                self.server_name
            );
        }
        let none = Path::new("");
        let own = self.settings.certificate.as_deref().unwrap_or(none);
        format!(
            "TLS: {}",
            explain(
                tls,
                &Sides {
                    peer: "the PACS",
                    purpose: ("server", "serverAuth"),
                    trusted: ("inbound.pacs_tls.ca", &self.settings.ca),
                    own: ("inbound.pacs_tls.certificate", own),
                },
            )
        )
    }
}

/// How long the probe that follows an unanswered A-ASSOCIATE-RQ waits for the PACS's
/// first bytes (at most the association timeout): a TLS port answers a ClientHello at
/// once, and a PACS refuses a TLS 1.3 client certificate right after the handshake.
pub const PROBE_WAIT: Duration = Duration::from_secs(3);

/// Why the PACS at `address` sent no A-ASSOCIATE answer (the connection closed, was reset
/// or stayed silent), and whether only a change of configuration helps.
///
/// dicom-ul reports every failure to read the answer as "TLS not supported" and drops
/// the cause, so a second connection finds it out: on a plain target, a TLS ClientHello
/// tells whether the port speaks TLS (its answer is a TLS record); on a TLS target, a
/// handshake followed by a short read receives the alert of a PACS that refuses the
/// gateway's client certificate. `wait` is the association timeout, named in the message.
pub async fn unanswered(address: &str, tls: Option<&PacsTls>, wait: Duration) -> (String, bool) {
    let probe_wait = PROBE_WAIT.min(wait);
    let silent = format!(
        "no A-ASSOCIATE answer: the PACS closed the connection before answering, or did not \
         answer within {} s",
        wait.as_secs()
    );
    let tcp = match tokio::time::timeout(wait, TcpStream::connect(address)).await {
        Ok(Ok(tcp)) => tcp,
        _ => {
            return (format!("{silent}; it is tried again later"), false);
        }
    };
    match tls {
        None => {
            if speaks_tls(tcp, probe_wait).await {
                (
                    "the PACS answered with TLS: its port is a DICOM TLS port; configure \
                     [inbound.pacs_tls] (ca = the CA of its certificate)"
                        .to_owned(),
                    true,
                )
            } else {
                (
                    format!(
                        "{silent} (if the PACS's port speaks DICOM TLS, configure \
                         [inbound.pacs_tls]); it is tried again later"
                    ),
                    false,
                )
            }
        }
        Some(tls) => tls_probe(tls, tcp, probe_wait, &silent).await,
    }
}

/// Whether the server on `tcp` answers a TLS ClientHello with a TLS record (handshake
/// 0x16 or alert 0x15, version 0x03 ..) within `wait`.
async fn speaks_tls(mut tcp: TcpStream, wait: Duration) -> bool {
    let Some(hello) = client_hello() else {
        return false;
    };
    let exchange = async {
        tcp.write_all(&hello).await?;
        let mut head = [0u8; 2];
        tcp.read_exact(&mut head).await?;
        Ok::<_, io::Error>(head)
    };
    matches!(
        tokio::time::timeout(wait, exchange).await,
        Ok(Ok([0x15 | 0x16, 0x03]))
    )
}

/// A TLS ClientHello as rustls sends it (nothing is verified: the probe stops at the
/// server's first record).
fn client_hello() -> Option<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from("probe.invalid").ok()?;
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).ok()?;
    Some(hello)
}

/// The TLS handshake with the PACS again, then a read of at most `wait`: a refusal of the
/// gateway's certificate arrives as an alert; silence means the handshake is accepted.
async fn tls_probe(tls: &PacsTls, tcp: TcpStream, wait: Duration, silent: &str) -> (String, bool) {
    let closed = (
        format!(
            "TLS: {silent}; the PACS closes the connection right after the TLS handshake \
             without saying why: it may refuse the gateway's client certificate ({}); check \
             the PACS's log. It is tried again later",
            tls.settings.certificate.as_deref().map_or_else(
                || "none is set: inbound.pacs_tls.certificate".to_owned(),
                |c| format!("inbound.pacs_tls.certificate = {}", c.display())
            )
        ),
        false,
    );
    let Ok(name) = ServerName::try_from(tls.server_name.clone()) else {
        return closed;
    };
    let connector = tokio_rustls::TlsConnector::from(tls.config.clone());
    let mut stream = match tokio::time::timeout(wait, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return refusal(tls, &e).unwrap_or(closed),
        Err(_) => return closed,
    };
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait, stream.read(&mut byte)).await {
        Ok(Err(e)) => refusal(tls, &e).unwrap_or(closed),
        Ok(Ok(0)) => closed,
        Ok(Ok(_)) | Err(_) => (
            format!(
                "{silent} (the TLS handshake succeeds): the PACS is busy or restarting; it is tried again later"
            ),
            false,
        ),
    }
}

/// A rustls error inside `e`, explained; permanent (a certificate or a setting to change).
fn refusal(tls: &PacsTls, e: &io::Error) -> Option<(String, bool)> {
    let error = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some((tls.explain(error), true))
}

/// The host part of `host:port` (brackets of an IPv6 address removed).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, DicomTlsError> {
    std::fs::read(path).map_err(|source| DicomTlsError::Unreadable {
        key,
        path: path.to_owned(),
        source,
    })
}

fn not_pem(key: &'static str, path: &Path, e: &pem::Error) -> DicomTlsError {
    DicomTlsError::NotPem {
        key,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

fn unusable(key: &'static str, path: &Path, e: &dyn std::fmt::Display) -> DicomTlsError {
    DicomTlsError::Unusable {
        key,
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Why rustls refused the key `key_path` for the certificate `certificate` (`key` names
/// the configuration key): a mismatch told as such.
pub(crate) fn key_error(
    key: &'static str,
    key_path: &Path,
    certificate: &Path,
    e: &rustls::Error,
) -> DicomTlsError {
    match e {
        rustls::Error::InconsistentKeys(_) => DicomTlsError::KeyMismatch {
            key,
            key_path: key_path.to_owned(),
            certificate: certificate.to_owned(),
        },
        other => unusable(key, key_path, other),
    }
}

/// The PEM certificates in `path`, at least one (`key` names the configuration key).
pub(crate) fn certificates(
    key: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, DicomTlsError> {
    let bytes = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| not_pem(key, path, &e))?;
    if certs.is_empty() {
        return Err(DicomTlsError::NoCertificate {
            key,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The PEM private key in `path`; the file's bytes are zeroized once parsed. A key every
/// user of the machine can read is warned about (once per file): it is used all the same,
/// since a group such as Debian's `ssl-cert` reading it is normal.
pub(crate) fn private_key(
    key: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, DicomTlsError> {
    let bytes = Zeroizing::new(read(key, path)?);
    warn_if_world_readable(key, path);
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound if contains(&bytes, b"-----BEGIN ENCRYPTED PRIVATE KEY-----") => {
            DicomTlsError::EncryptedKey {
                key,
                path: path.to_owned(),
            }
        }
        pem::Error::NoItemsFound => DicomTlsError::NoKey {
            key,
            path: path.to_owned(),
        },
        other => not_pem(key, path, &other),
    })
}

/// Warns, once per file, that the private key `path` can be read by every user.
fn warn_if_world_readable(key: &'static str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    static WARNED: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 == 0 {
        return;
    }
    let mut warned = WARNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if warned.iter().any(|p| p == path) {
        return;
    }
    warned.push(path.to_owned());
    tracing::warn!(
        "{key} = {}: the private key can be read by every user of this machine (mode \
         {mode:04o}); run `chmod o-rwx` on it (the daemon's user or group must still read it)",
        path.display()
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The CA certificates in `path` as a root store.
pub(crate) fn roots(
    key: &'static str,
    path: &Path,
) -> Result<Arc<rustls::RootCertStore>, DicomTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(key, path)? {
        roots.add(cert).map_err(|e| unusable(key, path, &e))?;
    }
    Ok(Arc::new(roots))
}

/// The rustls error inside a dicom-ul connection or handshake error.
fn rustls_error(error: &UlError) -> Option<&rustls::Error> {
    let source = match error {
        UlError::TlsHandshake { source, .. } | UlError::Connect { source, .. } => source,
        _ => return None,
    };
    source.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Who is who in a handshake failure: the other side, the CA file it must match and the
/// gateway's own certificate, each with its configuration key.
struct Sides<'a> {
    peer: &'static str,
    /// What the peer's certificate must be issued for, and its extendedKeyUsage name.
    purpose: (&'static str, &'static str),
    trusted: (&'static str, &'a Path),
    own: (&'static str, &'a Path),
}

fn explain(error: &rustls::Error, sides: &Sides<'_>) -> String {
    let Sides {
        peer,
        purpose,
        trusted,
        own,
    } = sides;
    let (trusted_key, trusted_file) = (trusted.0, trusted.1.display());
    let (own_key, own_file) = (own.0, own.1.display());
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "{peer}'s certificate is not trusted: it is not signed by a CA in the CA file \
                 {trusted_key} = {trusted_file}; give {peer} a certificate from that CA, or \
                 add the CA that signed it to the file"
            ),
            CertificateError::ExpiredContext { not_after, .. } => format!(
                "{peer}'s certificate expired on {}: renew it",
                when(not_after.as_secs())
            ),
            CertificateError::Expired => format!("{peer}'s certificate expired: renew it"),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!(
                    "{peer}'s certificate is not valid yet: check the clocks of both hosts, \
                     or the certificate's start date"
                )
            }
            CertificateError::UnsupportedSignatureAlgorithmContext { .. }
            | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
                format!(
                    "{peer}'s certificate (or its chain) is signed with an algorithm the \
                     gateway does not accept (BCP 195: RSA with SHA-256 or stronger, ECDSA, \
                     Ed25519): have it reissued"
                )
            }
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                let (usage, oid) = purpose;
                format!(
                    "{peer}'s certificate is not issued for TLS {usage} use (its \
                     extendedKeyUsage lacks {oid}): have it reissued with that purpose"
                )
            }
            other => format!("{peer}'s certificate was refused: {other:?}"),
        },
        rustls::Error::NoCertificatesPresented => format!(
            "{peer} sent no certificate, but {trusted_key} = {trusted_file} requires one \
             from that CA"
        ),
        rustls::Error::AlertReceived(alert) => match alert {
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied => format!(
                "{peer} does not trust the gateway's certificate ({own_key} = {own_file}; \
                 TLS alert {alert:?}): give {peer} the CA that issued it"
            ),
            AlertDescription::CertificateExpired => format!(
                "{peer} says the gateway's certificate ({own_key} = {own_file}) expired: \
                 renew it"
            ),
            AlertDescription::CertificateRequired => {
                format!("{peer} requires a client certificate: set {own_key} and its key")
            }
            AlertDescription::ProtocolVersion
            | AlertDescription::HandshakeFailure
            | AlertDescription::InsufficientSecurity => format!(
                "{peer} refused the handshake (TLS alert {alert:?}): it offers no TLS version \
                 and cipher suite the gateway accepts (TLS 1.2 or 1.3, BCP 195), or wants a \
                 client certificate"
            ),
            other => format!("{peer} ended the handshake with TLS alert {other:?}"),
        },
        rustls::Error::PeerIncompatible(why) => format!(
            "{peer} offers no TLS version or cipher suite the gateway accepts (TLS 1.2 or \
             1.3, BCP 195): {why:?}"
        ),
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            format!("{peer} does not speak TLS on this connection ({error})")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// A Unix time as an RFC 3339 UTC date.
fn when(seconds: u64) -> String {
    i64::try_from(seconds)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| format!("{seconds} (Unix time)"), |t| t.to_string())
}

/// An association over plain TCP or over TLS.
#[derive(Debug)]
pub enum Link<P, T> {
    /// Plain DICOM.
    Plain(P),
    /// DICOM over TLS.
    Tls(T),
}

/// An association the SCP accepted, on its plain or its TLS listener.
pub type ServerAssociation =
    Link<AsyncServerAssociation<TcpStream>, AsyncServerAssociation<server::AsyncTlsStream>>;

/// An association the SCU opened to the PACS, plain or TLS.
pub type ClientAssociation =
    Link<AsyncClientAssociation<TcpStream>, AsyncClientAssociation<client::AsyncTlsStream>>;

macro_rules! either {
    ($link:expr, $a:ident => $body:expr) => {
        match $link {
            Link::Plain($a) => $body,
            Link::Tls($a) => $body,
        }
    };
}

impl<P: Association, T: Association> Association for Link<P, T> {
    fn peer_ae_title(&self) -> &str {
        either!(self, a => a.peer_ae_title())
    }
    fn acceptor_max_pdu_length(&self) -> u32 {
        either!(self, a => a.acceptor_max_pdu_length())
    }
    fn requestor_max_pdu_length(&self) -> u32 {
        either!(self, a => a.requestor_max_pdu_length())
    }
    fn local_max_pdu_length(&self) -> u32 {
        either!(self, a => a.local_max_pdu_length())
    }
    fn peer_max_pdu_length(&self) -> u32 {
        either!(self, a => a.peer_max_pdu_length())
    }
    fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        either!(self, a => Association::presentation_contexts(a))
    }
    fn user_variables(&self) -> &[UserVariableItem] {
        either!(self, a => Association::user_variables(a))
    }
}

/// What a DIMSE exchange needs of an association: whole PDUs sent and received, over plain
/// TCP or TLS, whichever side opened it; so one implementation of a service (storage
/// commitment) serves the SCP's associations, the SCU's and those it opens itself.
pub trait Messages: Association + Send {
    /// Sends a PDU.
    fn send_pdu(&mut self, pdu: &Pdu) -> impl Future<Output = Result<(), UlError>> + Send;
    /// Receives a PDU.
    fn receive_pdu(&mut self) -> impl Future<Output = Result<Pdu, UlError>> + Send;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Messages for AsyncServerAssociation<S> {
    fn send_pdu(&mut self, pdu: &Pdu) -> impl Future<Output = Result<(), UlError>> + Send {
        AsyncAssociation::send(self, pdu)
    }
    fn receive_pdu(&mut self) -> impl Future<Output = Result<Pdu, UlError>> + Send {
        AsyncAssociation::receive(self)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Messages for AsyncClientAssociation<S> {
    fn send_pdu(&mut self, pdu: &Pdu) -> impl Future<Output = Result<(), UlError>> + Send {
        AsyncAssociation::send(self, pdu)
    }
    fn receive_pdu(&mut self) -> impl Future<Output = Result<Pdu, UlError>> + Send {
        AsyncAssociation::receive(self)
    }
}

impl<P: Messages, T: Messages> Messages for Link<P, T> {
    async fn send_pdu(&mut self, pdu: &Pdu) -> Result<(), UlError> {
        either!(self, a => a.send_pdu(pdu).await)
    }
    async fn receive_pdu(&mut self) -> Result<Pdu, UlError> {
        either!(self, a => a.receive_pdu().await)
    }
}

impl ServerAssociation {
    /// The negotiated presentation contexts.
    pub fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        Association::presentation_contexts(self)
    }

    /// The AE title the peer called.
    pub fn called_ae_title(&self) -> &str {
        either!(self, a => a.called_ae_title())
    }

    /// Sends a PDU.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn send(&mut self, pdu: &Pdu) -> Result<(), UlError> {
        either!(self, a => a.send(pdu).await)
    }

    /// Receives a PDU.
    ///
    /// # Errors
    /// The connection failed or the PDU is malformed.
    pub async fn receive(&mut self) -> Result<Pdu, UlError> {
        either!(self, a => a.receive().await)
    }

    /// Aborts the association (A-ABORT) and closes the connection.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn abort(self) -> Result<(), UlError> {
        either!(self, a => a.abort().await)
    }
}

impl ClientAssociation {
    /// The presentation contexts the PACS accepted.
    pub fn presentation_contexts(&self) -> &[PresentationContextNegotiated] {
        Association::presentation_contexts(self)
    }

    /// Sends a PDU.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn send(&mut self, pdu: &Pdu) -> Result<(), UlError> {
        either!(self, a => a.send(pdu).await)
    }

    /// Receives a PDU.
    ///
    /// # Errors
    /// The connection failed or the PDU is malformed.
    pub async fn receive(&mut self) -> Result<Pdu, UlError> {
        either!(self, a => a.receive().await)
    }

    /// Releases the association (A-RELEASE) and closes the connection.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn release(self) -> Result<(), UlError> {
        either!(self, a => a.release().await)
    }

    /// Aborts the association (A-ABORT) and closes the connection.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn abort(self) -> Result<(), UlError> {
        either!(self, a => a.abort().await)
    }

    /// A writer of one dataset as P-DATA fragments on `context_id`.
    pub fn send_pdata(&mut self, context_id: u8) -> PDataWriter<'_> {
        match self {
            Link::Plain(a) => PDataWriter(Link::Plain(a.send_pdata(context_id))),
            Link::Tls(a) => PDataWriter(Link::Tls(a.send_pdata(context_id))),
        }
    }

    /// Turns off Nagle's algorithm: with delayed ACKs it stalls every small PDU.
    ///
    /// # Errors
    /// The socket option cannot be set.
    pub fn set_nodelay(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(a) => a.inner_stream().set_nodelay(true),
            Link::Tls(a) => a.inner_stream().get_ref().0.set_nodelay(true),
        }
    }
}

/// Writes a dataset as P-DATA fragments, over plain TCP or TLS.
pub struct PDataWriter<'a>(
    Link<AsyncPDataWriter<&'a mut TcpStream>, AsyncPDataWriter<&'a mut client::AsyncTlsStream>>,
);

impl PDataWriter<'_> {
    /// Sends what is buffered as the last fragment.
    ///
    /// # Errors
    /// The connection failed.
    pub async fn finish(self) -> io::Result<()> {
        either!(self.0, w => w.finish().await)
    }
}

impl AsyncWrite for PDataWriter<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        either!(&mut self.get_mut().0, w => Pin::new(w).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(&mut self.get_mut().0, w => Pin::new(w).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        either!(&mut self.get_mut().0, w => Pin::new(w).poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_name_defaults_to_the_host_of_the_pacs_address() {
        assert_eq!(host_of("pacs.hospital.local:11112"), "pacs.hospital.local");
        assert_eq!(host_of("10.1.2.20:104"), "10.1.2.20");
        assert_eq!(host_of("[fd00::5]:104"), "fd00::5");
    }

    #[test]
    fn a_wrong_purpose_or_signature_algorithm_is_told_as_such() {
        let sides = Sides {
            peer: "the client",
            purpose: ("client", "clientAuth"),
            trusted: ("dicom.tls.client_ca", Path::new("/etc/ca.pem")),
            own: ("dicom.tls.certificate", Path::new("/etc/gw.pem")),
        };
        let purpose = explain(
            &rustls::Error::InvalidCertificate(CertificateError::InvalidPurpose),
            &sides,
        );
        assert_eq!(
            purpose,
            "the client's certificate is not issued for TLS client use (its extendedKeyUsage \
             lacks clientAuth): have it reissued with that purpose"
        );
        let algorithm = explain(
            &rustls::Error::InvalidCertificate(
                CertificateError::UnsupportedSignatureAlgorithmContext {
                    signature_algorithm_id: vec![1, 2, 3],
                    supported_algorithms: Vec::new(),
                },
            ),
            &sides,
        );
        assert!(
            algorithm.contains("signed with an algorithm the gateway does not accept")
                && !algorithm.contains("not signed by a CA"),
            "{algorithm}"
        );
    }

    #[test]
    fn a_bad_server_name_says_where_it_came_from() {
        let settings = PacsTlsConfig {
            ca: "/nonexistent/ca.pem".into(),
            certificate: None,
            key: None,
            server_name: None,
        };
        let defaulted = PacsTls::load(&settings, "pacs_1!:104").expect_err("not a name");
        assert_eq!(
            defaulted.to_string(),
            "the host of inbound.pacs = \"pacs_1!:104\" (the default of \
             inbound.pacs_tls.server_name): \"pacs_1!\" is not a DNS name or IP address; set \
             inbound.pacs_tls.server_name to a name in the PACS's certificate"
        );
        let set = PacsTlsConfig {
            server_name: Some("a b".into()),
            ..settings
        };
        let named = PacsTls::load(&set, "10.0.0.5:104").expect_err("not a name");
        assert!(
            named
                .to_string()
                .starts_with("inbound.pacs_tls.server_name: \"a b\" is not a DNS name"),
            "{named}"
        );
    }

    #[test]
    fn an_expiry_date_is_told_in_utc() {
        assert_eq!(when(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
