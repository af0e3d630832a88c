//! The HTTP/1.1 server loop: a node's router on hyper connections, with the
//! read timeouts `axum::serve` does not set.
//!
//! Without them a client that sends its request headers, or its body, a few
//! bytes at a time (or not at all) holds a connection and a task for as long
//! as it likes; a few thousand such clients exhaust the node's file
//! descriptors. So:
//!
//! - the headers of a request must arrive within the read timeout
//!   ([`DEFAULT_READ_TIMEOUT`]; hyper closes the connection otherwise, idle
//!   keep-alive connections included);
//! - a request body may pause at most as long between two chunks (the
//!   handler then gets a read error: 400 `invalid_body`, or for Raft RPCs
//!   `invalid_rpc_body`). A slow but steady upload is not cut off.
//!
//! Responses are not limited: a watch stream lasts as long as its client
//! reads it. On shutdown the loop stops accepting, lets each connection
//! finish the request in progress, and returns once they are all closed.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;
use tower_http::timeout::RequestBodyTimeoutLayer;

/// How long a client may take to send a request's headers, and how long a
/// request body may pause between two chunks, unless configured.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` resolves, then drains.
/// `read_timeout` bounds reading a request's headers and each pause in its
/// body.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    read_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let app = app.layer(RequestBodyTimeoutLayer::new(read_timeout));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a receiver; `closed()` waits for the last.
    let (open_tx, open_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, typically: wait for some to
                    // be released rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small request/response messages (Raft RPCs, reads) must not wait
        // for Nagle's algorithm: send every write at once.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY");
        }
        let service = app
            .clone()
            .map_request(|req: hyper::Request<Incoming>| req.map(Body::new));
        tokio::spawn(connection(
            stream,
            TowerToHyperService::new(service),
            read_timeout,
            stop_rx.clone(),
            open_rx.clone(),
        ));
    }
    let _ = stop_tx.send(true);
    drop(open_rx);
    open_tx.closed().await;
}

/// Serves one connection; after `stop`, finishes the request in progress.
async fn connection<S>(
    stream: tokio::net::TcpStream,
    service: S,
    read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    _open: watch::Receiver<()>,
) where
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        >,
    S::Future: Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::trace!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}
