//! Serves the routes over HTTP/1.1 on a listener, one task per connection, with a deadline on
//! request headers: a client that sends them too slowly (or sends nothing, or leaves a keep-alive
//! connection idle) is disconnected, so it cannot hold a connection open; and one on answers: a
//! client that takes none of an answer's bytes for as long is disconnected too. warp's own server
//! sets neither. Bodies have their own deadline where they are read
//! ([`super::limits::Body::read`]). HTTP/2 is not served: its connections stay open as long as
//! the client answers pings, and an unfinished header block has no deadline.
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
use std::pin::Pin;
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
    max_connections: usize,
    tls: Option<Arc<ServerTls>>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    // HTTP/1 alone: no guessing of the protocol from the first bytes, which would wait for
    // them without the header deadline.
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    let graceful = GracefulShutdown::new();
    // One for each open connection: past `max_connections`, new ones wait in the backlog rather
    // than take file descriptors the node's own connections need.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
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
            let _slot = slot;
            let (io, name): (Box<dyn Io>, _) = match tls {
                None => (Box::new(Stalling::new(stream, header_read_timeout)), None),
                Some(acceptor) => {
                    match tokio::time::timeout(header_read_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let name = CertificateName::of(stream.get_ref().1);
                            (Box::new(Stalling::new(stream, header_read_timeout)), name)
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
            let connection = builder.serve_connection(TokioIo::new(io), service);
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
/// in each request's extensions, where [`super::auth::credentials`] finds it, and a
/// `tracestate` sent in several headers joined into one (see [`join_tracestate`]).
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
        join_tracestate(request.headers_mut());
        self.routes.call(request)
    }
}

/// Several `tracestate` headers are one list, in their order (W3C Trace Context, as RFC 9110
/// combines fields); joined into one, so the routes, which read one header, get all of it.
fn join_tracestate(headers: &mut warp::http::HeaderMap) {
    const NAME: &str = "tracestate";
    let mut values = headers.get_all(NAME).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let joined = headers
        .get_all(NAME)
        .iter()
        .map(|value| value.as_bytes())
        .collect::<Vec<_>>()
        .join(&b","[..]);
    // Parsed header values are valid bytes for one, and so is their join.
    if let Ok(value) = warp::http::HeaderValue::from_bytes(&joined) {
        headers.insert(NAME, value);
    }
}

/// A connection whose writes give up once they have made no progress for `limit`: a client that
/// stops reading (a full receive window) cannot hold its connection, and the answer's memory,
/// for ever.
struct Stalling<T> {
    inner: T,
    limit: Duration,
    /// Running while a write waits for the client.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Stalling<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Stalling {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `written`, unless it is still pending and the writes have waited `limit` for the client.
    fn deadline<R>(
        &mut self,
        written: Poll<std::io::Result<R>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<R>> {
        if written.is_ready() {
            self.stalled = None;
            return written;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no bytes of the answer within limits.header_read_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalling<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalling<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.deadline(written, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.deadline(written, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let flushed = Pin::new(&mut self.inner).poll_flush(cx);
        self.deadline(flushed, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let shut = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.deadline(shut, cx)
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
