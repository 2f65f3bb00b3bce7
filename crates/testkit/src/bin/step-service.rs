//! A fast stand-in for a shop's step services, to measure the node's cost per http step:
//! answers every POST with `200 {}` after `--delay`, over plain http or, with `--cert` and
//! `--key`, over https (rustls).
//!
//! `order-process-step-service --listen 127.0.0.1:9001 --delay 1ms [--cert c.pem --key k.pem]`

#![forbid(unsafe_code)]

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use warp::Filter;

struct Args {
    listen: SocketAddr,
    delay: Duration,
    cert: Option<String>,
    key: Option<String>,
}

fn args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
        delay: Duration::from_millis(1),
        cert: None,
        key: None,
    };
    let mut words = std::env::args().skip(1);
    while let Some(flag) = words.next() {
        let value = words.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => args.listen = value.parse().map_err(|e| format!("--listen: {e}"))?,
            "--delay" => {
                args.delay = humantime_like(&value).ok_or(format!("--delay: `{value}`"))?
            }
            "--cert" => args.cert = Some(value),
            "--key" => args.key = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// `0`, `1ms`, `250us`, `2s`.
fn humantime_like(text: &str) -> Option<Duration> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let number: u64 = digits.parse().ok()?;
    match &text[digits.len()..] {
        "" | "ms" => Some(Duration::from_millis(number)),
        "us" => Some(Duration::from_micros(number)),
        "s" => Some(Duration::from_secs(number)),
        _ => None,
    }
}

fn tls(cert: &str, key: &str) -> Result<rustls::ServerConfig, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    // ring, as the node's own (deprecated by rustls for lacking post-quantum key exchange).
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("step-service: {problem}");
            std::process::exit(64);
        }
    };
    let acceptor = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => match tls(cert, key) {
            Ok(config) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            Err(problem) => {
                eprintln!("step-service: {problem}");
                std::process::exit(64);
            }
        },
        _ => None,
    };
    let delay = args.delay;
    let routes = warp::post().then(move || async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut response = warp::http::Response::new(String::from("{}"));
        response.headers_mut().insert(
            warp::http::header::CONTENT_TYPE,
            warp::http::HeaderValue::from_static("application/json"),
        );
        response
    });
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("step-service: cannot listen on {}: {error}", args.listen);
            std::process::exit(1);
        }
    };
    let service = warp::service(routes);
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let http = auto::Builder::new(TokioExecutor::new());
            let service = TowerToHyperService::new(service);
            match acceptor {
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
}
