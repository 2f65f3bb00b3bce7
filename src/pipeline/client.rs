//! The HTTP client of http steps and the completion webhook: hyper's pooled HTTP/1 client over
//! rustls, with nothing between it and each call. (reqwest's redirect layer parses every call's
//! URL again, twice, even when it follows no redirects.) The calls it does not make go through
//! reqwest: those a proxy named in the environment (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`,
//! less `NO_PROXY`) takes, and those to a URL with a user and password (sent as basic auth).

use crate::config::ConfigError;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, ACCEPT, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{HeaderMap, Method, Request, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{connect::HttpConnector, Client as Pool};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::time::Duration;

/// How long an idle connection to a service is kept for the next call.
const IDLE: Duration = Duration::from_secs(30);

/// Pooled keep-alive connections to the services of a node's steps (or its webhook's).
#[derive(Clone)]
pub struct Client {
    pool: Pool<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// For the calls `pool` does not make.
    fallback: Arc<Fallback>,
}

/// reqwest, and the environment's proxies (none when it names none).
struct Fallback {
    proxies: Option<Matcher>,
    client: reqwest::Client,
}

/// The variables that name a proxy, in either case.
const PROXY_VARIABLES: [&str; 6] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// A service's answer: its status, headers and body (at most the limit the call gave).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
    /// The body went past the limit: `body` holds only its start.
    pub truncated: bool,
}

/// Where calls go: a config URL parsed once, and the `Host` header a call to it sends, made
/// once too (hyper's pool would otherwise make it again, with `format!`, at every call).
#[derive(Clone, Debug)]
pub struct Target {
    uri: Uri,
    host: Option<HeaderValue>,
}

/// Why a call got no whole answer.
#[derive(Debug)]
pub enum CallError {
    /// No answer (or not all of it) within the call's timeout.
    Timeout,
    /// The request could not be made or sent, or its answer read (`status`, when it was the
    /// body that could not be): what went wrong, causes included.
    Failed { reason: String, status: Option<u16> },
}

impl Client {
    /// Speaks TLS to `https://` services as `tls` says, and plain HTTP to `http://` ones.
    pub fn new(tls: rustls::ClientConfig) -> Result<Client, reqwest::Error> {
        let named = PROXY_VARIABLES
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()));
        let fallback = Fallback {
            proxies: named.then(Matcher::from_env),
            client: reqwest::Client::builder()
                .use_preconfigured_tls(tls.clone())
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(USER_AGENT_VALUE)
                .pool_idle_timeout(IDLE)
                .build()?,
        };
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let pool = Pool::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Client {
            pool,
            fallback: Arc::new(fallback),
        })
    }

    /// POSTs the JSON `body` to `uri` with `headers`, and reads the answer's body up to `limit`
    /// bytes, all within `timeout`.
    pub async fn post_json(
        &self,
        target: &Target,
        headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
        body: Vec<u8>,
        timeout: Duration,
        limit: usize,
    ) -> Result<Answer, CallError> {
        let uri = &target.uri;
        let fallback = &self.fallback;
        let credentials = uri
            .authority()
            .is_some_and(|authority| authority.as_str().contains('@'));
        let proxied = || {
            let proxies = fallback.proxies.as_ref();
            proxies.is_some_and(|proxies| proxies.intercept(uri).is_some())
        };
        if credentials || proxied() {
            return post_reqwest(&fallback.client, uri, headers, body, timeout, limit).await;
        }
        let mut request = Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri.clone();
        let fields = request.headers_mut();
        // Ours (four), the caller's (up to four: the webhook's) and hyper's `content-length`.
        fields.reserve(9);
        if let Some(host) = &target.host {
            fields.insert(HOST, host.clone());
        }
        fields.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
        fields.insert(ACCEPT, HeaderValue::from_static("*/*"));
        fields.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        fields.extend(headers);
        let exchange = async {
            // Kept for a second try: a clone shares the body's bytes.
            let again = request.clone();
            let response = match self.pool.request(request).await {
                Err(error) if closed_unanswered(&error) => {
                    tracing::debug!(uri = %uri, error = %error, "connection closed as the call went out; sent again");
                    self.pool.request(again).await
                }
                sent => sent,
            }
            .map_err(|error| CallError::failed(&error, None))?;
            let (parts, mut body) = response.into_parts();
            let status = parts.status.as_u16();
            let mut answer = Answer::new(status, parts.headers);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|error| CallError::failed(&error, Some(status)))?;
                if let Ok(chunk) = frame.into_data() {
                    if !answer.take(&chunk, limit) {
                        break;
                    }
                }
            }
            Ok(answer)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(CallError::Timeout))
    }
}

/// Whether `error` is a connection closed or reset before any of the answer came: what a call
/// sent on a kept-alive connection meets when the service closes that connection, idle on its
/// side, as the call goes out. hyper sends again only a call it had not begun to write; this
/// one is sent once more, on another connection (it carries its `Idempotency-Key`, so a service
/// that did get it answers the repeat as the first).
fn closed_unanswered(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
            || error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|error| error.kind() == std::io::ErrorKind::ConnectionReset)
        {
            return true;
        }
        cause = error.source();
    }
    false
}

const USER_AGENT_VALUE: &str = concat!("order-process/", env!("CARGO_PKG_VERSION"));

/// The URL of config key `key`, as a call's request takes it.
pub fn target(key: &str, url: &reqwest::Url) -> Result<Target, ConfigError> {
    let uri: Uri = url
        .as_str()
        .parse()
        .map_err(|error| ConfigError::new(key, format!("{url}: {error}")))?;
    // As hyper's pool writes it: the host, and the port unless it is the scheme's default.
    let host = match (uri.host(), uri.port_u16()) {
        (None, _) => None,
        (Some(host), Some(port)) if Some(port) != default_port(&uri) => {
            HeaderValue::from_str(&format!("{host}:{port}")).ok()
        }
        (Some(host), _) => HeaderValue::from_str(host).ok(),
    };
    Ok(Target { uri, host })
}

fn default_port(uri: &Uri) -> Option<u16> {
    match uri.scheme_str() {
        Some("http") => Some(80),
        Some("https") => Some(443),
        _ => None,
    }
}

/// [`Client::post_json`] with reqwest.
async fn post_reqwest(
    client: &reqwest::Client,
    uri: &Uri,
    headers: impl IntoIterator<Item = (HeaderName, HeaderValue)>,
    body: Vec<u8>,
    timeout: Duration,
    limit: usize,
) -> Result<Answer, CallError> {
    let failed = |error: reqwest::Error, status| match error.is_timeout() {
        true => CallError::Timeout,
        false => CallError::failed(&error, status),
    };
    let url =
        reqwest::Url::parse(&uri.to_string()).map_err(|error| CallError::failed(&error, None))?;
    let mut request = client
        .post(url)
        .timeout(timeout)
        .header(ACCEPT, "*/*")
        .header(CONTENT_TYPE, "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let mut response = request.send().await.map_err(|error| failed(error, None))?;
    let status = response.status().as_u16();
    let mut answer = Answer::new(status, std::mem::take(response.headers_mut()));
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|error| failed(error, Some(status)))?
    {
        if !answer.take(&chunk, limit) {
            break;
        }
    }
    Ok(answer)
}

impl Answer {
    fn new(status: u16, headers: HeaderMap) -> Answer {
        Answer {
            status,
            headers,
            body: Vec::new(),
            truncated: false,
        }
    }

    /// Adds `chunk` of the body, up to `limit` bytes in all; false once past it.
    fn take(&mut self, chunk: &[u8], limit: usize) -> bool {
        let room = limit.saturating_sub(self.body.len());
        if chunk.len() > room {
            self.body
                .extend_from_slice(chunk.get(..room).unwrap_or_default());
            self.truncated = true;
            return false;
        }
        self.body.extend_from_slice(chunk);
        true
    }
}

impl CallError {
    /// `error` and its causes, one after another: hyper's own messages are generic ("client
    /// error (Connect)"); the cause (refused, reset, DNS, a certificate) is in the chain.
    fn failed(error: &dyn std::error::Error, status: Option<u16>) -> CallError {
        let mut reason = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        CallError::Failed { reason, status }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn at(url: &str) -> Target {
        target("steps.Processing.url", &reqwest::Url::parse(url).unwrap()).unwrap()
    }

    #[test]
    fn a_target_names_its_host_and_any_port_but_the_default() {
        let host = |url| at(url).host.map(|host| host.to_str().unwrap().to_string());
        assert_eq!(
            host("http://127.0.0.1:9001/a").as_deref(),
            Some("127.0.0.1:9001")
        );
        assert_eq!(
            host("http://shop.example/a").as_deref(),
            Some("shop.example")
        );
        assert_eq!(
            host("http://shop.example:80/a").as_deref(),
            Some("shop.example")
        );
        assert_eq!(
            host("https://shop.example:443/a").as_deref(),
            Some("shop.example")
        );
        assert_eq!(
            host("https://shop.example:80/a").as_deref(),
            Some("shop.example:80")
        );
        assert_eq!(host("http://[::1]:9001/a").as_deref(), Some("[::1]:9001"));
        assert_eq!(
            host("http://user:pw@shop.example/a").as_deref(),
            Some("shop.example")
        );
    }

    fn plain() -> Client {
        let tls = crate::pipeline::http::tls_config(
            &crate::config::StepTls::default(),
            rustls::RootCertStore::empty(),
            "steps.Processing",
        )
        .unwrap();
        Client::new(tls).unwrap()
    }

    /// A service on a free port that answers each connection's first request with `answer`,
    /// then hands back what it was sent.
    async fn service(answer: &'static str) -> (Target, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = at(&format!("http://{}/charge", listener.local_addr().unwrap()));
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            // The head, then as many body bytes as it announced.
            loop {
                let read = socket.read(&mut buffer).await.unwrap();
                assert!(read > 0, "the request ended early");
                request.extend_from_slice(&buffer[..read]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length: "))
                        .map_or(0, |value| value.trim().parse::<usize>().unwrap());
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            socket.write_all(answer.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (uri, served)
    }

    #[tokio::test]
    async fn a_call_sends_its_headers_and_body_and_reads_the_answer_up_to_the_limit() {
        let (uri, served) = service(
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\ncontent-length: 10\r\n\r\n0123456789",
        )
        .await;
        let headers = [(
            HeaderName::from_static("idempotency-key"),
            HeaderValue::from_static("k:1"),
        )];
        let answer = plain()
            .post_json(
                &uri,
                headers,
                b"{\"a\":1}".to_vec(),
                Duration::from_secs(5),
                4,
            )
            .await
            .unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.headers["retry-after"], "7");
        assert_eq!(answer.body, b"0123");
        assert!(answer.truncated);
        let request = served.await.unwrap();
        assert!(
            request.starts_with("POST /charge HTTP/1.1\r\n"),
            "{request}"
        );
        for line in [
            "idempotency-key: k:1",
            "content-type: application/json",
            "content-length: 7",
            "user-agent: order-process/",
            "accept: */*",
        ] {
            assert!(request.contains(line), "{line} in {request}");
        }
        assert!(request.ends_with("\r\n\r\n{\"a\":1}"), "{request}");
        let host = format!("host: {}\r\n", uri.uri.authority().unwrap());
        assert_eq!(request.matches("host: ").count(), 1, "{request}");
        assert!(request.contains(&host), "{host} in {request}");
    }

    #[tokio::test]
    async fn a_whole_answer_within_the_limit_is_not_truncated() {
        let (uri, _served) = service("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
        let answer = plain()
            .post_json(&uri, [], Vec::new(), Duration::from_secs(5), 2)
            .await
            .unwrap();
        assert_eq!((answer.status, answer.body.as_slice()), (200, &b"{}"[..]));
        assert!(!answer.truncated);
    }

    #[tokio::test]
    async fn a_service_that_does_not_answer_in_time_is_a_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = at(&format!("http://{}/slow", listener.local_addr().unwrap()));
        let held = tokio::spawn(async move { listener.accept().await });
        let failed = plain()
            .post_json(&uri, [], Vec::new(), Duration::from_millis(200), 10)
            .await;
        assert!(matches!(failed, Err(CallError::Timeout)), "{failed:?}");
        held.abort();
    }

    #[tokio::test]
    async fn a_refused_connection_names_its_cause() {
        // A port just freed: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let uri = at(&format!("http://127.0.0.1:{port}/x"));
        let failed = plain()
            .post_json(&uri, [], Vec::new(), Duration::from_secs(5), 10)
            .await;
        match failed {
            Err(CallError::Failed { reason, status }) => {
                assert!(reason.contains("Connection refused"), "{reason}");
                assert_eq!(status, None);
            }
            other => panic!("{other:?}"),
        }
    }
}
