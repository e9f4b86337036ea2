//! What the index does to its files, seen from outside: `swav index stats|search` change no
//! byte and no mtime (even with a torn log tail to recover from), and under strace a write is
//! logged and fdatasync'd before it is answered, and a snapshot is fsynced file, directory,
//! rename, parent, in that order.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use swav::index::{Index, IndexOptions, ModelIdentity, NewItem};

fn identity() -> ModelIdentity {
    let m = common::gray_bundle().manifest;
    ModelIdentity { name: m.name.clone(), sha256: m.model_sha256.clone(), dim: m.outputs.embedding.dim }
}

/// Every file under `dir` with its bytes and mtime.
fn files(dir: &Path) -> BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let meta = fs::metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p.clone());
                out.insert(p, (Vec::new(), meta.modified().unwrap()));
            } else {
                out.insert(p.clone(), (fs::read(&p).unwrap(), meta.modified().unwrap()));
            }
        }
    }
    out
}

#[test]
fn stats_and_search_change_no_file_even_with_a_torn_log_tail() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index");
    let id = identity();
    let mut rng = StdRng::seed_from_u64(7);
    let mut vector = || (0..id.dim).map(|_| rng.random::<f32>() - 0.5).collect::<Vec<f32>>();
    {
        let index = Index::open_or_create(&dir, id.clone(), IndexOptions::default()).unwrap();
        index.add((0..30).map(|i| NewItem { id: format!("a{i}"), vector: vector(), cluster: 1, metadata: None, thumbnail: None }).collect()).unwrap();
        index.snapshot().unwrap();
        index.add((0..10).map(|i| NewItem { id: format!("b{i}"), vector: vector(), cluster: 2, metadata: None, thumbnail: None }).collect()).unwrap();
        index.delete("a0").unwrap();
    }
    // Half a record at the end: what a crash in the middle of an append leaves (the first
    // record's start, after the 12-byte file header).
    let log = dir.join("wal.log");
    let mut bytes = fs::read(&log).unwrap();
    let whole = bytes.len();
    bytes.extend_from_slice(&bytes[12..52].to_vec());
    fs::write(&log, &bytes).unwrap();
    // Old enough that a rewrite of the same bytes would still change the mtime.
    std::thread::sleep(Duration::from_millis(20));
    let before = files(&dir);

    let d = dir.display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_swav")).args(["index", "stats", &d]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["items"], 39);
    assert_eq!(stats["read_only"], true);
    assert_eq!(stats["recovered_torn_tail"]["offset"], whole as u64, "{stats}");

    let image = tmp.path().join("q.png");
    fs::write(&image, common::gray_png(28, 28, 3)).unwrap();
    let m = common::gray_bundle().dir.display().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_swav"))
        .args(["index", "search", &d, "--model", &m, "--device", "cpu", "--intra-threads", "1", "--k", "3"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["results"][0].as_array().unwrap().len(), 3);
    fs::remove_file(&image).unwrap();

    let after = files(&dir);
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>(), "files were added or removed");
    for (path, (bytes, mtime)) in &before {
        let (b, t) = &after[path];
        assert!(b == bytes, "{} changed", path.display());
        assert_eq!(t, mtime, "{} was touched", path.display());
    }
}

/// One syscall line of `strace -f -y`, by position.
struct Trace {
    lines: Vec<String>,
}

impl Trace {
    /// The first line at or after `from` whose call is `call` and that contains `text`.
    fn find(&self, from: usize, call: &str, text: &str) -> Option<usize> {
        self.find_where(from, call, |l| l.contains(text))
    }

    fn find_where(&self, from: usize, call: &str, pred: impl Fn(&str) -> bool) -> Option<usize> {
        (from..self.lines.len()).find(|&i| {
            let l = &self.lines[i];
            let body = l.split_once(' ').map_or(l.as_str(), |(_, rest)| rest.trim_start());
            body.starts_with(&format!("{call}(")) && pred(l)
        })
    }

    /// Where the call started at line `i` returned (its "resumed" line, if it was split).
    fn finished(&self, i: usize) -> usize {
        let l = &self.lines[i];
        if !l.contains("<unfinished ...>") {
            return i;
        }
        let pid = l.split_whitespace().next().unwrap_or("");
        let call = l.split_once(' ').map(|(_, r)| r.trim_start()).and_then(|r| r.split('(').next()).unwrap_or("");
        (i + 1..self.lines.len())
            .find(|&j| self.lines[j].starts_with(pid) && self.lines[j].contains(&format!("<... {call} resumed>")))
            .unwrap_or(usize::MAX)
    }

    fn show(&self, i: usize) -> &str {
        self.lines.get(i).map_or("<none>", String::as_str)
    }
}

#[test]
fn a_write_is_fdatasynced_before_its_answer_and_a_snapshot_is_fsynced_before_and_after_its_rename() {
    let strace = ["/usr/bin/strace", "/bin/strace"].into_iter().find(|p| Path::new(p).exists());
    let strace = strace.expect("strace is needed for this test (scripts/setup installs it)");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index");
    let trace_file = tmp.path().join("trace.txt");
    let m = common::gray_bundle().dir.display().to_string();
    let mut child = Command::new(strace)
        .args(["-f", "-y", "-s", "200", "-o"])
        .arg(&trace_file)
        .args(["-e", "trace=%file,fsync,fdatasync,write,writev,pwrite64,sendto,sendmsg"])
        .arg(env!("CARGO_BIN_EXE_swav"))
        .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu", "--intra-threads", "1", "--model", &m, "--index"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = format!("http://{}", line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("{line:?}")));
    let client = reqwest::blocking::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client.get(format!("{base}/ready")).send().map(|r| r.status()).ok() != Some(reqwest::StatusCode::OK) {
        assert!(std::time::Instant::now() < deadline, "server never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let form = reqwest::blocking::multipart::Form::new()
        .part("x", reqwest::blocking::multipart::Part::bytes(common::gray_png(28, 28, 4)).file_name("traced-item"));
    let resp = client.post(format!("{base}/v1/items")).multipart(form).send().unwrap();
    assert_eq!(resp.status(), 200);
    drop(client);
    // SIGTERM the server (strace's child): shutdown snapshots the index.
    let children = fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id())).unwrap();
    let server: i32 = children.split_whitespace().next().expect("the traced server").parse().unwrap();
    // SAFETY: signalling the server process this test started (through strace).
    assert_eq!(unsafe { libc::kill(server, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "server exit: {status}");

    let t = Trace { lines: fs::read_to_string(&trace_file).unwrap().lines().map(String::from).collect() };
    // The log record, its fdatasync, then the answer.
    let write = t.find(0, "pwrite64", "traced-item").unwrap_or_else(|| panic!("no log write of the item in the trace"));
    assert!(t.show(write).contains("wal.log>"), "{}", t.show(write));
    let fd = t.show(write).split_once('(').unwrap().1.split(',').next().unwrap().to_string();
    let sync = t.find(write, "fdatasync", &fd).expect("no fdatasync of the log after the write");
    let answer = ["writev", "write", "sendto", "sendmsg"]
        .iter()
        .filter_map(|c| t.find(write, c, "\\\"added\\\":1"))
        .min()
        .expect("no HTTP answer in the trace");
    assert!(t.finished(sync) < answer, "answered before the fdatasync returned:\n{}\n{}", t.show(sync), t.show(answer));

    // The snapshot: files fsynced, their directory, the rename, then the index directory.
    let items = t.find(answer, "fsync", "items.bin>").expect("items.bin never fsynced");
    let graph = t.find(answer, "fsync", "graph.bin>").expect("graph.bin never fsynced");
    let tmp_dir = t.find_where(answer, "fsync", |l| l.contains(".tmp-snapshot-") && !l.contains(".bin>")).expect("snapshot directory never fsynced");
    let rename = ["rename", "renameat", "renameat2"]
        .iter()
        .filter_map(|c| t.find(tmp_dir, c, ".tmp-snapshot-"))
        .min()
        .expect("no rename of the snapshot into place");
    let parent = format!("{}>)", dir.display());
    let parent_sync = t.find(rename, "fsync", &parent).expect("index directory never fsynced after the rename");
    let order = [t.finished(items), t.finished(graph), tmp_dir, t.finished(tmp_dir), rename, t.finished(rename), parent_sync];
    let shown: Vec<&str> = [items, graph, tmp_dir, rename, parent_sync].iter().map(|&i| t.show(i)).collect();
    assert!(
        order[0] < order[2] && order[1] < order[2] && order[3] < order[4] && order[5] < order[6],
        "snapshot steps out of order {order:?}:\n{}",
        shown.join("\n")
    );
}
