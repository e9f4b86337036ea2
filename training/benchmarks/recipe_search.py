"""Fashion-MNIST recipes compared at the same wall-clock budget, by the full-test-set evaluation.

All recipes train at once, one torch thread each, so each gets the same share of the machine for
the same --minutes (the trainer's --time-budget-min: it measures its speed over the first steps and
fixes how many steps fit, with the warmup and cosine decay scaled to them). Each then evaluates on
the full Fashion-MNIST test set against the full training set, and the table compares them, for
the embedding and for the normalised projection.

    .venv/bin/python training/benchmarks/recipe_search.py --out runs/search --minutes 30
    .venv/bin/python training/benchmarks/recipe_search.py --out runs/search --table-only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The previous default's augmentation (models/fashion-mnist before issue 13): milder crops and a
# blur that does not erase a 28 px image.
MILD = ["--min-scale-crops", "0.3", "0.1", "--max-scale-crops", "1.0", "0.4", "--blur-sigma", "0.1", "0.5"]
S2W32 = ["--width", "32", "--stem", "small-stride2"]
# name -> (what it changes, flags on top of --preset fashion-mnist)
RECIPES: dict[str, tuple[str, list[str]]] = {
    "s1-w16": ("the preset before issue 13: width 16, stride-1 stem, crops 0.14-1 / 0.05-0.14, blur sigma "
               "0.1-2, K 300, lr 0.6, batch 256", ["--width", "16", "--stem", "small"]),
    "s2-w32": ("width 32, stride-2 stem (the calibration run's net)", S2W32),
    "s2-w32-mild": ("s2-w32 with milder crops (0.3-1 / 0.1-0.4) and blur (sigma 0.1-0.5)", S2W32 + MILD),
    "s2-w32-mild-bf16": ("s2-w32-mild under bf16 autocast", S2W32 + MILD + ["--precision", "bf16"]),
    "s2-w32-mild-k1000": ("s2-w32-mild with K = 1000 prototypes", S2W32 + MILD + ["--nmb-prototypes", "1000"]),
    "s2-w32-mild-lr2.4": ("s2-w32-mild with lr 2.4 -> 0.0024", S2W32 + MILD + ["--base-lr", "2.4", "--final-lr", "0.0024"]),
    "s2-w32-mild-b128": ("s2-w32-mild with batch 128 and lr 0.3 (the linear scaling rule)",
                         S2W32 + MILD + ["--batch-size", "128", "--base-lr", "0.3", "--final-lr", "0.0003"]),
}


def command(name: str, out: Path, minutes: float) -> list[str]:
    # A budget of one or two epochs: the prototypes stay frozen for about the share of the run they
    # are in a full-length one (the preset's 313 steps of about 30 epochs), and the queue starts
    # after the first epoch rather than the third.
    flags = RECIPES[name][1]
    batch = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else 256
    return [sys.executable, "-m", "swav_train", "train", "--preset", "fashion-mnist", *RECIPES[name][1],
            "--freeze-prototypes-niters", str(20 * 256 // batch), "--epoch-queue-starts", "1",
            "--time-budget-min", str(minutes), "--threads", "1", "--no-progress", "--log-every", "50", "--no-crash-guard",
            "--out", str(out / name)]


def table(out: Path, names: list[str]) -> None:
    print(f"{'recipe':20s} {'steps':>6s} {'epochs':>6s} {'img/s':>6s} {'linear':>7s} {'kNN':>6s} {'NMI':>6s} "
          f"{'projkNN':>7s} {'projNMI':>7s} {'p>0.5':>6s} {'purity10':>8s}")
    for name in names:
        run = out / name
        ev_path = run / "eval.json"
        if not ev_path.exists():
            print(f"{name:20s} (no eval.json)")
            continue
        ev = json.loads(ev_path.read_text())
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        train = [x for x in lines if x["kind"] == "train"]
        cfg = json.loads((run / "config.json").read_text())
        steps = train[-1]["step"] + 1
        epochs = steps * cfg["batch_size"] / 60000
        rate = sum(x["images_per_s"] for x in train[-10:]) / len(train[-10:])
        pa = ev["prototype_assignment"]
        print(f"{name:20s} {steps:6d} {epochs:6.2f} {rate:6.1f} {ev['linear_probe_top1']:7.4f} "
              f"{ev['knn_top1']:6.4f} {ev['kmeans_embedding']['nmi']:6.4f} {ev['projection']['knn_top1']:7.4f} "
              f"{ev['projection']['kmeans']['nmi']:7.4f} {pa['top_probability_above_half']:6.3f} "
              f"{pa['largest_prototypes']['mean_purity']:8.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        args.out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        with contextlib.ExitStack() as logs:
            procs = {}
            for name in args.recipes:
                print(f"{name}: {RECIPES[name][0]}\n  {' '.join(command(name, args.out, args.minutes))}", flush=True)
                log = logs.enter_context(open(args.out / f"{name}.log", "w"))
                procs[name] = subprocess.Popen(command(name, args.out, args.minutes), stdout=log,
                                               stderr=subprocess.STDOUT, env=env)
            t0 = time.time()
            for name, p in procs.items():
                rc = p.wait()
                print(f"{name}: exit {rc} after {(time.time() - t0) / 60:.1f} min", flush=True)
    table(args.out, args.recipes)


if __name__ == "__main__":
    main()
