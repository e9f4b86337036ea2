"""--time-budget-min: the run measures its speed, fixes its length in steps, and scales the schedule to it."""

import json

import pytest
import torch

from conftest import make_images, tiny_config
from swav_train import checkpoint, cli
from swav_train import train as train_mod
from swav_train.config import ConfigError
from swav_train.optim import learning_rate


def test_schedule_keeps_the_epoch_rule_without_a_budget():
    cfg = tiny_config(epochs=5, warmup_epochs=2)
    s = train_mod.Schedule.of(cfg, iters_per_epoch=7)
    assert (s.total_steps, s.warmup_steps, s.fixed) == (35, 14, True)
    for step in range(35):
        assert s.lr(step) == pytest.approx(learning_rate(step, 7, 5, 2, cfg.base_lr, cfg.final_lr, cfg.start_warmup))
    assert not s.done(33) and s.done(34)


def test_schedule_under_a_budget_fits_the_measured_speed():
    cfg = tiny_config(epochs=10, warmup_epochs=1, time_budget_min=1.0)
    s = train_mod.Schedule.of(cfg, iters_per_epoch=50)
    assert not s.fixed and not s.done(10_000)
    s.observe(train_mod.PROBE_STEPS - 2, 1.0, torch.device("cpu"))  # too early to decide
    assert not s.fixed
    # 20 steps in 2 s: 600 steps fit in a minute; warmup keeps its share (1 of 10 epochs)
    s.observe(train_mod.PROBE_STEPS - 1, 2.0, torch.device("cpu"))
    assert (s.fixed, s.total_steps, s.warmup_steps) == (True, 600, 60)
    assert s.lr(599) == pytest.approx(cfg.final_lr, rel=0.01) and s.lr(60) == pytest.approx(cfg.base_lr)
    assert s.done(599) and not s.done(598)


def test_budgeted_run_stops_on_time_finishes_and_refuses_to_resume(tmp_path):
    folder = make_images(tmp_path / "images", 32)
    tiny_config(data_dir=str(folder), epochs=3, warmup_epochs=1, log_every=1).save(tmp_path / "tiny.json")
    run = tmp_path / "run"
    # Through the command line, as the README shows it.
    assert cli.main(["train", "--config", str(tmp_path / "tiny.json"), "--time-budget-min", "0.05",
                     "--out", str(run)]) == 0
    cfg = tiny_config(data_dir=str(folder), epochs=3, warmup_epochs=1, log_every=1, time_budget_min=0.05)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x for x in steps if x["kind"] == "train"]
    last = train_steps[-1]
    # It ran at least the 20 probe steps, to the length it fixed.
    assert last["step"] + 1 >= train_mod.PROBE_STEPS
    if last["step"] + 1 > train_mod.PROBE_STEPS:
        # The schedule, scaled to that length, ended at final_lr. (On a machine so loaded that only
        # the probe steps fit, the last step's rate was set before the length was known.)
        assert cfg.final_lr <= last["lr"] < cfg.final_lr + 0.05 * (cfg.base_lr - cfg.final_lr)
    assert (run / "bundle" / "model.onnx").is_file()
    ckpt = checkpoint.load(run / "checkpoint.pt")
    assert ckpt["epoch"] == -(-(last["step"] + 1) // 4)  # 32 images / batch 8 = 4 steps per epoch
    with pytest.raises(ConfigError, match="not resumable"):
        train_mod.train(cfg, run)


def test_schedule_over_a_set_number_of_steps():
    cfg = tiny_config(epochs=14, warmup_epochs=2, steps=2796)
    s = train_mod.Schedule.of(cfg, iters_per_epoch=234)
    # The shares of --epochs, as a budgeted run that fixed 2796 steps had them.
    assert (s.fixed, s.total_steps, s.warmup_steps, s.epochs()) == (True, 2796, 399, 12)
    assert s.done(2795) and not s.done(2794)
    with pytest.raises(ConfigError, match="time-budget"):
        tiny_config(steps=10, time_budget_min=1.0)


def test_run_of_set_steps_ends_mid_epoch_finishes_and_resumes_to_the_same_end(tmp_path):
    folder = make_images(tmp_path / "images", 32)
    tiny_config(data_dir=str(folder), epochs=3, warmup_epochs=1, log_every=1).save(tmp_path / "tiny.json")
    run = tmp_path / "run"
    # 10 steps at 4 steps per epoch: two whole epochs and half of a third.
    assert cli.main(["train", "--config", str(tmp_path / "tiny.json"), "--steps", "10", "--out", str(run)]) == 0
    cfg = tiny_config(data_dir=str(folder), epochs=3, warmup_epochs=1, log_every=1, steps=10)
    train_steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x for x in train_steps if x["kind"] == "train"]
    assert [x["step"] for x in train_steps] == list(range(10))
    # Warmup and cosine over the 10 steps, warmup taking its 1-of-3-epochs share (3 steps).
    for x in train_steps:
        assert x["lr"] == pytest.approx(learning_rate(x["step"], 1, 10, 3, cfg.base_lr, cfg.final_lr, cfg.start_warmup))
    assert train_steps[-1]["lr"] < cfg.final_lr + 0.1 * (cfg.base_lr - cfg.final_lr)
    assert (run / "bundle" / "model.onnx").is_file()
    assert checkpoint.load(run / "checkpoint.pt")["epoch"] == 3
    # Resuming a finished run trains no further step.
    train_mod.train(cfg, run, resume=True)
    after = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(x["step"] for x in after if x["kind"] == "train") == 9
