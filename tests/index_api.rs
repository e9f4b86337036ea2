//! The index routes over HTTP: every route, every query form, every error, auth and metrics;
//! every JSON body checked against openapi.yaml.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::{InProcess, ServerConfig, call};
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Varied images (noise, gradients, flat tones, stripes), so that they fall in several clusters.
fn image(seed: u64) -> Vec<u8> {
    match seed % 4 {
        0 => common::noise_png(28, 28, seed),
        1 => common::gray_png(28, 28, seed as u32),
        2 => {
            let v = (seed * 37 % 256) as u8;
            common::png(&image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(28, 28, image::Luma([v]))))
        }
        _ => {
            let img = image::GrayImage::from_fn(28, 28, |x, y| image::Luma([if (x / (1 + seed as u32 % 5) + y).is_multiple_of(2) { 255 } else { 0 }]));
            common::png(&image::DynamicImage::ImageLuma8(img))
        }
    }
}

async fn server_with_index(dir: &std::path::Path, api_key: Option<&str>) -> InProcess {
    let bundle = common::gray_bundle();
    let index = common::open_index(dir, &bundle);
    let cfg = ServerConfig { index: Some(index), api_key: api_key.map(String::from), ..ServerConfig::default() };
    common::start_in_process(&bundle, common::engine(&bundle), cfg).await
}


fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn add_json(srv: &InProcess, items: Value) -> (u16, Value) {
    call(client().post(format!("{}/v1/items", srv.base)).json(&json!({ "items": items })), "/v1/items", "post").await
}

async fn search_json(srv: &InProcess, query: &str, body: Value) -> (u16, Value) {
    call(client().post(format!("{}/v1/search{query}", srv.base)).json(&body), "/v1/search", "post").await
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<none>")
}

/// Adds `n` images as `img/<i>.png` with metadata {"n": i}; returns the raw images.
async fn populate(srv: &InProcess, n: u64) -> Vec<Vec<u8>> {
    let images: Vec<Vec<u8>> = (0..n).map(image).collect();
    let items: Vec<Value> =
        images.iter().enumerate().map(|(i, b)| json!({"id": format!("img/{i}.png"), "image": b64(b), "metadata": {"n": i}})).collect();
    let (status, body) = add_json(srv, json!(items)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["added"], n);
    assert_eq!(body["ids"][0], "img/0.png");
    images
}

#[tokio::test(flavor = "multi_thread")]
async fn without_an_index_every_index_route_is_a_clear_404() {
    let bundle = common::gray_bundle();
    let srv = common::start_in_process(&bundle, common::engine(&bundle), ServerConfig::default()).await;
    let c = client();
    let cases = [
        (c.post(format!("{}/v1/items", srv.base)).json(&json!({"items": []})), "/v1/items", "post"),
        (c.get(format!("{}/v1/items/a", srv.base)), "/v1/items/{id}", "get"),
        (c.delete(format!("{}/v1/items/a", srv.base)), "/v1/items/{id}", "delete"),
        (c.post(format!("{}/v1/search", srv.base)).json(&json!({"id": "a"})), "/v1/search", "post"),
        (c.get(format!("{}/v1/clusters", srv.base)), "/v1/clusters", "get"),
        (c.get(format!("{}/v1/clusters/0/items", srv.base)), "/v1/clusters/{id}/items", "get"),
        (c.get(format!("{}/v1/index", srv.base)), "/v1/index", "get"),
        (c.post(format!("{}/v1/index/compact", srv.base)), "/v1/index/compact", "post"),
    ];
    for (req, path, method) in cases {
        let (status, body) = call(req, path, method).await;
        assert_eq!((status, code(&body)), (404, "index_not_enabled"), "{method} {path}");
        assert!(body["error"]["message"].as_str().unwrap().contains("--index"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn items_can_be_added_read_searched_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with_index(dir.path(), None).await;
    let images = populate(&srv, 12).await;

    let (status, item) = call(client().get(format!("{}/v1/items/img/3.png", srv.base)), "/v1/items/{id}", "get").await;
    assert_eq!(status, 200);
    assert_eq!((item["id"].as_str(), item["metadata"].clone()), (Some("img/3.png"), json!({"n": 3})));
    let (status, same) = call(client().get(format!("{}/v1/items/img%2F3.png", srv.base)), "/v1/items/{id}", "get").await;
    assert_eq!((status, &same), (200, &item), "a percent-encoded slash names the same item");

    // Raw image body: the same image finds its own item first.
    let resp = client().post(format!("{}/v1/search?k=3", srv.base)).header("content-type", "image/png").body(images[5].clone());
    let (status, body) = call(resp, "/v1/search", "post").await;
    assert_eq!(status, 200, "{body}");
    let hits = body["results"][0].as_array().unwrap();
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0]["id"], "img/5.png");
    assert!(hits[0]["score"].as_f64().unwrap() > 0.999, "{body}");
    assert_eq!(hits[0]["metadata"], json!({"n": 5}));

    // Multipart and JSON images: one result list per image, in order.
    let form = Form::new()
        .part("a", Part::bytes(images[1].clone()).file_name("q1.png").mime_str("image/png").unwrap())
        .part("b", Part::bytes(images[2].clone()).file_name("q2.png").mime_str("image/png").unwrap());
    let (_, body) = call(client().post(format!("{}/v1/search?k=1", srv.base)).multipart(form), "/v1/search", "post").await;
    assert_eq!((body["results"][0][0]["id"].as_str(), body["results"][1][0]["id"].as_str()), (Some("img/1.png"), Some("img/2.png")));
    let (_, body) = search_json(&srv, "?k=1", json!({"images": [b64(&images[7])]})).await;
    assert_eq!(body["results"][0][0]["id"], "img/7.png");

    // A vector from /v1/embed, and an id (which leaves itself out).
    let embed = client().post(format!("{}/v1/embed", srv.base)).header("content-type", "image/png").body(images[9].clone());
    let embedding: Value = embed.send().await.unwrap().json().await.unwrap();
    let (_, body) = search_json(&srv, "?k=2", json!({"vector": embedding["embeddings"][0]})).await;
    assert_eq!(body["results"][0][0]["id"], "img/9.png");
    let (status, body) = search_json(&srv, "?k=11", json!({"id": "img/9.png"})).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = body["results"][0].as_array().unwrap().iter().map(|h| h["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 11);
    assert!(!ids.contains(&"img/9.png"), "search by id returned the item itself");

    // Delete: 204, then gone everywhere; a second delete is 404.
    let resp = client().delete(format!("{}/v1/items/img/9.png", srv.base)).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 204);
    let (status, body) = call(client().get(format!("{}/v1/items/img/9.png", srv.base)), "/v1/items/{id}", "get").await;
    assert_eq!((status, code(&body)), (404, "item_not_found"));
    let (status, _) = call(client().delete(format!("{}/v1/items/img/9.png", srv.base)), "/v1/items/{id}", "delete").await;
    assert_eq!(status, 404);
    let (_, body) = search_json(&srv, "?k=12", json!({"vector": embedding["embeddings"][0]})).await;
    let hits = body["results"][0].as_array().unwrap();
    assert_eq!(hits.len(), 11);
    assert!(hits.iter().all(|h| h["id"] != "img/9.png"));
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_items_are_named_by_filename_or_field_name_and_replace_on_readd() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with_index(dir.path(), None).await;
    let form = Form::new()
        .part("ignored-field", Part::bytes(image(1)).file_name("by-filename.png").mime_str("image/png").unwrap())
        .part("by-field", Part::bytes(image(2)).mime_str("image/png").unwrap());
    let (status, body) = call(client().post(format!("{}/v1/items", srv.base)).multipart(form), "/v1/items", "post").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ids"], json!(["by-filename.png", "by-field"]));
    // Re-adding an id replaces the item: new metadata, still one item.
    let (_, _) = add_json(&srv, json!([{"id": "by-field", "image": b64(&image(3)), "metadata": "v2"}])).await;
    let (_, item) = call(client().get(format!("{}/v1/items/by-field", srv.base)), "/v1/items/{id}", "get").await;
    assert_eq!(item["metadata"], "v2");
    let (_, stats) = call(client().get(format!("{}/v1/index", srv.base)), "/v1/index", "get").await;
    assert_eq!((stats["items"].as_u64(), stats["tombstones"].as_u64()), (Some(2), Some(1)));
}

#[tokio::test(flavor = "multi_thread")]
async fn clusters_list_pages_and_filter_searches() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with_index(dir.path(), None).await;
    let images = populate(&srv, 24).await;
    let (status, body) = call(client().get(format!("{}/v1/clusters", srv.base)), "/v1/clusters", "get").await;
    assert_eq!(status, 200);
    let clusters = body["clusters"].as_array().unwrap();
    assert!(clusters.len() >= 2, "the test images should fall in several clusters: {body}");
    let total: u64 = clusters.iter().map(|c| c["size"].as_u64().unwrap()).sum();
    assert_eq!(total, 24);

    for c in clusters {
        let id = c["id"].as_u64().unwrap();
        let size = c["size"].as_u64().unwrap() as usize;
        let path = "/v1/clusters/{id}/items";
        let (status, page) = call(client().get(format!("{}/v1/clusters/{id}/items?limit=2", srv.base)), path, "get").await;
        assert_eq!(status, 200);
        assert_eq!((page["total"].as_u64(), page["items"].as_array().unwrap().len()), (Some(size as u64), size.min(2)));
        let (_, rest) = call(client().get(format!("{}/v1/clusters/{id}/items?offset=2", srv.base)), path, "get").await;
        assert_eq!(rest["items"].as_array().unwrap().len(), size.saturating_sub(2));
        // Searching with the cluster filter only ever returns that cluster, and all of it.
        let req = client().post(format!("{}/v1/search?k=24&cluster={id}", srv.base)).header("content-type", "image/png");
        let (status, body) = call(req.body(images[0].clone()), "/v1/search", "post").await;
        assert_eq!(status, 200);
        let hits = body["results"][0].as_array().unwrap();
        assert_eq!(hits.len(), size, "cluster {id}");
        assert!(hits.iter().all(|h| h["cluster"] == id), "cluster {id}: {body}");
    }
    let k = common::gray_bundle().manifest.num_prototypes;
    let (status, body) = call(client().get(format!("{}/v1/clusters/{k}/items", srv.base)), "/v1/clusters/{id}/items", "get").await;
    assert_eq!((status, code(&body)), (404, "cluster_not_found"));
    let (status, _) = call(client().get(format!("{}/v1/clusters/x/items", srv.base)), "/v1/clusters/{id}/items", "get").await;
    assert_eq!(status, 422);
    let (status, _) = call(client().get(format!("{}/v1/clusters/0/items?limit=0", srv.base)), "/v1/clusters/{id}/items", "get").await;
    assert_eq!(status, 422);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_json_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with_index(dir.path(), None).await;
    populate(&srv, 2).await;
    let good = b64(&image(5));
    let cases: Vec<(Value, u16, &str)> = vec![
        (json!([]), 422, "invalid_request"),
        (json!([{"id": "x", "image": "%%%"}]), 400, "invalid_base64"),
        (json!([{"id": "x", "image": b64(b"not an image")}]), 400, "undecodable_image"),
        (json!([{"id": "ok", "image": good}, {"id": "", "image": good}]), 422, "invalid_request"),
        (json!([{"id": "x".repeat(2000), "image": good}]), 422, "invalid_request"),
        (json!([{"image": good}]), 422, "invalid_request"),
        (json!([{"id": "ok", "image": good}, {"id": "bad", "image": b64(&common::bomb_png(100_000, 100_000))}]), 413, "too_many_pixels"),
    ];
    for (items, status, want) in cases {
        let (got, body) = add_json(&srv, items.clone()).await;
        assert_eq!((got, code(&body)), (status, want), "{items}");
    }
    let too_many: Vec<Value> = (0..65).map(|i| json!({"id": format!("m{i}"), "image": good})).collect();
    let (status, body) = add_json(&srv, json!(too_many)).await;
    assert_eq!((status, code(&body)), (413, "too_many_images"));
    let (status, _) = call(client().post(format!("{}/v1/items", srv.base)).header("content-type", "image/png").body(image(1)), "/v1/items", "post").await;
    assert_eq!(status, 415);
    let (status, body) =
        call(client().post(format!("{}/v1/items", srv.base)).header("content-type", "application/json").body("{"), "/v1/items", "post").await;
    assert_eq!((status, code(&body)), (400, "invalid_json"));
    let (_, stats) = call(client().get(format!("{}/v1/index", srv.base)), "/v1/index", "get").await;
    assert_eq!(stats["items"], 2, "a refused request added something: {stats}");

    let dim = common::gray_bundle().manifest.outputs.embedding.dim;
    let search_cases: Vec<(&str, Value, u16, &str)> = vec![
        ("?k=0", json!({"id": "img/0.png"}), 422, "invalid_parameters"),
        ("?k=5000", json!({"id": "img/0.png"}), 422, "invalid_parameters"),
        ("?ef=0", json!({"id": "img/0.png"}), 422, "invalid_parameters"),
        ("?colour=red", json!({"id": "img/0.png"}), 422, "invalid_parameters"),
        ("?cluster=-1", json!({"id": "img/0.png"}), 422, "invalid_parameters"),
        ("", json!({"vector": [1.0, 2.0]}), 422, "invalid_request"),
        ("", json!({"vector": vec![0.0; dim]}), 422, "invalid_request"),
        ("", json!({"vector": ["a"]}), 422, "invalid_request"),
        ("", json!({"id": 7}), 422, "invalid_request"),
        ("", json!({"id": "missing"}), 404, "item_not_found"),
        ("", json!({"something": "else"}), 422, "invalid_request"),
        ("", json!({"id": "img/0.png", "vector": [1.0]}), 422, "invalid_request"),
        ("", json!({"images": ["%%%"]}), 400, "invalid_base64"),
    ];
    for (q, body, status, want) in search_cases {
        let (got, resp) = search_json(&srv, q, body.clone()).await;
        assert_eq!((got, code(&resp)), (status, want), "{q} {body}: {resp}");
    }
    let (status, body) =
        call(client().post(format!("{}/v1/search", srv.base)).header("content-type", "image/png").body(b"garbage".to_vec()), "/v1/search", "post").await;
    assert_eq!((status, code(&body)), (400, "undecodable_image"));
    let (status, _) = call(client().post(format!("{}/v1/search", srv.base)).header("content-type", "text/plain").body("hi"), "/v1/search", "post").await;
    assert_eq!(status, 415);
}

#[tokio::test(flavor = "multi_thread")]
async fn index_routes_need_the_api_key_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with_index(dir.path(), Some("k3y")).await;
    let item = json!({"items": [{"id": "a", "image": b64(&image(1))}]});
    let (status, body) = call(client().post(format!("{}/v1/items", srv.base)).json(&item), "/v1/items", "post").await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    let (status, _) = call(client().delete(format!("{}/v1/items/a", srv.base)), "/v1/items/{id}", "delete").await;
    assert_eq!(status, 401);
    let (status, _) = call(client().post(format!("{}/v1/index/compact", srv.base)), "/v1/index/compact", "post").await;
    assert_eq!(status, 401);
    let (status, _) = call(client().post(format!("{}/v1/items", srv.base)).bearer_auth("k3y").json(&item), "/v1/items", "post").await;
    assert_eq!(status, 200);
    let (status, _) = call(client().get(format!("{}/v1/items/a", srv.base)).bearer_auth("k3y"), "/v1/items/{id}", "get").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_stats_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with_index(dir.path(), None).await;
    let images = populate(&srv, 8).await;
    for i in 0..3 {
        let resp = client().delete(format!("{}/v1/items/img/{i}.png", srv.base)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 204);
    }
    let (_, stats) = call(client().get(format!("{}/v1/index", srv.base)), "/v1/index", "get").await;
    assert_eq!((stats["items"].as_u64(), stats["tombstones"].as_u64()), (Some(5), Some(3)));
    assert!(stats["log_bytes"].as_u64().unwrap() > 0);
    let (status, report) = call(client().post(format!("{}/v1/index/compact", srv.base)), "/v1/index/compact", "post").await;
    assert_eq!(status, 200);
    assert_eq!((report["items"].as_u64(), report["tombstones_removed"].as_u64()), (Some(5), Some(3)));
    let (_, stats) = call(client().get(format!("{}/v1/index", srv.base)), "/v1/index", "get").await;
    assert_eq!((stats["tombstones"].as_u64(), stats["log_bytes"].as_u64(), stats["compactions"].as_u64()), (Some(0), Some(0), Some(1)));
    let req = client().post(format!("{}/v1/search?k=1", srv.base)).header("content-type", "image/png").body(images[4].clone());
    let (_, body) = call(req, "/v1/search", "post").await;
    assert_eq!(body["results"][0][0]["id"], "img/4.png");

    let text = client().get(format!("{}/metrics", srv.base)).send().await.unwrap().text().await.unwrap();
    for needle in [
        "swav_index_items 5",
        "swav_index_tombstones 0",
        "swav_index_log_bytes 0",
        "swav_index_compactions_total 1",
        "swav_index_searches_total 1",
        "swav_index_search_duration_seconds_count 1",
        "swav_index_last_snapshot_duration_seconds",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn thumbnails_are_served_with_type_and_cache_headers_and_go_with_their_item() {
    let dir = tempfile::tempdir().unwrap();
    let srv = server_with_index(dir.path(), Some("k3y")).await;
    let c = client();
    let rgb = common::rgb_png(300, 200, 4);
    let items = json!({"items": [
        {"id": "gray/1.png", "image": b64(&image(1))},
        {"id": "rgb.png", "image": b64(&rgb)},
        {"id": "x/thumbnail", "image": b64(&image(2))},
    ]});
    let (status, body) = call(c.post(format!("{}/v1/items", srv.base)).bearer_auth("k3y").json(&items), "/v1/items", "post").await;
    assert_eq!(status, 200, "{body}");

    let url = |id: &str| format!("{}/v1/items/{id}/thumbnail", srv.base);
    let resp = c.get(url("gray/1.png")).send().await.unwrap();
    assert_eq!(resp.status(), 401, "thumbnails are behind the API key");
    let resp = c.get(url("gray/1.png")).bearer_auth("k3y").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "image/png");
    assert_eq!(h["cache-control"], "private, no-cache");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let etag = h["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"') && etag.len() > 10, "{etag}");
    let png = image::load_from_memory(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!((png.width(), png.height()), (28, 28), "the preprocessed image, as the model saw it");

    // Revalidation: the same ETag is 304 with no body.
    let resp = c.get(url("gray/1.png")).bearer_auth("k3y").header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(resp.status(), 304);
    assert!(resp.bytes().await.unwrap().is_empty());
    // The gray bundle makes every image gray, so the preprocessed colour image is a PNG too.
    let resp = c.get(url("rgb.png")).bearer_auth("k3y").send().await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.headers()["content-type"].to_str().unwrap()), (200, "image/png"));
    assert!(resp.headers()["etag"].to_str().unwrap() != etag);

    // Ids ending in "/thumbnail": the literal suffix names the thumbnail route, a %2F the item.
    let (status, body) = call(c.get(format!("{}/v1/items/x%2Fthumbnail", srv.base)).bearer_auth("k3y"), "/v1/items/{id}", "get").await;
    assert_eq!((status, body["id"].as_str()), (200, Some("x/thumbnail")));
    let resp = c.get(url("x%2Fthumbnail")).bearer_auth("k3y").send().await.unwrap();
    assert_eq!(resp.status(), 200, "the thumbnail of the item 'x/thumbnail'");
    let (status, body) = call(c.get(url("x")).bearer_auth("k3y"), "/v1/items/{id}/thumbnail", "get").await;
    assert_eq!((status, code(&body)), (404, "item_not_found"), "there is no item 'x'");

    let (status, body) = call(c.get(url("nope")).bearer_auth("k3y"), "/v1/items/{id}/thumbnail", "get").await;
    assert_eq!((status, code(&body)), (404, "item_not_found"));
    let resp = c.delete(format!("{}/v1/items/gray/1.png", srv.base)).bearer_auth("k3y").send().await.unwrap();
    assert_eq!(resp.status(), 204);
    let (status, body) = call(c.get(url("gray/1.png")).bearer_auth("k3y"), "/v1/items/{id}/thumbnail", "get").await;
    assert_eq!((status, code(&body)), (404, "item_not_found"), "the thumbnail goes with its item");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_thumbnails_off_items_have_none() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = common::gray_bundle();
    let index = common::open_index(dir.path(), &bundle);
    let cfg = ServerConfig { index: Some(index), thumbnails: false, ..ServerConfig::default() };
    let srv = common::start_in_process(&bundle, common::engine(&bundle), cfg).await;
    let (status, _) = add_json(&srv, json!([{"id": "a", "image": b64(&image(1))}])).await;
    assert_eq!(status, 200);
    let req = client().get(format!("{}/v1/items/a/thumbnail", srv.base));
    let (status, body) = call(req, "/v1/items/{id}/thumbnail", "get").await;
    assert_eq!((status, code(&body)), (404, "thumbnail_not_found"));
    let stored = srv.state.index.as_ref().unwrap().index.thumbnail("a").expect("a local read");
    assert_eq!(stored, swav::index::Thumbnail::NoThumbnail);
}

/// A bundle imported from a backbone-only checkpoint: no projection and no prototypes, and with
/// `--cluster-images` k-means centroids in their place.
fn headless_bundle(centroids: Option<usize>) -> swav::bundle::Bundle {
    let mut bundle = common::gray_bundle();
    let m = &mut bundle.manifest;
    m.schema_version = swav::bundle::SCHEMA_VERSION;
    m.num_prototypes = 0;
    m.outputs.projection = None;
    m.outputs.prototype_scores = None;
    m.outputs.centroid_scores = centroids.map(|dim| swav::bundle::OutputSpec { name: "centroid_scores".into(), dim });
    bundle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_without_prototypes_refuses_assign_and_clusters_only_by_centroids() {
    for centroids in [None, Some(4)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = headless_bundle(centroids);
        let index = common::open_index(dir.path(), &bundle);
        let runner = common::FakeRunner::new(&bundle, Duration::ZERO);
        let srv = common::start_in_process(&bundle, runner, ServerConfig { index: Some(index), ..ServerConfig::default() }).await;
        let post = |route: &str| client().post(format!("{}{route}", srv.base)).header("content-type", "image/png").body(image(1));

        let (status, body) = call(post("/v1/assign"), "/v1/assign", "post").await;
        assert_eq!((status, body["error"]["code"].as_str()), (409, Some("no_prototypes")), "{body}");
        assert!(body["error"]["message"].as_str().expect("message").contains("backbone-only"), "{body}");
        let (status, body) = call(post("/v1/embed?output=projection"), "/v1/embed", "post").await;
        assert_eq!((status, body["error"]["code"].as_str()), (409, Some("no_projection")), "{body}");
        let (status, body) = call(post("/v1/embed"), "/v1/embed", "post").await;
        assert_eq!((status, body["dim"].as_u64()), (200, Some(bundle.manifest.outputs.embedding.dim as u64)), "{body}");

        let (status, _) = add_json(&srv, json!([{"id": "a", "image": b64(&image(1))}])).await;
        assert_eq!(status, 200);
        let (status, body) = search_json(&srv, "?k=1", json!({"id": "a"})).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = call(post("/v1/search?k=1"), "/v1/search", "post").await;
        assert_eq!((status, body["results"][0][0]["id"].as_str()), (200, Some("a")), "{body}");

        let (status, model) = call(client().get(format!("{}/v1/model", srv.base)), "/v1/model", "get").await;
        assert_eq!(status, 200);
        assert!(model["outputs"]["prototype_scores"].is_null() && model["num_prototypes"] == 0, "{model}");
        let (status, body) = call(client().get(format!("{}/v1/clusters", srv.base)), "/v1/clusters", "get").await;
        let (items_status, items) =
            call(client().get(format!("{}/v1/clusters/0/items", srv.base)), "/v1/clusters/{id}/items", "get").await;
        match centroids {
            None => {
                assert_eq!(model["clusters"], "none");
                assert_eq!((status, body["error"]["code"].as_str()), (409, Some("no_clusters")), "{body}");
                assert!(body["error"]["message"].as_str().expect("message").contains("--cluster-images"), "{body}");
                assert_eq!((items_status, items["error"]["code"].as_str()), (409, Some("no_clusters")), "{items}");
                let (status, body) = search_json(&srv, "?k=1&cluster=0", json!({"id": "a"})).await;
                assert_eq!((status, body["error"]["code"].as_str()), (409, Some("no_clusters")), "{body}");
            }
            Some(k) => {
                assert_eq!(model["clusters"], "centroids");
                assert_eq!(status, 200, "{body}");
                let clusters = body["clusters"].as_array().expect("clusters");
                assert_eq!(clusters.len(), 1, "{body}");
                assert!(clusters[0]["id"].as_u64().expect("id") < k as u64, "{body}");
                assert_eq!(items_status, 200, "{items}");
                let (status, body) =
                    call(client().get(format!("{}/v1/clusters/{k}/items", srv.base)), "/v1/clusters/{id}/items", "get").await;
                assert_eq!(status, 404, "{body}");
                assert!(body["error"]["message"].as_str().expect("message").contains("k-means centroids"), "{body}");
            }
        }
    }
}
