//! The real binary: `swav index build|stats|search|compact` end to end (corrupt files, resume,
//! file lists, model mismatch), `swav dataset`, and `swav serve --index` surviving SIGKILL.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn swav(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_swav")).args(args).output().expect("run swav")
}

fn model() -> String {
    common::gray_bundle().dir.display().to_string()
}

fn stdout_json(out: &Output) -> Value {
    assert!(out.status.success(), "swav failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn build(input: &Path, out: &Path, model: &str) -> Output {
    let (input, out) = (input.display().to_string(), out.display().to_string());
    swav(&["index", "build", "--model", model, "--device", "cpu", "--intra-threads", "1", "--input", &input, "--out", &out, "--no-progress"])
}

/// Five good images in nested folders and four bad files.
fn photo_folder(root: &Path) {
    fs::create_dir_all(root.join("shoes/left")).unwrap();
    fs::create_dir_all(root.join("bags")).unwrap();
    for i in 0..3u64 {
        fs::write(root.join(format!("shoes/left/{i}.png")), common::noise_png(28, 28, i)).unwrap();
    }
    fs::write(root.join("bags/a.png"), common::gray_png(40, 30, 1)).unwrap();
    fs::write(root.join("bags/b.png"), common::rgb_png(28, 28, 2)).unwrap();
    let good = common::noise_png(28, 28, 9);
    fs::write(root.join("bags/truncated.png"), &good[..good.len() / 2]).unwrap();
    fs::write(root.join("notes.txt"), "not an image").unwrap();
    fs::write(root.join("empty.png"), b"").unwrap();
    fs::write(root.join("bomb.png"), common::bomb_png(100_000, 100_000)).unwrap();
}

#[test]
fn build_skips_bad_files_reports_them_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, index) = (tmp.path().join("photos"), tmp.path().join("index"));
    photo_folder(&input);
    let m = model();

    let out = build(&input, &index, &m);
    let report = stdout_json(&out);
    assert_eq!((report["files"].as_u64(), report["indexed"].as_u64(), report["rejected"].as_u64()), (Some(9), Some(5), Some(4)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("4 rejected") && stderr.contains("rejected.tsv"), "{stderr}");
    let tsv = fs::read_to_string(index.join("rejected.tsv")).unwrap();
    let rows: Vec<&str> = tsv.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{tsv}");
    for name in ["truncated.png", "notes.txt", "empty.png", "bomb.png"] {
        let row = rows.iter().find(|r| r.contains(name)).unwrap_or_else(|| panic!("{name} not in rejected.tsv:\n{tsv}"));
        let reason = row.split('\t').nth(1).unwrap_or("");
        assert!(!reason.trim().is_empty(), "no reason for {name}");
    }

    // A rerun skips everything already indexed; a new file is all it adds.
    let again = stdout_json(&build(&input, &index, &m));
    assert_eq!((again["indexed"].as_u64(), again["already_present"].as_u64(), again["rejected"].as_u64()), (Some(0), Some(5), Some(4)));
    fs::write(input.join("bags/c.png"), common::noise_png(28, 28, 77)).unwrap();
    let third = stdout_json(&build(&input, &index, &m));
    assert_eq!((third["indexed"].as_u64(), third["already_present"].as_u64()), (Some(1), Some(5)));

    let stats = stdout_json(&swav(&["index", "stats", &index.display().to_string()]));
    assert_eq!((stats["items"].as_u64(), stats["model"]["name"].as_str()), (Some(6), Some("tiny-gray")));
    assert_eq!(stats["log_bytes"], 0, "build must end with a snapshot");

    // Search by file: each image finds its own item (id = path relative to the input) first.
    let idx = index.display().to_string();
    let files = [input.join("shoes/left/1.png"), input.join("bags/c.png")];
    let (f0, f1) = (files[0].display().to_string(), files[1].display().to_string());
    let found = stdout_json(&swav(&["index", "search", &idx, "--model", &m, "--device", "cpu", "--k", "3", &f0, &f1]));
    assert_eq!(found["results"][0][0]["id"], "shoes/left/1.png");
    assert_eq!(found["results"][1][0]["id"], "bags/c.png");
    assert!(found["results"][0][0]["score"].as_f64().unwrap() > 0.999);
    assert_eq!(found["results"][0].as_array().unwrap().len(), 3);

    let compact = stdout_json(&swav(&["index", "compact", &idx]));
    assert_eq!((compact["items"].as_u64(), compact["tombstones_removed"].as_u64()), (Some(6), Some(0)));
}

#[test]
fn build_from_a_file_list_uses_the_listed_paths_as_ids() {
    let tmp = tempfile::tempdir().unwrap();
    photo_folder(&tmp.path().join("photos"));
    fs::write(tmp.path().join("list.txt"), "# two of them\nphotos/bags/a.png\nphotos/missing.png\n").unwrap();
    let report = stdout_json(&build(&tmp.path().join("list.txt"), &tmp.path().join("index"), &model()));
    assert_eq!((report["indexed"].as_u64(), report["rejected"].as_u64()), (Some(1), Some(1)));
    let tsv = fs::read_to_string(tmp.path().join("index/rejected.tsv")).unwrap();
    assert!(tsv.contains("missing.png\tcannot read"), "{tsv}");
    let stats = stdout_json(&swav(&["index", "stats", &tmp.path().join("index").display().to_string()]));
    assert_eq!(stats["items"], 1);
}

#[test]
fn nothing_indexable_fails_and_another_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad");
    fs::create_dir_all(&bad).unwrap();
    fs::write(bad.join("x.png"), b"nope").unwrap();
    let out = build(&bad, &tmp.path().join("i1"), &model());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing could be indexed"));

    let good = tmp.path().join("good");
    fs::create_dir_all(&good).unwrap();
    fs::write(good.join("a.png"), common::noise_png(28, 28, 1)).unwrap();
    stdout_json(&build(&good, &tmp.path().join("i2"), &model()));
    let rgb = common::bundle_with_channels(3).dir.display().to_string();
    let out = build(&good, &tmp.path().join("i2"), &rgb);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("was built with model 'tiny-gray'"), "{stderr}");

    let out = swav(&["index", "stats", &tmp.path().join("nothing-here").display().to_string()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no index"));
}

#[test]
fn batch_sizes_below_one_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out) = (tmp.path().display().to_string(), tmp.path().join("i").display().to_string());
    let m = model();
    for flag in ["--batch-size", "--inference-batch"] {
        let run = swav(&["index", "build", "--model", &m, "--input", &input, "--out", &out, flag, "0"]);
        assert_eq!(run.status.code(), Some(2), "{flag} 0 must be a usage error");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains(flag) && stderr.contains("at least 1"), "{stderr}");
    }
    assert!(!tmp.path().join("i").exists(), "nothing is created for a refused command");
}

#[test]
fn dataset_command_writes_class_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("idx");
    fs::create_dir_all(&data).unwrap();
    let gz = |name: &str, bytes: &[u8]| {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(fs::File::create(data.join(name)).unwrap(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap();
    };
    let mut images = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
    images.extend(std::iter::repeat_n(128u8, 2 * 28 * 28));
    gz("train-images-idx3-ubyte.gz", &images);
    gz("train-labels-idx1-ubyte.gz", &[0, 0, 8, 1, 0, 0, 0, 2, 3, 8]);
    let out_dir = tmp.path().join("out");
    let (d, o) = (data.display().to_string(), out_dir.display().to_string());
    let report = stdout_json(&swav(&["dataset", "fashion-mnist", "--split", "train", "--out", &o, "--data-dir", &d]));
    assert_eq!(report["written"], 2);
    assert!(out_dir.join("dress/00000.png").is_file() && out_dir.join("bag/00001.png").is_file());
    let out = swav(&["dataset", "fashion-mnist", "--split", "test", "--out", &o, "--data-dir", &d]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("t10k-images-idx3-ubyte.gz"));
}

#[test]
fn serve_with_index_keeps_acknowledged_items_across_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index").display().to_string();
    let m = model();
    let client = reqwest::blocking::Client::new();
    let image = common::noise_png(28, 28, 5);
    {
        let server = common::Spawned::start(&["--model", &m, "--index", &dir]);
        server.wait_ready();
        let form = reqwest::blocking::multipart::Form::new()
            .part("x", reqwest::blocking::multipart::Part::bytes(image.clone()).file_name("kept.png"));
        let resp = client.post(format!("{}/v1/items", server.base)).multipart(form).send().unwrap();
        assert_eq!(resp.status(), 200);
        server.signal(libc::SIGKILL);
    }
    let server = common::Spawned::start(&["--model", &m, "--index", &dir]);
    server.wait_ready();
    let resp = client.get(format!("{}/v1/items/kept.png", server.base)).send().unwrap();
    assert_eq!(resp.status(), 200, "acknowledged item lost by SIGKILL");
    let resp = client.post(format!("{}/v1/search?k=1", server.base)).header("content-type", "image/png").body(image).send().unwrap();
    let body: Value = resp.json().unwrap();
    assert_eq!(body["results"][0][0]["id"], "kept.png");
}

/// The fields of the last JSON log line with this message.
fn logged(out: &Output, message: &str) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().rfind(|l| l.contains(&format!("\"{message}\"")));
    let line = line.unwrap_or_else(|| panic!("no {message:?} log line: {stderr}"));
    serde_json::from_str::<Value>(line).expect("a JSON log line")["fields"].clone()
}

#[test]
fn build_runs_one_single_threaded_session_per_core_on_cpu_unless_told() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("photos");
    photo_folder(&input);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let m = model();
    let run = |out: &str, extra: &[&str]| {
        let (input, out) = (input.display().to_string(), tmp.path().join(out).display().to_string());
        let mut args = vec!["index", "build", "--model", &m, "--input", &input, "--out", &out, "--no-progress", "--log-format", "json"];
        args.extend_from_slice(extra);
        let out = swav(&args);
        assert_eq!(stdout_json(&out)["indexed"].as_u64(), Some(5));
        let mut fields = logged(&out, "model loaded");
        fields["inference_batch"] = logged(&out, "indexing")["inference_batch"].clone();
        fields
    };
    // The default device is auto: on a machine without CUDA it ends on the CPU, one session per core.
    let auto = run("auto", &[]);
    match auto["provider"].as_str() {
        Some("cpu") => assert_eq!((auto["workers"].as_u64(), auto["intra_threads"].as_u64()), (Some(cores), Some(1)), "{auto}"),
        Some("cuda") => assert_eq!(auto["workers"].as_u64(), Some(1), "{auto}"),
        other => panic!("unexpected provider {other:?}"),
    }
    let cpu = run("cpu", &["--device", "cpu"]);
    assert_eq!((cpu["workers"].as_u64(), cpu["intra_threads"].as_u64()), (Some(cores), Some(1)), "{cpu}");
    // On the CPU a worker's batch of 128 runs through onnxruntime 16 images at a time.
    assert_eq!(cpu["inference_batch"].as_u64(), Some(16), "{cpu}");
    let one = run("one", &["--device", "cpu", "--workers", "1", "--inference-batch", "2"]);
    assert_eq!((one["workers"].as_u64(), one["intra_threads"].as_u64()), (Some(1), Some(cores)), "{one}");
    assert_eq!(one["inference_batch"].as_u64(), Some(2), "{one}");
}

/// `index build` keeps a thumbnail of each image (the preprocessed image), none with `--thumbnails=false`.
#[test]
fn build_keeps_thumbnails_unless_told_not_to() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("photos");
    fs::create_dir_all(&input).unwrap();
    fs::write(input.join("a.png"), common::gray_png(40, 30, 1)).unwrap();
    let m = model();
    let (with, without) = (tmp.path().join("with"), tmp.path().join("without"));
    stdout_json(&build(&input, &with, &m));
    let (i, o) = (input.display().to_string(), without.display().to_string());
    stdout_json(&swav(&["index", "build", "--model", &m, "--device", "cpu", "--input", &i, "--out", &o, "--no-progress", "--thumbnails=false"]));

    let index = swav::index::Index::open(&with, swav::index::IndexOptions::default()).unwrap();
    let png = image::load_from_memory_with_format(&index.thumbnail("a.png").expect("a thumbnail"), image::ImageFormat::Png).unwrap();
    let crop = &common::gray_bundle().manifest.input.crop;
    assert_eq!((png.width(), png.height()), (crop.width, crop.height), "the preprocessed image");
    let index = swav::index::Index::open(&without, swav::index::IndexOptions::default()).unwrap();
    assert!(index.contains("a.png") && index.thumbnail("a.png").is_none());
}
