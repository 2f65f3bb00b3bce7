//! The bench's HTTP client: hyper's HTTP/1 connections and nothing between them and each
//! request (no pool, redirect or retry layers, no URL parsed per request), so that what a
//! request costs the machine the bench shares with the nodes is mostly the nodes'. Each worker
//! keeps its own keep-alive connection to each node ([`Connections`]): it sends one request at
//! a time, so a pool (which hashes the node's address twice a request and locks its table)
//! would only hand it back the same connection. `https://` URLs are spoken over rustls,
//! trusting the system's roots and `--ca-file`, showing `--client-cert` to a node that asks for
//! a client certificate.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tower_service::Service;

/// How the bench reaches nodes: what makes its connections, and how long a request may take.
#[derive(Clone)]
pub struct Client {
    connector: HttpsConnector<HttpConnector>,
    /// The most a request and its answer (and a connection made for it) may take.
    timeout: Duration,
}

/// The sending side of one connection.
type Sender = SendRequest<Full<Bytes>>;

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
/// it, and which of the bench's nodes it is (the `node`th `--url`).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub uri: Uri,
    host: HeaderValue,
    node: usize,
}

/// `url`, the `node`th node's base URL, with `path` appended.
pub fn endpoint(url: &str, path: &str, node: usize) -> Result<Endpoint, String> {
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
        Some(host) => Ok(Endpoint { uri, host, node }),
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
    /// `https://` nodes must have a certificate from one of `roots`, and are shown `identity`
    /// when they ask for one.
    pub fn new(
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
        Ok(Client { connector, timeout })
    }

    /// A new connection to `to`'s node, its other end driven by a task of its own until either
    /// side closes it.
    async fn connect(&self, to: &Endpoint) -> Result<Sender, Failure> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|_| Failure::Connect)?;
        let stream = connector
            .call(to.uri.clone())
            .await
            .map_err(|_| Failure::Connect)?;
        let (sender, connection) = http1::handshake(stream)
            .await
            .map_err(|_| Failure::Connect)?;
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// One worker's keep-alive connections, one to each node it has posted to.
pub struct Connections {
    client: Client,
    /// By [`Endpoint`]'s node.
    open: Vec<Option<Sender>>,
}

impl Connections {
    /// None yet to any of `nodes` nodes.
    pub fn new(client: Client, nodes: usize) -> Connections {
        Connections {
            client,
            open: (0..nodes).map(|_| None).collect(),
        }
    }

    /// POSTs `body` (JSON) to `to` as `user`: the answer's status and body.
    pub async fn post_json(
        &mut self,
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
        let timeout = self.client.timeout;
        let answer = tokio::time::timeout(timeout, self.exchange(to, request)).await;
        let answer = answer.unwrap_or(Err(Failure::Timeout));
        if answer.is_err() {
            // Maybe still busy with this request, or closed: the next one makes a new one.
            if let Some(open) = self.open.get_mut(to.node) {
                *open = None;
            }
        }
        answer
    }

    /// Sends `request` on the connection to `to`'s node, made first if there is none. A kept
    /// connection the node closed meanwhile gives the request back unsent: it goes once more,
    /// on a new connection.
    async fn exchange(
        &mut self,
        to: &Endpoint,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), Failure> {
        let Connections { client, open } = self;
        let open = open.get_mut(to.node).ok_or(Failure::Other)?;
        // Whether the connection in use was kept from before (made anew: no second try).
        let mut kept = true;
        loop {
            let sender = match open {
                Some(sender) if !sender.is_closed() => sender,
                _ => {
                    kept = false;
                    open.insert(client.connect(to).await?)
                }
            };
            let sent = match sender.ready().await {
                Ok(()) => sender.try_send_request(request).await,
                Err(_) if kept => {
                    *open = None;
                    continue;
                }
                Err(_) => return Err(Failure::Other),
            };
            let response = match sent {
                Ok(response) => response,
                Err(mut error) => match error.take_message() {
                    Some(unsent) if kept => {
                        request = unsent;
                        *open = None;
                        continue;
                    }
                    _ => return Err(Failure::Other),
                },
            };
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|_| Failure::Other)?
                .to_bytes();
            return Ok((status, body));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_or_https_urls_with_a_host() {
        let to = endpoint("http://127.0.0.1:8080", "/orders", 0).expect("an endpoint");
        assert_eq!(to.uri.to_string(), "http://127.0.0.1:8080/orders");
        assert_eq!(to.host, "127.0.0.1:8080");
        // The port only when it is not the scheme's.
        let host = |url| endpoint(url, "/orders", 0).map(|to| to.host);
        assert_eq!(host("https://node-1:443").expect("an endpoint"), "node-1");
        assert_eq!(host("http://node-1").expect("an endpoint"), "node-1");
        assert_eq!(
            host("https://[::1]:8443").expect("an endpoint"),
            "[::1]:8443"
        );
        assert!(endpoint("https://127.0.0.1:8080", "/orders", 0).is_ok());
        assert!(endpoint("ftp://127.0.0.1:8080", "/orders", 0).is_err());
        assert!(endpoint("127.0.0.1:8080", "/orders", 0).is_err());
        assert!(endpoint("http://exa mple", "/orders", 0).is_err());
    }

    #[tokio::test]
    async fn a_node_that_is_not_there_is_a_connect_failure() {
        // A port just freed: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .unwrap_or(9);
        let client =
            Client::new(Duration::from_secs(5), RootCertStore::empty(), None).expect("a client");
        let to = endpoint(&format!("http://127.0.0.1:{port}"), "/orders", 0);
        let to = to.expect("a valid endpoint");
        let mut connections = Connections::new(client, 1);
        let answer = connections.post_json(&to, "bench", b"{}".to_vec()).await;
        assert_eq!(answer.err(), Some(Failure::Connect));
    }

    /// A node on a free port that answers every POST with `{}` and closes each connection
    /// after `per_connection` answers: the connections it took, so far.
    async fn node(per_connection: usize) -> (Endpoint, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let address = listener.local_addr().expect("its address");
        let taken = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&taken);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    for _ in 0..per_connection {
                        // A request: its head, then as many bytes as its content-length.
                        let (head, length) = loop {
                            let text = String::from_utf8_lossy(&read).to_lowercase();
                            if let Some(end) = text.find("\r\n\r\n") {
                                let length = text
                                    .lines()
                                    .find_map(|line| line.strip_prefix("content-length:"))
                                    .and_then(|value| value.trim().parse::<usize>().ok())
                                    .unwrap_or(0);
                                break (end + 4, length);
                            }
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.extend_from_slice(&chunk[..n]),
                            }
                        };
                        while read.len() < head + length {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => read.extend_from_slice(&chunk[..n]),
                            }
                        }
                        read.drain(..head + length);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let to = endpoint(&format!("http://{address}"), "/orders", 0).expect("an endpoint");
        (to, taken)
    }

    fn connections() -> Connections {
        let client =
            Client::new(Duration::from_secs(5), RootCertStore::empty(), None).expect("a client");
        Connections::new(client, 1)
    }

    #[tokio::test]
    async fn a_worker_keeps_its_connection_to_a_node() {
        let (to, taken) = node(usize::MAX).await;
        let mut connections = connections();
        for _ in 0..3 {
            let answer = connections.post_json(&to, "bench", b"{}".to_vec()).await;
            assert_eq!(answer, Ok((StatusCode::OK, Bytes::from_static(b"{}"))));
        }
        assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_node_closed_is_made_again() {
        let (to, taken) = node(1).await;
        let mut connections = connections();
        for _ in 0..5 {
            let answer = connections.post_json(&to, "bench", b"{}".to_vec()).await;
            assert_eq!(answer, Ok((StatusCode::OK, Bytes::from_static(b"{}"))));
        }
        assert_eq!(taken.load(std::sync::atomic::Ordering::SeqCst), 5);
    }
}
