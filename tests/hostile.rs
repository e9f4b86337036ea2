//! Hostile and careless clients: memory bounded per request and in total, metric labels from
//! a closed set, connections closed on their timeouts and limit, and the small framing, auth and
//! validation rules. Memory is read from `/proc` of a `swav serve` child process.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{InProcess, ServerConfig, Spawned, call};
use serde_json::{Value, json};
use swav::engine::batcher::BatcherConfig;
use swav::http::RequestLimits;
use swav::http::server::ConnLimits;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn model() -> String {
    common::gray_bundle().dir.display().to_string()
}

/// A `/proc/<pid>/status` field in KiB (VmRSS, VmHWM).
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("KiB value")
}

fn addr(base: &str) -> String {
    base.strip_prefix("http://").expect("http base").to_string()
}

/// Sends raw bytes on a fresh connection and reads the response (until close or 2 s).
fn raw(base: &str, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr(base)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    // The server may answer and close before it has read everything.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn json_tail(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not a JSON body ({e}): {response:?}"))
}

/// How long until the server closes this connection (None if still open at `limit`).
fn closed_after(mut s: &TcpStream, started: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).expect("timeout");
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                if started.elapsed() >= limit {
                    return None;
                }
            }
            Err(_) => return Some(started.elapsed()),
        }
    }
}

fn health_ms(base: &str) -> f64 {
    let started = Instant::now();
    let resp = raw(base, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    started.elapsed().as_secs_f64() * 1e3
}

fn p99(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

// ---------------------------------------------------------------- memory

#[test]
fn json_bodies_cost_a_small_multiple_of_their_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dir.path().display().to_string();
    let server = Spawned::start(&["--model", &model(), "--index", &index]);
    server.wait_ready();
    let pid = server.child.id();
    let client = reqwest::blocking::Client::new();
    let _ = client.get(format!("{}/metrics", server.base)).send();
    let before = proc_kib(pid, "VmHWM");
    // 16 MiB each: tiny objects as items, empty strings as images, and unknown deep keys.
    let n = 16 << 20;
    let tiny_items = format!("{{\"items\":[{}{{\"a\":0}}]}}", "{\"a\":0},".repeat(n / 8));
    let empty_images = format!("{{\"images\":[{}\"\"]}}", "\"\",".repeat(n / 3));
    let ignored = format!("{{\"other\":[{}{{}}],\"images\":[\"\"]}}", "{},".repeat(n / 3));
    for (route, body, status) in
        [("/v1/items", &tiny_items, 422), ("/v1/embed", &empty_images, 413), ("/v1/search", &empty_images, 413), ("/v1/embed", &ignored, 400)]
    {
        let resp = client.post(format!("{}{route}", server.base)).header("content-type", "application/json").body(body.clone()).send();
        let resp = resp.expect("answered");
        assert_eq!(resp.status().as_u16(), status, "{route}: {}", resp.text().unwrap_or_default());
    }
    let grew_mib = (proc_kib(pid, "VmHWM").saturating_sub(before)) as f64 / 1024.0;
    // The body itself is held once (16 MiB) and hyper's buffers once more; a JSON tree of it
    // took over 1 GiB.
    assert!(grew_mib < 64.0, "peak RSS grew by {grew_mib:.0} MiB for 16 MiB bodies");
}

#[test]
fn metadata_at_the_limit_is_stored_as_its_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let index = dir.path().display().to_string();
    let png = b64(&common::gray_png(28, 28, 1));
    // An array of small objects: the worst case for a JSON tree (~170× its text).
    let meta_of = |i: usize| {
        let mut s = format!("[{{\"n\":{i}}}");
        while s.len() < 64 * 1024 - 16 {
            s.push_str(",{\"a\":1}");
        }
        s.push(']');
        s
    };
    let items: Vec<Value> = (0..40)
        .map(|i| json!({"id": format!("m{i}"), "image": png, "metadata": serde_json::from_str::<Value>(&meta_of(i)).expect("json")}))
        .collect();
    let rss_mib = |pid| proc_kib(pid, "VmRSS") as f64 / 1024.0;
    let grew = {
        let server = Spawned::start(&["--model", &model(), "--index", &index]);
        server.wait_ready();
        let client = reqwest::blocking::Client::new();
        let before = rss_mib(server.child.id());
        for chunk in items.chunks(20) {
            let resp = client.post(format!("{}/v1/items", server.base)).json(&json!({"items": chunk})).send().expect("add");
            assert_eq!(resp.status(), 200, "{}", resp.text().unwrap_or_default());
        }
        let got: Value = client.get(format!("{}/v1/items/m7", server.base)).send().expect("get").json().expect("json");
        assert_eq!(got["metadata"], serde_json::from_str::<Value>(&meta_of(7)).expect("json"));
        let over = json!({"items": [{"id": "big", "image": png, "metadata": "x".repeat(64 * 1024)}]});
        let resp = client.post(format!("{}/v1/items", server.base)).json(&over).send().expect("over");
        assert_eq!(resp.status(), 413);
        let body: Value = resp.json().expect("json");
        assert_eq!(body["error"]["code"], "metadata_too_large");
        rss_mib(server.child.id()) - before
    };
    // 40 × 64 KiB = 2.5 MiB of text; as trees they took over 400 MiB.
    assert!(grew < 40.0, "RSS grew by {grew:.0} MiB storing 2.5 MiB of metadata");
    let server = Spawned::start(&["--model", &model(), "--index", &index]);
    server.wait_ready();
    let empty_dir = tempfile::tempdir().expect("tempdir");
    let empty = Spawned::start(&["--model", &model(), "--index", &empty_dir.path().display().to_string()]);
    empty.wait_ready();
    let (loaded, fresh) = (rss_mib(server.child.id()), rss_mib(empty.child.id()));
    assert!(loaded - fresh < 40.0, "after a restart: {loaded:.0} MiB against {fresh:.0} MiB with an empty index");
    let got: Value = reqwest::blocking::get(format!("{}/v1/items/m39", server.base)).expect("get").json().expect("json");
    assert_eq!(got["metadata"], serde_json::from_str::<Value>(&meta_of(39)).expect("json"));
}

async fn server(cfg: ServerConfig) -> InProcess {
    let bundle = common::gray_bundle();
    common::start_in_process(&bundle, common::engine(&bundle), cfg).await
}

async fn index_server(dir: &std::path::Path, cfg: ServerConfig) -> InProcess {
    let index = common::open_index(dir, &common::gray_bundle());
    server(ServerConfig { index: Some(index), ..cfg }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_do_not_grow_the_metrics() {
    let srv = server(ServerConfig::default()).await;
    let base = srv.base.clone();
    let send = move |from: usize, to: usize| {
        let mut s = TcpStream::connect(addr(&base)).expect("connect");
        let mut reader = s.try_clone().expect("clone");
        let answers = std::thread::spawn(move || {
            let mut out = String::new();
            let _ = reader.read_to_string(&mut out);
            out
        });
        for i in from..to {
            s.write_all(format!("MADEUP{i} /health HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).expect("write");
        }
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").expect("write");
        let out = answers.join().expect("reader");
        assert_eq!(out.matches("HTTP/1.1 405").count(), to - from, "every made-up method is 405");
    };
    let metrics = || srv.state.metrics.render();
    let s1 = send.clone();
    tokio::task::spawn_blocking(move || s1(0, 1)).await.expect("join");
    let (before, before_lines) = (metrics().len(), metrics().lines().count());
    tokio::task::spawn_blocking(move || send(1, 2001)).await.expect("join");
    let text = metrics();
    let other: Vec<&str> = text.lines().filter(|l| l.contains("method=\"other\"")).collect();
    assert!(other.len() == 1 && other[0].ends_with(" 2001"), "one series counts them all: {other:?}");
    // No new series: only the digits of counts change (1 -> 2001 in the counter and histogram).
    assert_eq!(text.lines().count(), before_lines, "no new lines in /metrics");
    assert!(text.len() - before < 100, "/metrics grew from {before} to {} bytes", text.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_flight_share_one_byte_budget() {
    let limits = RequestLimits { max_body_bytes: 1 << 20, max_inflight_bytes: 1 << 20, ..RequestLimits::default() };
    let srv = server(ServerConfig { limits, ..ServerConfig::default() }).await;
    let base = srv.base.clone();
    // Holds 600 KB of the budget: headers declare it, the body never comes.
    let mut held = TcpStream::connect(addr(&base)).expect("connect");
    held.write_all(b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 600000\r\n\r\n").expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let client = reqwest::Client::new();
    let png = common::gray_png(28, 28, 1);
    let req = client.post(format!("{base}/v1/embed")).header("content-type", "application/octet-stream").body(vec![0u8; 500_000]);
    let resp = req.send().await.expect("send");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    let body: Value = resp.json().await.expect("json");
    common::check_response(&common::openapi(), "/v1/embed", "post", 503, &body);
    assert_eq!(body["error"]["code"], "server_busy");
    // A small one still fits; and once the held request is gone, the large one does too.
    let (status, _) = call(client.post(format!("{base}/v1/embed")).header("content-type", "image/png").body(png.clone()), "/v1/embed", "post").await;
    assert_eq!(status, 200);
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = client.post(format!("{base}/v1/embed")).header("content-type", "image/png").body(vec![0u8; 500_000]).send().await.expect("send");
    assert_eq!(resp.status(), 400, "admitted, then refused as an image");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_limit_is_refused_before_the_body() {
    let limits = RequestLimits { max_body_bytes: 1 << 20, ..RequestLimits::default() };
    let srv = server(ServerConfig { limits, ..ServerConfig::default() }).await;
    let base = srv.base.clone();
    let started = Instant::now();
    let resp = tokio::task::spawn_blocking(move || {
        raw(&base, b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 5000000000\r\n\r\n")
    })
    .await
    .expect("join");
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp:?}");
    assert!(started.elapsed() < Duration::from_secs(1), "refused at once, not after a read timeout");
    let body = json_tail(&resp);
    assert_eq!(body["error"]["code"], "body_too_large");
    assert!(body["error"]["message"].as_str().expect("message").contains("5000000000"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_framed_twice_is_refused() {
    let srv = server(ServerConfig::default()).await;
    let base = srv.base.clone();
    let png = common::gray_png(28, 28, 1);
    let (both, chunked) = tokio::task::spawn_blocking(move || {
        let both = raw(&base, b"POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\ncontent-length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        let mut one = format!("POST /v1/embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n", png.len()).into_bytes();
        one.extend_from_slice(&png);
        one.extend_from_slice(b"\r\n0\r\n\r\n");
        (both, raw(&base, &one))
    })
    .await
    .expect("join");
    assert!(both.starts_with("HTTP/1.1 400"), "{both:?}");
    assert_eq!(json_tail(&both)["error"]["code"], "ambiguous_framing");
    assert!(chunked.starts_with("HTTP/1.1 200"), "chunked alone is fine: {chunked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_raised_below_the_app_have_json_bodies() {
    let srv = server(ServerConfig::default()).await;
    let base = srv.base.clone();
    let cases = tokio::task::spawn_blocking(move || {
        let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
        let many_headers = format!("GET /health HTTP/1.1\r\n{}\r\n", (0..200).map(|i| format!("X-{i}: v\r\n")).collect::<String>());
        [
            (raw(&base, long_uri.as_bytes()), 414, "uri_too_long"),
            (raw(&base, many_headers.as_bytes()), 431, "headers_too_large"),
            (raw(&base, b"GET /he llo HTTP/1.1\r\nHost: x\r\n\r\n"), 400, "malformed_request"),
            (raw(&base, b"GET /\x01 HTTP/1.1\r\n\r\n"), 400, "malformed_request"),
        ]
    })
    .await
    .expect("join");
    for (resp, status, code) in cases {
        assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{status}: {resp:?}");
        assert!(resp.to_ascii_lowercase().contains("content-type: application/json"), "{resp:?}");
        assert_eq!(json_tail(&resp)["error"]["code"], code, "{resp:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive_and_401s_say_what_is_wrong() {
    let srv = server(ServerConfig { api_key: Some("k3y".into()), ..ServerConfig::default() }).await;
    let client = reqwest::Client::new();
    let get = |auth: Option<&'static str>| {
        let req = client.get(format!("{}/v1/model", srv.base));
        match auth {
            Some(a) => req.header("authorization", a),
            None => req,
        }
    };
    for ok in ["bearer k3y", "BEARER k3y", "Bearer   k3y"] {
        let (status, _) = call(get(Some(ok)), "/v1/model", "get").await;
        assert_eq!(status, 200, "{ok}");
    }
    for (auth, says) in [(None, "missing API key"), (Some("Basic azN5"), "Bearer scheme"), (Some("bearer nope"), "invalid API key")] {
        let (status, body) = call(get(auth), "/v1/model", "get").await;
        assert_eq!(status, 401);
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(says), "{auth:?}: {message}");
    }
}

#[test]
fn an_empty_api_key_is_a_start_up_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_swav"))
        .args(["serve", "--model", &model(), "--listen", "127.0.0.1:0", "--api-key", ""])
        .output()
        .expect("run");
    assert!(!out.status.success(), "an empty key must not silently disable auth");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--api-key (SWAV_API_KEY) is empty"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_rules_unknown_clusters_and_extreme_vectors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = index_server(dir.path(), ServerConfig::default()).await;
    let client = reqwest::Client::new();
    let png = common::gray_png(28, 28, 3);
    let items = json!({"items": [{"id": "a", "image": b64(&png)}]});
    let (status, _) = call(client.post(format!("{}/v1/items", srv.base)).json(&items), "/v1/items", "post").await;
    assert_eq!(status, 200);
    let k = srv.state.model.manifest.num_prototypes;
    let dim = srv.state.model.manifest.outputs.embedding.dim;
    let search = |query: String, body: Value| client.post(format!("{}/v1/search{query}", srv.base)).json(&body);
    let (status, body) = call(search(format!("?cluster={k}"), json!({"vector": vec![1.0; dim]})), "/v1/search", "post").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("cluster_not_found")), "{body}");
    for magnitude in [1e30f32, 1e-30] {
        let (status, body) = call(search(String::new(), json!({"vector": vec![magnitude; dim]})), "/v1/search", "post").await;
        assert_eq!(status, 200, "{magnitude}: {body}");
        assert_eq!(body["results"][0][0]["id"], "a");
    }
    let (status, body) = call(search(String::new(), json!({"vector": vec![0.5; dim + 1]})), "/v1/search", "post").await;
    assert_eq!((status, body["error"]["code"].as_str()), (422, Some("invalid_request")), "{body}");
    let (status, _) = call(search(String::new(), json!({"id": "a", "extra": 1})), "/v1/search", "post").await;
    assert_eq!(status, 422, "one key only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_with_nothing_to_compact_does_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = index_server(dir.path(), ServerConfig::default()).await;
    let client = reqwest::Client::new();
    let items = json!({"items": [{"id": "a", "image": b64(&common::gray_png(28, 28, 3))}]});
    let (status, _) = call(client.post(format!("{}/v1/items", srv.base)).json(&items), "/v1/items", "post").await;
    assert_eq!(status, 200);
    for _ in 0..3 {
        let (status, report) = call(client.post(format!("{}/v1/index/compact", srv.base)), "/v1/index/compact", "post").await;
        assert_eq!((status, report["items"].as_u64(), report["tombstones_removed"].as_u64()), (200, Some(1), Some(0)));
    }
    let (_, stats) = call(client.get(format!("{}/v1/index", srv.base)), "/v1/index", "get").await;
    assert_eq!((stats["compactions"].as_u64(), stats["snapshots"].as_u64()), (Some(0), Some(0)), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_parts_are_counted_as_they_arrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = RequestLimits { max_images: 4, ..RequestLimits::default() };
    let srv = index_server(dir.path(), ServerConfig { limits, ..ServerConfig::default() }).await;
    let base = srv.base.clone();
    let resp = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr(&base)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        let head = "POST /v1/items HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=XX\r\nTransfer-Encoding: chunked\r\n\r\n";
        s.write_all(head.as_bytes()).expect("head");
        // Five parts, and the body left open: the fifth must be refused without waiting.
        let parts: String = (0..5).map(|i| format!("--XX\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{i}\"\r\n\r\nabc\r\n")).collect();
        s.write_all(format!("{:x}\r\n{parts}\r\n", parts.len()).as_bytes()).expect("parts");
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).expect("a response before the body ends");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .expect("join");
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp:?}");
    assert_eq!(json_tail(&resp)["error"]["code"], "too_many_images");
}

/// A request whose images the queue cannot all take is refused before any is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_admitted_by_images_before_decoding() {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::from_millis(600));
    let cfg = ServerConfig {
        // The delay lets the first request's four images make one batch.
        batcher: BatcherConfig { max_batch_size: 4, max_delay: Duration::from_millis(100), queue_capacity: 8, ..BatcherConfig::default() },
        ..ServerConfig::default()
    };
    let srv = common::start_in_process(&bundle, runner, cfg).await;
    let images = |n: u32| json!({"images": (0..n).map(|i| b64(&common::gray_png(28, 28, i))).collect::<Vec<_>>()});
    let client = reqwest::Client::new();
    let post = |body: Value| client.post(format!("{}/v1/embed", srv.base)).json(&body).send();
    // 4 images run (one batch), 6 more wait: 2 places are left in the queue.
    let running = tokio::spawn(post(images(4)));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let waiting = tokio::spawn(post(images(6)));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let decoded = srv.state.metrics.images_decoded.get();
    assert_eq!(decoded, 10);
    let resp = post(images(3)).await.expect("answered");
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    assert_eq!(srv.state.metrics.images_decoded.get(), decoded, "a refused request decodes nothing");
    assert_eq!(running.await.expect("join").expect("answered").status(), 200);
    assert_eq!(waiting.await.expect("join").expect("answered").status(), 200);
    assert_eq!(post(images(2)).await.expect("answered").status(), 200, "admitted again once there is room");
}

/// The exact rule, once a request's images are counted: all of them fit, or none is taken.
#[test]
fn the_batcher_admits_all_of_a_requests_images_or_none() {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::from_millis(10));
    let config = BatcherConfig { max_batch_size: 4, max_delay: Duration::ZERO, queue_capacity: 8, ..BatcherConfig::default() };
    let metrics = std::sync::Arc::new(swav::metrics::Metrics::new());
    let batcher = swav::engine::batcher::Batcher::new(runner, 1, config, metrics.clone());
    assert_eq!(batcher.typical_request(), 1);
    let six = batcher.admit(6).expect("6 of 8");
    assert_eq!(batcher.typical_request(), 2, "moving towards 6");
    assert!(batcher.admit(3).is_err(), "3 more do not fit");
    assert_eq!(metrics.overloaded.get(), 3, "counted by image");
    assert!(batcher.try_reserve(3).is_err() && batcher.try_reserve(2).is_ok());
    let two = batcher.admit(2).expect("2 more fit exactly");
    drop(six);
    assert!(batcher.admit(6).is_ok(), "room again once announced images are withdrawn");
    drop(two);
}

// ---------------------------------------------------------------- waiting for room

/// A server whose queue holds one image, with one worker that takes `run` per image.
async fn one_place_server(run: Duration, wait: Duration, max_waiting: usize) -> InProcess {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, run);
    common::start_in_process(&bundle, runner, ServerConfig { batcher: one_place(wait, max_waiting), ..ServerConfig::default() }).await
}

/// A queue of one place, one image per batch, waits of up to `wait` for room.
fn one_place(wait: Duration, max_waiting: usize) -> BatcherConfig {
    BatcherConfig { max_batch_size: 1, max_delay: Duration::ZERO, queue_capacity: 1, admission_wait: wait, max_waiting }
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < Duration::from_secs(10), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One image running and one queued: the next request finds no room.
async fn fill_the_queue(srv: &InProcess) -> [tokio::task::JoinHandle<u16>; 2] {
    let m = &srv.state.metrics;
    let running = tokio::spawn(embed_one(srv.base.clone(), 1));
    until("the first image runs", || m.queue_seconds.get_sample_count() == 1).await;
    let queued = tokio::spawn(embed_one(srv.base.clone(), 2));
    until("the second image is queued", || m.queue_depth.get() == 1).await;
    [running, queued]
}

async fn post_png(base: &str, seed: u32) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/embed"))
        .header("content-type", "image/png")
        .body(common::gray_png(28, 28, seed))
        .send()
        .await
        .expect("answered")
}

async fn embed_one(base: String, seed: u32) -> u16 {
    post_png(&base, seed).await.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_the_queue_full_is_admitted_when_room_appears() {
    let srv = one_place_server(Duration::from_millis(400), Duration::from_secs(10), 8).await;
    let before = fill_the_queue(&srv).await;
    let started = Instant::now();
    let waiting = tokio::spawn(embed_one(srv.base.clone(), 3));
    until("the third request waits", || srv.state.metrics.admission_waiting.get() == 1).await;
    assert_eq!(srv.state.metrics.images_decoded.get(), 2, "a waiting request's image is not decoded");
    assert_eq!(waiting.await.expect("join"), 200, "admitted once the first image ran");
    assert!(started.elapsed() >= Duration::from_millis(300), "it had to wait: {:?}", started.elapsed());
    for b in before {
        assert_eq!(b.await.expect("join"), 200);
    }
    assert_eq!(srv.state.metrics.overloaded.get(), 0);
    assert_eq!(srv.state.metrics.admission_waiting.get(), 0);
}

/// A client that gives up while it waits for room: its place in the line of waiters comes back
/// (with `max_waiting` 1 the next request would otherwise be refused at once), its image never
/// reaches the model, and its share of the byte budget is given back. hyper does not read a
/// connection whose request body the handler has not asked for, so the leaving is noticed when
/// room appears and the body is read, not at the moment the client goes; either way nothing is
/// spent on it but the wait. `body_sent`: the client sent its whole body before leaving, or only
/// the head of a chunked request.
async fn leave_while_waiting(body_sent: bool) {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::from_millis(600));
    let batcher = one_place(Duration::from_secs(30), 1);
    let srv = common::start_in_process(&bundle, runner.clone(), ServerConfig { batcher, ..ServerConfig::default() }).await;
    let before = fill_the_queue(&srv).await;
    let m = &srv.state.metrics;
    let png = common::gray_png(28, 28, 3);
    let mut quitter = send_head(&srv.base, "/v1/embed", "image/png", body_sent.then_some(png.len()));
    if body_sent {
        quitter.write_all(&png).expect("write body");
    }
    until("the quitter waits", || m.admission_waiting.get() == 1).await;
    drop(quitter);
    until("its wait ends", || m.admission_waiting.get() == 0).await;
    // The one place in the line of waiters is free again: this request waits and is served.
    assert_eq!(embed_one(srv.base.clone(), 4).await, 200, "the next client waits for room, not refused");
    for b in before {
        assert_eq!(b.await.expect("join"), 200);
    }
    assert_eq!(m.overloaded.get(), 0, "nobody was refused");
    assert_eq!(runner.images_run.load(std::sync::atomic::Ordering::SeqCst), 3, "only the live clients' images reach the model");
    let state = &srv.state;
    until("no share of the byte budget is kept", || state.inflight_bytes.available_permits() == state.limits.max_inflight_bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sent_its_body_and_left_while_waiting_costs_only_the_wait() {
    leave_while_waiting(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_left_before_sending_its_body_costs_only_the_wait() {
    leave_while_waiting(false).await;
}

/// Sends a request head declaring a body, and none of the body: an answer then proves that the
/// server did not wait to read it.
fn head_only(base: &str, path: &str, content_type: &str) -> String {
    let mut s = TcpStream::connect(addr(base)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: 100000\r\n\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_after_the_wait_gets_429_with_retry_after_and_its_body_unread() {
    let wait = Duration::from_millis(300);
    let srv = one_place_server(Duration::from_secs(2), wait, 8).await;
    let before = fill_the_queue(&srv).await;
    let base = srv.base.clone();
    let started = Instant::now();
    let resp = tokio::task::spawn_blocking(move || head_only(&base, "/v1/embed", "image/png")).await.expect("join");
    let took = started.elapsed();
    assert!(resp.starts_with("HTTP/1.1 429"), "{resp:?}");
    let head = resp.split_once("\r\n\r\n").map_or("", |(h, _)| h).to_ascii_lowercase();
    assert!(head.contains("\r\nretry-after: 1"), "{head}");
    assert!(head.contains("\r\nconnection: close"), "the unread body ends the connection: {head}");
    assert_eq!(json_tail(&resp)["error"]["code"], "overloaded");
    assert!(took >= wait && took < Duration::from_secs(2), "refused after the wait, not at once: {took:?}");
    assert_eq!(srv.state.metrics.admission_waiting.get(), 0);
    for b in before {
        assert_eq!(b.await.expect("join"), 200);
    }
    let state = &srv.state;
    until("no share of the byte budget is kept", || state.inflight_bytes.available_permits() == state.limits.max_inflight_bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_on_waiting_requests_refusal_is_immediate() {
    let wait = Duration::from_secs(10);
    let srv = one_place_server(Duration::from_secs(1), wait, 1).await;
    let before = fill_the_queue(&srv).await;
    let waiting = tokio::spawn(embed_one(srv.base.clone(), 3));
    until("one request waits", || srv.state.metrics.admission_waiting.get() == 1).await;
    let started = Instant::now();
    let resp = post_png(&srv.base, 4).await;
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_millis(1000), "the bound refuses at once: {:?}", started.elapsed());
    assert_eq!(waiting.await.expect("join"), 200, "the one that waited is admitted");
    for b in before {
        assert_eq!(b.await.expect("join"), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_requests_do_not_block_other_routes_or_shutdown() {
    let srv = one_place_server(Duration::from_secs(3), Duration::from_secs(30), 64).await;
    let _before = fill_the_queue(&srv).await;
    let waiting: Vec<_> = (0..16)
        .map(|i| {
            let base = srv.base.clone();
            tokio::spawn(async move {
                let resp = post_png(&base, 10 + i).await;
                (resp.status().as_u16(), resp.json::<Value>().await.expect("json")["error"]["code"].clone())
            })
        })
        .collect();
    until("16 requests wait", || srv.state.metrics.admission_waiting.get() == 16).await;
    let base = srv.base.clone();
    let ms = tokio::task::spawn_blocking(move || (0..10).map(|_| health_ms(&base)).collect::<Vec<_>>()).await.expect("join");
    assert!(p99(ms.clone()) < 500.0, "/health while requests wait: {ms:?}");
    let (status, model) = call(reqwest::Client::new().get(format!("{}/v1/model", srv.base)), "/v1/model", "get").await;
    assert_eq!(status, 200, "{model}");
    // Shutdown (what `swav serve` does on SIGTERM) ends the waits at once, not after 30 s.
    let state = srv.state.clone();
    let started = Instant::now();
    drop(srv);
    for w in waiting {
        let (status, code) = w.await.expect("join");
        assert_eq!((status, code.as_str()), (503, Some("shutting_down")));
    }
    assert!(started.elapsed() < Duration::from_secs(2), "waits ended in {:?}", started.elapsed());
    until("no share of the byte budget is kept", || state.inflight_bytes.available_permits() == state.limits.max_inflight_bytes).await;
}

/// The batcher's side: first come first served, and the waits end at `stop_waiting`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_room_is_first_come_first_served_and_ends_at_stop() {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::ZERO);
    let config = BatcherConfig { queue_capacity: 4, admission_wait: Duration::from_secs(30), ..BatcherConfig::default() };
    let metrics = std::sync::Arc::new(swav::metrics::Metrics::new());
    let batcher = std::sync::Arc::new(swav::engine::batcher::Batcher::new(runner, 1, config, metrics.clone()));
    let all = batcher.try_reserve(4).expect("room for 4");
    let first = tokio::spawn({
        let b = batcher.clone();
        async move { b.reserve(3).await.map(|room| room.images()) }
    });
    until("one waits", || metrics.admission_waiting.get() == 1).await;
    drop(all);
    assert_eq!(first.await.expect("join"), Ok(3));
    // Room for 3 given back: a later request does not overtake one that waits for it.
    let held = batcher.try_reserve(2).expect("room for 2 of 4");
    let second = tokio::spawn({
        let b = batcher.clone();
        async move { b.reserve(3).await.map(|room| room.images()) }
    });
    until("the second waits", || metrics.admission_waiting.get() == 1).await;
    assert!(batcher.try_reserve(2).is_err(), "2 places are free, but a request waits for 3 first");
    let started = Instant::now();
    batcher.stop_waiting();
    let refused = second.await.expect("join");
    assert_eq!(refused, Err(swav::engine::batcher::BatchError::ShuttingDown));
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(batcher.reserve(3).await.is_err(), "after stop_waiting nothing waits");
    drop(held);
    assert!(batcher.reserve(3).await.is_ok(), "room that is free is still taken");
}

// ---------------------------------------------------------------- the byte budget and waiting

/// Opens a connection and sends a request head whose body is sent later, or never: with
/// `length` its `Content-Length`, without it `Transfer-Encoding: chunked`.
fn send_head(base: &str, path: &str, content_type: &str, length: Option<usize>) -> TcpStream {
    let mut s = TcpStream::connect(addr(base)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let framing = length.map_or_else(|| "Transfer-Encoding: chunked".to_string(), |n| format!("Content-Length: {n}"));
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nConnection: close\r\n{framing}\r\n\r\n");
    s.write_all(head.as_bytes()).expect("write head");
    s
}

/// Reads a response to its end (the server closes the connection) on a blocking thread.
async fn response_of(mut s: TcpStream) -> String {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .expect("join")
}

/// The body limit of [`budget_server`].
const LIMIT: usize = 1 << 20;

/// A server with an index (so `/v1/search` by vector reads a body without needing room in the
/// queue), the body limit `LIMIT`, the byte budget `budget`, and a queue of one place whose
/// worker takes 2 s per image; requests wait up to 30 s for room.
async fn budget_server(dir: &std::path::Path, budget: usize) -> InProcess {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::from_secs(2));
    let batcher = one_place(Duration::from_secs(30), 8);
    let limits = RequestLimits { max_body_bytes: LIMIT, max_inflight_bytes: budget, ..RequestLimits::default() };
    let index = common::open_index(dir, &bundle);
    common::start_in_process(&bundle, runner, ServerConfig { batcher, limits, index: Some(index), ..ServerConfig::default() }).await
}

/// A `/v1/search` body by vector, padded with spaces to `len` bytes.
fn search_body(dim: usize, len: usize) -> String {
    let mut body = json!({"vector": vec![0.5f32; dim]}).to_string();
    assert!(body.len() <= len);
    body.extend(std::iter::repeat_n(' ', len - body.len()));
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_room_hold_no_share_of_the_byte_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for the two waiting chunked requests' shares (the whole body limit each), but not
    // for those and the search below as well.
    let budget = 2 * LIMIT + 64 * 1024;
    let srv = budget_server(dir.path(), budget).await;
    let before = fill_the_queue(&srv).await;
    let waiting: Vec<TcpStream> = (0..2).map(|_| send_head(&srv.base, "/v1/embed", "image/png", None)).collect();
    until("two chunked requests wait", || srv.state.metrics.admission_waiting.get() == 2).await;
    // A search by vector reads its body at once, without room in the queue.
    let dim = common::gray_bundle().manifest.outputs.embedding.dim;
    let client = reqwest::Client::new();
    let search = client
        .post(format!("{}/v1/search?k=1", srv.base))
        .header("content-type", "application/json")
        .body(search_body(dim, 100_000));
    let resp = search.send().await.expect("answered");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("json");
    assert_eq!(status, 200, "a request on another route is not refused for the waiting ones' shares: {body}");
    common::check_response(&common::openapi(), "/v1/search", "post", 200, &body);
    // The waiting requests are admitted in turn once room appears, and then read their bodies.
    let png = common::gray_png(28, 28, 7);
    let answers: Vec<_> = waiting
        .into_iter()
        .map(|mut s| {
            let mut chunk = format!("{:x}\r\n", png.len()).into_bytes();
            chunk.extend_from_slice(&png);
            chunk.extend_from_slice(b"\r\n0\r\n\r\n");
            s.write_all(&chunk).expect("write body");
            tokio::spawn(response_of(s))
        })
        .collect();
    for a in answers {
        let resp = a.await.expect("join");
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    }
    for b in before {
        assert_eq!(b.await.expect("join"), 200);
    }
    let state = srv.state.clone();
    until("every share is given back", || state.inflight_bytes.available_permits() == budget).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_still_holds_for_a_request_admitted_after_waiting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let budget = LIMIT + 64 * 1024;
    let srv = budget_server(dir.path(), budget).await;
    let state = srv.state.clone();
    // A search whose 600 KB body never comes holds 600 KB of the budget while it reads.
    let held = send_head(&srv.base, "/v1/search", "application/json", Some(600_000));
    until("the search holds its share", || state.inflight_bytes.available_permits() == budget - 600_000).await;
    let before = fill_the_queue(&srv).await;
    // Another 600 KB request waits for room; once it has room, its share does not fit.
    let waiter = tokio::spawn(response_of(send_head(&srv.base, "/v1/embed", "image/png", Some(600_000))));
    until("the embed waits for room", || state.metrics.admission_waiting.get() == 1).await;
    let resp = waiter.await.expect("join");
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp:?}");
    let head = resp.split_once("\r\n\r\n").map_or("", |(h, _)| h).to_ascii_lowercase();
    assert!(head.contains("\r\nretry-after: 1"), "{head}");
    assert!(head.contains("\r\nconnection: close"), "refused with its body unread: {head}");
    let body = json_tail(&resp);
    common::check_response(&common::openapi(), "/v1/embed", "post", 503, &body);
    assert_eq!(body["error"]["code"], "server_busy");
    assert_eq!(state.metrics.admission_waiting.get(), 0);
    // The room it was given goes back: the queued image and a new request are served.
    for b in before {
        assert_eq!(b.await.expect("join"), 200);
    }
    assert_eq!(embed_one(srv.base.clone(), 9).await, 200);
    // The search's client goes away mid-body: its share comes back.
    drop(held);
    until("every share is given back", || state.inflight_bytes.available_permits() == budget).await;
}

// ---------------------------------------------------------------- connections

fn serve_with(extra: &[&str]) -> Spawned {
    let model = model();
    let mut args = vec!["--model", model.as_str()];
    args.extend_from_slice(extra);
    let server = Spawned::start(&args);
    server.wait_ready();
    server
}

#[test]
fn idle_and_half_sent_connections_are_closed_on_their_timeouts() {
    let server = serve_with(&["--header-timeout-s", "1", "--idle-timeout-s", "2"]);
    let started = Instant::now();
    let connect = || TcpStream::connect(addr(&server.base)).expect("connect");
    let mut idle = connect();
    let mut half = connect();
    half.write_all(b"GET /health HT").expect("write");
    let mut kept = connect();
    kept.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut buf = [0u8; 512];
    kept.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    assert!(kept.read(&mut buf).expect("response") > 0);
    let limit = Duration::from_secs(5);
    let half_closed = closed_after(&mut half, started, limit).expect("half-sent connection closed");
    let idle_closed = closed_after(&mut idle, started, limit).expect("idle connection closed");
    let kept_closed = closed_after(&mut kept, started, limit).expect("keep-alive connection closed");
    let within = |d: Duration, lo: f64, hi: f64| (lo..hi).contains(&d.as_secs_f64());
    assert!(within(half_closed, 0.9, 1.8), "half-sent closed after {half_closed:?} (header timeout 1 s)");
    assert!(within(idle_closed, 1.9, 3.0), "idle closed after {idle_closed:?} (idle timeout 2 s)");
    assert!(within(kept_closed, 1.9, 3.0), "idle keep-alive closed after {kept_closed:?}");
}

#[test]
fn slow_header_senders_do_not_keep_others_out() {
    let server = serve_with(&["--header-timeout-s", "2"]);
    // The same probes first without the slow clients: on a shared machine the scheduler alone
    // can cost tens of milliseconds.
    let alone = p99((0..40).map(|_| {
        std::thread::sleep(Duration::from_millis(20));
        health_ms(&server.base)
    }).collect());
    let slow: Vec<TcpStream> = (0..500).map(|_| TcpStream::connect(addr(&server.base)).expect("connect")).collect();
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let started = Instant::now();
    let mut latencies = Vec::new();
    // One byte a second, from 0 s: the 2 s header timeout ends them all.
    for (second, byte) in request.iter().enumerate().take(2) {
        for mut s in &slow {
            let _ = s.write_all(&[*byte]);
        }
        let tick = started + Duration::from_secs(second as u64 + 1);
        while Instant::now() < tick {
            latencies.push(health_ms(&server.base));
            std::thread::sleep(Duration::from_millis(20));
        }
        if second == 0 {
            let early = slow.iter().take(20).filter(|s| closed_after(s, Instant::now(), Duration::from_millis(5)).is_some()).count();
            assert_eq!(early, 0, "closed before the header timeout");
        }
    }
    let worst = p99(latencies.clone());
    eprintln!("/health p99 {worst:.1} ms with 500 slow clients, {alone:.1} ms without ({} probes)", latencies.len());
    assert!(worst < 50.0 || worst < 2.0 * alone, "/health p99 {worst:.1} ms with 500 slow clients, {alone:.1} ms without");
    let closed: Vec<Duration> = slow.iter().filter_map(|s| closed_after(s, started, Duration::from_secs(4))).collect();
    assert_eq!(closed.len(), 500, "every slow client is closed after the header timeout");
    let last = closed.iter().max().expect("some");
    assert!(*last >= Duration::from_millis(1900), "closed after {last:?}");
}

#[test]
fn the_connection_limit_holds_and_health_still_answers() {
    let server = serve_with(&["--max-connections", "20"]);
    let pid = server.child.id();
    let sockets = || std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fds").flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("socket:")))
        .count();
    std::thread::sleep(Duration::from_millis(200));
    let listening = sockets();
    let mut held: Vec<TcpStream> = Vec::new();
    for i in 0..60 {
        let mut s = TcpStream::connect(addr(&server.base)).expect("connect");
        if i % 2 == 0 {
            s.write_all(b"GET /hea").expect("half a request");
        }
        held.push(s);
        if i % 10 == 9 {
            assert!(health_ms(&server.base) < 500.0);
            std::thread::sleep(Duration::from_millis(100));
            // The limit, plus at most the one connection being admitted.
            let open = sockets() - listening;
            assert!(open <= 21, "{open} connections open with --max-connections 20");
        }
    }
    let started = Instant::now();
    let closed = held.iter().filter(|s| closed_after(s, started, Duration::from_millis(300)).is_some()).count();
    assert!(closed >= 40, "only {closed} of 60 held connections were displaced");
}

#[test]
fn sigterm_with_idle_connections_exits_within_two_seconds() {
    let mut server = serve_with(&[]);
    let mut held = Vec::new();
    for i in 0..50 {
        let mut s = TcpStream::connect(addr(&server.base)).expect("connect");
        match i % 3 {
            0 => {}
            1 => s.write_all(b"GET /health HTTP/1.1\r\nHo").expect("half"),
            _ => {
                s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
                let mut buf = [0u8; 512];
                assert!(s.read(&mut buf).expect("response") > 0);
            }
        }
        held.push(s);
    }
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    assert_exits_within_two_seconds(&mut server, started, "with idle connections");
}

/// Waits for the server to exit with status 0 within 2 s of `since` (its SIGTERM).
fn assert_exits_within_two_seconds(server: &mut Spawned, since: Instant, what: &str) {
    let exit = loop {
        if let Some(s) = server.child.try_wait().expect("wait") {
            break s;
        }
        assert!(since.elapsed() < Duration::from_secs(2), "still running 2 s after SIGTERM {what}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0));
}

/// The `swav_admission_waiting` gauge of a running server, read from `/metrics`.
fn waiting_in(base: &str) -> u64 {
    let text = reqwest::blocking::get(format!("{base}/metrics")).expect("metrics").text().expect("text");
    let line = text.lines().find(|l| l.starts_with("swav_admission_waiting ")).expect("swav_admission_waiting in /metrics");
    line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).expect("a number") as u64
}

#[test]
fn sigterm_ends_requests_waiting_for_room_in_the_real_server() {
    let mut server = serve_with(&["--queue-capacity", "1", "--admission-wait-ms", "30000"]);
    let png = common::gray_png(28, 28, 5);
    // Four requests send their heads and none of their bodies yet. The first to be admitted
    // holds the queue's one place while its body is awaited (for up to the 30 s wait); the other
    // three wait for that place, their bodies unread.
    let conns: Vec<TcpStream> = (0..4).map(|_| send_head(&server.base, "/v1/embed", "image/png", Some(png.len()))).collect();
    let started = Instant::now();
    while waiting_in(&server.base) != 3 {
        assert!(started.elapsed() < Duration::from_secs(10), "three requests never waited for room");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let term = Instant::now();
    for (i, s) in conns.iter().enumerate() {
        let mut reader = s.try_clone().expect("clone");
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = reader.read_to_end(&mut out);
            let _ = tx.send((i, String::from_utf8_lossy(&out).into_owned(), term.elapsed()));
        });
    }
    server.signal(libc::SIGTERM);
    let mut answered = Vec::new();
    for _ in 0..3 {
        let (i, resp, after) = rx.recv_timeout(Duration::from_secs(2)).expect("a waiting request answered within 2 s of SIGTERM");
        assert!(resp.starts_with("HTTP/1.1 503"), "request {i}: {resp:?}");
        assert_eq!(json_tail(&resp)["error"]["code"], "shutting_down", "request {i}");
        assert!(after < Duration::from_secs(1), "request {i} answered {after:?} after SIGTERM");
        answered.push(i);
    }
    // The one with the place is in progress: shutdown lets it finish once its body comes.
    let holder = (0..4).find(|i| !answered.contains(i)).expect("one left");
    (&conns[holder]).write_all(&png).expect("write body");
    let (i, resp, _) = rx.recv_timeout(Duration::from_secs(2)).expect("the admitted request answered");
    assert_eq!(i, holder);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    assert_exits_within_two_seconds(&mut server, term, "with requests waiting for room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_servers_use_the_same_connection_rules() {
    let conn = ConnLimits { max_connections: 4, header_timeout: Duration::from_millis(300), idle_timeout: Duration::from_millis(300) };
    let srv = server(ServerConfig { conn, ..ServerConfig::default() }).await;
    let base = srv.base.clone();
    let closed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr(&base)).expect("connect");
        closed_after(&mut s, Instant::now(), Duration::from_secs(3))
    })
    .await
    .expect("join")
    .expect("closed");
    assert!(closed < Duration::from_secs(1), "{closed:?}");
}
