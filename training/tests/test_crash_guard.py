"""The crash guard (issue 20): a trial step that dies by a signal switches the run to the contiguous
memory format, or stops it before any step with a clear message; it never crashes the run.

The child's death is simulated: `guard.child_command` is replaced by a Python child that kills
itself with a signal (when the config asks for channels_last, or always) before doing the real
trial step. The runs go through `cli.main`, in this process."""

from __future__ import annotations

import json
import signal
import sys
import textwrap

import pytest
import torch

from conftest import make_images, tiny_config
from swav_train import cli, guard
from swav_train.model import SwAVModel, channels_last_unsafe_on_cpu, to_channels_last

DIE = textwrap.dedent("""
    import json, os, signal, sys
    config, device, die_when = sys.argv[1], sys.argv[2], sys.argv[3]
    channels_last = json.load(open(config))["channels_last"]
    with open(sys.argv[4], "a") as log:
        log.write(json.dumps(channels_last) + "\\n")
    if die_when == "always" or (die_when == "channels_last" and channels_last):
        print("double free or corruption (!prev)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), int(sys.argv[5]))
    if die_when == "error":
        sys.exit("RuntimeError: simulated failure in the trial step")
    from swav_train.guard import main
    sys.exit(main([config, "--device", device]))
""")


@pytest.fixture
def simulate(monkeypatch, tmp_path):
    """simulate(die_when, signum) -> the path of the log of the trials' channels_last values."""
    def install(die_when: str, signum: int = signal.SIGSEGV):
        trials = tmp_path / "trials.jsonl"
        monkeypatch.setattr(guard, "child_command", lambda path, device: [
            sys.executable, "-c", DIE, str(path), device, die_when, str(trials), str(int(signum))])
        return trials
    return install


def _train_args(tmp_path, **changes) -> list[str]:
    folder = make_images(tmp_path / "images", 16)
    cfg = tmp_path / "tiny.json"
    tiny_config(data_dir=str(folder), epochs=1, warmup_epochs=0, crash_guard=True, **changes).save(cfg)
    return ["train", "--config", str(cfg), "--out", str(tmp_path / "run")]


def _trials(path) -> list[bool]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_death_with_channels_last_switches_the_run_to_contiguous(tmp_path, simulate, caplog):
    trials = simulate("channels_last", signal.SIGSEGV)
    assert cli.main(_train_args(tmp_path, channels_last=True)) == 0
    assert _trials(trials) == [True, False]
    warning = " ".join(r.getMessage() for r in caplog.records if r.name == "swav_train.guard")
    assert "died by signal 11 (SIGSEGV)" in warning and "--no-channels-last" in warning
    assert "trains with channels_last off" in warning
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["channels_last"] is False
    assert json.loads((run / "bundle" / "manifest.json").read_text())["parity"]["max_abs_diff"] <= 1e-4
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 2


@pytest.mark.parametrize("channels_last", [True, False])
def test_death_in_every_format_stops_before_the_first_step(tmp_path, simulate, capsys, channels_last):
    trials = simulate("always", signal.SIGABRT)
    assert cli.main(_train_args(tmp_path, channels_last=channels_last)) == 4
    assert _trials(trials) == ([True, False] if channels_last else [False])
    err = capsys.readouterr().err
    assert "died by signal 6 (SIGABRT)" in err and "double free or corruption" in err
    if channels_last:
        assert "with --no-channels-last" in err
    run = tmp_path / "run"
    assert not (run / "checkpoint.pt").exists() and not (run / "metrics.jsonl").exists()


def test_an_ordinary_failure_of_the_trial_is_reported_not_retried(tmp_path, simulate, capsys):
    trials = simulate("error")
    assert cli.main(_train_args(tmp_path, channels_last=True)) == 1
    assert _trials(trials) == [True]
    err = capsys.readouterr().err
    assert "exited with status 1" in err and "simulated failure in the trial step" in err


def test_no_crash_guard_runs_no_trial(tmp_path, simulate):
    trials = simulate("always")
    assert cli.main(_train_args(tmp_path) + ["--no-crash-guard"]) == 0
    assert not trials.exists()


def test_the_real_trial_step_runs_in_a_child(tmp_path):
    cfg = tiny_config(channels_last=True, width=8, size_crops=(64, 32), image_size=64, resize_size=64)
    trial = guard.run_trial(cfg, "cpu")
    assert (trial.returncode, trial.signal) == (0, None), trial.output
    assert guard.check(cfg, "cpu") == cfg


def test_narrow_strided_1x1_convolutions_stay_contiguous_on_cpu_with_equal_results():
    torch.manual_seed(0)
    cfg = tiny_config(width=8, size_crops=(64, 32), image_size=64, resize_size=64)
    model = SwAVModel.from_config(cfg).train()
    reference = SwAVModel.from_config(cfg).train()
    reference.load_state_dict(model.state_dict())
    kept = to_channels_last(model, torch.device("cpu"))
    # width 8: only layer2's downsample sees 8 channels; layer3's and layer4's see 16 and 32
    assert kept == ["backbone.layer2.0.downsample.0"]
    conv = model.backbone.layer2[0].downsample[0]
    assert conv.weight.stride() == (8, 1, 1, 1)  # contiguous, not the ambiguous 1x1 channels_last strides
    assert model.backbone.layer3[0].downsample[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert to_channels_last(SwAVModel.from_config(cfg.replace(width=16)), torch.device("cpu")) == []

    crops = [torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64), torch.rand(4, 3, 32, 32)]
    out = model([c.contiguous(memory_format=torch.channels_last) for c in crops])
    want = reference(crops)
    for got, exp in zip(out, want):
        torch.testing.assert_close(got, exp, rtol=1e-3, atol=2e-4)  # train-mode BatchNorm amplifies rounding
    (out[0].sum() + out[1].sum()).backward()
    (want[0].sum() + want[1].sum()).backward()
    grad, want_grad = conv.weight.grad, reference.backbone.layer2[0].downsample[0].weight.grad
    assert float((grad - want_grad).norm() / want_grad.norm()) < 1e-2


def test_which_convolutions_count_as_unsafe():
    conv = torch.nn.Conv2d
    assert channels_last_unsafe_on_cpu(conv(8, 16, 1, stride=2))
    assert channels_last_unsafe_on_cpu(conv(3, 16, 1, stride=2))
    assert not channels_last_unsafe_on_cpu(conv(16, 32, 1, stride=2))
    assert not channels_last_unsafe_on_cpu(conv(8, 16, 1, stride=1))
    assert not channels_last_unsafe_on_cpu(conv(8, 16, 3, stride=2))
    assert not channels_last_unsafe_on_cpu(torch.nn.Linear(8, 16))
