//! Batch packing (`src/engine/packing.rs`): the packed model must give the model's own outputs
//! for every bundle whose first layers are narrower than a 16-channel block (their width read
//! from the manifest; the fixtures are 4 wide, four images to a row), a bundle with wider ones
//! must not pack, and batches the packed model cannot take must run on the model as it is.

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

/// Channels of the bundle's first layers, from its manifest: the trainer records its ResNet's
/// base width, which the stem and the first stage have.
fn first_width(bundle: &Bundle) -> usize {
    let name = &bundle.manifest.name;
    let width = bundle.manifest.training["width"].as_u64().unwrap_or_else(|| panic!("{name}: the manifest's training config has no width"));
    usize::try_from(width).expect("width")
}

/// Images per packed row: a 16-channel block holds 16 / width images when the width divides it.
fn expected_factor(bundle: &Bundle) -> Option<usize> {
    let width = first_width(bundle);
    (width < 16 && 16 % width == 0).then(|| 16 / width)
}

/// The default bundle when its first layers pack, else the first fixture bundle that packs.
fn packing_bundle() -> Bundle {
    std::iter::once(default_bundle())
        .chain(common::all_bundles())
        .find(|b| expected_factor(b).is_some())
        .expect("no bundle with first layers narrower than a 16-channel block")
}

#[test]
fn packed_outputs_equal_the_models_for_every_bundle() {
    let mut bundles = common::all_bundles();
    bundles.push(default_bundle());
    let mut packing = 0;
    for bundle in &bundles {
        let name = &bundle.manifest.name;
        let plain = engine(bundle, BatchPacking::Never);
        let packed = engine(bundle, BatchPacking::Always);
        assert_eq!(plain.packing_factor(), None, "{name}");
        assert_eq!(packed.packing_factor(), expected_factor(bundle), "{name}: first layers {} wide", first_width(bundle));
        let Some(factor) = packed.packing_factor() else { continue };
        packing += 1;
        for n in [factor, 4 * factor] {
            let images = batch(bundle, n);
            assert_close(&plain.run(&images, n).expect("plain"), &packed.run(&images, n).expect("packed"), &format!("{name}, {n} images"));
        }
    }
    // The fixtures are 4 wide: at least they pack.
    assert!(packing >= 2, "only {packing} bundle(s) packed");
}

#[test]
fn each_image_keeps_its_own_outputs_in_a_packed_row() {
    // The last image of a row must not change when its row-mates change.
    let bundle = packing_bundle();
    let packed = engine(&bundle, BatchPacking::Always);
    let factor = packed.packing_factor().expect("packs");
    let len = packed.tensor_len();
    let images = batch(&bundle, 2 * factor - 1);
    let row_a: Vec<f32> = images[..factor * len].to_vec();
    let row_b: Vec<f32> = [&images[factor * len..], &images[(factor - 1) * len..factor * len]].concat();
    let a = packed.run(&row_a, factor).expect("row a").image(factor - 1);
    let b = packed.run(&row_b, factor).expect("row b").image(factor - 1);
    assert!(common::max_abs_diff(&a.embedding, &b.embedding) < 1e-6);
    assert!(common::max_abs_diff(&a.prototype_scores, &b.prototype_scores) < 1e-6);
}

#[test]
fn batches_that_do_not_fill_rows_run_on_the_model_as_it_is() {
    let bundle = packing_bundle();
    let (plain, packed) = (engine(&bundle, BatchPacking::Never), engine(&bundle, BatchPacking::Always));
    let factor = packed.packing_factor().expect("packs");
    for n in [1, factor + 1, 2 * factor + 1] {
        let images = batch(&bundle, n);
        // The same session, so the same bits.
        assert_eq!(plain.run(&images, n).expect("plain"), packed.run(&images, n).expect("packed"), "{n} images");
    }
    packed.warm_up(2 * factor + 1).expect("warm-up runs both sessions");
}

#[test]
fn batch_packing_is_parsed_from_its_flag_values() {
    assert_eq!("auto".parse::<BatchPacking>(), Ok(BatchPacking::Auto));
    assert_eq!("always".parse::<BatchPacking>(), Ok(BatchPacking::Always));
    assert_eq!("never".parse::<BatchPacking>(), Ok(BatchPacking::Never));
    let err = "sometimes".parse::<BatchPacking>().unwrap_err();
    assert!(err.contains("auto, always or never"), "{err}");
}
