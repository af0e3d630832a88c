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
//! A client that hangs up while its request is being served does not cancel
//! it (hyper's `half_close`): the handler runs to its end and its answer goes
//! nowhere. A write's handler may be running the batch of other clients'
//! writes (`coalesce.rs`), which cancelling it would leave without answers
//! ("may or may not have been applied") although their entry commits. The
//! price: a closed connection is noticed when its answer is written, so a
//! watch stream whose client went away ends at its next event or keep-alive
//! (15 s), not at once.
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
        .header_read_timeout(read_timeout)
        // A client that closes its side mid-request does not cancel the
        // request (see the module docs).
        .half_close(true);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use axum::routing::get;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;

    use super::*;

    /// A client that closes its connection while its request is served
    /// does not cancel the handler.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_hangs_up_does_not_cancel_its_request() {
        let finished = Arc::new(AtomicBool::new(false));
        let handler = {
            let finished = finished.clone();
            move || async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                finished.store(true, Ordering::SeqCst);
                "done"
            }
        };
        let app = Router::new().route("/slow", get(handler));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, Duration::from_secs(5), async {
            let _ = stopped.await;
        }));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(client);
        let ran_to_its_end = tokio::time::timeout(Duration::from_secs(5), async {
            while !finished.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(ran_to_its_end.is_ok(), "the handler was cancelled");
        let _ = stop.send(());
        server.await.unwrap();
    }
}
