//! Serves the routes on a listener, one task per connection, with a deadline on request
//! headers: a client that sends them too slowly (or leaves a keep-alive connection idle) is
//! disconnected, so it cannot hold a connection open. warp's own server sets no such deadline.
//! Bodies have their own deadline where they are read ([`super::limits::Body::read`]).
//! Over https the TLS handshake has the same deadline as the headers, and the common name of
//! the client certificate a caller showed goes with each of its requests (see
//! [`super::auth::credentials`]).

use super::tls::{CertificateName, ServerTls};
use crate::metrics::{Metrics, TlsFailure};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower_service::Service;
use warp::filters::BoxedFilter;
use warp::http::Request;
use warp::reply::Response;

/// Runs until `shutdown` resolves, then stops accepting and waits for open connections to
/// finish their requests. With `tls`, every connection is https; handshakes that fail are
/// counted in `metrics`.
pub async fn serve(
    routes: BoxedFilter<(Response,)>,
    listener: TcpListener,
    header_read_timeout: Duration,
    tls: Option<Arc<ServerTls>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(header_read_timeout)
        .keep_alive_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        // Accept until told to stop.
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if !is_connection_error(&error) {
                        // Out of file descriptors or similar: give others time to close theirs.
                        tracing::error!(error = %error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let routes = warp::service(routes.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.as_ref().map(|tls| tls.acceptor());
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let (io, name): (Box<dyn Io>, _) = match tls {
                None => (Box::new(stream), None),
                Some(acceptor) => {
                    match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let name = CertificateName::of(stream.get_ref().1);
                            (Box::new(stream), name)
                        }
                        Ok(Err(error)) => {
                            let reason = failure(&error);
                            tracing::debug!(peer = ?peer, error = %error, reason = reason.as_str(), "tls handshake failed");
                            metrics.tls_handshake_failed(reason);
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(
                                peer = ?peer,
                                "tls handshake not done within limits.header_read_timeout"
                            );
                            metrics.tls_handshake_failed(TlsFailure::Timeout);
                            return;
                        }
                    }
                }
            };
            let service = TowerToHyperService::new(Named { routes, name });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Why a handshake failed, from the error rustls gave.
fn failure(error: &std::io::Error) -> TlsFailure {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => TlsFailure::NoClientCertificate,
        Some(rustls::Error::InvalidCertificate(_)) => TlsFailure::BadClientCertificate,
        _ => TlsFailure::Other,
    }
}

/// The routes, with the name of the client certificate the connection showed (if it did) put
/// in each request's extensions, where [`super::auth::credentials`] finds it.
#[derive(Clone)]
struct Named<S> {
    routes: S,
    name: Option<CertificateName>,
}

impl<S, B> Service<Request<B>> for Named<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.routes.poll_ready(context)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        if let Some(name) = &self.name {
            request.extensions_mut().insert(name.clone());
        }
        self.routes.call(request)
    }
}

/// A connection's bytes: plain TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
