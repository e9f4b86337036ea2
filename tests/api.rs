//! The HTTP API in-process: every route, every input form, every error class, auth, batching
//! correctness, overload and cancellation; every JSON body checked against openapi.yaml.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{InProcess, ServerConfig, call};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};
use swav::engine::batcher::{BatchError, Batcher, BatcherConfig};
use swav::http::RequestLimits;
use swav::metrics::Metrics;
use swav::preprocess::DecodeLimits;

async fn real_server(cfg: ServerConfig) -> InProcess {
    let bundle = common::gray_bundle();
    let engine = common::engine(&bundle);
    common::start_in_process(&bundle, engine, cfg).await
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}


async fn embed_raw(srv: &InProcess, bytes: Vec<u8>, query: &str) -> (u16, Value) {
    let req = reqwest::Client::new()
        .post(format!("{}/v1/embed{query}", srv.base))
        .header("content-type", "image/png")
        .body(bytes);
    call(req, "/v1/embed", "post").await
}

fn vectors(body: &Value, key: &str) -> Vec<Vec<f32>> {
    body[key]
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v.as_array().expect("vector").iter().map(|x| x.as_f64().expect("num") as f32).collect())
        .collect()
}

fn assert_same_vectors(a: &[Vec<f32>], b: &[Vec<f32>]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!(common::max_abs_diff(x, y) < 1e-5, "vectors differ");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_input_form_gives_the_same_answers_in_order() {
    let srv = real_server(ServerConfig::default()).await;
    let images: Vec<Vec<u8>> = (0..3).map(|s| common::gray_png(28, 28, s)).collect();
    let mut single = Vec::new();
    for img in &images {
        let (status, body) = embed_raw(&srv, img.clone(), "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["dim"], srv.state.model.manifest.outputs.embedding.dim);
        let v = vectors(&body, "embeddings");
        let norm: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not L2-normalised: {norm}");
        single.push(v[0].clone());
    }
    assert!(common::max_abs_diff(&single[0], &single[1]) > 1e-3, "different images must differ");

    let client = reqwest::Client::new();
    let octet = client
        .post(format!("{}/v1/embed", srv.base))
        .header("content-type", "application/octet-stream")
        .body(images[1].clone());
    let (status, body) = call(octet, "/v1/embed", "post").await;
    assert_eq!(status, 200);
    assert_same_vectors(&vectors(&body, "embeddings"), &single[1..2]);

    let form = Form::new()
        .part("first", Part::bytes(images[0].clone()).file_name("a.png").mime_str("image/png").expect("mime"))
        .text("note", "not an image, ignored")
        .part("second", Part::bytes(images[1].clone()).file_name("b.png"))
        .part("third", Part::bytes(images[2].clone()).file_name("c.png"));
    let (status, body) = call(client.post(format!("{}/v1/embed", srv.base)).multipart(form), "/v1/embed", "post").await;
    assert_eq!(status, 200, "{body}");
    assert_same_vectors(&vectors(&body, "embeddings"), &single);

    let json_body = json!({"images": [b64(&images[2]), b64(&images[0]), format!("data:image/png;base64,{}", b64(&images[1]))]});
    let (status, body) = call(client.post(format!("{}/v1/embed", srv.base)).json(&json_body), "/v1/embed", "post").await;
    assert_eq!(status, 200, "{body}");
    assert_same_vectors(&vectors(&body, "embeddings"), &[single[2].clone(), single[0].clone(), single[1].clone()]);

    let (status, body) = embed_raw(&srv, images[0].clone(), "?output=projection").await;
    assert_eq!(status, 200);
    assert_eq!(body["dim"], srv.state.model.manifest.outputs.projection.as_ref().expect("projection").dim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_returns_sorted_top_k_probabilities() {
    let srv = real_server(ServerConfig::default()).await;
    let k = srv.state.model.manifest.num_prototypes;
    let img = common::gray_png(28, 28, 9);
    let url = format!("{}/v1/assign?top_k=3&temperature=0.5", srv.base);
    let req = reqwest::Client::new().post(url).header("content-type", "image/png").body(img.clone());
    let (status, body) = call(req, "/v1/assign", "post").await;
    assert_eq!(status, 200, "{body}");
    let a = &body["assignments"][0];
    let top = a["top"].as_array().expect("top");
    assert_eq!(top.len(), 3);
    assert_eq!(a["cluster"], top[0]["cluster"]);
    let probs: Vec<f64> = top.iter().map(|t| t["probability"].as_f64().expect("p")).collect();
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "{probs:?}");
    assert!(a["cluster"].as_u64().expect("id") < k as u64);

    let all = format!("{}/v1/assign?top_k={k}", srv.base);
    let req = reqwest::Client::new().post(all).header("content-type", "image/png").body(img);
    let (_, body) = call(req, "/v1/assign", "post").await;
    let sum: f64 = body["assignments"][0]["top"].as_array().expect("top").iter().map(|t| t["probability"].as_f64().expect("p")).sum();
    assert!((sum - 1.0).abs() < 1e-4, "probabilities over all prototypes sum to {sum}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operational_routes() {
    let srv = real_server(ServerConfig { ready: false, ..ServerConfig::default() }).await;
    let client = reqwest::Client::new();
    let (status, body) = call(client.get(format!("{}/ready", srv.base)), "/ready", "get").await;
    assert_eq!(status, 503, "{body}");
    srv.state.mark_ready();
    let (status, _) = call(client.get(format!("{}/ready", srv.base)), "/ready", "get").await;
    assert_eq!(status, 200);
    let (status, body) = call(client.get(format!("{}/health", srv.base)), "/health", "get").await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (status, body) = call(client.get(format!("{}/v1/model", srv.base)), "/v1/model", "get").await;
    assert_eq!(status, 200);
    assert_eq!(body["name"], srv.state.model.manifest.name);
    assert_eq!(body["execution_provider"], "cpu");

    embed_raw(&srv, common::gray_png(28, 28, 1), "").await;
    embed_raw(&srv, b"garbage".to_vec(), "").await;
    let metrics = client.get(format!("{}/metrics", srv.base)).send().await.expect("metrics");
    assert_eq!(metrics.status(), 200);
    let text = metrics.text().await.expect("text");
    for needle in [
        "swav_http_requests_total{method=\"POST\",route=\"/v1/embed\",status=\"200\"} 1",
        "swav_http_requests_total{method=\"POST\",route=\"/v1/embed\",status=\"400\"} 1",
        "swav_images_rejected_total{reason=\"undecodable_image\"} 1",
        "swav_images_decoded_total 1",
        "swav_decode_duration_seconds_count",
        "swav_queue_duration_seconds_count 1",
        "swav_inference_duration_seconds_count 1",
        "swav_batch_size_count 1",
        "swav_queue_depth 0",
        "swav_execution_provider{provider=\"cpu\"} 1",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_is_json_with_the_right_status() {
    let srv = real_server(ServerConfig {
        limits: RequestLimits { max_images: 2, max_body_bytes: 64 * 1024, ..RequestLimits::default() },
        decode: DecodeLimits { max_pixels: 1_000_000, max_bytes: 32 * 1024 },
        ..ServerConfig::default()
    })
    .await;
    let png = common::gray_png(28, 28, 5);
    let noisy = common::noise_png(200, 200, 3);
    assert!((32 * 1024..64 * 1024).contains(&noisy.len()), "noise PNG is {} bytes", noisy.len());
    let ico = vec![0, 0, 1, 0, 1, 0, 16, 16, 0, 0, 1, 0, 32, 0, 0, 0, 0, 0, 22, 0, 0, 0];
    let cases: Vec<(&str, u16, &str, Vec<u8>, &str)> = vec![
        ("truncated", 400, "image/png", png[..png.len() / 2].to_vec(), "truncated_image"),
        ("empty", 400, "image/png", vec![], "empty_image"),
        ("non-image", 400, "image/png", b"just some text".to_vec(), "undecodable_image"),
        ("bomb", 413, "image/png", common::bomb_png(100_000, 100_000), "too_many_pixels"),
        ("body over limit", 413, "image/png", vec![7u8; 100 * 1024], "body_too_large"),
        ("unsupported format", 415, "image/x-icon", ico, "unsupported_image_format"),
        ("unsupported media type", 415, "text/plain", png.clone(), "unsupported_media_type"),
    ];
    let client = reqwest::Client::new();
    for (name, status, ct, bytes, code) in cases {
        let req = client.post(format!("{}/v1/embed", srv.base)).header("content-type", ct).body(bytes);
        let (got, body) = call(req, "/v1/embed", "post").await;
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{name}: {body}");
    }
    let (got, body) = embed_raw(&srv, noisy, "").await;
    assert_eq!((got, body["error"]["code"].as_str()), (413, Some("image_too_large")), "{body}");

    let no_ct = client.post(format!("{}/v1/embed", srv.base)).body(png.clone());
    let (got, body) = call(no_ct, "/v1/embed", "post").await;
    assert_eq!((got, body["error"]["code"].as_str()), (415, Some("unsupported_media_type")));

    let too_many = json!({"images": [b64(&png), b64(&png), b64(&png)]});
    let (got, body) = call(client.post(format!("{}/v1/embed", srv.base)).json(&too_many), "/v1/embed", "post").await;
    assert_eq!((got, body["error"]["code"].as_str()), (413, Some("too_many_images")));
    let form = (0..3).fold(Form::new(), |f, i| f.part(format!("f{i}"), Part::bytes(png.clone()).file_name("x.png")));
    let (got, body) = call(client.post(format!("{}/v1/embed", srv.base)).multipart(form), "/v1/embed", "post").await;
    assert_eq!((got, body["error"]["code"].as_str()), (413, Some("too_many_images")));
    let form = Form::new().text("only", "text");
    let (got, _) = call(client.post(format!("{}/v1/embed", srv.base)).multipart(form), "/v1/embed", "post").await;
    assert_eq!(got, 400);

    let json_cases: Vec<(&str, u16, &str)> = vec![
        ("{not json", 400, "invalid_json"),
        ("{\"imgs\": []}", 422, "invalid_request"),
        ("{\"images\": []}", 422, "invalid_request"),
        ("{\"images\": [\"%%%\"]}", 400, "invalid_base64"),
    ];
    for (text, status, code) in json_cases {
        let req = client.post(format!("{}/v1/embed", srv.base)).header("content-type", "application/json").body(text);
        let (got, body) = call(req, "/v1/embed", "post").await;
        assert_eq!((got, body["error"]["code"].as_str()), (status, Some(code)), "{text}: {body}");
    }

    for (path, query) in [
        ("/v1/embed", "?output=logits"),
        ("/v1/embed", "?colour=red"),
        ("/v1/assign", "?top_k=0"),
        ("/v1/assign", "?top_k=100000"),
        ("/v1/assign", "?top_k=abc"),
        ("/v1/assign", "?temperature=-1"),
        ("/v1/assign", "?temperature=nan"),
    ] {
        let req = client.post(format!("{}{path}{query}", srv.base)).header("content-type", "image/png").body(png.clone());
        let (got, body) = call(req, path, "post").await;
        assert_eq!((got, body["error"]["code"].as_str()), (422, Some("invalid_parameters")), "{path}{query}: {body}");
    }

    let resp = client.get(format!("{}/no/such/route", srv.base)).send().await.expect("404");
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_found");
    let resp = client.get(format!("{}/v1/embed", srv.base)).send().await.expect("405");
    assert_eq!(resp.status(), 405);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_v1_only() {
    let srv = real_server(ServerConfig { api_key: Some("s3cret".into()), ..ServerConfig::default() }).await;
    let client = reqwest::Client::new();
    let png = common::gray_png(28, 28, 2);
    let embed = |auth: Option<&str>| {
        let mut req = client.post(format!("{}/v1/embed", srv.base)).header("content-type", "image/png").body(png.clone());
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        req
    };
    let (status, body) = call(embed(None), "/v1/embed", "post").await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")));
    let (status, _) = call(embed(Some("Bearer wrong")), "/v1/embed", "post").await;
    assert_eq!(status, 401);
    let (status, _) = call(embed(Some("s3cret")), "/v1/embed", "post").await;
    assert_eq!(status, 401, "the Bearer scheme is required");
    let (status, _) = call(embed(Some("Bearer s3cret")), "/v1/embed", "post").await;
    assert_eq!(status, 200);
    let (status, _) = call(client.get(format!("{}/v1/model", srv.base)), "/v1/model", "get").await;
    assert_eq!(status, 401);
    for open in ["/health", "/ready", "/metrics"] {
        let resp = client.get(format!("{}{open}", srv.base)).send().await.expect("open route");
        assert_eq!(resp.status(), 200, "{open} must not need the key");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_batched_and_routed_back_correctly() {
    let srv = real_server(ServerConfig::default()).await;
    let n = 48;
    let images: Vec<Vec<u8>> = (0..n).map(|s| common::gray_png(28, 28, 1000 + s)).collect();
    let mut alone = Vec::new();
    for img in &images {
        let (status, body) = embed_raw(&srv, img.clone(), "").await;
        assert_eq!(status, 200);
        alone.push(vectors(&body, "embeddings").remove(0));
    }
    let batches_before = srv.state.metrics.batch_size.get_sample_count();
    let tasks: Vec<_> = images
        .iter()
        .cloned()
        .map(|img| {
            let base = srv.base.clone();
            tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(format!("{base}/v1/embed"))
                    .header("content-type", "image/png")
                    .body(img)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(resp.status(), 200);
                let body: Value = resp.json().await.expect("json");
                vectors(&body, "embeddings").remove(0)
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let got = task.await.expect("task");
        let cos = common::cosine(&got, &alone[i]);
        assert!(cos > 0.99999, "image {i}: concurrent answer differs from its single answer (cosine {cos})");
    }
    let batches = srv.state.metrics.batch_size.get_sample_count() - batches_before;
    assert!(batches < n as u64, "{n} concurrent images ran in {batches} batches: no batching happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_with_retry_after_at_once() {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::from_millis(300));
    let cfg = ServerConfig {
        // Refusing at once, as the test's name says (waiting for room: tests/hostile.rs).
        batcher: BatcherConfig {
            max_batch_size: 1,
            max_delay: Duration::ZERO,
            queue_capacity: 2,
            admission_wait: Duration::ZERO,
            ..BatcherConfig::default()
        },
        ..ServerConfig::default()
    };
    let srv = common::start_in_process(&bundle, runner, cfg).await;
    let png = common::gray_png(28, 28, 4);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (base, png) = (srv.base.clone(), png.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let resp = reqwest::Client::new()
                    .post(format!("{base}/v1/embed"))
                    .header("content-type", "image/png")
                    .body(png)
                    .send()
                    .await
                    .expect("send");
                let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap_or("").to_string());
                (resp.status().as_u16(), retry, started.elapsed(), resp.json::<Value>().await.expect("json"))
            })
        })
        .collect();
    let mut refused = 0;
    for t in tasks {
        let (status, retry, elapsed, body) = t.await.expect("task");
        if status == 429 {
            refused += 1;
            assert_eq!(retry.as_deref(), Some("1"));
            assert_eq!(body["error"]["code"], "overloaded");
            assert!(elapsed < Duration::from_millis(250), "refusal must be immediate, took {elapsed:?}");
            common::check_response(&common::openapi(), "/v1/embed", "post", 429, &body);
        } else {
            assert_eq!(status, 200, "{body}");
        }
    }
    assert!(refused >= 3, "with 1 running + 2 queued, at least 3 of 8 must be refused; got {refused}");
    assert_eq!(srv.state.metrics.overloaded.get(), refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_are_dropped_before_inference() {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::from_millis(300));
    let metrics = Arc::new(Metrics::new());
    let config = BatcherConfig { max_batch_size: 8, max_delay: Duration::ZERO, queue_capacity: 16, ..BatcherConfig::default() };
    let batcher = Arc::new(Batcher::new(runner.clone(), 1, config, metrics.clone()));
    let tensor = vec![0.5f32; bundle.manifest.input.tensor_len()];

    // Occupies the only worker for 300 ms.
    let first = tokio::spawn({
        let (b, t) = (batcher.clone(), tensor.clone());
        async move { b.submit(t).await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // These callers give up while they wait in the queue.
    for _ in 0..3 {
        let r = tokio::time::timeout(Duration::from_millis(20), batcher.submit(tensor.clone())).await;
        assert!(r.is_err(), "should have timed out while queued");
    }
    let kept = batcher.submit(tensor.clone()).await.expect("live request is answered");
    assert_eq!(kept.embedding.len(), bundle.manifest.outputs.embedding.dim);
    first.await.expect("join").expect("first answered");
    assert_eq!(runner.images_run.load(Ordering::SeqCst), 2, "abandoned images must not reach the model");
    assert_eq!(metrics.cancelled.get(), 3);
    assert_eq!(metrics.queue_depth.get(), 0);

    let wrong = batcher.submit(vec![0.0; 3]).await;
    assert!(matches!(wrong, Err(BatchError::BadInput(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_only_for_images_that_are_on_their_way() {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::ZERO);
    let metrics = Arc::new(Metrics::new());
    let config = BatcherConfig { max_batch_size: 8, max_delay: Duration::from_secs(2), queue_capacity: 16, ..BatcherConfig::default() };
    let batcher = Arc::new(Batcher::new(runner.clone(), 1, config, metrics.clone()));
    let tensor = vec![0.5f32; bundle.manifest.input.tensor_len()];

    // Nothing else announced: answered at once, not after the 2 s delay.
    let started = Instant::now();
    batcher.submit(tensor.clone()).await.expect("answered");
    assert!(started.elapsed() < Duration::from_millis(1000), "a lone image waited {:?}", started.elapsed());

    // One image announced (still decoding): the batch holding the other waits for it.
    let announced = batcher.announce();
    let other = tokio::spawn({
        let (b, t) = (batcher.clone(), tensor.clone());
        async move { b.submit(t).await }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(!other.is_finished(), "the batch must wait for the announced image");
    announced.submit(tensor.clone()).await.expect("answered");
    other.await.expect("join").expect("answered");
    assert_eq!(metrics.batch_size.get_sample_count(), 2, "the two images must share one batch");
    assert_eq!(metrics.batch_size.get_sample_sum(), 3.0);
}

#[test]
fn openapi_is_valid_and_documents_every_route() {
    let spec = common::openapi();
    assert!(spec["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "openapi version");
    assert!(spec["info"]["title"].is_string() && spec["info"]["version"].is_string(), "info");
    let paths = spec["paths"].as_object().expect("paths");
    for (path, item) in paths {
        assert!(path.starts_with('/'), "{path}");
        for (method, op) in item.as_object().expect("path item") {
            assert!(["get", "post", "put", "delete", "patch"].contains(&method.as_str()), "{path} {method}");
            let responses = op["responses"].as_object().unwrap_or_else(|| panic!("{method} {path} has no responses"));
            assert!(!responses.is_empty());
            for (code, response) in responses {
                assert!(code == "default" || code.parse::<u16>().is_ok(), "{code}");
                assert!(common::resolve(&spec, response)["description"].is_string(), "{method} {path} {code}");
            }
        }
    }
    // Every $ref resolves and every schema compiles.
    fn walk(spec: &Value, v: &Value) {
        match v {
            Value::Object(m) => {
                if let Some(r) = m.get("$ref").and_then(Value::as_str) {
                    common::resolve(spec, v);
                    assert!(r.starts_with("#/components/"), "{r}");
                }
                m.values().for_each(|c| walk(spec, c));
            }
            Value::Array(a) => a.iter().for_each(|c| walk(spec, c)),
            _ => {}
        }
    }
    walk(&spec, &spec);
    for (name, schema) in spec["components"]["schemas"].as_object().expect("schemas") {
        let mut root = json!({"components": spec["components"].clone()});
        root.as_object_mut().expect("obj").extend(schema.as_object().expect("schema").clone());
        jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema {name}: {e}"));
    }
    // The routes the router serves (keep in step with http::router).
    for (path, method) in [
        ("/v1/embed", "post"),
        ("/v1/assign", "post"),
        ("/v1/model", "get"),
        ("/v1/items", "post"),
        ("/v1/items/{id}", "get"),
        ("/v1/items/{id}", "delete"),
        ("/v1/items/{id}/thumbnail", "get"),
        ("/", "get"),
        ("/v1/search", "post"),
        ("/v1/clusters", "get"),
        ("/v1/clusters/{id}/items", "get"),
        ("/v1/index", "get"),
        ("/v1/index/compact", "post"),
        ("/health", "get"),
        ("/ready", "get"),
        ("/metrics", "get"),
    ] {
        assert!(spec["paths"][path][method].is_object(), "openapi.yaml does not document {method} {path}");
    }
}

/// openapi.yaml's list of error codes is exactly `ErrorCode`'s: a code added, renamed or removed
/// on one side only fails here.
#[test]
fn openapi_lists_exactly_the_error_codes() {
    use std::collections::BTreeSet;
    use strum::IntoEnumIterator;
    use swav::http::error::ErrorCode;
    let spec = common::openapi();
    let listed = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
        .as_array()
        .expect("the Error schema's code has an enum");
    let spec_codes: BTreeSet<&str> = listed.iter().map(|v| v.as_str().expect("codes are strings")).collect();
    assert_eq!(spec_codes.len(), listed.len(), "openapi.yaml lists a code twice");
    let ours: BTreeSet<&str> = ErrorCode::iter().map(ErrorCode::as_str).collect();
    let missing: Vec<_> = ours.difference(&spec_codes).collect();
    let stale: Vec<_> = spec_codes.difference(&ours).collect();
    assert!(missing.is_empty(), "codes the server answers that openapi.yaml does not list: {missing:?}");
    assert!(stale.is_empty(), "codes openapi.yaml lists that the server never answers: {stale:?}");
}

/// Every documented operation is served (none answers 404 or 405).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_served() {
    // The index routes answer 404 by design when no index is open, so serve one.
    let dir = tempfile::tempdir().expect("tempdir");
    let index = common::open_index(dir.path(), &common::gray_bundle());
    let srv = real_server(ServerConfig { index: Some(index), ..ServerConfig::default() }).await;
    let spec = common::openapi();
    let client = reqwest::Client::new();
    let mut seen = 0;
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            let m = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let resp = client.request(m, format!("{}{path}", srv.base)).send().await.expect("send");
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            // A 404 about the resource (an unknown item id) is fine; the router's own "no such route" is not.
            let unrouted = status == 405 || (status == 404 && body["error"]["code"] == "not_found");
            assert!(!unrouted, "{method} {path} is documented but answers {status}: {body}");
            seen += 1;
        }
    }
    assert!(seen >= 6, "only {seen} operations documented");
}

/// A client that hangs up while its image waits in the queue costs no inference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_clients_are_dropped_before_inference() {
    let bundle = common::gray_bundle();
    let runner = common::FakeRunner::new(&bundle, Duration::from_millis(400));
    let cfg = ServerConfig {
        batcher: BatcherConfig { max_batch_size: 8, max_delay: Duration::ZERO, queue_capacity: 16, ..BatcherConfig::default() },
        ..ServerConfig::default()
    };
    let srv = common::start_in_process(&bundle, runner.clone(), cfg).await;
    let png = common::gray_png(28, 28, 8);
    let send = |timeout: Duration| {
        let (base, png) = (srv.base.clone(), png.clone());
        async move {
            reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .expect("client")
                .post(format!("{base}/v1/embed"))
                .header("content-type", "image/png")
                .body(png)
                .send()
                .await
        }
    };
    let first = tokio::spawn(send(Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let quitters: Vec<_> = (0..3).map(|_| tokio::spawn(send(Duration::from_millis(100)))).collect();
    for q in quitters {
        assert!(q.await.expect("join").is_err(), "quitters time out");
    }
    assert_eq!(first.await.expect("join").expect("first").status(), 200);
    // Let the worker pick up (and discard) the abandoned images.
    let live = send(Duration::from_secs(10)).await.expect("live request");
    assert_eq!(live.status(), 200);
    assert_eq!(srv.state.metrics.cancelled.get(), 3, "abandoned images must be dropped");
    assert_eq!(runner.images_run.load(Ordering::SeqCst), 2, "only the two live images reach the model");
}

/// The web page: served without the API key (it asks for one), with a strict CSP and
/// revalidated caching; everything under /v1 still needs the key; `--no-ui` turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_page_is_served_with_strict_headers_and_only_its_assets_skip_the_key() {
    let bundle = common::gray_bundle();
    let cfg = ServerConfig { api_key: Some("k3y".into()), ..ServerConfig::default() };
    let srv = common::start_in_process(&bundle, common::engine(&bundle), cfg).await;
    let c = reqwest::Client::new();
    for (path, kind) in [("/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")] {
        let resp = c.get(format!("{}{path}", srv.base)).send().await.expect("send");
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers().clone();
        assert!(h["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        let csp = h["content-security-policy"].to_str().unwrap();
        for rule in ["default-src 'none'", "script-src 'self'", "img-src 'self' blob: data:", "frame-ancestors 'none'"] {
            assert!(csp.contains(rule), "{path}: CSP lacks {rule}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-cache");
        let etag = h["etag"].clone();
        let body = resp.text().await.unwrap();
        assert!(body.len() > 100, "{path}");
        let again = c.get(format!("{}{path}", srv.base)).header("if-none-match", etag).send().await.unwrap();
        assert_eq!(again.status(), 304, "{path} revalidates");
    }
    let html = c.get(format!("{}/", srv.base)).send().await.unwrap().text().await.unwrap();
    assert!(html.contains(r#"<script src="/ui/app.js""#), "the script is an external file");
    assert!(!html.contains("<script>") && !html.contains("style="), "no inline script or style");
    let js = c.get(format!("{}/ui/app.js", srv.base)).send().await.unwrap().text().await.unwrap();
    assert!(!js.contains("innerHTML") && !js.contains("insertAdjacentHTML"), "user data is only set as text");
    // The data the page shows needs the key.
    for path in ["/v1/model", "/v1/items/a/thumbnail"] {
        let resp = c.get(format!("{}{path}", srv.base)).send().await.unwrap();
        assert_eq!(resp.status(), 401, "{path}");
    }

    let cfg = ServerConfig { ui: false, ..ServerConfig::default() };
    let off = common::start_in_process(&bundle, common::engine(&bundle), cfg).await;
    let resp = c.get(format!("{}/", off.base)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    let resp = c.get(format!("{}/ui/app.js", off.base)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}
