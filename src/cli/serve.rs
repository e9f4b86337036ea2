//! `swav serve`: load, bind, warm up, serve, and shut down gracefully on SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use super::{ModelArgs, ThumbnailArgs};
use crate::engine::batcher::{Batcher, BatcherConfig};
use crate::engine::{Engine, EngineOptions};
use crate::http::server::ConnLimits;
use crate::http::{self, AppState, ModelInfo, RequestLimits};
use crate::metrics::Metrics;
use crate::preprocess::Preprocessor;

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (port 0 picks a free port; the bound address is printed to stdout).
    #[arg(long, env = "SWAV_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Inference workers, each with its own ONNX Runtime session.
    #[arg(long, env = "SWAV_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Most images in one inference batch.
    #[arg(long, env = "SWAV_MAX_BATCH_SIZE", default_value_t = BatcherConfig::default().max_batch_size)]
    pub max_batch_size: usize,
    /// Longest a batch waits for more images after its first, in microseconds (0: never wait).
    #[arg(long, env = "SWAV_MAX_DELAY_US", default_value_t = BatcherConfig::default().max_delay.as_micros() as u64)]
    pub max_delay_us: u64,
    /// Images that may wait for inference; beyond it requests get 429 with Retry-After.
    #[arg(long, env = "SWAV_QUEUE_CAPACITY", default_value_t = BatcherConfig::default().queue_capacity)]
    pub queue_capacity: usize,
    /// Milliseconds a request that finds the queue full may wait for room, its body unread,
    /// before it gets 429; it is admitted as soon as room appears, first come first served.
    /// 0 refuses at once.
    #[arg(long, env = "SWAV_ADMISSION_WAIT_MS", default_value_t = BatcherConfig::default().admission_wait.as_millis() as u64)]
    pub admission_wait_ms: u64,
    /// Requests that may wait for room in the queue at once (--admission-wait-ms); past it
    /// requests that find the queue full get 429 at once.
    #[arg(long, env = "SWAV_MAX_WAITING_REQUESTS", default_value_t = BatcherConfig::default().max_waiting)]
    pub max_waiting_requests: usize,
    /// Most images in one request (413 beyond).
    #[arg(long, env = "SWAV_MAX_IMAGES_PER_REQUEST", default_value_t = RequestLimits::default().max_images)]
    pub max_images_per_request: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, env = "SWAV_MAX_BODY_BYTES", default_value_t = RequestLimits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Largest metadata of one item, in bytes of JSON text (413 beyond).
    #[arg(long, env = "SWAV_MAX_METADATA_BYTES", default_value_t = RequestLimits::default().max_metadata_bytes)]
    pub max_metadata_bytes: usize,
    /// Request body bytes the server holds at once, over all requests: each request reserves
    /// its Content-Length (or --max-body-bytes when it sends none) from when its body starts to
    /// be read (not while it waits for room in the queue) until it is answered. Past it requests
    /// get 503 with Retry-After. At least --max-body-bytes.
    #[arg(long, env = "SWAV_MAX_INFLIGHT_BYTES", default_value_t = RequestLimits::default().max_inflight_bytes)]
    pub max_inflight_bytes: usize,
    /// Images decoded concurrently on the decode pool. Default: the number of cores. Images of at
    /// most 64×64 pixels skip the pool: they decode faster than a hand-off to it.
    #[arg(long, env = "SWAV_DECODE_THREADS")]
    pub decode_threads: Option<usize>,
    /// Require `Authorization: Bearer <KEY>` on /v1/* (health, ready and metrics stay open).
    #[arg(long, env = "SWAV_API_KEY", hide_env_values = true, value_parser = parse_api_key)]
    pub api_key: Option<ApiKey>,
    /// Nearest-neighbour index: a directory, or milvus://HOST:PORT/COLLECTION to keep it in
    /// Milvus (shared by any number of replicas); created if missing. Enables /v1/items,
    /// /v1/search and /v1/clusters. It must have been built with the same model.
    #[arg(long, env = "SWAV_INDEX", value_name = "DIR|MILVUS_URL")]
    pub index: Option<crate::index::IndexLocation>,
    #[command(flatten)]
    pub store: super::StoreArgs,
    #[command(flatten)]
    pub thumbnails: ThumbnailArgs,
    /// Do not serve the web page at `/`: the same as `--ui=false` (hidden from help so that
    /// every listed flag keeps its env var; `--ui` carries it).
    #[arg(long, hide = true)]
    pub no_ui: bool,
    /// Serve the web page at `/` (the default); `--ui=false`, `--no-ui` or SWAV_UI=0 turn it off.
    #[arg(long, env = "SWAV_UI", value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub ui: bool,
    /// Most open client connections. At the limit a new connection displaces the oldest one
    /// with no request in progress; when every one is busy, new ones wait.
    #[arg(long, env = "SWAV_MAX_CONNECTIONS", default_value_t = ConnLimits::default().max_connections)]
    pub max_connections: usize,
    /// Seconds a client has from the first byte of a request head to its end; slower ones are
    /// disconnected.
    #[arg(long, env = "SWAV_HEADER_TIMEOUT_S", default_value_t = ConnLimits::default().header_timeout.as_secs_f64())]
    pub header_timeout_s: f64,
    /// Seconds a keep-alive connection may stay open with no request in progress and nothing
    /// received.
    #[arg(long, env = "SWAV_IDLE_TIMEOUT_S", default_value_t = ConnLimits::default().idle_timeout.as_secs_f64())]
    pub idle_timeout_s: f64,
    /// Seconds to let in-flight requests finish after SIGINT/SIGTERM (idle connections are
    /// closed at once).
    #[arg(long, env = "SWAV_SHUTDOWN_TIMEOUT_S", default_value_t = 30)]
    pub shutdown_timeout_s: u64,
}

/// The API key. Its `Debug` prints `***`, so that `ServeArgs`' Debug, panics and logs never
/// show it; [`ApiKey::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

fn parse_api_key(s: &str) -> Result<ApiKey, std::convert::Infallible> {
    Ok(ApiKey(s.to_string()))
}

impl ServeArgs {
    fn conn_limits(&self) -> anyhow::Result<ConnLimits> {
        let seconds = |v: f64, flag: &str| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .with_context(|| format!("{flag} must be a positive number of seconds, got {v}"))
        };
        Ok(ConnLimits {
            max_connections: self.max_connections.max(1),
            header_timeout: seconds(self.header_timeout_s, "--header-timeout-s")?,
            idle_timeout: seconds(self.idle_timeout_s, "--idle-timeout-s")?,
        })
    }

    fn batcher_config(&self) -> BatcherConfig {
        BatcherConfig {
            max_batch_size: self.max_batch_size.max(1),
            max_delay: Duration::from_micros(self.max_delay_us),
            queue_capacity: self.queue_capacity.max(1),
            admission_wait: Duration::from_millis(self.admission_wait_ms),
            max_waiting: self.max_waiting_requests,
        }
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.api_key.as_ref().is_some_and(|k| k.expose().trim().is_empty()) {
        // An empty key would otherwise read as "no key" and serve without auth.
        anyhow::bail!("--api-key (SWAV_API_KEY) is empty: give a key, or leave it unset to serve without auth");
    }
    if args.max_inflight_bytes < args.max_body_bytes {
        anyhow::bail!(
            "--max-inflight-bytes ({}) must be at least --max-body-bytes ({}), or no request of the largest size could ever be admitted",
            args.max_inflight_bytes,
            args.max_body_bytes
        );
    }
    let conn = args.conn_limits()?;
    let workers = args.workers.max(1);
    let (bundle, engine, options) = args.model.load(workers)?;
    let engine = Arc::new(engine);
    let metrics = Arc::new(Metrics::new());
    metrics.execution_provider.with_label_values(&[engine.provider()]).set(1);
    let batcher = Arc::new(Batcher::new(engine.clone(), workers, args.batcher_config(), metrics.clone()));
    let preprocessor = Preprocessor::new(&bundle.manifest.input, args.model.decode_limits());
    let info = model_info(&bundle.manifest, &engine, &options);
    let mut state = AppState::new(info, preprocessor, batcher, metrics)
        .with_limits(RequestLimits {
            max_images: args.max_images_per_request.max(1),
            max_body_bytes: args.max_body_bytes,
            max_metadata_bytes: args.max_metadata_bytes,
            max_inflight_bytes: args.max_inflight_bytes,
        })
        .with_api_key(args.api_key.as_ref().map(|k| k.expose().to_string()))
        .with_thumbnails(args.thumbnails.thumbnails)
        .with_ui(args.ui && !args.no_ui);
    if let Some(n) = args.decode_threads {
        state = state.with_decode_threads(n);
    }
    log_configuration(&args, conn, &bundle.dir, &options, engine.provider(), &state);
    let index = match &args.index {
        Some(location) => Some(super::index::open_for_model(location, &bundle, &args.store)?),
        None => None,
    };
    if let Some(index) = &index {
        state = state.with_index_backend(index.clone());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("swav-http")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args, state, engine))?;
    if let Some(index) = index {
        index.close().context("cannot close the index at shutdown")?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One line with every flag's effective value (defaults filled in), named as the flag, so that a
/// log shows what the server ran with. The API key is shown only as set or not.
fn log_configuration(args: &ServeArgs, conn: ConnLimits, model_dir: &std::path::Path, options: &EngineOptions, provider: &str, state: &AppState) {
    let batcher = args.batcher_config();
    tracing::info!(
        model = %model_dir.display(),
        device = %options.device,
        provider,
        ort_lib = ?options.ort_lib,
        intra_threads = options.intra_threads,
        batch_packing = ?options.batch_packing,
        max_pixels = args.model.max_pixels,
        max_image_bytes = args.model.max_image_bytes,
        listen = %args.listen,
        workers = options.workers,
        max_batch_size = batcher.max_batch_size,
        max_delay_us = batcher.max_delay.as_micros() as u64,
        queue_capacity = batcher.queue_capacity,
        admission_wait_ms = batcher.admission_wait.as_millis() as u64,
        max_waiting_requests = batcher.max_waiting,
        max_images_per_request = state.limits.max_images,
        max_body_bytes = state.limits.max_body_bytes,
        max_metadata_bytes = state.limits.max_metadata_bytes,
        max_inflight_bytes = state.limits.max_inflight_bytes,
        decode_threads = state.decode_permits.available_permits(),
        api_key = ?args.api_key,
        index = ?args.index,
        milvus_timeout = args.store.milvus_timeout,
        milvus_token = ?args.store.milvus_token.as_ref().map(|_| "***"),
        milvus_consistency = %args.store.milvus_consistency,
        thumbnails = state.thumbnails,
        ui = state.ui,
        max_connections = conn.max_connections,
        header_timeout_s = conn.header_timeout.as_secs_f64(),
        idle_timeout_s = conn.idle_timeout.as_secs_f64(),
        shutdown_timeout_s = args.shutdown_timeout_s,
        "effective configuration"
    );
}

fn model_info(manifest: &crate::bundle::Manifest, engine: &Engine, options: &EngineOptions) -> ModelInfo {
    ModelInfo {
        manifest: manifest.clone(),
        provider: engine.provider().to_string(),
        device: options.device.to_string(),
        intra_threads: options.intra_threads,
    }
}

async fn serve(args: ServeArgs, state: AppState, engine: Arc<Engine>) -> anyhow::Result<()> {
    raise_open_file_limit(args.max_connections);
    let listener = bind(args.listen).with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("cannot read the bound address")?;
    // Tests and scripts read this line to find a port-0 server.
    println!("listening on {addr}");
    tracing::info!(%addr, auth = state.api_key.is_some(), "listening");

    let warm_state = state.clone();
    let max_batch = args.max_batch_size;
    let warm_up = tokio::task::spawn_blocking(move || engine.warm_up(max_batch));

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let batcher = Arc::clone(&state.batcher);
    let app = http::router(state);
    let mut graceful_rx = stop_rx.clone();
    let limits = args.conn_limits()?;
    let server = tokio::spawn(http::server::serve(listener, app, limits, async move {
        let _ = graceful_rx.wait_for(|stop| *stop).await;
        tracing::info!("shutting down: finishing in-flight requests");
        // Requests waiting for room are refused rather than waited for.
        batcher.stop_waiting();
    }));

    match warm_up.await {
        Ok(Ok(())) => {
            warm_state.mark_ready();
            tracing::info!("model warmed up; ready");
        }
        Ok(Err(e)) => anyhow::bail!("model warm-up failed: {e}"),
        Err(e) => anyhow::bail!("model warm-up task failed: {e}"),
    }

    let timeout = Duration::from_secs(args.shutdown_timeout_s);
    let mut deadline_rx = stop_rx;
    tokio::select! {
        result = server => {
            result.context("server task failed")?.context("server error")?;
            tracing::info!("stopped");
        }
        _ = async {
            let _ = deadline_rx.wait_for(|stop| *stop).await;
            tokio::time::sleep(timeout).await;
        } => {
            tracing::warn!(timeout_s = args.shutdown_timeout_s, "shutdown timeout reached; abandoning unfinished requests");
        }
    }
    Ok(())
}

/// A listener whose accept queue holds a burst of connections: with the kernel's usual 128, a
/// burst beyond it loses SYNs, and those clients wait a second for the retry.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Connections are file descriptors: lifts the soft limit towards the hard one so that
/// `--max-connections` is reachable, and warns when it is not.
fn raise_open_file_limit(max_connections: usize) {
    // Index files, the model, logs and listeners besides the connections.
    let wanted = max_connections as u64 + 256;
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit write or read only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < wanted {
        let raised = libc::rlimit { rlim_cur: wanted.min(lim.rlim_max), rlim_max: lim.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = raised.rlim_cur;
        }
    }
    if lim.rlim_cur < wanted {
        tracing::warn!(open_files = lim.rlim_cur, max_connections,
            "the open-file limit is below --max-connections plus a margin; accept errors may occur before the connection limit");
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ServeArgs;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn debug_never_shows_the_api_key() {
        let key = "a-key-that-must-stay-secret";
        let parsed = Wrapper::try_parse_from(["swav", "--api-key", key]).expect("parse");
        let key_of = parsed.serve.api_key.as_ref().expect("a key");
        assert_eq!(key_of.expose(), key);
        assert_eq!(format!("{key_of:?}"), "***");
        for shown in [format!("{:?}", parsed.serve), format!("{:#?}", parsed.serve), format!("{parsed:?}")] {
            assert!(!shown.contains(key), "{shown}");
            assert!(shown.contains("***"), "{shown}");
        }
    }
}
