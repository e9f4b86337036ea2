//! The accept loop and per-connection policy: a bounded number of open connections, a
//! header-read timeout, an idle keep-alive timeout, and a shutdown that waits for requests,
//! not for connections.
//!
//! hyper bounds none of these by itself (its header timeout needs a timer and then also counts
//! the idle time before a request), so each connection task keeps its own clock:
//! - a connection that has received nothing since it opened or since its last response is
//!   closed after the idle timeout;
//! - one that has sent part of a request head is closed if the head is not complete within
//!   the header timeout of its first byte;
//! - a connection with a request in progress is never closed by either; shutdown lets its
//!   response finish, then closes it.
//!
//! At the connection limit a new connection displaces the oldest one that has no request in
//! progress (an idle or half-sent one), so held-open sockets cannot keep `/health` out; if
//! every connection is busy, new ones wait in the kernel's backlog.
//!
//! A request with both `Content-Length` and `Transfer-Encoding` is answered 400 and its
//! connection closed (RFC 9112 §6.3 allows either; hyper would serve it by the
//! Transfer-Encoding and remove the Content-Length, so only the raw head shows both).
//!
//! Errors hyper answers itself (400 for a malformed request line or header, 414, 431) go out
//! with an empty body. The connection's writer recognises them, as the only responses of those
//! statuses without a content type (every error of the API has its JSON body), and sends the
//! API's JSON error body instead.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

use super::error::{ApiError, ErrorCode};

/// Connection limits of the server (`swav serve --max-connections`, `--header-timeout-s`,
/// `--idle-timeout-s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_connections: usize,
    /// From the first byte of a request head to its end.
    pub header_timeout: Duration,
    /// With no request in progress and nothing received.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then waits for the requests in
/// progress (not for idle connections) and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let limits = ConnLimits { max_connections: limits.max_connections.max(1), ..limits };
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        epoch: Instant::now(),
        limits,
        conns: Mutex::new(BTreeMap::new()),
        closed: Notify::new(),
        stop: stop_rx,
    });
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    'accept: loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: wait a
                    // little rather than spin; the open connections carry on.
                    tracing::warn!(error = %e, "accept error");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        loop {
            let room = shared.closed.notified();
            if shared.conns.lock().len() < limits.max_connections {
                break;
            }
            shared.evict_oldest_idle();
            tokio::select! {
                () = &mut shutdown => break 'accept,
                () = room => {}
                // An evicted connection goes within a tick; a busy one may take long.
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let conn = Arc::new(ConnState::new(next_id, shared.now_ms()));
        shared.conns.lock().insert(next_id, Arc::clone(&conn));
        tokio::spawn(run_connection(Arc::clone(&shared), conn, stream, app.clone()));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    loop {
        let closed = shared.closed.notified();
        if shared.conns.lock().is_empty() {
            return Ok(());
        }
        closed.await;
    }
}

struct Shared {
    epoch: Instant,
    limits: ConnLimits,
    conns: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    /// Signalled whenever a connection closes (to the accept loop and the final drain).
    closed: Notify,
    stop: watch::Receiver<bool>,
}

impl Shared {
    /// Milliseconds since the server started, never 0 (0 means "not set").
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    fn evict_oldest_idle(&self) {
        let conns = self.conns.lock();
        let victim = conns.values().find(|c| c.busy.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Acquire));
        if let Some(c) = victim {
            c.evicted.store(true, Ordering::Release);
            c.evict.notify_one();
        }
    }

    fn tick(&self) -> Duration {
        (self.limits.header_timeout.min(self.limits.idle_timeout) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

struct ConnState {
    id: u64,
    /// Requests of this connection inside the application (their response not yet written).
    busy: AtomicUsize,
    /// When something was last received or a response last finished.
    last_activity: AtomicU64,
    /// When the first byte of the request head now arriving was received (0: none arriving).
    head_started: AtomicU64,
    evicted: AtomicBool,
    evict: Notify,
    /// The next bytes received start a request head (set when a response finishes).
    expect_head: AtomicBool,
    /// The request head just read declared its length twice (Content-Length and
    /// Transfer-Encoding).
    ambiguous_framing: AtomicBool,
}

impl ConnState {
    fn new(id: u64, now: u64) -> ConnState {
        ConnState {
            id,
            busy: AtomicUsize::new(0),
            last_activity: AtomicU64::new(now),
            head_started: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            expect_head: AtomicBool::new(true),
            ambiguous_framing: AtomicBool::new(false),
        }
    }

    fn idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0
    }

    /// Whether an idle connection has outstayed its timeout.
    fn expired(&self, now: u64, limits: &ConnLimits) -> bool {
        let since = |t: u64| Duration::from_millis(now.saturating_sub(t));
        match self.head_started.load(Ordering::Acquire) {
            0 => since(self.last_activity.load(Ordering::Acquire)) > limits.idle_timeout,
            started => since(started) > limits.header_timeout,
        }
    }
}

/// Marks a request in progress until its response body has been written (or dropped).
struct InProgress {
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.conn.last_activity.store(self.shared.now_ms(), Ordering::Release);
        self.conn.expect_head.store(true, Ordering::Release);
        self.conn.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that holds its request's [`InProgress`] mark until hyper drops it, keeping
/// the body's size (and so the Content-Length header).
struct Guarded {
    inner: Body,
    _guard: InProgress,
}

impl hyper::body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn run_connection(shared: Arc<Shared>, conn: Arc<ConnState>, stream: TcpStream, app: Router) {
    let io = TokioIo::new(Watched {
        inner: stream,
        conn: Arc::clone(&conn),
        shared: Arc::clone(&shared),
        replacement: None,
        head: None,
    });
    let service = {
        let (shared, conn) = (Arc::clone(&shared), Arc::clone(&conn));
        hyper::service::service_fn(move |req: Request<Incoming>| {
            conn.busy.fetch_add(1, Ordering::AcqRel);
            conn.head_started.store(0, Ordering::Release);
            let guard = InProgress { conn: Arc::clone(&conn), shared: Arc::clone(&shared) };
            let app = app.clone();
            let ambiguous = conn.ambiguous_framing.swap(false, Ordering::AcqRel);
            async move {
                let response = if ambiguous {
                    ApiError::new(ErrorCode::AmbiguousFraming, "the request has both Content-Length and Transfer-Encoding; send one")
                        .before_body()
                        .into_response()
                } else {
                    app.oneshot(req.map(Body::new)).await.unwrap_or_else(|e: Infallible| match e {})
                };
                Ok::<_, Infallible>(response.map(|body| Body::new(Guarded { inner: body, _guard: guard })))
            }
        })
    };
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stop = shared.stop.clone();
    let mut draining = *stop.borrow_and_update();
    if draining {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        let tick = if draining { Duration::from_millis(10) } else { shared.tick() };
        tokio::select! {
            _ = connection.as_mut() => break,
            () = conn.evict.notified() => {
                if conn.idle() {
                    break;
                }
                conn.evicted.store(false, Ordering::Release);
            }
            changed = stop.changed(), if !draining => {
                // A closed channel means the server is gone: stop too.
                draining = true;
                let _ = changed;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(tick) => {}
        }
        if conn.idle() && (draining || conn.expired(shared.now_ms(), &shared.limits)) {
            break;
        }
    }
    shared.conns.lock().remove(&conn.id);
    shared.closed.notify_waiters();
    shared.closed.notify_one();
}

/// The socket as hyper sees it: reads stamp the connection's clock, and hyper's own empty-bodied
/// error responses are rewritten with a JSON body.
struct Watched {
    inner: TcpStream,
    conn: Arc<ConnState>,
    shared: Arc<Shared>,
    /// A rewritten error response and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
    /// The request head being received, while it is (for the framing check).
    head: Option<Vec<u8>>,
}

/// Longest request head scanned for its framing headers; hyper refuses longer heads itself.
const MAX_SCANNED_HEAD: usize = 64 * 1024;

impl Watched {
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.replacement {
            if *written == bytes.len() {
                self.replacement = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

impl Watched {
    /// Follows the bytes of a request head (those received after a response finished, up to
    /// the blank line) and flags one that has both framing headers. Bytes of a pipelined head
    /// received before the previous response finished are not scanned; hyper then still
    /// serves the request by its Transfer-Encoding and closes the connection after it.
    fn scan_head(&mut self, bytes: &[u8]) {
        if self.conn.expect_head.swap(false, Ordering::AcqRel) {
            self.head = Some(Vec::new());
        }
        let Some(head) = &mut self.head else { return };
        head.extend_from_slice(bytes);
        // Empty lines before a request line are allowed and skipped (RFC 9112 §2.2).
        let start = head.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(head.len());
        head.drain(..start);
        let Some(end) = head.windows(2).position(|w| w == b"\n\n" || w == b"\n\r").map(|i| i + 1) else {
            if head.len() > MAX_SCANNED_HEAD {
                self.head = None;
            }
            return;
        };
        let has = |name: &[u8]| {
            head[..end].split(|&b| b == b'\n').skip(1).any(|line| {
                line.len() > name.len() && line[..name.len()].eq_ignore_ascii_case(name) && line[name.len()] == b':'
            })
        };
        if has(b"content-length") && has(b"transfer-encoding") {
            self.conn.ambiguous_framing.store(true, Ordering::Release);
        }
        self.head = None;
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            let now = self.shared.now_ms();
            self.conn.last_activity.store(now, Ordering::Release);
            if self.conn.idle() {
                let _ = self.conn.head_started.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
            }
            if self.head.is_some() || self.conn.expect_head.load(Ordering::Acquire) {
                let fresh = buf.filled()[before..].to_vec();
                self.scan_head(&fresh);
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drain(cx))?;
        if let Some(replacement) = json_error_for(buf) {
            self.replacement = Some((replacement, 0));
            // Reported as written: what hyper meant to send is sent, in the API's form.
            let _ = self.drain(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    // Not vectored: hyper then writes each response head as one buffer, which is what
    // `json_error_for` inspects.
}

/// The JSON response to send instead of hyper's bodiless answer to an unparsable request.
fn json_error_for(written: &[u8]) -> Option<Vec<u8>> {
    let rest = written.strip_prefix(b"HTTP/1.")?;
    let status = rest.get(2..5)?;
    if !matches!(status, b"400" | b"414" | b"431") {
        return None;
    }
    let head_end = written.windows(4).position(|w| w == b"\r\n\r\n")?;
    let typed = written[..head_end].split(|&b| b == b'\n').any(|line| {
        line.len() >= 13 && line[..13].eq_ignore_ascii_case(b"content-type:")
    });
    if typed {
        return None;
    }
    let error = match status {
        b"400" => ApiError::new(ErrorCode::MalformedRequest, "the request line or a header is not valid HTTP"),
        b"414" => ApiError::new(ErrorCode::UriTooLong, "the request URI is too long"),
        b"431" => ApiError::new(ErrorCode::HeadersTooLarge, "the request headers are too large or too many"),
        _ => return None,
    };
    Some(serialise(error.before_body().into_response()))
}

fn serialise(response: Response<Body>) -> Vec<u8> {
    let (parts, body) = response.into_parts();
    // The body of an ApiError is a buffered JSON value; polling it once yields all of it.
    let body = futures::executor::block_on(body.collect()).map(|b| b.to_bytes()).unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        parts.status.as_str(),
        parts.status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_errors_get_json_bodies() {
        let out = json_error_for(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n").expect("rewritten");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{text}");
        assert!(text.contains("content-type: application/json\r\n"), "{text}");
        assert!(text.ends_with(r#"{"error":{"code":"headers_too_large","message":"the request headers are too large or too many"}}"#), "{text}");
        assert!(json_error_for(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert!(json_error_for(ours).is_none(), "the API's own errors pass unchanged");
        assert!(json_error_for(b"\x00\x00\x12\x04").is_none());
    }

    #[test]
    fn idle_and_half_sent_connections_expire_on_their_own_clocks() {
        let limits = ConnLimits { max_connections: 1, header_timeout: Duration::from_secs(2), idle_timeout: Duration::from_secs(5) };
        let c = ConnState::new(1, 1000);
        assert!(!c.expired(5000, &limits));
        assert!(c.expired(6001, &limits));
        c.head_started.store(1500, Ordering::Release);
        assert!(!c.expired(3400, &limits));
        assert!(c.expired(3501, &limits));
    }
}
