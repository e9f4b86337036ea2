import json

import pytest

from swav_train import cli, config
from swav_train.config import ConfigError, TrainConfig


def test_defaults_are_the_papers():
    c = config.preset("imagenet")
    assert (c.nmb_crops, c.size_crops, c.min_scale_crops, c.max_scale_crops) == ((2, 6), (224, 96), (0.14, 0.05), (1.0, 0.14))
    assert (c.base_lr, c.final_lr, c.warmup_epochs, c.epochs, c.batch_size) == (4.8, 0.0048, 10, 100, 64)
    assert (c.nmb_prototypes, c.epsilon, c.sinkhorn_iterations, c.temperature) == (3000, 0.05, 3, 0.1)
    assert (c.freeze_prototypes_niters, c.queue_length, c.epoch_queue_starts) == (313, 0, 15)
    assert (c.hidden_mlp, c.feat_dim, c.weight_decay, c.momentum, c.trust_coefficient) == (2048, 128, 1e-6, 0.9, 0.001)


def test_fashion_mnist_preset():
    c = config.preset("fashion-mnist")
    assert c.channels == 1 and c.nmb_crops == (2, 4) and c.size_crops == (28, 16) and c.small_stem


@pytest.mark.parametrize("change,field", [({"channels": 2}, "channels"), ({"nmb_crops": (2,)}, "size_crops"),
                                          ({"epsilon": 0}, "epsilon"), ({"crops_for_assign": (0, 9)}, "crops_for_assign"),
                                          ({"mean": (0.5,)}, "mean"), ({"precision": "fp8"}, "precision"),
                                          ({"resize_size": 100}, "resize_size")])
def test_validation_names_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**change)


def test_json_round_trip_and_unknown_keys(tmp_path):
    c = config.preset("fashion-mnist")
    c.save(tmp_path / "c.json")
    assert config.load(tmp_path / "c.json") == c
    (tmp_path / "bad.json").write_text(json.dumps({"epoch": 3}))
    with pytest.raises(ConfigError, match="epoch"):
        config.load(tmp_path / "bad.json")


def test_queue_length_made_divisible():
    c = TrainConfig(queue_length=3840, batch_size=100)
    assert c.effective_queue_length(world_size=3) == 3600


def test_cli_flags_override_preset_and_config(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 7, "width": 8}))
    args = cli.build_parser().parse_args(["train", "--preset", "fashion-mnist", "--config", str(tmp_path / "c.json"),
                                          "--out", "x", "--width", "32", "--nmb-crops", "2", "2", "--no-progress"])
    c = cli.config_from_args(args)
    assert (c.epochs, c.width, c.nmb_crops, c.progress, c.channels) == (7, 32, (2, 2), False, 1)
    args = cli.build_parser().parse_args(["train", "--out", "x", "--data-dir", "/some/dir"])
    assert cli.config_from_args(args).dataset == "folder"


def test_help_documents_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["train", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ("--freeze-prototypes-niters", "--queue-length", "torch.distributed.run", "fashion-mnist preset"):
        assert name in text
    assert "entropic regularisation" in text
