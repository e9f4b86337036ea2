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
    assert c.stem_stride == 2 and c.width == 32 and c.tensor_augment and c.base_lr == 2.4
    assert c.embedding_layer == 3 and config.preset("imagenet").embedding_layer == 4


@pytest.mark.parametrize("change,field", [({"channels": 2}, "channels"), ({"nmb_crops": (2,)}, "size_crops"),
                                          ({"epsilon": 0}, "epsilon"), ({"crops_for_assign": (0, 9)}, "crops_for_assign"),
                                          ({"mean": (0.5,)}, "mean"), ({"precision": "fp8"}, "precision"),
                                          ({"resize_size": 100}, "resize_size"),
                                          ({"embedding_layer": 2}, "embedding_layer")])
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


@pytest.mark.parametrize("values, field, why", [
    ({"epochs": "3"}, "epochs", "must be an integer, not str"),
    ({"batch_size": 64.5}, "batch_size", "must be an integer, not float"),
    ({"batch_size": 64.0}, "batch_size", "must be an integer, not float"),
    ({"width": True}, "width", "must be an integer, not bool"),
    ({"base_lr": "0.6"}, "base_lr", "must be a number, not str"),
    ({"progress": 1}, "progress", "must be true or false, not int"),
    ({"arch": 18}, "arch", "must be a string, not int"),
    ({"nmb_crops": 2}, "nmb_crops", "must be a list"),
    ({"nmb_crops": [2, "6"]}, r"nmb_crops\[1\]", "must be an integer, not str"),
    ({"mean": [None, 0.4, 0.4]}, r"mean\[0\]", "must be a number, not NoneType"),
])
def test_json_values_are_type_checked_against_the_fields(tmp_path, values, field, why):
    (tmp_path / "c.json").write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=rf"^{field}=.*: {why}"):
        config.load(tmp_path / "c.json")


def test_ints_are_taken_for_floats_and_lists_for_tuples(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"base_lr": 1, "final_lr": 0, "nmb_crops": [2, 4],
                                                 "size_crops": [28, 16], "min_scale_crops": [1, 0.1],
                                                 "max_scale_crops": [1, 0.5], "mean": [0, 0, 0]}))
    c = config.load(tmp_path / "c.json")
    assert (c.base_lr, c.final_lr, c.min_scale_crops, c.mean) == (1.0, 0.0, (1.0, 0.1), (0.0, 0.0, 0.0))
    assert type(c.base_lr) is float and type(c.min_scale_crops[0]) is float and c.nmb_crops == (2, 4)
    # What is saved reads back equal, and keeps the float type.
    c.save(tmp_path / "back.json")
    assert config.load(tmp_path / "back.json") == c
    assert json.loads((tmp_path / "back.json").read_text())["base_lr"] == 1.0
    # The dataclass itself checks too, whatever built it.
    with pytest.raises(ConfigError, match="epochs="):
        TrainConfig(epochs=3.5)
