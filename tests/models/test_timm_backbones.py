"""timm's DaViT and InceptionNeXt in chanzoo: parameter counts, stage channel modules, features_only, and
official checkpoints (dingmyu/davit, sail-sg/inceptionnext, BangguWu/ECANet) loading through ``pretrained_file``.

The official key layouts are written here from our timm models by the inverse of each release's naming; the
mappings were checked once against the official model code (identical key/shape sets, identical outputs)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import chanzoo
from chanzoo import hub
from chanzoo.configs import CONFIG_DIR


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def photo_batch(photos: dict[str, np.ndarray]) -> torch.Tensor:
    """astronaut and chelsea at 64x64, ImageNet-normalised."""
    from skimage.transform import resize

    images = [resize(photos[n], (64, 64), anti_aliasing=True) for n in ("astronaut", "chelsea")]
    x = torch.tensor(np.stack(images), dtype=torch.float32).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize(
    ("name", "official"),
    [  # counts printed by the official code (dingmyu/davit comments; sail-sg/inceptionnext models run on CPU)
        ("davit_tiny", 28_360_168),
        ("davit_small", 49_745_896),
        ("davit_base", 87_954_408),
        ("inception_next_atto", 4_156_520),
        ("inception_next_tiny", 28_055_680),
    ],
)
def test_parameter_counts_equal_official(name: str, official: int) -> None:
    with torch.device("meta"):  # counts without allocating weights
        model = chanzoo.create_model(name)
    assert _params(model) == official


@pytest.mark.parametrize(("name", "attn"), [("inception_next_atto", "se"), ("davit_tiny", "eca")])
def test_stage_modules_add_exactly_their_own_parameters(name: str, attn: str) -> None:
    kwargs = {} if name.startswith("inception") else {"embed_dims": (32, 64, 128, 256), "num_heads": (1, 2, 4, 8)}
    base = chanzoo.create_model(name, **kwargs)
    with_attn = chanzoo.create_model(name, attn=attn, attn_position="stage", **kwargs)
    channels = [info["num_chs"] for info in base.feature_info]
    own = sum(_params(chanzoo.create_channel_module(attn, c)) for c in channels)
    assert own > 0 and _params(with_attn) == _params(base) + own
    assert all(f"stages.{i}.channel_attn" in dict(with_attn.named_modules()) for i in range(4))


def test_stage_modules_run_in_the_forward_pass(photo_batch: torch.Tensor) -> None:
    model = chanzoo.create_model("inception_next_atto", attn="se", attn_position="stage", num_classes=5).eval()
    calls = []
    for i in range(4):
        model.stages[i].channel_attn.register_forward_hook(lambda m, a, out: calls.append(out.shape[1]))
    with torch.no_grad():
        logits = model(photo_batch)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert calls == [40, 80, 160, 320]


@pytest.mark.parametrize("attn", [None, "eca"])
def test_features_only_returns_the_requested_scales(attn: str | None, photo_batch: torch.Tensor) -> None:
    kwargs = dict(attn=attn, attn_position="stage") if attn else {}
    model = chanzoo.create_model("inception_next_atto", features_only=True, out_indices=(1, 2, 3), **kwargs).eval()
    with torch.no_grad():
        features = model(photo_batch)
    assert [tuple(f.shape) for f in features] == [(2, 80, 8, 8), (2, 160, 4, 4), (2, 320, 2, 2)]
    if attn:  # the channel modules sit inside the stages that produce these maps
        assert sum(".channel_attn." in n for n, _ in model.named_parameters()) == 4


def test_davit_features_only() -> None:
    model = chanzoo.create_model(
        "davit_tiny", features_only=True, out_indices=(0, 3), embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8)
    ).eval()
    with torch.no_grad():
        features = model(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(1, 32, 16, 16), (1, 256, 2, 2)]


# ---------------------------------------------------------------------------------------------- official checkpoints
def _davit_official_key(key: str) -> str:
    """timm DaViT key -> the key of the official DaViT (dingmyu/davit ``timm/models/davit.py``)."""
    key = re.sub(r"^stem\.conv\.", "patch_embeds.0.proj.", key)
    key = re.sub(r"^stem\.norm\.", "patch_embeds.0.norm.", key)
    key = re.sub(r"^stages\.(\d+)\.downsample\.conv\.", r"patch_embeds.\1.proj.", key)
    key = re.sub(r"^stages\.(\d+)\.downsample\.norm\.", r"patch_embeds.\1.norm.", key)
    key = re.sub(r"^stages\.(\d+)\.blocks\.", r"main_blocks.\1.", key)
    key = key.replace(".cpe1.", ".cpe.0.").replace(".cpe2.", ".cpe.1.")
    key = re.sub(r"^head\.norm\.", "norms.", key)
    return re.sub(r"^head\.fc\.", "head.", key)


@pytest.mark.parametrize("wrapped", [False, True])
def test_official_davit_checkpoint_loads(tmp_path: Path, photo_batch: torch.Tensor, wrapped: bool) -> None:
    kwargs = dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8))
    torch.manual_seed(0)
    reference = chanzoo.create_model("davit_tiny", **kwargs).eval()
    official = {_davit_official_key(k): v for k, v in reference.state_dict().items()}
    for key in ("patch_embeds.0.proj.weight", "patch_embeds.1.norm.weight", "main_blocks.2.1.1.cpe.1.proj.weight",
                "main_blocks.0.0.0.attn.qkv.weight", "norms.weight", "head.weight"):
        assert key in official
    assert not any(k.startswith(("stem", "stages")) for k in official)
    path = tmp_path / "DaViT_tiny.pth.tar"
    torch.save({"state_dict": official} if wrapped else official, path)

    converted = timm.models.davit.checkpoint_filter_fn(dict(official), reference)
    assert set(converted) == set(reference.state_dict())  # nothing missing, nothing unexpected
    model = chanzoo.create_model("davit_tiny", pretrained_file=str(path), **kwargs).eval()
    with torch.no_grad():
        assert torch.equal(model(photo_batch), reference(photo_batch))


def test_official_inceptionnext_checkpoint_loads(tmp_path: Path, photo_batch: torch.Tensor) -> None:
    """sail-sg/inceptionnext's keys equal timm's (checked against the official MetaNeXt), so no converter runs."""
    torch.manual_seed(0)
    reference = chanzoo.create_model("inception_next_atto").eval()
    official = reference.state_dict()
    for key in ("stem.0.weight", "stem.1.running_var", "stages.1.downsample.1.weight", "stages.0.blocks.0.gamma",
                "stages.0.blocks.0.token_mixer.dwconv_hw.weight", "head.fc1.weight", "head.norm.weight"):
        assert key in official
    path = tmp_path / "inceptionnext_atto.pth"
    torch.save(official, path)
    model = chanzoo.create_model("inception_next_atto", pretrained_file=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(model(photo_batch), reference(photo_batch))


def _ecanet_release(model: torch.nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """Write ``model`` as the ECA-Net release does: legacy torch format, {'state_dict'}, DataParallel prefix."""
    official = {f"module.{k.replace('.se.', '.eca.')}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 100, "arch": "eca_resnet18", "state_dict": official, "best_prec1": 70.9}, path,
               _use_new_zipfile_serialization=False)
    return official


def test_official_ecanet_checkpoint_loads(tmp_path: Path, photo_batch: torch.Tensor) -> None:
    eca3 = dict(attn="eca", attn_kwargs={"kernel_size": 3})  # the official k_size default, [3, 3, 3, 3]
    torch.manual_seed(0)
    reference = chanzoo.create_model("resnet18", **eca3).eval()
    official = _ecanet_release(reference, tmp_path / "eca_resnet18_k3333.pth.tar")
    assert "module.layer1.0.eca.conv.weight" in official and "module.fc.weight" in official

    converted = hub.ecanet_checkpoint_filter_fn(torch.load(tmp_path / "eca_resnet18_k3333.pth.tar"), reference)
    assert set(converted) == set(reference.state_dict())  # nothing missing, nothing unexpected
    model = chanzoo.create_model("resnet18", pretrained_file=str(tmp_path / "eca_resnet18_k3333.pth.tar"), **eca3)
    with torch.no_grad():
        assert torch.equal(model.eval()(photo_batch), reference(photo_batch))


def test_ecanet_kernel_mismatch_is_named(tmp_path: Path) -> None:
    reference = chanzoo.create_model("resnet18", attn="eca", attn_kwargs={"kernel_size": 3})
    _ecanet_release(reference, tmp_path / "eca.pth.tar")
    with pytest.raises(ValueError, match=r"layer2\.0\.se\.conv\.weight .*kernel 3"):
        chanzoo.create_model("resnet18", attn="eca", pretrained_file=str(tmp_path / "eca.pth.tar"))  # adaptive k=5


# ----------------------------------------------------------------------------------------------------------- configs
CONFIG_PARAMS = {  # measured on the official code where it exists (see docs/models.md)
    "davit_tiny": 28_360_168, "davit_small": 49_745_896, "davit_base": 87_954_408, "davit_large": 196_811_752,
    "davit_huge": 348_922_856, "davit_giant": 1_406_470_120, "inception_next_atto": 4_156_520,
    "inception_next_tiny": 28_055_680, "inception_next_small": 49_374_016, "inception_next_base": 86_672_136,
}


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose("config", overrides=overrides)


def test_model_configs_build_the_named_models() -> None:
    from chanzoo.run import build_model

    for name, params in CONFIG_PARAMS.items():
        cfg = _compose([f"model={name}", "data=imagenet"])
        with torch.device("meta"):
            model = build_model(cfg.model)
        assert _params(model) == params, name
        assert model.pretrained_cfg["input_size"][-1] == (384 if name == "davit_large" else 224)


def test_features_only_through_the_model_config(photo_batch: torch.Tensor) -> None:
    from chanzoo.run import build_model

    cfg = _compose(["model=inception_next_atto", "data=imagenet", "model.attn=eca", "model.features_only=true",
                    "model.out_indices=[1,3]"])
    with torch.no_grad():
        features = build_model(cfg.model).eval()(photo_batch)
    assert [tuple(f.shape) for f in features] == [(2, 80, 8, 8), (2, 320, 2, 2)]
