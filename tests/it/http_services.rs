//! `http` steps against services that are more than a plain endpoint: https with a private CA
//! and a client certificate (certificates made with rcgen, the server on rustls), services that
//! answer "busy" with `Retry-After`, a step's `concurrency` limit, and the `Order-Epoch` header.
//! The service is a real HTTP server in the test on 127.0.0.1:0 that records every call (path,
//! epoch header, body) and the most calls it had in flight at once; the node is the real binary.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use warp::Filter;

use crate::harness::{pretty, simulate, unique_user, Node, TERMINAL};
use crate::history::{assert_completed, assert_failed_at};
use crate::redis_tls::Pki;

/// One call the service received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    /// The `Order-Epoch` header.
    epoch: Option<String>,
    body: Value,
}

/// How the service answers one call.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// How long it works before answering.
    takes: Duration,
}

impl Reply {
    fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: String::new(),
            takes: Duration::ZERO,
        }
    }

    fn ok() -> Reply {
        Reply::status(200)
    }

    fn header(mut self, name: &'static str, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }

    fn taking(mut self, takes: Duration) -> Reply {
        self.takes = takes;
        self
    }
}

/// The answer to the n-th call (from 1) to a path.
type Script = dyn Fn(&str, usize) -> Reply + Send + Sync;

#[derive(Default)]
struct Record {
    seen: Vec<Seen>,
    by_path: HashMap<String, usize>,
}

/// A service on a free loopback port, plain or https; stops when dropped.
struct Service {
    base: String,
    record: Arc<Mutex<Record>>,
    most_in_flight: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock(record: &Mutex<Record>) -> MutexGuard<'_, Record> {
    record
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Service {
    /// Serves every POST as `script` says; over TLS with `tls`.
    async fn start(
        tls: Option<rustls::ServerConfig>,
        script: impl Fn(&str, usize) -> Reply + Send + Sync + 'static,
    ) -> Service {
        let script: Arc<Script> = Arc::new(script);
        let record: Arc<Mutex<Record>> = Arc::default();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let most_in_flight = Arc::new(AtomicUsize::new(0));
        let (shared, most) = (Arc::clone(&record), Arc::clone(&most_in_flight));
        let routes = warp::post()
            .and(warp::path::full())
            .and(warp::header::optional::<String>("order-epoch"))
            .and(warp::body::bytes())
            .then(
                move |path: warp::path::FullPath, epoch: Option<String>, body: Bytes| {
                    let (script, record) = (Arc::clone(&script), Arc::clone(&shared));
                    let (in_flight, most) = (Arc::clone(&in_flight), Arc::clone(&most));
                    async move {
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        let path = path.as_str().to_string();
                        let reply = {
                            let mut record = lock(&record);
                            let number = record.by_path.entry(path.clone()).or_default();
                            *number += 1;
                            let number = *number;
                            record.seen.push(Seen {
                                path: path.clone(),
                                epoch,
                                body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                            });
                            script(&path, number)
                        };
                        tokio::time::sleep(reply.takes).await;
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        let mut response = warp::http::Response::new(reply.body);
                        *response.status_mut() = warp::http::StatusCode::from_u16(reply.status)
                            .unwrap_or(warp::http::StatusCode::INTERNAL_SERVER_ERROR);
                        for (name, value) in reply.headers {
                            if let Ok(value) = warp::http::HeaderValue::from_str(&value) {
                                response.headers_mut().insert(name, value);
                            }
                        }
                        response
                    }
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let address = listener.local_addr().expect("the service's address");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let acceptor = tls.map(|config| tokio_rustls::TlsAcceptor::from(Arc::new(config)));
        let service = warp::service(routes);
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (acceptor, service) = (acceptor.clone(), service.clone());
                tokio::spawn(async move {
                    let http = auto::Builder::new(TokioExecutor::new());
                    let service = TowerToHyperService::new(service);
                    match acceptor {
                        // A client the handshake refuses just goes away.
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Service {
            base: format!("{scheme}://{address}"),
            record,
            most_in_flight,
            server,
        }
    }

    fn calls_to(&self, path: &str) -> Vec<Seen> {
        lock(&self.record)
            .seen
            .iter()
            .filter(|seen| seen.path == path)
            .cloned()
            .collect()
    }

    fn most_in_flight(&self) -> usize {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    /// A node config with `Processing` on this service's `/charge` (and `/refund`), these
    /// `extra` lines in its section; the other steps simulated.
    fn processing(&self, extra: &str) -> String {
        format!(
            "{}[steps.Processing]\nhandler = \"http\"\nurl = \"{base}/charge\"\n\
             rollback_url = \"{base}/refund\"\ntimeout = \"5s\"\n{extra}",
            simulate("10ms"),
            base = self.base
        )
    }
}

/// The server side of https: the test PKI's server certificate, and client certificates
/// required, signed by the test CA.
fn server_tls(pki: &Pki) -> rustls::ServerConfig {
    let provider = Arc::new(order_process::crypto::provider());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("ca.pem") {
        roots
            .add(certificate.expect("a CA certificate"))
            .expect("a usable CA");
    }
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .expect("a client verifier");
    let chain = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .expect("server.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("the server's chain");
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("server.key");
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .expect("the server's certificate")
}

/// The `[steps.Processing]` lines naming the test PKI's files.
fn tls_lines(pki: &Pki, ca: bool) -> String {
    let mut lines = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"\n",
        pki.path("client.pem").display(),
        pki.path("client.key").display()
    );
    if ca {
        lines.push_str(&format!("ca_file = \"{}\"\n", pki.path("ca.pem").display()));
    }
    lines
}

fn attempts(order: &Value, step: &str) -> Vec<Value> {
    order["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|entry| entry["step_name"] == step))
        .and_then(|entry| entry["attempts"].as_array())
        .cloned()
        .unwrap_or_else(|| panic!("no {step} attempts in {}", pretty(order)))
}

/// Submits an order for a new user and waits for its end.
async fn run_order(node: &Node, who: &str) -> Value {
    let user = unique_user(who);
    let id = node.create_order(&user, &json!({"sku": "T1"})).await;
    node.wait_terminal(&user, &id, TERMINAL).await
}

#[tokio::test]
async fn an_https_step_trusts_a_private_ca_and_presents_a_client_certificate() {
    let pki = Pki::new();
    let service = Service::start(Some(server_tls(&pki)), |_, _| {
        Reply::ok().header("content-type", "application/json")
    })
    .await;
    assert!(service.base.starts_with("https://127.0.0.1:"));
    let node = Node::start(&service.processing(&tls_lines(&pki, true))).await;
    let order = run_order(&node, "tess").await;
    assert_completed(&order);
    let charges = service.calls_to("/charge");
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(attempts(&order, "Processing")[0]["status"], 200);
}

#[tokio::test]
async fn an_https_webhook_trusts_a_private_ca_and_presents_a_client_certificate() {
    let pki = Pki::new();
    let receiver = Service::start(Some(server_tls(&pki)), |_, _| Reply::ok()).await;
    let config = format!(
        "{}[notify]\nurl = \"{}/finished\"\nsecret = \"webhook-secret-0123456789\"\n{}",
        simulate("10ms"),
        receiver.base,
        tls_lines(&pki, true)
    );
    let node = Node::start(&config).await;
    let user = unique_user("nia");
    let id = node.create_order(&user, &json!({"sku": "T1"})).await;
    let order = node
        .wait_for(&user, &id, TERMINAL, "the webhook delivered", |order| {
            order["notification"]["state"] == "delivered"
        })
        .await;
    assert_completed(&order);
    assert_eq!(receiver.calls_to("/finished").len(), 1);
}

#[tokio::test]
async fn an_https_step_without_the_ca_fails_on_the_certificate_and_retries() {
    let pki = Pki::new();
    let service = Service::start(Some(server_tls(&pki)), |_, _| Reply::ok()).await;
    let retry_once = "retries = 1\nbackoff = \"50ms\"\nbackoff_max = \"50ms\"\n";
    let config = service.processing(&format!("{}{retry_once}", tls_lines(&pki, false)));
    let node = Node::start(&config).await;
    let order = run_order(&node, "uma").await;
    // The refund cannot get through either, so the order is parked with its rollback undone.
    assert_eq!(order["current_step"], "Failed", "{}", pretty(&order));
    assert_eq!(order["failure"]["step"], "Processing", "{}", pretty(&order));
    let runs: Vec<Value> = attempts(&order, "Processing")
        .into_iter()
        .filter(|attempt| attempt["rollback"] == false)
        .collect();
    assert_eq!(runs.len(), 2, "retried once: {}", pretty(&order));
    for run in &runs {
        let error = run["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("certificate") && run["status"].is_null(),
            "a transport error naming the certificate: {}",
            pretty(run)
        );
    }
    assert!(
        service.calls_to("/charge").is_empty(),
        "no call got through"
    );
}

#[tokio::test]
async fn busy_answers_are_retried_when_the_service_asks() {
    // The charge is busy twice, asking for a second each time; then it goes through. The
    // backoff alone would retry after 50 ms.
    let service = Service::start(None, |path, number| match (path, number) {
        ("/charge", 1 | 2) => Reply::status(429).header("retry-after", "1"),
        _ => Reply::ok(),
    })
    .await;
    let timing = "retries = 3\nbackoff = \"50ms\"\nbackoff_max = \"5s\"\n";
    let node = Node::start(&service.processing(timing)).await;
    let order = run_order(&node, "vera").await;
    assert_completed(&order);
    let tries = attempts(&order, "Processing");
    let statuses: Vec<&Value> = tries.iter().map(|attempt| &attempt["status"]).collect();
    assert_eq!(statuses, [429, 429, 200], "{}", pretty(&order));
    let times: Vec<chrono::DateTime<chrono::Utc>> = tries
        .iter()
        .map(|attempt| {
            attempt["at"]
                .as_str()
                .and_then(|at| at.parse().ok())
                .unwrap_or_else(|| panic!("no time in {attempt}"))
        })
        .collect();
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= chrono::Duration::seconds(1),
            "retried {gap} after a Retry-After of 1s: {}",
            pretty(&order)
        );
    }
}

#[tokio::test]
async fn timeouts_and_too_early_are_retried_other_client_errors_are_not() {
    let service = Service::start(None, |path, number| match (path, number) {
        ("/charge", 1) => Reply::status(408),
        ("/charge", 2) => Reply::status(425),
        ("/charge", _) => Reply::ok(),
        _ => Reply::ok(),
    })
    .await;
    let timing = "retries = 3\nbackoff = \"50ms\"\nbackoff_max = \"50ms\"\n";
    let node = Node::start(&service.processing(timing)).await;
    let order = run_order(&node, "wes").await;
    assert_completed(&order);
    let statuses: Vec<Value> = attempts(&order, "Processing")
        .iter()
        .map(|attempt| attempt["status"].clone())
        .collect();
    assert_eq!(statuses, [408, 425, 200], "{}", pretty(&order));

    let refusing = Service::start(None, |path, _| match path {
        "/charge" => Reply::status(404),
        _ => Reply::ok(),
    })
    .await;
    let node = Node::start(&refusing.processing(timing)).await;
    let order = run_order(&node, "xia").await;
    assert_failed_at(&order, "Processing");
    assert_eq!(
        refusing.calls_to("/charge").len(),
        1,
        "a 404 is not retried"
    );
}

#[tokio::test]
async fn concurrency_limits_the_calls_in_flight_to_a_step() {
    let service = Service::start(None, |path, _| match path {
        "/charge" => Reply::ok().taking(Duration::from_millis(150)),
        _ => Reply::ok(),
    })
    .await;
    let node = Node::start(&service.processing("concurrency = 2\n")).await;
    let user = unique_user("yan");
    let mut ids = Vec::new();
    for index in 0..12 {
        ids.push(node.create_order(&user, &json!({ "n": index })).await);
    }
    for id in &ids {
        assert_completed(&node.wait_terminal(&user, id, TERMINAL).await);
    }
    assert_eq!(service.calls_to("/charge").len(), 12);
    assert_eq!(
        service.most_in_flight(),
        2,
        "at most 2 charges at once, and the orders did overlap"
    );
}

#[tokio::test]
async fn every_call_carries_the_orders_epoch() {
    let service = Service::start(None, |path, _| match path {
        "/charge" => Reply::status(422),
        _ => Reply::ok(),
    })
    .await;
    let node = Node::start(&service.processing("")).await;
    let order = run_order(&node, "zoe").await;
    assert_failed_at(&order, "Processing");
    let calls: Vec<Seen> = ["/charge", "/refund"]
        .iter()
        .flat_map(|path| service.calls_to(path))
        .collect();
    assert_eq!(calls.len(), 2, "the charge and its rollback: {calls:?}");
    for call in calls {
        assert_eq!(call.epoch.as_deref(), Some("1"), "{call:?}");
        assert_eq!(call.body["epoch"], 1, "{call:?}");
    }
}

/// An https service that answers every call 200 with a body that has no length (it ends where
/// the connection does) and then drops the connection without a TLS `close_notify`: anyone on
/// the path could have cut such a body short.
async fn cut_short_service(pki: &Pki) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the service");
    let base = format!("https://{}", listener.local_addr().expect("its address"));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(pki)));
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                // The request's head is enough: the answer does not wait for the body.
                let mut read = Vec::new();
                let mut buffer = [0u8; 4096];
                while !read.windows(4).any(|window| window == b"\r\n\r\n") {
                    match tls.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(count) => read.extend_from_slice(&buffer[..count]),
                    }
                }
                let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"cut\":";
                if tls.write_all(answer.as_bytes()).await.is_err() || tls.flush().await.is_err() {
                    return;
                }
                // The TCP connection alone, closed under the TLS session.
                let (tcp, _session) = tls.into_inner();
                drop(tcp);
            });
        }
    });
    (base, server)
}

#[tokio::test]
async fn an_https_answer_ended_without_close_notify_is_refused_and_retried() {
    let pki = Pki::new();
    let (base, server) = cut_short_service(&pki).await;
    let config = format!(
        "{}[steps.Processing]\nhandler = \"http\"\nurl = \"{base}/charge\"\ntimeout = \"5s\"\n\
         retries = 1\nbackoff = \"50ms\"\nbackoff_max = \"50ms\"\n{}",
        simulate("10ms"),
        tls_lines(&pki, true)
    );
    let node = Node::start(&config).await;
    let order = run_order(&node, "cora").await;
    assert_failed_at(&order, "Processing");
    let runs = attempts(&order, "Processing");
    assert_eq!(runs.len(), 2, "retried once: {}", pretty(&order));
    for run in &runs {
        let error = run["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("close_notify"),
            "a transport error naming the missing close_notify: {}",
            pretty(run)
        );
        assert_eq!(run["status"], 200, "{}", pretty(run));
    }
    server.abort();
}

/// A server on a free port that answers every request itself, `{"via":"proxy"}` (as a forward
/// proxy, or as a service), and keeps each request's head.
async fn answering_server() -> (String, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    closing_server(usize::MAX).await
}

/// [`answering_server`], which closes a connection once it has answered `answers` requests on
/// it, as the next one arrives: an idle close meeting a call the client sent on the connection
/// it kept alive. A request it closes on is not kept.
async fn closing_server(
    answers: usize,
) -> (String, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let base = format!("http://{}", listener.local_addr().expect("its address"));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let noted = Arc::clone(&lines);
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let noted = Arc::clone(&noted);
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut read = Vec::new();
                let mut buffer = [0u8; 4096];
                let mut count = 0;
                // Requests one after another on a kept-alive connection.
                loop {
                    let Some(end) = read.windows(4).position(|window| window == b"\r\n\r\n") else {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(count) => read.extend_from_slice(&buffer[..count]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&read[..end]).to_string();
                    let length: usize = head
                        .lines()
                        .filter_map(|line| line.split_once(':'))
                        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, value)| value.trim().parse().ok())
                        .unwrap_or(0);
                    if read.len() < end + 4 + length {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(count) => read.extend_from_slice(&buffer[..count]),
                        }
                        continue;
                    }
                    read.drain(..end + 4 + length);
                    if count == answers {
                        return;
                    }
                    count += 1;
                    noted.lock().expect("the heads").push(head);
                    let body = r#"{"via":"proxy"}"#;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (base, lines, server)
}

#[tokio::test]
async fn calls_go_through_the_proxy_the_environment_names_except_where_no_proxy_says() {
    let (proxy, heads, server) = answering_server().await;
    let service = Service::start(None, |_, _| Reply::ok()).await;
    // A host no resolver knows: only the proxy can answer for it.
    let config = format!(
        "{}[steps.Processing]\nhandler = \"http\"\nurl = \"http://shop.invalid/charge\"\n\
         [steps.Post-Processing]\nhandler = \"http\"\nurl = \"{}/ship\"\n",
        simulate("10ms"),
        service.base
    );
    let env = [("HTTP_PROXY", proxy.as_str()), ("NO_PROXY", "127.0.0.1")];
    let node = Node::start_env(&config, &env).await;
    let order = run_order(&node, "pia").await;
    assert_completed(&order);
    let processing = order["steps"]
        .as_array()
        .and_then(|steps| {
            steps
                .iter()
                .find(|entry| entry["step_name"] == "Processing")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        processing["output"],
        json!({"via": "proxy"}),
        "{}",
        pretty(&order)
    );
    // Absolute-form: the request line a forward proxy reads.
    let lines: Vec<String> = heads
        .lock()
        .expect("the heads")
        .iter()
        .map(|head| head.lines().next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(lines, ["POST http://shop.invalid/charge HTTP/1.1"]);
    // NO_PROXY: straight to the service.
    assert_eq!(service.calls_to("/ship").len(), 1);
    server.abort();
}

#[tokio::test]
async fn a_call_meeting_the_services_close_of_a_kept_alive_connection_is_sent_again() {
    let (base, heads, server) = closing_server(1).await;
    let mut config = simulate("10ms");
    for step in [
        "Scheduling",
        "Pre-Processing",
        "Processing",
        "Post-Processing",
    ] {
        config.push_str(&format!(
            "[steps.{step}]\nhandler = \"http\"\nurl = \"{base}/{step}\"\nretries = 0\n"
        ));
    }
    let node = Node::start(&config).await;
    assert_completed(&run_order(&node, "kai").await);
    // Each of the second order's calls goes out on the connection the first order's call to
    // that step kept alive, is dropped by the service, and is answered on a new connection,
    // not counted as a failed attempt.
    let order = run_order(&node, "kai").await;
    assert_completed(&order);
    for step in [
        "Scheduling",
        "Pre-Processing",
        "Processing",
        "Post-Processing",
    ] {
        assert_eq!(attempts(&order, step).len(), 1, "{}", pretty(&order));
    }
    assert_eq!(heads.lock().expect("the heads").len(), 8);
    server.abort();
}

#[tokio::test]
async fn a_user_and_password_in_a_step_url_are_sent_as_basic_auth() {
    let (base, heads, server) = answering_server().await;
    let url = base.replacen("http://", "http://ann:s%40cret@", 1);
    let config = format!(
        "{}[steps.Processing]\nhandler = \"http\"\nurl = \"{url}/charge\"\n",
        simulate("10ms")
    );
    let node = Node::start(&config).await;
    let order = run_order(&node, "ann").await;
    assert_completed(&order);
    let heads = heads.lock().expect("the heads").clone();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let head = &heads[0];
    assert!(head.starts_with("POST /charge HTTP/1.1\r\n"), "{head}");
    let authorization = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.trim());
    // "ann:s@cret", the password percent-decoded.
    assert_eq!(authorization, Some("Basic YW5uOnNAY3JldA=="), "{head}");
    server.abort();
}
