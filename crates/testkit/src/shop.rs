//! The fake shop: a real warp server on a free port (loopback unless asked) playing the services the nodes'
//! `http` steps call. Every POST is handed to a handler that decides the answer; [`Scripted`]
//! is the handler the tests script call by call, and the fault campaign's ledger is another.
//! The server stops when the [`Shop`] is dropped.

use bytes::Bytes;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use warp::http::{Response, StatusCode};
use warp::Filter;

/// The largest request body the shop reads.
const MAX_BODY: u64 = 1024 * 1024;

/// One call to the shop.
#[derive(Clone, Debug)]
pub struct Request {
    pub path: String,
    /// The `Idempotency-Key` header.
    pub key: Option<String>,
    /// Every header, names in lower case, in the order they came.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// How the shop answers one call.
#[derive(Clone, Debug)]
pub enum Answer {
    /// This status and body.
    Status(u16, String),
    /// Never answers.
    Hang,
}

/// A warp server on a free port, aborted when dropped.
pub struct Shop {
    /// `http://IP:PORT` (`127.0.0.1` unless served on another address)
    pub base: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Shop {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Shop {
    /// Serves every POST with `handler` on a free loopback port.
    pub async fn serve<F, Fut>(handler: F) -> std::io::Result<Shop>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Answer> + Send + 'static,
    {
        Self::serve_on(IpAddr::from([127, 0, 0, 1]), handler).await
    }

    /// Serves every POST with `handler` on a free port of `ip` (an address other hosts reach,
    /// such as a bridge's, when the callers run in network namespaces).
    pub async fn serve_on<F, Fut>(ip: IpAddr, handler: F) -> std::io::Result<Shop>
    where
        F: Fn(Request) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Answer> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let routes = warp::post()
            .and(warp::path::full())
            .and(warp::header::optional::<String>("idempotency-key"))
            .and(warp::header::headers_cloned())
            .and(warp::body::content_length_limit(MAX_BODY))
            .and(warp::body::bytes())
            .then(
                move |path: warp::path::FullPath,
                      key: Option<String>,
                      headers: warp::http::HeaderMap,
                      body: Bytes| {
                    let path = path.as_str().to_string();
                    let headers = headers
                        .iter()
                        .map(|(name, value)| {
                            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                            (name.as_str().to_string(), value)
                        })
                        .collect();
                    let answer = handler(Request {
                        path,
                        key,
                        headers,
                        body,
                    });
                    async move { respond(answer.await).await }
                },
            );
        let listener = tokio::net::TcpListener::bind((ip, 0)).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(warp::serve(routes).incoming(listener).run());
        Ok(Shop { base, server })
    }
}

async fn respond(answer: Answer) -> Response<String> {
    match answer {
        Answer::Status(status, body) => {
            let mut response = Response::new(body);
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            response
        }
        Answer::Hang => std::future::pending::<Response<String>>().await,
    }
}

/// One call the scripted shop received.
#[derive(Clone, Debug)]
pub struct ShopCall {
    pub path: String,
    pub key: String,
    /// Every header, names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Value,
    pub at: Instant,
}

#[derive(Default)]
struct Script {
    /// Answers to give next, per path, before falling back to the default.
    queued: HashMap<String, VecDeque<Answer>>,
    defaults: HashMap<String, Answer>,
    calls: Vec<ShopCall>,
}

fn lock(script: &Mutex<Script>) -> MutexGuard<'_, Script> {
    script
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A shop that records every call and answers as the test scripts it: per path, queued
/// answers first, then that path's default, else 200 with no body.
pub struct Scripted {
    pub shop: Shop,
    script: Arc<Mutex<Script>>,
}

impl Scripted {
    /// Starts it; fails the test if it cannot listen.
    pub async fn start() -> Scripted {
        let script: Arc<Mutex<Script>> = Arc::default();
        let shared = Arc::clone(&script);
        let shop = Shop::serve(move |request: Request| {
            let answer = {
                let mut script = lock(&shared);
                script.calls.push(ShopCall {
                    path: request.path.clone(),
                    key: request.key.unwrap_or_default(),
                    headers: request.headers,
                    body: serde_json::from_slice(&request.body).unwrap_or(Value::Null),
                    at: Instant::now(),
                });
                let queued = script
                    .queued
                    .get_mut(&request.path)
                    .and_then(VecDeque::pop_front);
                queued
                    .or_else(|| script.defaults.get(&request.path).cloned())
                    .unwrap_or_else(|| Answer::Status(200, String::new()))
            };
            std::future::ready(answer)
        })
        .await
        .unwrap_or_else(|error| panic!("cannot start the shop: {error}"));
        Scripted { shop, script }
    }

    pub fn base(&self) -> &str {
        &self.shop.base
    }

    /// Answers for the next calls to `path`, in order; then its default.
    pub fn queue(&self, path: &str, answers: Vec<Answer>) {
        lock(&self.script)
            .queued
            .entry(path.to_string())
            .or_default()
            .extend(answers);
    }

    /// How `path` answers once its queue is empty (200 with no body unless set).
    pub fn answer(&self, path: &str, answer: Answer) {
        lock(&self.script).defaults.insert(path.to_string(), answer);
    }

    /// Every call so far, in the order they came.
    pub fn calls(&self) -> Vec<ShopCall> {
        lock(&self.script).calls.clone()
    }

    pub fn calls_to(&self, path: &str) -> Vec<ShopCall> {
        self.calls()
            .into_iter()
            .filter(|call| call.path == path)
            .collect()
    }

    pub fn paths(&self) -> Vec<String> {
        self.calls().into_iter().map(|call| call.path).collect()
    }
}
