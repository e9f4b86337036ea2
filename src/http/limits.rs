//! Admission by request size: a body declared over the limit is refused before it is read, and
//! bodies being read or handled share one server-wide byte budget.
//!
//! The budget bounds the memory of requests in total, where the body limit bounds one. A
//! request's share is the declared `Content-Length`, or the whole body limit when the length is
//! not declared (chunked). It is taken when the handler first reads the body, not when the
//! request arrives, and held until the handler returns. A request that waits for room in the
//! batch queue (`--admission-wait-ms`) has not read its body yet, so it holds no share while it
//! waits: a few waiting chunked requests would otherwise hold the whole budget and turn every
//! other request away for as long as they wait, while costing no memory themselves (their bodies
//! are still in the kernel's buffers). A route that never reads its body never takes a share.
//!
//! Past the budget the answer is 503 with Retry-After, without reading the body: the share is
//! taken before the first byte of it is asked for, and a handler whose read was refused for lack
//! of a share gets its response replaced with that 503 here, whatever it made of the read error.
//!
//! The share is a permit of one semaphore, so what is held never exceeds the budget. It lives in
//! a slot owned by this layer and given back when the handler returns; a client that goes away
//! drops the whole request future, slot included, so no path keeps a share.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody as _};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper::body::{Frame, SizeHint};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use super::error::{ApiError, ErrorCode};

pub async fn admit_body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let max = state.limits.max_body_bytes as u64;
    let hint = req.body().size_hint();
    if hint.lower() > max {
        return ApiError::new(
            ErrorCode::BodyTooLarge,
            format!(
                "the request body is {} bytes (Content-Length), over the limit of {max} bytes",
                hint.lower()
            ),
        )
        .before_body()
        .into_response();
    }
    let bytes = hint.exact().unwrap_or(max);
    if bytes == 0 {
        return next.run(req).await;
    }
    let share = Arc::new(Share {
        budget: Arc::clone(&state.inflight_bytes),
        // The budget's semaphore holds at most u32::MAX permits; a share it cannot count is
        // larger than the budget and is refused like any other share that does not fit.
        bytes: u32::try_from(bytes).ok(),
        state: Mutex::new(ShareState::NotTaken),
    });
    let req = req.map(|body| {
        Body::new(Budgeted {
            inner: body,
            share: Arc::clone(&share),
        })
    });
    let response = next.run(req).await;
    match share.release() {
        ShareState::Refused => busy().into_response(),
        _ => response,
    }
}

fn busy() -> ApiError {
    ApiError::new(
        ErrorCode::ServerBusy,
        "the server is reading as many request bytes as it holds at once; retry shortly",
    )
    .before_body()
}

/// A request's share of the byte budget, taken at the first read of its body.
struct Share {
    budget: Arc<Semaphore>,
    /// None: more than the semaphore can count.
    bytes: Option<u32>,
    state: Mutex<ShareState>,
}

enum ShareState {
    NotTaken,
    Held(#[allow(dead_code)] OwnedSemaphorePermit),
    Refused,
    /// The handler has returned; a body that outlives it is read without a share.
    Released,
}

impl Share {
    /// Takes the share if nothing was asked yet; false when the budget cannot hold it.
    fn take(&self) -> bool {
        let mut state = self.state.lock();
        match *state {
            ShareState::NotTaken => {
                let permit = self
                    .bytes
                    .and_then(|n| Arc::clone(&self.budget).try_acquire_many_owned(n).ok());
                *state = match permit {
                    Some(p) => ShareState::Held(p),
                    None => ShareState::Refused,
                };
                matches!(*state, ShareState::Held(_))
            }
            ShareState::Held(_) | ShareState::Released => true,
            ShareState::Refused => false,
        }
    }

    /// Gives the share back (if held) and says what became of it.
    fn release(&self) -> ShareState {
        std::mem::replace(&mut *self.state.lock(), ShareState::Released)
    }
}

/// The request body, which takes its request's share before its first byte is read.
struct Budgeted {
    inner: Body,
    share: Arc<Share>,
}

/// The body read that the byte budget refused; its handler's response is replaced.
#[derive(Debug, thiserror::Error)]
#[error("the server's in-flight byte budget cannot hold this request's body now")]
struct OverBudget;

impl hyper::body::Body for Budgeted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if !self.share.take() {
            return Poll::Ready(Some(Err(axum::Error::new(OverBudget))));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn share(budget: &Arc<Semaphore>, bytes: u32) -> Arc<Share> {
        Arc::new(Share {
            budget: Arc::clone(budget),
            bytes: Some(bytes),
            state: Mutex::new(ShareState::NotTaken),
        })
    }

    #[tokio::test]
    async fn a_share_is_taken_at_the_first_read_and_given_back_at_release() {
        let budget = Arc::new(Semaphore::new(10));
        let a = share(&budget, 6);
        let body = Budgeted {
            inner: Body::from("abcdef"),
            share: Arc::clone(&a),
        };
        assert_eq!(
            budget.available_permits(),
            10,
            "nothing is taken before the body is read"
        );
        let read = body.collect().await.expect("read").to_bytes();
        assert_eq!(&read[..], b"abcdef");
        assert_eq!(
            budget.available_permits(),
            4,
            "held after the read, until the handler returns"
        );
        // A second body that does not fit is refused before any of it is read.
        let b = share(&budget, 6);
        let refused = Budgeted {
            inner: Body::from("ghijkl"),
            share: Arc::clone(&b),
        }
        .collect()
        .await;
        assert!(refused.is_err());
        assert!(matches!(b.release(), ShareState::Refused));
        assert!(matches!(a.release(), ShareState::Held(_)));
        assert_eq!(budget.available_permits(), 10);
        assert!(a.take(), "a body read after release reads without a share");
        assert_eq!(budget.available_permits(), 10);
    }

    #[tokio::test]
    async fn a_share_dropped_unreleased_is_given_back() {
        let budget = Arc::new(Semaphore::new(10));
        let a = share(&budget, 10);
        assert!(a.take());
        assert_eq!(budget.available_permits(), 0);
        drop(a);
        assert_eq!(budget.available_permits(), 10);
    }
}
