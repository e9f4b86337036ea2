"""`python -m swav_train train | export | eval`.

The train flags are generated from `config.TrainConfig`, whose field docs are the help text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from swav_train import config as config_mod
from swav_train.config import ConfigError, TrainConfig

EPILOG_TRAIN = """\
precedence: --preset, then --config FILE, then individual flags.

examples:
  python -m swav_train train --preset fashion-mnist --out runs/fmnist
  python -m swav_train train --preset imagenet --data-dir ~/photos --out runs/photos --epochs 50
  python -m swav_train train --data-dir ~/photos --out runs/photos --eval-train-dir L/train --eval-test-dir L/test
  python -m torch.distributed.run --nproc-per-node 4 -m swav_train train --preset imagenet --data-dir DIR --out RUN

The run directory receives config.json, metrics.jsonl, tensorboard/, checkpoint.pt (written atomically
each epoch), eval.json and bundle/ (model.onnx, manifest.json). Running the same command again resumes
from RUN_DIR/checkpoint.pt. Under torch.distributed.run (torchrun) each process trains on its share of
the data with DDP; --batch-size is per process.

evaluation: Fashion-MNIST test against train, unless --eval-train-dir and --eval-test-dir name two
labelled folders (ROOT/<class>/<image>, the same class subfolders in both; class names sorted give
the label ids). Unreadable images are reported and skipped.

fashion-mnist preset: 1 channel, 2 crops of 28 px (scale 0.3-1) + 4 crops of 16 px (scale 0.1-0.4),
blur sigma 0.1-0.5, ResNet-18 at width 32 behind a 3x3 stride-2 stem, K=300 prototypes, batch 256,
lr 2.4 -> 0.0024 (2 warmup epochs), no queue, 14 epochs, crops drawn batched on tensors.
"""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    group = parser.add_argument_group("training configuration (defaults shown are the imagenet preset's)")
    for f in dataclasses.fields(TrainConfig):
        elem, is_tuple = config_mod.field_kind(f.type)
        nargs = "+" if is_tuple else None
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text = f"{f.metadata['help']} (default: {shown!s})".replace("%", "%%")
        if elem is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=elem, nargs=nargs, default=None, metavar=f.name.upper(),
                               help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = config_mod.preset(args.preset)
    if args.config:
        base = config_mod.load(args.config, base)
    overrides = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            overrides[f.name] = tuple(value) if isinstance(value, list) else value
    if overrides.get("data_dir") and "dataset" not in overrides:
        overrides["dataset"] = "folder"
    return config_mod.from_dict({**base.to_dict(), **overrides})


def add_eval_set_flags(parser: argparse.ArgumentParser) -> None:
    """The labelled-set flags of export and eval; unset ones keep what the run's config recorded."""
    group = parser.add_argument_group(
        "labelled set (default: the one the run was trained with, else Fashion-MNIST test against train)")
    group.add_argument("--eval-train-dir", metavar="DIR", default=None,
                       help="labelled reference folder, one subfolder per class (ROOT/<class>/<image>); "
                            "needs --eval-test-dir")
    group.add_argument("--eval-test-dir", metavar="DIR", default=None,
                       help="labelled query folder with the same class subfolders; needs --eval-train-dir")
    group.add_argument("--fashion-mnist-dir", metavar="DIR", default=None,
                       help="evaluate on the Fashion-MNIST IDX files here instead "
                            f"(default: {config_mod.FASHION_MNIST_DIR})")
    group.add_argument("--eval-train-size", type=int, default=0,
                       help="labelled reference images, a random subset (0 = all; Fashion-MNIST has 60000)")
    group.add_argument("--eval-test-size", type=int, default=0,
                       help="labelled query images, a random subset (0 = all; Fashion-MNIST has 10000)")


def eval_set_from_args(recorded, args: argparse.Namespace):
    """The labelled set to use: the command line's choice over the `recorded` EvalSet."""
    return recorded.override(args.fashion_mnist_dir, args.eval_train_dir, args.eval_test_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m swav_train",
        description="Train a SwAV image embedding model (Caron et al. 2020) and export a swav model bundle.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,export,eval,import}")

    t = sub.add_parser("train", help="train a model and write RUN_DIR/bundle",
                       description="Train SwAV on an image folder or Fashion-MNIST; at the end evaluate on "
                                   "Fashion-MNIST or on labelled folders (--eval-train-dir, --eval-test-dir): "
                                   "linear probe, kNN, NMI/ARI; then export RUN_DIR/bundle.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--out", "--run-dir", dest="out", required=True, metavar="RUN_DIR",
                   help="run directory (created; resumed from when it holds checkpoint.pt)")
    t.add_argument("--preset", default="imagenet", choices=sorted(config_mod.PRESETS),
                   help="starting configuration: imagenet (the paper's defaults) or fashion-mnist (small, CPU-sized)")
    t.add_argument("--config", metavar="FILE", help="JSON file of config fields (e.g. a run's config.json)")
    t.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint instead of RUN_DIR/checkpoint.pt")
    t.add_argument("--no-resume", action="store_true", help="start afresh even if RUN_DIR holds a checkpoint "
                   "(the old checkpoint is overwritten after the first epoch)")
    add_config_flags(t)

    e = sub.add_parser("export", help="write a bundle from a training checkpoint or from one of this trainer's bundles",
                       description="Export CHECKPOINT to BUNDLE_DIR/{model.onnx, manifest.json}; checks "
                                   "onnxruntime against PyTorch (max abs diff <= 1e-4). The source may also be "
                                   "a bundle this trainer wrote: its weights are read back from model.onnx "
                                   "(checked against it) and exported again, for example at another input "
                                   "size with --image-size.",
                       epilog="example: python -m swav_train export models/fashion-mnist --image-size 32 "
                              "--out runs/fm32 --evaluate")
    e.add_argument("checkpoint", metavar="CHECKPOINT_OR_BUNDLE",
                   help="a checkpoint.pt written by train, or a bundle directory written by train or export")
    e.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="the model's input height and width in the new bundle (default: the source's). A "
                        "model trained on random-resized crops is often better served a little larger "
                        "than its training crops (Touvron et al. 2019, FixRes); --evaluate measures it")
    e.add_argument("--resize-size", type=int, default=None, metavar="N",
                   help="shorter side before the centre crop (default: --image-size when that is given, "
                        "else the source's)")
    e.add_argument("--embedding-layer", type=int, choices=(3, 4), default=None, metavar="{3,4}",
                   help="the ResNet stage whose pooled output becomes the bundle's `embedding` (default: the "
                        "source's); the weights are unchanged, so a trained model can be exported either way")
    e.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory to write")
    e.add_argument("--golden", nargs="+", metavar="IMAGE", default=None,
                   help="image files to copy into BUNDLE_DIR/golden with their expected tensors and outputs")
    e.add_argument("--evaluate", action="store_true",
                   help="evaluate on the labelled set below and put the metrics in the manifest")
    e.add_argument("--name", default=None, help="bundle name (default: from the checkpoint's config)")
    add_eval_set_flags(e)

    v = sub.add_parser("eval", help="evaluate a bundle or checkpoint on Fashion-MNIST or labelled folders",
                       description="Linear probe, weighted kNN (k=20, T=0.07), NMI/ARI of k-means and of "
                                   "prototype assignments: Fashion-MNIST test against train, or the images of "
                                   "--eval-test-dir against those of --eval-train-dir (one subfolder per class, "
                                   "the same classes in both). Prints JSON.",
                       epilog="example: python -m swav_train eval runs/photos/bundle "
                              "--eval-train-dir ~/labelled/train --eval-test-dir ~/labelled/test")
    v.add_argument("target", metavar="BUNDLE_OR_CHECKPOINT", help="a bundle directory or a checkpoint.pt")
    v.add_argument("--out", metavar="FILE", default=None,
                   help="also write the JSON here (default: RUN_DIR/eval.json for a checkpoint)")
    v.add_argument("--no-update-manifest", action="store_true",
                   help="do not store the results in the bundle's manifest.json (for a checkpoint: "
                        "RUN_DIR/bundle/manifest.json, when present)")
    add_eval_set_flags(v)

    i = sub.add_parser("import", help="write a bundle from a released SwAV checkpoint (the paper's models)",
                       description="Read CHECKPOINT (the official SwAV releases: flat 'module.' state_dicts, "
                                   "training checkpoints with state_dict/epoch/optimizer, ResNet-50 and the "
                                   "wide w2/w4/w5 variants; or a backbone-only torchvision ResNet-50 such as the "
                                   "torch.hub 'resnet50' entry) with torch.load(weights_only=True), map every key "
                                   "strictly, and write BUNDLE_DIR. Preprocessing: the official evaluation "
                                   "transform (Resize 256, CenterCrop 224, mean 0.485 0.456 0.406, std 0.228 "
                                   "0.224 0.225). onnxruntime is checked against PyTorch (max abs diff <= 1e-4).",
                       epilog="example: python -m swav_train import swav_800ep_pretrain.pth.tar --out models/swav-rn50")
    i.add_argument("checkpoint", metavar="CHECKPOINT", help="the .pth.tar / .pth file")
    i.add_argument("--out", required=True, metavar="BUNDLE_DIR", help="bundle directory to write")
    i.add_argument("--name", default=None, help="bundle name (default: swav-<arch>)")
    i.add_argument("--arch", choices=["resnet50", "resnet50w2", "resnet50w4", "resnet50w5"], default=None,
                   help="fail unless the file holds this architecture (default: take the width from the file)")
    i.add_argument("--fp16", action="store_true",
                   help="store the weights as float16 (half the file; checked against float32, cosine >= 0.999)")
    i.add_argument("--external-data", choices=["auto", "always", "never"], default="auto",
                   help="keep the weights in BUNDLE_DIR/model.onnx.data: auto does so past 1 GiB of weights")
    i.add_argument("--cluster-images", metavar="DIR", default=None,
                   help="for a file without prototypes: images whose embeddings k-means groups into --clusters "
                        "centroids, which /v1/clusters then uses")
    i.add_argument("--clusters", type=int, default=0, metavar="K", help="number of k-means centroids")
    i.add_argument("--resize", type=int, default=256, help="shorter side after resizing (default 256)")
    i.add_argument("--crop", type=int, default=224, help="centre crop size, the model's input (default 224)")
    return parser


def cmd_train(args) -> int:
    from swav_train.train import train

    cfg = config_from_args(args)
    resume: str | bool = args.resume if args.resume else not args.no_resume
    result = train(cfg, args.out, resume=resume)
    if result.bundle_dir is not None:
        print(f"done: {result.epochs_done} epochs; bundle at {result.bundle_dir}")
    return 0


def cmd_export(args) -> int:
    from swav_train import checkpoint, evaluate, export

    source = Path(args.checkpoint)
    if source.is_dir():
        from swav_train.bundle_model import model_from_bundle

        model, cfg, manifest = model_from_bundle(source)
        dataset = manifest.get("dataset") if isinstance(manifest.get("dataset"), dict) else None
    else:
        model, cfg, _ = checkpoint.model_from_checkpoint(source)
        dataset = None
    if args.name:
        cfg = cfg.replace(name=args.name)
    if args.image_size is not None or args.resize_size is not None:
        size = args.image_size if args.image_size is not None else cfg.image_size
        resize = args.resize_size if args.resize_size is not None else (
            size if args.image_size is not None else cfg.resize_size)
        # 'auto' resolves the stem from image_size: pin the model's actual stem first, so that the
        # recorded config still builds this model.
        stem = ("small" if cfg.small_stem else "imagenet") if cfg.stem == "auto" else cfg.stem
        cfg = cfg.replace(image_size=size, resize_size=resize, stem=stem)
    if args.embedding_layer is not None:
        cfg = cfg.replace(embedding_layer=args.embedding_layer)
        model.embedding_layer = args.embedding_layer
    evaluation = None
    if args.evaluate:
        eval_set = eval_set_from_args(evaluate.EvalSet.of(cfg.to_dict()), args)
        evaluation = evaluate.evaluate_torch(model, cfg, args.eval_train_size, args.eval_test_size, eval_set)
    golden = [Path(g) for g in args.golden] if args.golden else None
    for g in golden or []:
        if not g.is_file():
            raise FileNotFoundError(f"golden image {g} does not exist")
    out = export.export_bundle(model, cfg, args.out, dataset=dataset, evaluation=evaluation, golden_files=golden)
    print(f"bundle written to {out}")
    return 0


def cmd_eval(args) -> int:
    from swav_train import checkpoint, evaluate, export

    target = Path(args.target)
    if target.is_dir():
        manifest_path = target / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{target} is a directory without manifest.json (not a bundle)")
        manifest = json.loads(manifest_path.read_text())
        eval_set = eval_set_from_args(evaluate.EvalSet.of(manifest.get("training") or {}), args)
        result = evaluate.evaluate_bundle(target, eval_set, args.eval_train_size, args.eval_test_size)
        if not args.no_update_manifest:
            export.record_evaluation(target, result)
        out = Path(args.out) if args.out else None
    else:
        model, cfg, _ = checkpoint.model_from_checkpoint(target)
        eval_set = eval_set_from_args(evaluate.EvalSet.of(cfg.to_dict()), args)
        result = evaluate.evaluate_torch(model, cfg, args.eval_train_size, args.eval_test_size, eval_set)
        out = Path(args.out) if args.out else target.parent / "eval.json"
        run_bundle = target.parent / "bundle"
        if (run_bundle / "manifest.json").is_file() and not args.no_update_manifest:
            export.record_evaluation(run_bundle, result)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.write_text(text + "\n")
    print(text)
    print("evaluation: " + evaluate.summary(result), file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from swav_train.importers import ImportOptions, import_checkpoint

    widen = {"resnet50": 1, "resnet50w2": 2, "resnet50w4": 4, "resnet50w5": 5}.get(args.arch)
    options = ImportOptions(name=args.name, widen=widen, fp16=args.fp16, external_data=args.external_data,
                            cluster_images=args.cluster_images, clusters=args.clusters, resize=args.resize,
                            crop=args.crop)
    manifest = import_checkpoint(args.checkpoint, args.out, options)
    extra = f" + {manifest['model_data']['file']}" if manifest["model_data"] else ""
    print(f"bundle written to {args.out} (model.onnx{extra}, manifest.json)")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Our own messages at INFO; the ONNX exporter's chatter only from WARNING up.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("swav_train").setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    from swav_train.checkpoint import CheckpointError
    from swav_train.data import DataError
    from swav_train.distributed import DistributedSetupError
    from swav_train.export import ExportError
    from swav_train.guard import NativeCrashError, TrialStepError
    from swav_train.train import NonFiniteLossError

    try:
        commands = {"train": cmd_train, "export": cmd_export, "eval": cmd_eval, "import": cmd_import}
        return commands[args.command](args)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except NativeCrashError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except TrialStepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, ExportError, CheckpointError, DistributedSetupError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
