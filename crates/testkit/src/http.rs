//! HTTP to a node: a request builder ([`Call`], from `Node::call`) and the answer it reads
//! completely ([`Reply`]).

use crate::node::Node;
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// One HTTP answer, read completely.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
    }

    /// The body as JSON, or `None` if it is not JSON.
    pub fn try_json(&self) -> Option<Value> {
        serde_json::from_str(&self.text).ok()
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let content_type = self.header("content-type").unwrap_or_default();
        write!(
            formatter,
            "HTTP {} (content-type {content_type:?}) body: {}",
            self.status, self.text
        )
    }
}

/// A client without connection reuse: nodes get killed and restarted on the same port, and a
/// pooled connection to a dead process would fail the next request for the wrong reason.
pub fn client() -> reqwest::Client {
    client_builder().build().expect("build the HTTP client")
}

/// What [`client`] is built from.
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
}

/// A client of [`client_builder`]'s for https that trusts only the CA in `ca_file`; with
/// `identity` (a PEM certificate and its PEM private key), it shows that client certificate.
pub fn https_client(
    ca_file: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> reqwest::Client {
    let pem = std::fs::read(ca_file).expect("read the CA file");
    let ca = reqwest::Certificate::from_pem(&pem).expect("a PEM CA certificate");
    let mut builder = client_builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca);
    if let Some((cert, key)) = identity {
        let mut pem = std::fs::read(cert).expect("read the client certificate");
        pem.extend(std::fs::read(key).expect("read the client key"));
        let identity = reqwest::Identity::from_pem(&pem).expect("a PEM certificate and key");
        builder = builder.identity(identity);
    }
    builder.build().expect("build the https client")
}

/// A request being built against a node (see `Node::call`).
pub struct Call<'a> {
    pub(crate) node: &'a Node,
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) user: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) query: Vec<(String, String)>,
    pub(crate) body: Option<String>,
    pub(crate) bare: bool,
}

impl Call<'_> {
    /// Sets `Authorization: <user>` (the user id, verbatim).
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_string());
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn query(mut self, name: &str, value: &str) -> Self {
        self.query.push((name.to_string(), value.to_string()));
        self
    }

    /// The request body; sent with `Content-Type: application/json` unless a header sets another.
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sends the body without any `Content-Type` header.
    pub fn without_content_type(mut self) -> Self {
        self.bare = true;
        self
    }

    /// Sends the request; `Err` only for transport errors (refused, reset, timeout).
    pub async fn try_send(self) -> Result<Reply, reqwest::Error> {
        let url = format!("{}{}", self.node.base, self.path);
        let mut request = self.node.client().request(self.method, url);
        if !self.query.is_empty() {
            request = request.query(&self.query);
        }
        if let Some(user) = &self.user {
            request = request.header("Authorization", user);
        }
        let has_content_type = self
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(body) = self.body {
            if !has_content_type && !self.bare {
                request = request.header("Content-Type", "application/json");
            }
            request = request.body(body);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await?;
        Ok(Reply {
            status,
            headers,
            text,
        })
    }

    /// Sends the request; a transport error fails the test (with the log tail).
    pub async fn send(self) -> Reply {
        let node = self.node;
        let what = format!("{} {}", self.method, self.path);
        self.try_send().await.unwrap_or_else(|error| {
            panic!("{what}: transport error: {error:?}\n{}", node.log_tail())
        })
    }
}

/// Pretty JSON for messages.
pub fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// The `order_id`s of a `GET /orders` page, in order.
pub fn order_ids(page: &Value) -> Vec<String> {
    page["orders"]
        .as_array()
        .unwrap_or_else(|| panic!("GET /orders: no \"orders\" array in {}", pretty(page)))
        .iter()
        .map(|order| {
            order["order_id"]
                .as_str()
                .unwrap_or_else(|| panic!("listed order without order_id: {order}"))
                .to_string()
        })
        .collect()
}
