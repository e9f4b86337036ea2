//! A short overload soak of the real binary (the 60 s one is `scripts/bench_overload.py`):
//! closed-loop clients far past capacity, mixing embeds, searches and item writes. Every answer
//! is 200, 429 or 503 with Retry-After; memory settles; `/health` stays fast.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use parking_lot::Mutex;
use serde_json::json;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kib: f64 = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).expect("VmRSS");
    kib / 1024.0
}

fn health_ms(addr: &str) -> Option<f64> {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    out.starts_with(b"HTTP/1.1 200").then(|| started.elapsed().as_secs_f64() * 1e3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_cleanly_with_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = common::gray_bundle().dir.display().to_string();
    let index = dir.path().display().to_string();
    // Few may wait for room, so that both waiting and refusing are exercised.
    let server = common::Spawned::start(&[
        "--model", &model, "--index", &index, "--queue-capacity", "32", "--max-delay-us", "2000", "--max-waiting-requests", "8",
    ]);
    let base = server.base.clone();
    tokio::task::block_in_place(|| server.wait_ready());
    let pid = server.child.id();
    let addr = base.strip_prefix("http://").expect("base").to_string();
    let pngs: Arc<Vec<Vec<u8>>> = Arc::new((0..64).map(|i| common::noise_png(28, 28, i)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    let missing_retry_after = Arc::new(Mutex::new(0usize));

    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().expect("client");
    let mut clients = Vec::new();
    for c in 0..48usize {
        let (client, base, pngs, stop, statuses, missing) =
            (client.clone(), base.clone(), pngs.clone(), stop.clone(), statuses.clone(), missing_retry_after.clone());
        clients.push(tokio::spawn(async move {
            let mut n = c;
            while !stop.load(Ordering::Relaxed) {
                n += 48;
                let png = pngs[n % pngs.len()].clone();
                let req = match n % 4 {
                    0 => client.post(format!("{base}/v1/embed")).header("content-type", "image/png").body(png),
                    1 => {
                        let form = (0..8).fold(reqwest::multipart::Form::new(), |f, i| {
                            f.part(format!("f{i}"), reqwest::multipart::Part::bytes(pngs[(n + i) % pngs.len()].clone()).file_name("x.png"))
                        });
                        client.post(format!("{base}/v1/embed")).multipart(form)
                    }
                    2 => client.post(format!("{base}/v1/search?k=5")).header("content-type", "image/png").body(png),
                    _ => {
                        let image = base64::engine::general_purpose::STANDARD.encode(&png);
                        let body = json!({"items": [{"id": format!("soak/{}", n % 200), "image": image, "metadata": {"n": n}}]});
                        client.post(format!("{base}/v1/items")).json(&body)
                    }
                };
                let Ok(resp) = req.send().await else { continue };
                let status = resp.status().as_u16();
                if matches!(status, 429 | 503) && !resp.headers().contains_key("retry-after") {
                    *missing.lock() += 1;
                }
                let _ = resp.bytes().await;
                *statuses.lock().entry(status).or_default() += 1;
            }
        }));
    }

    let probe = {
        let (addr, stop) = (addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut lat, mut rss) = (Vec::new(), Vec::new());
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(15) {
                lat.push(health_ms(&addr));
                rss.push((started.elapsed(), rss_mib(pid)));
                std::thread::sleep(Duration::from_millis(50));
            }
            stop.store(true, Ordering::Relaxed);
            (lat, rss)
        })
    };
    let (lat, rss) = tokio::task::spawn_blocking(move || probe.join().expect("probe")).await.expect("join");
    for c in clients {
        c.await.expect("client");
    }

    let statuses = statuses.lock().clone();
    let served = statuses.get(&200).copied().unwrap_or(0);
    let refused = statuses.get(&429).copied().unwrap_or(0) + statuses.get(&503).copied().unwrap_or(0);
    assert!(statuses.keys().all(|s| matches!(s, 200 | 429 | 503)), "unexpected statuses: {statuses:?}");
    assert_eq!(*missing_retry_after.lock(), 0, "every 429/503 carries Retry-After");
    assert!(served > 50 && refused > 0, "the load must be past capacity and still served: {statuses:?}");
    let failed = lat.iter().filter(|l| l.is_none()).count();
    assert_eq!(failed, 0, "/health failed {failed} times");
    let mut ms: Vec<f64> = lat.into_iter().flatten().collect();
    ms.sort_by(f64::total_cmp);
    let p99 = ms[ms.len() * 99 / 100];
    // After the warm-up (5 s) memory must settle: no growth with the number of requests served.
    let warm: Vec<f64> = rss.iter().filter(|(t, _)| *t >= Duration::from_secs(5)).map(|(_, m)| *m).collect();
    let (base_rss, top) = (warm[0], warm.iter().copied().fold(0.0, f64::max));
    eprintln!(
        "soak: statuses {statuses:?}; /health p50 {:.1} ms p99 {p99:.1} ms; RSS {base_rss:.0} -> max {top:.0} MiB",
        ms[ms.len() / 2]
    );
    assert!(top <= 1.5 * base_rss, "RSS grew from {base_rss:.0} to {top:.0} MiB under overload");
    // The 50 ms target holds for the release build (scripts/bench_overload.py, BENCHMARKS.md);
    // this debug build decodes and parses unoptimised on the same runtime, on a shared machine.
    let limit = if cfg!(debug_assertions) { 500.0 } else { 50.0 };
    assert!(p99 < limit, "/health p99 {p99:.1} ms under overload (limit {limit} ms)");
}
