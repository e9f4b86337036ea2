//! Shared helpers for the integration tests: fixtures, image makers, servers, OpenAPI checks.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use swav::bundle::Bundle;
use swav::engine::batcher::{BatchRunner, Batcher, BatcherConfig};
use swav::engine::{Device, Engine, EngineOptions};
use swav::http::{AppState, ModelInfo, RequestLimits};
use swav::metrics::Metrics;
use swav::preprocess::{DecodeLimits, Preprocessor};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Directory holding the trainer's fixture bundles (override: SWAV_TEST_BUNDLES).
pub fn bundles_dir() -> PathBuf {
    std::env::var_os("SWAV_TEST_BUNDLES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("tests/fixtures/bundles"))
}

/// Every fixture bundle; fails (never skips) when there is none.
pub fn all_bundles() -> Vec<Bundle> {
    let dir = bundles_dir();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixture bundles missing at {}: {e} (copy the trainer's tests/fixtures/bundles)", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "no fixture bundles under {}", dir.display());
    entries
        .iter()
        .map(|p| Bundle::load(p).unwrap_or_else(|e| panic!("fixture bundle {}: {e}", p.display())))
        .collect()
}

/// The first fixture bundle with the given channel count.
pub fn bundle_with_channels(channels: u32) -> Bundle {
    all_bundles()
        .into_iter()
        .find(|b| b.manifest.input.channels == channels)
        .unwrap_or_else(|| panic!("no fixture bundle with {channels} channel(s) under {}", bundles_dir().display()))
}

/// An index in `dir` bound to `bundle`'s model, as `swav serve --index` opens it.
pub fn open_index(dir: &Path, bundle: &Bundle) -> swav::index::Index {
    let m = &bundle.manifest;
    let identity = swav::index::ModelIdentity { name: m.name.clone(), sha256: m.model_sha256.clone(), dim: m.outputs.embedding.dim };
    swav::index::Index::open_or_create(dir, identity, swav::index::IndexOptions::default()).expect("open index")
}

pub fn gray_bundle() -> Bundle {
    bundle_with_channels(1)
}

pub fn engine_options() -> EngineOptions {
    EngineOptions {
        device: Device::Cpu,
        intra_threads: 1,
        workers: 1,
        ort_lib: None,
        batch_packing: swav::engine::BatchPacking::Auto,
    }
}

pub fn engine(bundle: &Bundle) -> Arc<Engine> {
    Arc::new(Engine::new(bundle, &engine_options()).expect("engine"))
}

/// Encodes an 8-bit image as PNG.
pub fn png(img: &image::DynamicImage) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png).expect("encode png");
    buf.into_inner()
}

/// A deterministic, seed-dependent grayscale image.
pub fn gray_png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(width, height, |x, y| {
        let v = (x.wrapping_mul(31) ^ y.wrapping_mul(17)).wrapping_add(seed.wrapping_mul(97)) % 256;
        image::Luma([v as u8])
    });
    png(&image::DynamicImage::ImageLuma8(img))
}

/// A deterministic RGB image.
pub fn rgb_png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        let s = seed.wrapping_mul(13);
        image::Rgb([((x * 7 + s) % 256) as u8, ((y * 5 + s) % 256) as u8, ((x + y + s) % 256) as u8])
    });
    png(&image::DynamicImage::ImageRgb8(img))
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut h = crc32fast::Hasher::new();
    h.update(kind);
    h.update(data);
    out.extend_from_slice(&h.finalize().to_be_bytes());
}

/// A tiny PNG whose header claims `width × height` pixels: a decompression bomb's calling card.
pub fn bomb_png(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit gray
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(&mut out, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

// ---------------------------------------------------------------- in-process server

pub struct InProcess {
    pub base: String,
    pub state: AppState,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

pub struct ServerConfig {
    pub batcher: BatcherConfig,
    pub limits: RequestLimits,
    pub decode: DecodeLimits,
    pub api_key: Option<String>,
    pub ready: bool,
    pub index: Option<swav::index::Index>,
    /// Keep thumbnails of added items (`--thumbnails`).
    pub thumbnails: bool,
    /// Serve the web page at `/` (`--no-ui` turns it off).
    pub ui: bool,
    pub conn: swav::http::server::ConnLimits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            batcher: BatcherConfig {
                max_delay: Duration::from_millis(2),
                ..BatcherConfig::default()
            },
            limits: RequestLimits::default(),
            decode: DecodeLimits::default(),
            api_key: None,
            ready: true,
            index: None,
            thumbnails: true,
            ui: true,
            conn: swav::http::server::ConnLimits::default(),
        }
    }
}

/// Starts the router on 127.0.0.1:0 inside the current tokio runtime.
pub async fn start_in_process(bundle: &Bundle, runner: Arc<dyn BatchRunner>, cfg: ServerConfig) -> InProcess {
    let metrics = Arc::new(Metrics::new());
    metrics.execution_provider.with_label_values(&["cpu"]).set(1);
    let batcher = Arc::new(Batcher::new(runner, 1, cfg.batcher, metrics.clone()));
    let info = ModelInfo {
        manifest: bundle.manifest.clone(),
        provider: "cpu".into(),
        device: "cpu".into(),
        intra_threads: 1,
    };
    let mut state = AppState::new(info, Preprocessor::new(&bundle.manifest.input, cfg.decode), batcher, metrics)
        .with_limits(cfg.limits)
        .with_api_key(cfg.api_key)
        .with_thumbnails(cfg.thumbnails)
        .with_ui(cfg.ui);
    if let Some(index) = cfg.index {
        state = state.with_index(index);
    }
    if cfg.ready {
        state.mark_ready();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = swav::http::router(state.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let batcher = state.batcher.clone();
    tokio::spawn(async move {
        let _ = swav::http::server::serve(listener, app, cfg.conn, async move {
            let _ = rx.await;
            // As `swav serve` does at shutdown.
            batcher.stop_waiting();
        })
        .await;
    });
    InProcess {
        base: format!("http://{addr}"),
        state,
        _shutdown: tx,
    }
}

// ---------------------------------------------------------------- real binary

pub struct Spawned {
    pub child: Child,
    pub base: String,
    pub stderr: Option<std::process::ChildStderr>,
}

impl Spawned {
    /// Starts `swav serve` with `--listen 127.0.0.1:0` and waits for its "listening on" line.
    pub fn start(extra: &[&str]) -> Spawned {
        let mut child = Command::new(env!("CARGO_BIN_EXE_swav"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--device", "cpu", "--intra-threads", "1"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn swav");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"))
            .to_string();
        let stderr = child.stderr.take();
        Spawned {
            child,
            base: format!("http://{addr}"),
            stderr,
        }
    }

    pub fn wait_ready(&self) {
        let client = reqwest::blocking::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(r) = client.get(format!("{}/ready", self.base)).send()
                && r.status() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("server at {} never became ready", self.base);
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- OpenAPI

pub fn openapi() -> Value {
    let text = std::fs::read_to_string(repo().join("openapi.yaml")).expect("read openapi.yaml");
    serde_yaml::from_str(&text).expect("openapi.yaml is valid YAML")
}

/// Sends a request and returns (status, JSON body), checking the body against openapi.yaml.
pub async fn call(req: reqwest::RequestBuilder, path: &str, method: &str) -> (u16, Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("JSON body");
    check_response(&openapi(), path, method, status, &body);
    (status, body)
}

/// Validates a JSON body against the schema documented for `path`/`method`/`status`.
pub fn check_response(spec: &Value, path: &str, method: &str, status: u16, body: &Value) {
    let responses = &spec["paths"][path][method]["responses"];
    let response = responses
        .get(status.to_string())
        .or_else(|| responses.get("default"))
        .unwrap_or_else(|| panic!("openapi.yaml documents no {status} response for {method} {path}"));
    let response = resolve(spec, response);
    let schema = &response["content"]["application/json"]["schema"];
    assert!(!schema.is_null(), "no application/json schema for {status} {method} {path}");
    let mut root = serde_json::json!({"components": spec["components"].clone()});
    root.as_object_mut()
        .expect("object")
        .extend(schema.as_object().expect("schema object").clone());
    let validator = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("schema for {method} {path}: {e}"));
    let errors: Vec<String> = validator.iter_errors(body).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    assert!(errors.is_empty(), "{method} {path} {status} body does not match openapi.yaml: {errors:?}\nbody: {body}");
}

/// Follows a local `$ref`.
pub fn resolve<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("non-local $ref {r}"));
            resolve(spec, spec.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {r}")))
        }
        None => v,
    }
}

pub fn read_fixture(name: &str) -> Vec<u8> {
    let p: &Path = &repo().join("tests/fixtures/preprocess").join(name);
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ---------------------------------------------------------------- fake runner

/// A stand-in for the engine: slow on demand, counts images, echoes the tensor's mean.
pub struct FakeRunner {
    pub tensor_len: usize,
    pub dims: (usize, usize, usize, usize),
    pub delay: Duration,
    pub images_run: std::sync::atomic::AtomicUsize,
}

impl FakeRunner {
    pub fn new(bundle: &Bundle, delay: Duration) -> Arc<FakeRunner> {
        let o = &bundle.manifest.outputs;
        Arc::new(FakeRunner {
            tensor_len: bundle.manifest.input.tensor_len(),
            dims: (
                o.embedding.dim,
                o.projection.as_ref().map_or(0, |p| p.dim),
                bundle.manifest.num_prototypes,
                o.centroid_scores.as_ref().map_or(0, |c| c.dim),
            ),
            delay,
            images_run: Default::default(),
        })
    }
}

impl BatchRunner for FakeRunner {
    fn tensor_len(&self) -> usize {
        self.tensor_len
    }
    fn run_batch(&self, batch: &[f32], n: usize) -> Result<swav::engine::ModelOutputs, swav::engine::EngineError> {
        std::thread::sleep(self.delay);
        self.images_run.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        let (e, p, k, c) = self.dims;
        let means: Vec<f32> = batch.chunks(self.tensor_len).map(|t| t.iter().sum::<f32>() / t.len() as f32).collect();
        let fill = |d: usize| means.iter().flat_map(|m| std::iter::repeat_n(*m + 0.01, d)).collect::<Vec<f32>>();
        Ok(swav::engine::ModelOutputs {
            n,
            embedding_dim: e,
            projection_dim: p,
            num_prototypes: k,
            embedding: fill(e),
            projection: fill(p),
            num_centroids: c,
            prototype_scores: fill(k),
            centroid_scores: fill(c),
        })
    }
}

/// Incompressible grayscale noise, so the PNG is about `width × height` bytes.
pub fn noise_png(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let img = image::GrayImage::from_fn(width, height, |_, _| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        image::Luma([(state >> 56) as u8])
    });
    png(&image::DynamicImage::ImageLuma8(img))
}
