//! Parity with the trainer: for every fixture bundle's golden cases, our preprocessed tensor is
//! within 2/255 of the trainer's, and our model outputs match its golden outputs (cosine ≥ 0.9999
//! without resize, ≥ 0.999 with).

mod common;

use serde_json::Value;
use swav::bundle::Bundle;
use swav::preprocess::{DecodeLimits, Preprocessor};

fn floats(v: &Value, key: &str) -> Vec<f32> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("golden case has no {key}"))
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn check_bundle(bundle: &Bundle) -> usize {
    let golden_path = bundle
        .golden_path()
        .unwrap_or_else(|| panic!("fixture bundle {} has no golden fixtures", bundle.dir.display()));
    let golden: Value = serde_json::from_str(&std::fs::read_to_string(&golden_path).expect("read golden"))
        .expect("golden.json");
    let golden_dir = golden_path.parent().expect("golden dir");
    let cases = golden["cases"].as_array().expect("cases");
    assert!(!cases.is_empty(), "{} has no golden cases", golden_path.display());
    let pre = Preprocessor::new(&bundle.manifest.input, DecodeLimits::default());
    let engine = common::engine(bundle);
    let mut failures = Vec::new();
    for case in cases {
        let file = case["file"].as_str().expect("file");
        let bytes = std::fs::read(golden_dir.join(file)).expect("golden image");
        let tensor = pre.prepare(&bytes).unwrap_or_else(|e| panic!("{file}: {e}"));
        let diff = common::max_abs_diff(&tensor, &floats(case, "tensor"));
        if diff > 2.0 / 255.0 + 1e-6 {
            failures.push(format!("{file}: tensor max diff {:.2}/255", diff * 255.0));
        }
        let out = engine.run(&tensor, 1).expect("run").image(0);
        let min_cos = if case["needs_resize"].as_bool().unwrap_or(true) { 0.999 } else { 0.9999 };
        for (key, ours) in [("embedding", &out.embedding), ("projection", &out.projection)] {
            let cos = common::cosine(ours, &floats(case, key));
            if cos < min_cos {
                failures.push(format!("{file}: {key} cosine {cos:.6} < {min_cos}"));
            }
        }
        let scores = floats(case, "prototype_scores");
        let score_diff = common::max_abs_diff(&out.prototype_scores, &scores);
        if score_diff > 0.02 {
            failures.push(format!("{file}: prototype_scores max diff {score_diff}"));
        }
    }
    assert!(failures.is_empty(), "{}: parity failures:\n{}", bundle.manifest.name, failures.join("\n"));
    cases.len()
}

#[test]
fn every_fixture_bundle_matches_its_golden_outputs() {
    let bundles = common::all_bundles();
    let checked: usize = bundles.iter().map(check_bundle).sum();
    assert!(checked >= bundles.len(), "no golden cases checked");
}

/// The default model too: its golden images are 28 px Fashion-MNIST pictures that it takes at
/// 32 px, so this also holds our upscaling to the trainer's.
#[test]
fn the_default_model_matches_its_golden_outputs() {
    let bundle = Bundle::load(&common::repo().join("models/fashion-mnist")).expect("default bundle");
    assert!(check_bundle(&bundle) >= 4, "the default model has fewer than 4 golden cases");
}

/// The same image through the engine alone and in a batch with others gives the same answer.
#[test]
fn batch_results_equal_single_results() {
    let bundle = common::gray_bundle();
    let engine = common::engine(&bundle);
    let pre = Preprocessor::new(&bundle.manifest.input, DecodeLimits::default());
    let tensors: Vec<Vec<f32>> = (0..5).map(|s| pre.prepare(&common::gray_png(28, 28, s)).expect("ok")).collect();
    let batch: Vec<f32> = tensors.iter().flatten().copied().collect();
    let together = engine.run(&batch, tensors.len()).expect("batch");
    for (i, t) in tensors.iter().enumerate() {
        let alone = engine.run(t, 1).expect("single").image(0);
        let cos = common::cosine(&alone.embedding, &together.image(i).embedding);
        assert!(cos > 0.99999, "image {i}: cosine {cos}");
        assert!(common::max_abs_diff(&alone.prototype_scores, &together.image(i).prototype_scores) < 1e-4);
    }
}

/// Several sessions (workers) used from several threads at once agree with each other.
#[test]
fn multiple_sessions_run_concurrently_and_agree() {
    let bundle = common::gray_bundle();
    let options = swav::engine::EngineOptions { workers: 2, ..common::engine_options() };
    let engine = std::sync::Arc::new(swav::engine::Engine::new(&bundle, &options).expect("engine"));
    assert_eq!(engine.workers(), 2);
    let pre = Preprocessor::new(&bundle.manifest.input, DecodeLimits::default());
    let tensor = pre.prepare(&common::gray_png(28, 28, 77)).expect("ok");
    let reference = engine.run(&tensor, 1).expect("run").image(0);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (engine, tensor) = (engine.clone(), tensor.clone());
            std::thread::spawn(move || (0..10).map(|_| engine.run(&tensor, 1).expect("run").image(0)).collect::<Vec<_>>())
        })
        .collect();
    for h in handles {
        for out in h.join().expect("thread") {
            assert!(common::max_abs_diff(&out.embedding, &reference.embedding) < 1e-6);
        }
    }
}
