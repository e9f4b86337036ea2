//! Batch packing (`src/engine/packing.rs`): the packed model must give the model's own outputs,
//! for the default bundle (8-channel first layers, two images to a row) and the fixture bundles
//! (4 channels, four to a row), and batches it cannot take must run on the model as it is.

mod common;

use swav::bundle::Bundle;
use swav::engine::{BatchPacking, Engine, EngineOptions, ModelOutputs};
use swav::preprocess::{DecodeLimits, Preprocessor};

fn engine(bundle: &Bundle, batch_packing: BatchPacking) -> Engine {
    Engine::new(bundle, &EngineOptions { batch_packing, ..common::engine_options() }).expect("engine")
}

/// `n` distinct images preprocessed for the bundle, laid end to end.
fn batch(bundle: &Bundle, n: usize) -> Vec<f32> {
    let pre = Preprocessor::new(&bundle.manifest.input, DecodeLimits::default());
    let (w, h) = (bundle.manifest.input.width, bundle.manifest.input.height);
    (0..n as u64)
        .flat_map(|seed| {
            let png = if bundle.manifest.input.channels == 1 { common::noise_png(w, h, seed) } else { common::rgb_png(w, h, seed as u32) };
            pre.prepare(&png).expect("prepare")
        })
        .collect()
}

fn assert_close(a: &ModelOutputs, b: &ModelOutputs, what: &str) {
    assert_eq!(a.n, b.n);
    for (name, x, y) in [
        ("embedding", &a.embedding, &b.embedding),
        ("projection", &a.projection, &b.projection),
        ("prototype_scores", &a.prototype_scores, &b.prototype_scores),
    ] {
        let d = common::max_abs_diff(x, y);
        assert!(d < 1e-5, "{what}: {name} differs by {d}");
    }
}

fn default_bundle() -> Bundle {
    Bundle::load(&common::repo().join("models/fashion-mnist")).expect("default bundle")
}

#[test]
fn packed_outputs_equal_the_models_for_every_bundle() {
    let mut bundles = common::all_bundles();
    bundles.push(default_bundle());
    for bundle in &bundles {
        let name = &bundle.manifest.name;
        let plain = engine(bundle, BatchPacking::Never);
        let packed = engine(bundle, BatchPacking::Always);
        assert_eq!(plain.packing_factor(), None, "{name}");
        // The first layers' width sets the factor: 16 channels to a row.
        let first_width = if name.contains("w8") { 8 } else { 4 };
        let factor = packed.packing_factor().unwrap_or_else(|| panic!("{name}: nothing packed"));
        assert_eq!(factor, 16 / first_width, "{name}");
        for n in [factor, 4 * factor] {
            let images = batch(bundle, n);
            assert_close(&plain.run(&images, n).expect("plain"), &packed.run(&images, n).expect("packed"), &format!("{name}, {n} images"));
        }
    }
}

#[test]
fn each_image_keeps_its_own_outputs_in_a_packed_row() {
    // Image 1 of a row must not change when its row-mate changes.
    let bundle = default_bundle();
    let packed = engine(&bundle, BatchPacking::Always);
    assert_eq!(packed.packing_factor(), Some(2));
    let len = packed.tensor_len();
    let images = batch(&bundle, 3);
    let row_a: Vec<f32> = images[..2 * len].to_vec();
    let row_b: Vec<f32> = [&images[2 * len..], &images[len..2 * len]].concat();
    let a = packed.run(&row_a, 2).expect("row a").image(1);
    let b = packed.run(&row_b, 2).expect("row b").image(1);
    assert!(common::max_abs_diff(&a.embedding, &b.embedding) < 1e-6);
    assert!(common::max_abs_diff(&a.prototype_scores, &b.prototype_scores) < 1e-6);
}

#[test]
fn batches_that_do_not_fill_rows_run_on_the_model_as_it_is() {
    let bundle = default_bundle();
    let (plain, packed) = (engine(&bundle, BatchPacking::Never), engine(&bundle, BatchPacking::Always));
    for n in [1, 3, 5] {
        let images = batch(&bundle, n);
        // The same session, so the same bits.
        assert_eq!(plain.run(&images, n).expect("plain"), packed.run(&images, n).expect("packed"), "{n} images");
    }
    packed.warm_up(7).expect("warm-up runs both sessions");
}

#[test]
fn batch_packing_is_parsed_from_its_flag_values() {
    assert_eq!("auto".parse::<BatchPacking>(), Ok(BatchPacking::Auto));
    assert_eq!("always".parse::<BatchPacking>(), Ok(BatchPacking::Always));
    assert_eq!("never".parse::<BatchPacking>(), Ok(BatchPacking::Never));
    let err = "sometimes".parse::<BatchPacking>().unwrap_err();
    assert!(err.contains("auto, always or never"), "{err}");
}
