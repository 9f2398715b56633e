"""Configuration: built-in files, overrides, and errors that name the bad key."""

from __future__ import annotations

import pytest

from stemdist import config as cfg
from stemdist.errors import ConfigError


def test_builtin_configs_load_and_differ_as_documented():
    default, reference, smoke = cfg.load("default"), cfg.load("reference"), cfg.load("smoke")
    assert default == cfg.Config()  # the YAML file says what the code's defaults are
    assert reference.data.borders == "copy" and default.data.borders == "reflect"
    assert (reference.train.mean_weight, reference.train.sum_weight) == (0.02, 0.01)
    assert (reference.train.cycles, reference.train.epochs, reference.train.warmup_epochs) == (10, 15, 4)
    assert (reference.train.batch_size, reference.train.lr, reference.model.base_width) == (32, 1e-3, 24)
    assert smoke.train.cycles * smoke.train.epochs <= 6
    # the reference runs its own epochs and takes the last cycle as it is; the default trains small scans longer
    assert (reference.train.min_samples, reference.output.fuse) == (0, False) and default.train.min_samples == "auto"
    assert smoke.train.min_samples == 0 and reference.model.head == "square"


def test_auto_sizes_resolve_from_the_counts_per_pattern_and_explicit_sizes_stay():
    default = cfg.load("default")
    assert (default.model.base_width, default.train.warmup_epochs) == ("auto", "auto")
    low, said = cfg.resolve_auto(default, 48.0)
    assert (low.model.base_width, low.train.warmup_epochs) == (16, 2) and "48 counts per pattern, below 85" in said
    assert low.train.min_samples == 30000 and "train.min_samples 30000" in said
    high, said = cfg.resolve_auto(default, cfg.LOW_COUNTS)
    assert (high.model.base_width, high.train.warmup_epochs) == (24, 4) and "at or above 85" in said
    assert high.train.min_samples == 60000
    mixed, said = cfg.resolve_auto(cfg.load("default", cfg.parse_overrides(["model.base_width=32"])), 10.0)
    assert (mixed.model.base_width, mixed.train.warmup_epochs) == (32, 2) and said.startswith("train.warmup_epochs 2")
    reference = cfg.load("reference")
    assert cfg.resolve_auto(reference, 10.0) == (reference, "")  # the reference keeps its own sizes


def test_overrides_are_typed():
    c = cfg.load("smoke", cfg.parse_overrides(["train.epochs=7", "data.tile=null", "train.lr=5e-4",
                                                "hardware.compile=true", "data.borders=copy"]))
    assert (c.train.epochs, c.data.tile, c.train.lr, c.hardware.compile, c.data.borders) == (7, None, 5e-4, True,
                                                                                             "copy")


@pytest.mark.parametrize("pairs,needle", [
    (["train.epoch=3"], "unknown key train.epoch"),
    (["trian.epochs=3"], "unknown section 'trian'"),
    (["train.epochs=0"], "train.epochs must be >= 1"),
    (["train.epochs=2.5"], "train.epochs must be an integer"),
    (["data.borders=wrap"], "data.borders must be one of reflect, copy"),
    (["train.lr=fast"], "train.lr must be a number"),
    (["train.lr=-1"], "train.lr must be > 0"),
    (["hardware.compile=maybe"], "hardware.compile must be true or false"),
    (["epochs=3"], "--set expects section.key=value"),
    (["output.fuse_by=pixels"], "output.fuse_by must be one of bright_field, regions"),
    (["model.head=softplus"], "model.head must be one of square, mean_exp"),
    (["train.relative_weight=2"], "train.relative_weight must be <= 1"),
    (["train.min_samples=-5"], "train.min_samples: must be an integer >= 0 or auto; got -5"),
    (["train.grad_clip=-1"], "train.grad_clip must be >= 0"),
    (["train.max_epochs=0"], "train.max_epochs must be >= 1"),
    (["model.base_width=wide"], "model.base_width: must be an integer >= 1 or auto; got 'wide'"),
    (["model.base_width=0"], "model.base_width: must be an integer >= 1 or auto; got 0"),
    (["train.warmup_epochs=-1"], "train.warmup_epochs: must be an integer >= 0 or auto; got -1"),
    (["train.average_epochs=0"], "train.average_epochs must be >= 1"),
    (["train.holdout=0.5"], "train.holdout must be <= 0.25"),
    (["train.holdout=-0.1"], "train.holdout must be >= 0"),
    (["train.ema=0.99"], "train.ema 0.99 and train.average_epochs 4 are two ways to average"),
    (["train.crossfit=2", "train.ensemble=2"], "train.crossfit 2 trains one network per fold of the positions; it "
                                               "does not combine with train.ensemble"),
    (["train.crossfit=3", "train.holdout=0.1"], "does not combine with train.holdout"),
    (["train.crossfit=0"], "train.crossfit must be >= 1"),
])
def test_bad_values_name_the_key(pairs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        cfg.load(None, cfg.parse_overrides(pairs))


def test_bad_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  widht: 3\n")
    with pytest.raises(ConfigError, match="unknown key model.widht"):
        cfg.load(bad)
    with pytest.raises(ConfigError, match="not found"):
        cfg.load(tmp_path / "missing.yaml")


def test_epochs_given_as_a_flag_are_the_epochs_run():
    """--epochs N (or epochs=N in Python) means N epochs: train.min_samples, which lengthens a small scan's
    cycles, is off; --set train.epochs=N keeps it."""
    c = cfg.apply(cfg.load("default"), cfg.shortcut_overrides({"epochs": 2}))
    assert (c.train.epochs, c.train.min_samples) == (2, 0)
    c = cfg.load("default", cfg.parse_overrides(["train.epochs=2"]))
    assert (c.train.epochs, c.train.min_samples) == (2, "auto")


def test_max_epochs_caps_what_min_samples_adds_and_keeps_the_epochs_given():
    """676 positions (a 26 x 26 scan): min_samples 60000 asks 89 epochs, max_epochs 60 keeps 60; the epochs
    given stay when larger; 60 by default, null lifts it; a large scan is untouched."""
    from stemdist.train.trainer import cycle_epochs

    capped = cfg.load("default", {"train": {"min_samples": 60000}}).train
    assert capped.max_epochs == 60 and cycle_epochs(capped, 676) == 60
    train = cfg.load("default", cfg.parse_overrides(["train.min_samples=60000", "train.max_epochs=null"])).train
    assert train.max_epochs is None and cycle_epochs(train, 676) == 89
    assert cycle_epochs(capped, 676) == 60 and cycle_epochs(capped, 1024) == 59
    assert cycle_epochs(capped, 65536) == train.epochs == 15
    assert cycle_epochs(capped.model_copy(update={"epochs": 80}), 676) == 80
    assert cycle_epochs(capped.model_copy(update={"max_epochs": 5}), 676) == 15
