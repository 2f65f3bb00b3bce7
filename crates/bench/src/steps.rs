//! `order-process bench --serve-steps ADDR`: a step service for nodes whose steps are `http`
//! steps. It answers every `POST` at once with 200 and, with `--output-bytes N`, a JSON output
//! of N bytes (`{"pad":"xx…"}`, the shape of `simulate.output_bytes`); without, an empty body,
//! which a node keeps no output for. Rollbacks get the same answer. It reads each request's
//! body whole, so a connection is kept alive, and does nothing else, so that what a run
//! measures is the nodes' calls, not the service.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use tokio::net::TcpListener;

/// The answer to every step call: `output_bytes` of JSON, or an empty body for 0.
pub fn answer(output_bytes: usize) -> Bytes {
    if output_bytes == 0 {
        return Bytes::new();
    }
    // `{"pad":""}` is 10 bytes; an output asked smaller than that is the bare shape.
    let pad = "x".repeat(output_bytes.saturating_sub(10));
    Bytes::from(format!("{{\"pad\":\"{pad}\"}}"))
}

/// Serves step calls on `listen` until the process is stopped.
pub async fn serve(listen: SocketAddr, output_bytes: usize) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| format!("--serve-steps {listen}: {error}"))?;
    let bound = listener
        .local_addr()
        .map_err(|error| format!("--serve-steps {listen}: {error}"))?;
    eprintln!("order-process bench: serving steps on {bound}");
    let body = answer(output_bytes);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of file descriptors, say: the next accept may succeed.
            Err(error) => {
                eprintln!("order-process bench: cannot accept a connection: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| call(request, body.clone()));
            // A caller that goes away mid-request is no concern of the service's.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// One step call: its body read whole, then `body` with 200, or 405 for anything but `POST`.
async fn call(
    request: Request<Incoming>,
    body: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::POST {
        let mut response = Response::new(Full::new(Bytes::from_static(
            b"{\"error\":\"step calls are POSTs\"}",
        )));
        *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return Ok(with_json(response));
    }
    if request.into_body().collect().await.is_err() {
        let mut response = Response::new(Full::new(Bytes::from_static(
            b"{\"error\":\"the request body broke off\"}",
        )));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(with_json(response));
    }
    Ok(with_json(Response::new(Full::new(body))))
}

fn with_json(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_json_of_the_size_asked_or_empty() {
        assert!(answer(0).is_empty());
        for size in [10, 64, 2000] {
            let body = answer(size);
            assert_eq!(body.len(), size);
            let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            assert!(value["pad"].is_string(), "{value}");
        }
        assert_eq!(&answer(3)[..], b"{\"pad\":\"\"}");
    }
}
