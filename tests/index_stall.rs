//! No stalls while the index compacts: a server holding a 60k-item index compacts it while
//! clients poll `/health`, `/metrics`, `/v1/index` and `/v1/search` every 10 ms. Before reads
//! stopped taking the writer lock, a scrape during a compaction held a runtime worker for the
//! whole rebuild, and with two of them `/health` waited too.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use swav::index::{Index, IndexOptions, ModelIdentity, NewItem};

const ITEMS: usize = 60_000;
const REPLACED: usize = 6_000;

fn random_unit(rng: &mut StdRng, dim: usize) -> Vec<f32> {
    let v: Vec<f32> = (0..dim).map(|_| rng.random::<f32>() - 0.5).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

struct Poll {
    path: &'static str,
    latencies: Vec<Duration>,
    failures: Vec<String>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[test]
fn health_metrics_and_search_stay_fast_while_a_60k_index_compacts() {
    let bundle = common::gray_bundle();
    let m = &bundle.manifest;
    let dim = m.outputs.embedding.dim;
    let identity = ModelIdentity { name: m.name.clone(), sha256: m.model_sha256.clone(), dim };
    let dir = tempfile::tempdir().unwrap();
    // A small M and beam keep the build affordable in a debug build; the rebuild still takes
    // seconds, which is what matters here.
    let opts = IndexOptions { m: 6, ef_construction: 12, compact_min_tombstones: usize::MAX, ..IndexOptions::default() };
    let index = Index::open_or_create(dir.path(), identity, opts).unwrap();
    let mut rng = StdRng::seed_from_u64(15);
    let started = Instant::now();
    for chunk in (0..ITEMS).collect::<Vec<_>>().chunks(10_000) {
        let items = chunk.iter().map(|&i| NewItem { id: format!("v{i}"), vector: random_unit(&mut rng, dim), cluster: (i % 10) as u32, metadata: None, thumbnail: None }).collect();
        index.add(items).unwrap();
    }
    // Replacing items leaves tombstones for the compaction to remove.
    let items = (0..REPLACED).map(|i| NewItem { id: format!("v{}", i * 10), vector: random_unit(&mut rng, dim), cluster: 0, metadata: None, thumbnail: None }).collect();
    index.add(items).unwrap();
    assert_eq!((index.len(), index.stats().tombstones), (ITEMS, REPLACED));
    eprintln!("built {ITEMS} items in {:.1}s", started.elapsed().as_secs_f64());
    let query = random_unit(&mut rng, dim);

    // The server on a runtime of its own with two workers (swav serve's default on two cores),
    // so that the pollers' own threads do not stand in for it.
    let server_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cfg = common::ServerConfig { index: Some(index), ..common::ServerConfig::default() };
    let srv = server_rt.block_on(common::start_in_process(&bundle, common::engine(&bundle), cfg));
    let base = srv.base.clone();

    let done = Arc::new(AtomicBool::new(false));
    let pollers: Vec<_> = ["/health", "/metrics", "/v1/index", "/v1/search"]
        .into_iter()
        .map(|path| {
            let (base, done, query) = (base.clone(), done.clone(), query.clone());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
                let mut poll = Poll { path, latencies: Vec::new(), failures: Vec::new() };
                while !done.load(Ordering::Acquire) {
                    let t = Instant::now();
                    let req = if path == "/v1/search" {
                        client.post(format!("{base}{path}?k=10")).json(&json!({"vector": query}))
                    } else {
                        client.get(format!("{base}{path}"))
                    };
                    match req.send() {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes();
                        }
                        Ok(r) => poll.failures.push(format!("{path}: {}", r.status())),
                        Err(e) => poll.failures.push(format!("{path}: {e}")),
                    }
                    let took = t.elapsed();
                    poll.latencies.push(took);
                    std::thread::sleep(Duration::from_millis(10).saturating_sub(took));
                }
                poll
            })
        })
        .collect();

    std::thread::sleep(Duration::from_millis(300));
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(600)).build().unwrap();
    let compact_url = format!("{base}/v1/index/compact");
    let compaction = {
        let (client, url) = (client.clone(), compact_url.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = client.post(url).send().unwrap();
            (r.status().as_u16(), r.text().unwrap(), t.elapsed())
        })
    };
    // A second request while the first runs is refused with its progress, and rebuilds nothing.
    std::thread::sleep(Duration::from_millis(200));
    let second = client.post(&compact_url).send().unwrap();
    let (second_status, second_body) = (second.status().as_u16(), second.text().unwrap());
    let (status, body, took) = compaction.join().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Release);
    let polls: Vec<Poll> = pollers.into_iter().map(|p| p.join().unwrap()).collect();

    eprintln!("compaction: {status} in {:.2}s: {body}", took.as_secs_f64());
    let mut health_p99 = Duration::ZERO;
    for p in &polls {
        let mut l = p.latencies.clone();
        l.sort();
        eprintln!(
            "{:<11} n={:>5} p50={:>7.1?} p99={:>7.1?} max={:>7.1?} failures={}",
            p.path, l.len(), percentile(&l, 0.5), percentile(&l, 0.99), l[l.len() - 1], p.failures.len()
        );
        if p.path == "/health" {
            health_p99 = percentile(&l, 0.99);
        }
    }
    assert_eq!(status, 200, "{body}");
    assert!(took > Duration::from_millis(500), "the compaction was too short ({took:?}) to show a stall");
    assert_eq!(second_status, 409, "a second compaction must be refused while one runs: {second_body}");
    assert!(second_body.contains("compaction_running") && second_body.contains(" of "), "{second_body}");
    for p in &polls {
        assert!(p.failures.is_empty(), "{} failed: {:?}", p.path, &p.failures[..p.failures.len().min(5)]);
    }
    assert!(health_p99 < Duration::from_millis(50), "/health p99 was {health_p99:?} during compaction");
    drop(srv);
    server_rt.shutdown_timeout(Duration::from_secs(5));
}
