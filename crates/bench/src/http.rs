//! The bench's HTTP client: hyper's pooled HTTP/1 client and nothing between it and each
//! request (no redirect or retry layers, no URL parsed per request), so that what a request
//! costs the machine the bench shares with the nodes is mostly the nodes'. `https://` URLs are
//! spoken over rustls, trusting the system's roots and `--ca-file`, showing `--client-cert` to
//! a node that asks for a client certificate.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{connect::HttpConnector, Client as Pool};
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Pooled keep-alive connections to the nodes.
#[derive(Clone)]
pub struct Client {
    pool: Pool<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The most a request and its answer may take.
    timeout: Duration,
}

/// Why a request got no answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Timeout,
    Other,
}

impl Failure {
    /// How the summary counts it.
    pub fn name(&self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Other => "other",
        }
    }
}

/// Where requests go: a node's URL and its `Host` header, both made once for every request to
/// it (hyper's pool would write the header with `format!` at every request that has none).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub uri: Uri,
    host: HeaderValue,
}

/// `url` (a node's base URL) with `path` appended.
pub fn endpoint(url: &str, path: &str) -> Result<Endpoint, String> {
    let uri: Uri = format!("{url}{path}")
        .parse()
        .map_err(|error| format!("--url {url}: {error}"))?;
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => 0,
    };
    let host = match (uri.host(), uri.port_u16()) {
        _ if default_port == 0 => None,
        (None, _) => None,
        // As hyper's pool writes it: the host, and the port unless it is the scheme's default.
        (Some(host), Some(port)) if port != default_port => {
            HeaderValue::from_str(&format!("{host}:{port}")).ok()
        }
        (Some(host), _) => HeaderValue::from_str(host).ok(),
    };
    match host {
        Some(host) => Ok(Endpoint { uri, host }),
        None => Err(format!(
            "--url {url}: must be an http:// or https:// URL with a host"
        )),
    }
}

/// The roots an https node's certificate is checked against: the system's (with `system`;
/// reading them takes some 18 million instructions, which a run against http nodes need not
/// spend), and the certificates in `ca_file`.
pub fn roots(ca_file: Option<&Path>, system: bool) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if system {
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    }
    if let Some(path) = ca_file {
        let shown = path.display();
        let certificates = CertificateDer::pem_file_iter(path)
            .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
            .map_err(|error| format!("--ca-file {shown}: {error}"))?;
        if certificates.is_empty() {
            return Err(format!("--ca-file {shown}: no PEM certificate in it"));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|error| format!("--ca-file {shown}: not a CA certificate: {error}"))?;
        }
    }
    Ok(roots)
}

/// A client certificate chain and its key, shown to https nodes that ask for one.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

/// The identity of `--client-cert` and `--client-key`, when both are given.
pub fn identity(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<Identity>, String> {
    let (cert, key) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err("--client-cert and --client-key go together".into()),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
        .map_err(|error| format!("--client-cert {}: {error}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "--client-cert {}: no PEM certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|error| format!("--client-key {}: {error}", key.display()))?;
    Ok(Some(Identity { chain, key }))
}

impl Client {
    /// Keeps up to `idle_per_host` idle connections to each node; `https://` nodes must have a
    /// certificate from one of `roots`, and are shown `identity` when they ask for one.
    pub fn new(
        idle_per_host: usize,
        timeout: Duration,
        roots: RootCertStore,
        identity: Option<Identity>,
    ) -> Result<Client, String> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(false);
        // rustls deprecates ring for lacking post-quantum key exchange; the node uses it too
        // (see its `crypto` module).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("cannot set up TLS: {error}"))?
            .with_root_certificates(roots);
        let tls = match identity {
            Some(Identity { chain, key }) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| format!("--client-key: {error}"))?,
            None => builder.with_no_client_auth(),
        };
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let pool = Pool::builder(TokioExecutor::new())
            .pool_max_idle_per_host(idle_per_host)
            .build(connector);
        Ok(Client { pool, timeout })
    }

    /// POSTs `body` (JSON) to `to` as `user`: the answer's status and body.
    pub async fn post_json(
        &self,
        to: &Endpoint,
        user: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = to.uri.clone();
        let headers = request.headers_mut();
        // These three and hyper's `content-length`.
        headers.reserve(4);
        headers.insert(header::HOST, to.host.clone());
        let user = HeaderValue::from_str(user).map_err(|_| Failure::Other)?;
        headers.insert(header::AUTHORIZATION, user);
        let json = HeaderValue::from_static("application/json");
        headers.insert(header::CONTENT_TYPE, json);
        let exchange = async {
            let response = self.pool.request(request).await.map_err(|error| {
                if error.is_connect() {
                    Failure::Connect
                } else {
                    Failure::Other
                }
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|_| Failure::Other)?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_or_https_urls_with_a_host() {
        let to = endpoint("http://127.0.0.1:8080", "/orders").expect("an endpoint");
        assert_eq!(to.uri.to_string(), "http://127.0.0.1:8080/orders");
        assert_eq!(to.host, "127.0.0.1:8080");
        // The port only when it is not the scheme's.
        let host = |url| endpoint(url, "/orders").map(|to| to.host);
        assert_eq!(host("https://node-1:443").expect("an endpoint"), "node-1");
        assert_eq!(host("http://node-1").expect("an endpoint"), "node-1");
        assert_eq!(
            host("https://[::1]:8443").expect("an endpoint"),
            "[::1]:8443"
        );
        assert!(endpoint("https://127.0.0.1:8080", "/orders").is_ok());
        assert!(endpoint("ftp://127.0.0.1:8080", "/orders").is_err());
        assert!(endpoint("127.0.0.1:8080", "/orders").is_err());
        assert!(endpoint("http://exa mple", "/orders").is_err());
    }

    #[tokio::test]
    async fn a_node_that_is_not_there_is_a_connect_failure() {
        // A port just freed: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .unwrap_or(9);
        let client =
            Client::new(1, Duration::from_secs(5), RootCertStore::empty(), None).expect("a client");
        let uri = endpoint(&format!("http://127.0.0.1:{port}"), "/orders");
        let uri = uri.expect("a valid endpoint");
        let answer = client.post_json(&uri, "bench", b"{}".to_vec()).await;
        assert_eq!(answer.err(), Some(Failure::Connect));
    }
}
