//! https for the node's API: the certificate chain and key of `server.tls_cert` and
//! `server.tls_key`, read at start and again on SIGHUP (a new certificate is served from the
//! next handshake; open connections and resumed sessions keep theirs), rustls with the `ring`
//! provider, HTTP/1.1 offered by ALPN (see [`super::serve`] for why not HTTP/2); with `server.tls_client_ca` (read again on
//! SIGHUP too), a client certificate from one of its CAs is required of every caller (mutual
//! TLS). A node that serves https calls its peers over https too ([`Peers`]), trusting the
//! system's roots and `cluster.ca_file`, and shows them its own certificate when they require
//! one.

use crate::config::{Config, ConfigError, StepTls};
use crate::pipeline::http::{add_cas, certificates, default_roots, read, tls_config};
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, SignatureScheme};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// The certificate the node serves, replaced whole by [`ServerTls::reload`].
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl Current {
    fn get(&self) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|current| Arc::clone(&current))
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get()
    }
}

/// The node's own certificate, shown to peers that require a client certificate.
impl ResolvesClientCert for Current {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.get()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What the node serves https with.
pub struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<Current>,
    /// `server.tls_client_ca`, when callers must show a client certificate.
    client_ca: Option<PathBuf>,
    /// Replaced whole when the client CA is read again.
    acceptor: RwLock<TlsAcceptor>,
}

impl ServerTls {
    /// The https setup of `config`, `None` when it serves plain http. A file that cannot be
    /// read, holds no PEM of its kind, or a key that does not go with the certificate is a
    /// [`ConfigError`] naming its key.
    pub fn from_config(config: &Config) -> Result<Option<ServerTls>, ConfigError> {
        let server = &config.server;
        if server.tls_cert.as_os_str().is_empty() {
            return Ok(None);
        }
        let certified = load(&server.tls_cert, &server.tls_key)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(certified))));
        let client_ca =
            (!server.tls_client_ca.as_os_str().is_empty()).then(|| server.tls_client_ca.clone());
        let acceptor = acceptor(&current, client_ca.as_deref())?;
        Ok(Some(ServerTls {
            cert: server.tls_cert.clone(),
            key: server.tls_key.clone(),
            current,
            client_ca,
            acceptor: RwLock::new(acceptor),
        }))
    }

    /// What accepts the next connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        // Only ever written by an assignment, which cannot panic and poison the lock.
        self.acceptor
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the certificate and key, and the client CA, again and uses them from the next
    /// handshake; on an error the ones used so far stay, all of them.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let certified = Arc::new(load(&self.cert, &self.key)?);
        let acceptor = match &self.client_ca {
            Some(ca_file) => Some(acceptor(&self.current, Some(ca_file))?),
            None => None,
        };
        if let Ok(mut current) = self.current.0.write() {
            *current = certified;
        }
        if let (Some(acceptor), Ok(mut serving)) = (acceptor, self.acceptor.write()) {
            *serving = acceptor;
        }
        Ok(())
    }
}

/// The subject common name of the client certificate a caller showed (asked for only with
/// `server.tls_client_ca`, and then signed by one of its CAs): the name a `[[certificate]]`
/// entry of the tokens file gives a user and a role (see [`super::auth`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateName(pub Arc<str>);

impl CertificateName {
    /// The name of the certificate the caller on `connection` showed, if it showed one with a
    /// common name that is text.
    pub fn of(connection: &rustls::ServerConnection) -> Option<CertificateName> {
        let der = connection.peer_certificates()?.first()?;
        let (_, certificate) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
        let name = certificate
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?;
        Some(CertificateName(Arc::from(name)))
    }
}

/// Serves the certificate `current` holds; with `client_ca`, requires a client certificate
/// from one of its CAs.
fn acceptor(current: &Arc<Current>, client_ca: Option<&Path>) -> Result<TlsAcceptor, ConfigError> {
    let provider = Arc::new(crate::crypto::provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| ConfigError::new("server.tls_cert", error.to_string()))?;
    let builder = match client_ca {
        Some(ca_file) => builder.with_client_cert_verifier(client_verifier(ca_file, provider)?),
        None => builder.with_no_client_auth(),
    };
    let mut tls = builder.with_cert_resolver(Arc::clone(current) as Arc<dyn ResolvesServerCert>);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(tls)))
}

/// Requires of every caller a client certificate from one of the CAs in `ca_file` (and only
/// those: not the system's roots).
fn client_verifier(
    ca_file: &Path,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, ConfigError> {
    let key = "server.tls_client_ca";
    let mut roots = RootCertStore::empty();
    add_cas(&mut roots, key, ca_file)?;
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|error| ConfigError::new(key, format!("{}: {error}", ca_file.display())))
}

/// The chain in `cert` with the key in `key`, checked to go together.
fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, ConfigError> {
    let chain = certificates("server.tls_cert", cert)?;
    let private =
        PrivateKeyDer::from_pem_slice(&read("server.tls_key", key)?).map_err(|error| {
            ConfigError::new(
                "server.tls_key",
                format!("{} holds no PEM private key: {error}", key.display()),
            )
        })?;
    let provider = crate::crypto::provider();
    CertifiedKey::from_der(chain, private, &provider).map_err(|error| {
        ConfigError::new(
            "server.tls_key",
            format!(
                "{} does not go with server.tls_cert {}: {error}",
                key.display(),
                cert.display()
            ),
        )
    })
}

/// How a node calls its peers' API: over https when it serves https itself (every node of a
/// cluster serves the same), trusting the system's roots and `cluster.ca_file`; showing its
/// own certificate, as it is at each handshake, when it requires client certificates itself.
#[derive(Clone, Default)]
pub struct Peers {
    tls: Option<rustls::ClientConfig>,
}

impl Peers {
    /// How a node that serves `server` (none: plain http) calls its peers.
    pub fn from_config(config: &Config, server: Option<&ServerTls>) -> Result<Peers, ConfigError> {
        let Some(server) = server else {
            return Ok(Peers::default());
        };
        let ca_file = &config.cluster.ca_file;
        let files = StepTls {
            ca_file: (!ca_file.as_os_str().is_empty()).then(|| ca_file.clone()),
            ..StepTls::default()
        };
        let mut tls = tls_config(&files, default_roots(), "cluster")?;
        if server.client_ca.is_some() {
            tls.client_auth_cert_resolver =
                Arc::clone(&server.current) as Arc<dyn ResolvesClientCert>;
        }
        Ok(Peers { tls: Some(tls) })
    }

    /// `http` or `https`.
    fn scheme(&self) -> &'static str {
        match self.tls {
            Some(_) => "https",
            None => "http",
        }
    }

    /// The URL of `path` on the peer at `addr`.
    pub fn url(&self, addr: SocketAddr, path: &str) -> String {
        format!("{}://{addr}{path}", self.scheme())
    }

    /// `builder` made to speak TLS as peers are called, straight to the peer: no proxy the
    /// environment names for steps, and no redirect followed (requests to peers may carry the
    /// cluster secret, which must go nowhere else).
    pub fn client(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        let builder = builder
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        match &self.tls {
            Some(tls) => builder.use_preconfigured_tls(tls.clone()),
            None => builder,
        }
    }
}
