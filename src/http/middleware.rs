//! Cross-cutting layers: API-key auth on `/v1/*`, and per-request metrics and log lines.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq as _;

use super::AppState;
use super::error::{ApiError, ErrorCode};

/// Requires `Authorization: Bearer <key>` when the server has an API key. The scheme is
/// case-insensitive (RFC 7235), and the 401 says which of header, scheme or key was wrong.
pub async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.api_key.as_deref() else {
        return next.run(req).await;
    };
    let unauthorized = |m: &str| ApiError::new(ErrorCode::Unauthorized, m).into_response();
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return unauthorized("missing API key: send Authorization: Bearer <key>");
    };
    let text = value.to_str().unwrap_or("").trim();
    let (scheme, key) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return unauthorized("the Authorization header must use the Bearer scheme: Authorization: Bearer <key>");
    }
    if constant_time_eq(key.trim().as_bytes(), expected.as_bytes()) {
        next.run(req).await
    } else {
        unauthorized("invalid API key")
    }
}

/// Compares in time independent of where the bytes differ, so the time taken says nothing
/// about the key's content (`subtle` keeps the optimiser from adding an early exit). A
/// different length answers at once: the length is not the secret.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// A closed set of label values: any token is a valid method name to hyper, and a label per
/// made-up name would grow the registry and `/metrics` without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Counts every request by route and status, times it, and logs one debug line.
pub async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method());
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let status = response.status();
    state
        .metrics
        .requests
        .with_label_values(&[route.as_str(), method, status.as_str()])
        .inc();
    state
        .metrics
        .request_seconds
        .with_label_values(&[route.as_str()])
        .observe(elapsed.as_secs_f64());
    tracing::debug!(%method, %route, status = status.as_u16(), latency_us = elapsed.as_micros() as u64, "request");
    response
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_keys() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"Secret"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"secret2", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn method_labels_are_a_closed_set() {
        use axum::http::Method;
        assert_eq!(super::method_label(&Method::PATCH), "PATCH");
        assert_eq!(super::method_label(&Method::from_bytes(b"GETX").expect("token")), "other");
    }
}
