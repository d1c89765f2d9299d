"""Every config file composes and builds its model (on the meta device); the model config contract of build_model."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import chanzoo
from chanzoo.configs import CONFIG_DIR
from chanzoo.run import build_model

MODEL_FILES = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml") if not p.name.startswith("_"))
EXPERIMENT_FILES = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _compose(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name, overrides=overrides)
        if "root" in cfg.get("data", {}) and OmegaConf.is_missing(cfg.data, "root"):  # a dataset folder is required
            cfg = compose(config_name, overrides=[*overrides, "data.root=/data/not-read-by-this-test"])
    return cfg


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_built(cfg, model: torch.nn.Module) -> None:
    """The built model is the one the config names, with the config's classifier width."""
    assert model.pretrained_cfg["architecture"] == timm.models.get_arch_name(cfg.model.name)
    # num_classes null (an image folder counts its classes at run time): the architecture's own default until then
    expected = cfg.model.num_classes if cfg.model.num_classes is not None else model.pretrained_cfg["num_classes"]
    assert model.num_classes == expected
    assert all(p.device.type == "meta" for p in model.parameters())


def test_every_config_file_is_covered() -> None:
    assert {"small_cnn", "resnet18", "rgt_s_x2", "histoformer", "channelvit_tiny_p8"} <= set(MODEL_FILES)
    assert len(EXPERIMENT_FILES) >= 6


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_config_builds_its_model(name: str) -> None:
    cfg = _compose("config", [f"model={name}"])
    assert cfg.model._target_ == "chanzoo.create_model"
    assert set(cfg.accel) == {"compile", "compile_mode", "channels_last"}
    with torch.device("meta"):
        model = build_model(cfg.model)
    _check_built(cfg, model)


@pytest.mark.parametrize("name", EXPERIMENT_FILES)
def test_experiment_config_builds_its_model(name: str) -> None:
    # the architecture only: pretrained weights (the dense protocols start from ImageNet ones) need the network
    cfg = _compose("config", [f"experiment={name}", "model.pretrained=false"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    _check_built(cfg, model)


@pytest.mark.parametrize("config_name", ["config", "eval", "profile"])
def test_any_timm_name_builds_without_a_config_file(config_name: str) -> None:
    assert not (CONFIG_DIR / "model" / "convnext_atto.yaml").exists()
    cfg = _compose(config_name, ["model.name=convnext_atto"])
    assert cfg.model.attn is None  # small_cnn's own SE default stays with small_cnn
    with torch.device("meta"):
        model = build_model(cfg.model)
    reference = timm.create_model("convnext_atto", num_classes=cfg.model.num_classes, in_chans=cfg.model.in_chans)
    assert _params(model) == _params(reference)


def test_a_channel_module_asked_for_applies_to_the_named_model() -> None:
    cfg = _compose("config", ["model.name=resnet18", "model.attn=eca"])
    with torch.device("meta"):
        model = build_model(cfg.model)
        reference = chanzoo.create_model("resnet18", num_classes=10, in_chans=1, attn="eca")
    assert _params(model) == _params(reference)
    assert type(model.layer1[0].se).__name__ == "EfficientChannelAttention"


def test_default_model_keeps_its_se_module() -> None:
    cfg = _compose("config", [])
    assert cfg.model.name == "small_cnn" and cfg.model.attn == "se"


def test_model_configs_choose_their_accel_preset() -> None:
    assert _compose("config", ["model=rgt_s_x2"]).accel == {"compile": False, "compile_mode": None,
                                                            "channels_last": False}
    assert _compose("config", ["model=vim2_nano"]).accel.compile is False
    assert _compose("config", ["model=vim2_nano", "accel.compile=true"]).accel.compile is True
    assert _compose("config", []).accel.compile == "auto"


def test_eval_without_model_name_takes_the_checkpoint_config() -> None:
    cfg = _compose("eval", [])
    assert OmegaConf.is_missing(cfg.model, "name")
    assert _compose("eval", ["model=davit_tiny"]).model.name == "davit_tiny"


def test_stored_configs_of_older_checkpoints_build_and_say_what_is_ignored(caplog) -> None:
    old = {"name": "small_cnn", "pretrained": False, "pretrained_file": None, "num_classes": 10, "in_chans": 1,
           "attn": "se", "attn_kwargs": {}, "attn_position": "auto", "compile": "auto", "channels_last": "auto",
           "kwargs": {}}
    with caplog.at_level(logging.INFO, logger="chanzoo.run"):
        model = build_model(old)
    reference = chanzoo.create_model("small_cnn", num_classes=10, in_chans=1, attn="se")
    assert _params(model) == _params(reference)
    assert "'compile': 'auto'" in caplog.text and "accel" in caplog.text


def test_model_kwargs_reach_the_constructor() -> None:
    cfg = _compose("config", ["model=channelvit_tiny_p8", "+model.kwargs.depth=3"])
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert len(model.blocks) == 3


def test_a_model_config_without_a_name_is_refused() -> None:
    with pytest.raises(ValueError, match="model.name must be a timm or chanzoo model name, got None"):
        build_model({"pretrained": False})


def test_configs_are_package_data() -> None:
    assert CONFIG_DIR == Path(chanzoo.__file__).parent / "configs"


@pytest.mark.parametrize("group", ["data", "task"])
def test_every_data_and_task_config_names_an_existing_class(group: str) -> None:
    """A datamodule or task missing from its package's ``__init__`` fails here, naming the config file."""
    import lightning as L
    from hydra.utils import get_class, get_method

    expected = {"data": L.LightningDataModule, "task": L.LightningModule}[group]
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        cfg = _compose("config", [f"{group}={path.stem}"])
        if group == "task" and "runner" in cfg.task:  # a task that runs its own loop (task=continual)
            assert callable(get_method(cfg.task.runner)), (path.name, cfg.task.runner)
            continue
        target = cfg[group]._target_
        assert issubclass(get_class(target), expected), (path.name, target)
