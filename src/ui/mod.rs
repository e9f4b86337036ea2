//! The web page: static HTML, CSS and JavaScript compiled into the binary, served at `/` with
//! strict security headers. The page talks to the public `/v1` API like any other client, so
//! this module knows nothing of the rest of swav.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::LazyLock;

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// No inline script or style, nothing from another origin, and no framing: ids and metadata
/// are user data, and even if one slipped into the markup it could not run.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: include_str!("assets/index.html") },
    Asset { path: "/ui/app.js", content_type: "text/javascript; charset=utf-8", body: include_str!("assets/app.js") },
    Asset { path: "/ui/style.css", content_type: "text/css; charset=utf-8", body: include_str!("assets/style.css") },
    Asset { path: "/ui/favicon.svg", content_type: "image/svg+xml", body: include_str!("assets/favicon.svg") },
];

/// One ETag per asset, from its bytes (so a new build's page is never served from an old cache).
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            let mut h = DefaultHasher::new();
            a.body.hash(&mut h);
            format!("\"{:016x}\"", h.finish())
        })
        .collect()
});

/// The page's routes; they need no API key (the page asks for it and sends it to `/v1`).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().enumerate().fold(Router::new(), |router, (i, asset)| {
        router.route(asset.path, get(move |headers: HeaderMap| async move { serve(i, &headers) }))
    })
}

/// The asset with its security headers and `no-cache`: the browser keeps it and revalidates with
/// the ETag, so an upgraded binary's page is seen at once.
fn serve(i: usize, headers: &HeaderMap) -> Response {
    let asset = &ASSETS[i];
    let etag = ETAGS[i].as_str();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = response.headers_mut();
    // An ETag is hex in quotes: always a valid header value.
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}
