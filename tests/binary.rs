//! The real `swav` binary: serve on port 0, CLI output equal to the server's, graceful shutdown,
//! start-up failures with clear messages, and --help listing every env var.

mod common;

use std::io::Read;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

fn swav() -> Command {
    Command::new(env!("CARGO_BIN_EXE_swav"))
}

fn model_arg() -> String {
    common::gray_bundle().dir.display().to_string()
}

#[test]
fn cli_embed_and_assign_print_what_the_server_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files: Vec<String> = (0..3)
        .map(|s| {
            let p = dir.path().join(format!("img{s}.png"));
            std::fs::write(&p, common::gray_png(28 + s, 30, s)).expect("write");
            p.display().to_string()
        })
        .collect();
    let model = model_arg();
    let server = common::Spawned::start(&["--model", &model]);
    server.wait_ready();
    let client = reqwest::blocking::Client::new();
    for (cmd, route, extra) in [("embed", "/v1/embed?output=projection", vec!["--output", "projection"]), ("assign", "/v1/assign?top_k=4", vec!["--top-k", "4"])] {
        let out = swav()
            .args([cmd, "--model", &model, "--device", "cpu"])
            .args(&extra)
            .args(&files)
            .output()
            .expect("run cli");
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        let cli: Value = serde_json::from_slice(&out.stdout).expect("cli prints JSON");
        let form = files.iter().fold(reqwest::blocking::multipart::Form::new(), |f, p| f.file("f", p).expect("file part"));
        let resp = client.post(format!("{}{route}", server.base)).multipart(form).send().expect("request");
        assert_eq!(resp.status(), 200);
        let srv: Value = resp.json().expect("json");
        assert_json_close(&cli, &srv, cmd);
    }
}

/// Equal structure; numbers within 1e-5 (batch composition may differ between the two paths).
fn assert_json_close(a: &Value, b: &Value, ctx: &str) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().expect("f64"), y.as_f64().expect("f64"));
            assert!((x - y).abs() < 1e-5, "{ctx}: {x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{ctx}: array lengths");
            x.iter().zip(y).for_each(|(p, q)| assert_json_close(p, q, ctx));
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>(), "{ctx}: keys");
            x.iter().for_each(|(k, v)| assert_json_close(v, &y[k], ctx));
        }
        _ => assert_eq!(a, b, "{ctx}"),
    }
}

#[test]
fn sigterm_lets_the_in_flight_request_finish_then_exits_zero() {
    let model = model_arg();
    // A long batching delay keeps the request in flight when the signal arrives.
    let mut server = common::Spawned::start(&["--model", &model, "--max-delay-us", "1500000", "--max-batch-size", "64"]);
    server.wait_ready();
    let base = server.base.clone();
    let request = std::thread::spawn(move || {
        reqwest::blocking::Client::new()
            .post(format!("{base}/v1/embed"))
            .header("content-type", "image/png")
            .body(common::gray_png(28, 28, 1))
            .send()
            .map(|r| r.status().as_u16())
    });
    std::thread::sleep(Duration::from_millis(300));
    server.signal(libc::SIGTERM);
    let status = request.join().expect("join").expect("in-flight request completes");
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(s) = server.child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.code(), Some(0), "graceful shutdown must exit 0");
    let refused = reqwest::blocking::Client::new().get(format!("{}/health", server.base)).send();
    assert!(refused.is_err(), "no longer accepting connections");
}

#[test]
fn sigint_also_shuts_down_cleanly() {
    let model = model_arg();
    let mut server = common::Spawned::start(&["--model", &model]);
    server.wait_ready();
    server.signal(libc::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(s) = server.child.try_wait().expect("wait") {
            assert_eq!(s.code(), Some(0));
            break;
        }
        assert!(Instant::now() < deadline, "no exit after SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `swav serve` logs one line with every flag's effective value, and never the API key.
#[test]
fn serve_logs_its_configuration_without_the_key() {
    use clap::CommandFactory;
    let model = model_arg();
    let key = "a-key-that-must-not-reach-the-log";
    let mut server = common::Spawned::start(&["--model", &model, "--api-key", key, "--log-format", "json", "--workers", "1"]);
    server.wait_ready();
    server.signal(libc::SIGINT);
    let mut stderr = String::new();
    server.stderr.take().expect("stderr").read_to_string(&mut stderr).expect("read stderr");
    let _ = server.child.wait();
    assert!(!stderr.contains(key), "the key reached the log:\n{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "effective configuration")
        .collect();
    assert_eq!(lines.len(), 1, "one configuration line:\n{stderr}");
    let fields = &lines[0]["fields"];
    assert_eq!(fields["api_key"], "Some(***)", "{fields}");
    assert_eq!(fields["workers"], 1, "{fields}");
    assert_eq!(fields["model"], model.as_str(), "{fields}");
    let cli = swav::cli::Cli::command();
    let serve = cli.find_subcommand("serve").expect("serve");
    let global = ["log", "log_format", "help", "version"];
    let mut flags = 0;
    for arg in serve.get_arguments().filter(|a| !a.is_hide_set() && !global.contains(&a.get_id().as_str())) {
        flags += 1;
        assert!(fields.get(arg.get_id().as_str()).is_some(), "the configuration line lacks --{}: {fields}", arg.get_id());
    }
    assert!(flags > 20, "{flags} flags");
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = swav().args(args).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: stderr lacks {n:?}:\n{stderr}");
    }
}

#[test]
fn start_up_failures_are_clear_one_liners() {
    let model = model_arg();
    fails_with(
        &["serve", "--model", &model, "--device", "cuda", "--listen", "127.0.0.1:0"],
        &["execution provider cuda:0 is not available"],
    );
    fails_with(
        &["embed", "--model", &model, "--ort-lib", "/nonexistent/libonnxruntime.so", "x.png"],
        &["ONNX Runtime library not found", "scripts/install-ort"],
    );
    fails_with(&["serve", "--model", "/nonexistent/bundle"], &["/nonexistent/bundle"]);

    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["manifest.json", "model.onnx"] {
        std::fs::copy(common::gray_bundle().dir.join(f), dir.path().join(f)).expect("copy");
    }
    let bundle = dir.path().display().to_string();
    std::fs::write(dir.path().join("model.onnx"), b"tampered").expect("tamper");
    fails_with(&["serve", "--model", &bundle], &["sha256 mismatch"]);
    let manifest = std::fs::read_to_string(common::gray_bundle().dir.join("manifest.json")).expect("read");
    let future = manifest.replacen("\"schema_version\": 1", "\"schema_version\": 99", 1);
    assert_ne!(future, manifest, "fixture manifest format changed");
    std::fs::write(dir.path().join("manifest.json"), future).expect("write");
    fails_with(&["serve", "--model", &bundle], &["schema_version 99 is not supported"]);
}

#[test]
fn cli_names_bad_files_and_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.png");
    std::fs::write(&bad, b"not an image").expect("write");
    let missing = dir.path().join("missing.png");
    let model = model_arg();
    let out = swav()
        .args(["assign", "--model", &model, "--device", "cpu"])
        .arg(&bad)
        .arg(&missing)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.png: the data is not a decodable image"), "{stderr}");
    assert!(stderr.contains("missing.png: No such file"), "{stderr}");
}

#[test]
fn help_documents_every_flag_with_its_env_var() {
    for sub in ["serve", "embed", "assign", "train"] {
        let out = swav().args([sub, "--help"]).output().expect("help");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let flags = text.lines().filter(|l| l.trim_start().starts_with("--") && !l.contains("--help") && !l.contains("--version")).count();
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let envs = flat.matches("[env: SWAV_").count();
        assert!(flags > 0, "{sub}: no flags?\n{text}");
        assert_eq!(flags, envs, "{sub}: every flag needs an env var:\n{text}");
    }
}

#[test]
fn train_launcher_forwards_arguments_and_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("python");
    let log = dir.path().join("args.txt");
    // A stand-in interpreter: passes the import check, records its arguments, exits 3.
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = \"-c\" ]; then exit 0; fi\necho \"$@\" > {}\nexit 3\n",
        log.display()
    );
    std::fs::write(&fake, script).expect("write");
    std::process::Command::new("chmod").arg("+x").arg(&fake).status().expect("chmod");
    let out = swav()
        .args(["train", "--python"])
        .arg(&fake)
        .args(["--nproc-per-node", "2", "--epochs", "5", "--data", "/tmp/x"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3), "exit code propagates");
    let mut recorded = String::new();
    std::fs::File::open(&log).expect("log").read_to_string(&mut recorded).expect("read");
    assert_eq!(
        recorded.trim(),
        "-m torch.distributed.run --nproc-per-node 2 -m swav_train train --epochs 5 --data /tmp/x"
    );

    std::fs::write(&fake, "#!/bin/sh\nexit 1\n").expect("write");
    fails_with(&["train", "--python", &fake.display().to_string(), "--epochs", "1"], &["cannot import swav_train", "scripts/setup-train"]);
}

#[test]
fn train_launcher_explains_a_trainer_killed_by_a_signal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("python");
    // Passes the import check, then dies as a native crash in PyTorch would: by SIGSEGV.
    std::fs::write(&fake, "#!/bin/sh\nif [ \"$1\" = \"-c\" ]; then exit 0; fi\nkill -SEGV $$\n").expect("write");
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let out = swav().args(["train"]).env("SWAV_PYTHON", &fake).args(["--epochs", "1"]).output().expect("run");
    assert_eq!(out.status.code(), Some(128 + 11), "128 + signal, as a shell reports it");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("died by signal 11 (SIGSEGV)"), "{stderr}");
    assert!(stderr.contains("native crash") && stderr.contains("--no-channels-last"), "{stderr}");
}
