"""Histoformer: parameter count of the released configuration, the official key layout, any input size, the
histogram attention against a loop reference, features, errors and training on real photos."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import chanzoo
from chanzoo.models.histoformer import (
    Histoformer,
    HistogramAttention,
    _attention_weights,
    checkpoint_filter_fn,
)
from chanzoo.tasks import RestorationTask
from chanzoo.tasks.losses import PearsonCorrelationLoss
from support import REPO
from chanzoo.configs import CONFIG_DIR

# the official histoformer_arch.py with the released Allweather_Histoformer.yml, counted on CPU (see docs)
OFFICIAL_PARAMS = 16_615_100
TINY = dict(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 2, 2, 4), ffn_expansion_factor=2.0)


def _image(photo: np.ndarray, top: int, left: int, height: int, width: int) -> torch.Tensor:
    crop = photo[top : top + height, left : left + width]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255.0


def _tiny(**kwargs) -> Histoformer:
    torch.manual_seed(0)
    return Histoformer(**{**TINY, **kwargs}).eval()


def official_layout(dim: int, num_blocks, num_refinement: int, ffn_factor: float, in_chans: int = 3) -> dict:
    """Names and shapes of the official ``Histoformer`` state dict (bias=False), from the official constructor."""
    shapes: dict[str, tuple] = {"patch_embed.proj.weight": (dim, in_chans, 3, 3)}

    def blocks(prefix: str, chans: int, n: int, heads: int) -> None:
        hidden = int(chans * ffn_factor)
        for i in range(n):
            p = f"{prefix}.{i}."
            shapes[p + "attn_g.temperature"] = (heads, 1, 1)
            shapes[p + "attn_g.qkv.weight"] = (chans * 5, chans, 1, 1)
            shapes[p + "attn_g.qkv_dwconv.weight"] = (chans * 5, 1, 3, 3)
            shapes[p + "attn_g.project_out.weight"] = (chans, chans, 1, 1)
            shapes[p + "ffn.project_in.weight"] = (hidden * 2, chans, 1, 1)
            shapes[p + "ffn.dwconv_5.weight"] = (hidden // 4, 1, 5, 5)
            shapes[p + "ffn.dwconv_dilated2_1.weight"] = (hidden // 4, 1, 3, 3)
            shapes[p + "ffn.project_out.weight"] = (chans, hidden, 1, 1)

    heads = (1, 2, 4, 8)
    blocks("encoder_level1", dim, num_blocks[0], heads[0])
    blocks("encoder_level2", dim * 2, num_blocks[1], heads[1])
    blocks("encoder_level3", dim * 4, num_blocks[2], heads[2])
    blocks("latent", dim * 8, num_blocks[3], heads[3])
    blocks("decoder_level3", dim * 4, num_blocks[2], heads[2])
    blocks("decoder_level2", dim * 2, num_blocks[1], heads[1])
    blocks("decoder_level1", dim * 2, num_blocks[0], heads[0])
    blocks("refinement", dim * 2, num_refinement, heads[0])
    for name, chans in (("down1_2", dim), ("down2_3", dim * 2), ("down3_4", dim * 4)):
        shapes[f"{name}.body.0.weight"] = (chans // 2, chans, 3, 3)
    for name, chans in (("up4_3", dim * 8), ("up3_2", dim * 4), ("up2_1", dim * 2)):
        shapes[f"{name}.body.0.weight"] = (chans * 2, chans, 3, 3)
    shapes["reduce_chan_level3.weight"] = (dim * 4, dim * 8, 1, 1)
    shapes["reduce_chan_level2.weight"] = (dim * 2, dim * 4, 1, 1)
    for i in (1, 2, 3):
        shapes[f"skip_patch_embed{i}.proj.1.weight"] = (in_chans, in_chans, 1, 1)
        shapes[f"skip_patch_embed{i}.proj.2.weight"] = (in_chans, 1, 3, 3)
        shapes[f"reduce_chan_level_{i}.weight"] = (dim * 2**i, dim * 2**i + in_chans, 1, 1)
    shapes["output.weight"] = (in_chans, dim * 2, 3, 3)
    return shapes


def test_released_configuration_matches_official_layout_and_count():
    with torch.device("meta"):
        model = timm.create_model("histoformer")
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS
    official = official_layout(36, (4, 4, 6, 8), 4, 2.667)
    assert sum(int(np.prod(s)) for s in official.values()) == OFFICIAL_PARAMS
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official


def test_official_checkpoint_loads_with_nothing_missing(tmp_path):
    official = official_layout(TINY["dim"], TINY["num_blocks"], TINY["num_refinement_blocks"], 2.0)
    torch.manual_seed(1)
    # the official blocks use heads (1, 2, 4, 8); TINY's differ only in the temperature shapes
    heads = dict(zip(("encoder_level1", "encoder_level2", "encoder_level3", "latent", "decoder_level3",
                      "decoder_level2", "decoder_level1", "refinement"), (1, 2, 2, 4, 2, 2, 1, 1)))
    state = {}
    for key, shape in official.items():
        if key.endswith("temperature"):
            shape = (heads[key.split(".")[0]], 1, 1)
        state[key] = torch.randn(shape) * 0.1
    path = tmp_path / "net_g_best.pth"
    torch.save({"params": {f"module.{k}": v for k, v in state.items()}}, path)

    model = chanzoo.create_model("histoformer", pretrained_file=str(path), **TINY)
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # the converter alone, strict: nothing missing, nothing unexpected
    fresh = _tiny()
    result = fresh.load_state_dict(checkpoint_filter_fn({"params_ema": state}, fresh), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_pretrained_cfg():
    model = timm.create_model("histoformer", **TINY)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 0 and cfg["tag"] == "allweather"
    assert cfg["mean"] == (0.0, 0.0, 0.0) and cfg["std"] == (1.0, 1.0, 1.0)
    assert cfg["license"] and "scale=1" in cfg["notes"]
    assert model.state_dict()[f"{cfg['first_conv']}.weight"].shape[1] == 3
    assert model.get_classifier() is model.output
    assert "net_g_real" in str(timm.models.get_pretrained_cfg("histoformer.realsnow").notes)


@pytest.mark.parametrize("size", [(45, 70), (33, 17), (8, 8), (1, 1), (64, 48)])
def test_any_size_keeps_size_and_matches_official_padding(photos, size):
    model = _tiny()
    x = _image(photos["coffee"], 100, 200, *size)
    with torch.no_grad():
        y = model(x)
        # the official test script: reflect-pad bottom/right to a multiple of 8, run, crop
        h, w = size
        padded = F.pad(x, (0, (-w) % 8, 0, (-h) % 8), "reflect" if min(h, w) > 7 else "replicate")
        ref = (model.forward_head(model.forward_features(padded)) + padded)[..., :h, :w]
    assert y.shape == x.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_attention_weights_are_softmax_with_an_extra_zero_logit():
    logits = torch.linspace(-3, 3, 24).reshape(2, 3, 4)
    with_zero = torch.softmax(torch.cat([logits, torch.zeros(2, 3, 1)], dim=-1), dim=-1)[..., :-1]
    torch.testing.assert_close(_attention_weights(logits), with_zero)
    assert (_attention_weights(logits).sum(-1) < 1).all()


@pytest.mark.parametrize("contiguous", [True, False])
def test_binned_attention_matches_loop_reference(photos, contiguous):
    """Tokens are (channel, bin) pairs of value-sorted pixels; N=27 is padded with zeros to 3 bins of 9."""
    torch.manual_seed(0)
    attn = HistogramAttention(dim=6, num_heads=3)
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1))
    pixels = _image(photos["astronaut"], 200, 200, 3, 9).reshape(1, 3, 27)
    q, k, v = pixels.repeat(1, 2, 1), pixels.flip(-1).repeat(1, 2, 1), (pixels * 2 - 1).repeat(1, 2, 1)
    out = attn._binned_attention(q, k, v, contiguous)

    bins, per_head, n = 3, 2, 27
    padded = [F.pad(t[0], (0, 0)) for t in (q, k, v)]
    ref = torch.zeros(6, n)
    for head in range(3):
        tokens = [(head * per_head + c, b) for c in range(per_head) for b in range(bins)]

        def members(b: int) -> list[int]:
            return list(range(b * 9, b * 9 + 9)) if contiguous else list(range(b, n, bins))

        def vec(t: torch.Tensor, token) -> torch.Tensor:
            return t[token[0], members(token[1])]

        for ti in tokens:
            qi = F.normalize(vec(padded[0], ti), dim=0)
            scores = torch.stack([qi @ F.normalize(vec(padded[1], tj), dim=0) for tj in tokens]) * (0.5 * 2**head)
            weights = scores.exp() / (scores.exp().sum() + 1)
            ref[ti[0], members(ti[1])] = sum(w * vec(padded[2], tj) for w, tj in zip(weights, tokens))
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)


def test_features_only_and_intermediates(photos):
    model = timm.create_model("histoformer", features_only=True, **TINY)
    x = _image(photos["rocket"], 100, 100, 32, 40)
    feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels() == [8, 16, 32, 64]
    assert [f.shape[-2:] for f in feats] == [(32 // r, 40 // r) for r in model.feature_info.reduction()]
    full = _tiny()
    final, inter = full.forward_intermediates(x, indices=[1, 3])
    assert final.shape == (1, 16, 32, 40) and [t.shape[1] for t in inter] == [16, 64]
    only = full.forward_intermediates(x, indices=[1], intermediates_only=True)
    torch.testing.assert_close(only[0], inter[0])


def test_grad_checkpointing_same_output_and_grads(photos):
    x = _image(photos["chelsea"], 50, 50, 16, 24)
    grads = []
    for enable in (False, True):
        model = _tiny().train()
        model.set_grad_checkpointing(enable)
        model(x).square().mean().backward()
        grads.append(model.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=10), "num_classes must be 0"),
        (dict(dim=7), "dim must be a positive even int"),
        (dict(heads=(3, 2, 2, 4)), "3 heads do not divide the 8 channels"),
        (dict(ffn_expansion_factor=2.667), r"ffn_expansion_factor=2.667: int\(8 \* factor\) = 21"),
        (dict(num_blocks=(1, 1, 1)), "num_blocks must be four"),
        (dict(layer_norm_type="RMS"), "layer_norm_type must be 'WithBias' or 'BiasFree', got 'RMS'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Histoformer(**{**TINY, **kwargs})


def test_bad_inputs(photos):
    model = _tiny()
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 3, H, W\), got \(1, 1, 8, 8\)"):
        model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"divisible by 8, got input \(1, 3, 12, 16\)"):
        model.forward_features(_image(photos["coffee"], 0, 0, 12, 16))
    with pytest.raises(ValueError, match="num_classes must stay 0, got 5"):
        model.reset_classifier(5)


def test_training_on_real_photos_lowers_l1_plus_pearson(photos):
    """A tiny Histoformer learns to remove a synthetic haze (contrast loss + veil) from real photo crops."""
    gt = torch.cat([_image(photos[name], 120, 160, 32, 32) for name in ("astronaut", "coffee", "chelsea", "rocket")])
    lq = 0.5 * gt + 0.4
    model = _tiny().train()
    task = RestorationTask(model, optim={"name": "adam", "lr": 2e-3}, sched={"name": "none"},
                           aux_loss=PearsonCorrelationLoss(), aux_loss_weight=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(20):
        losses = task.loss(model(lq), gt)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert set(history[0]) == {"l1", "aux", "total"}
    assert history[-1]["total"] < 0.5 * history[0]["total"]
    assert history[-1]["l1"] < (lq - gt).abs().mean().item()


def test_allweather_recipe_lr_follows_the_official_schedule():
    """Composed recipe: constant 3e-4, then BasicSR's CosineAnnealingRestartCyclicLR (3e-4 -> 1e-6), per iteration."""
    from hydra import compose, initialize_config_dir

    from chanzoo.tasks.optim import build_scheduler

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=histoformer_allweather", "data.root=/unused"])
    assert cfg.task.aux_loss._target_.endswith("PearsonCorrelationLoss") and cfg.task.aux_loss_weight == 1.0
    assert cfg.task.crop_border == 0 and cfg.trainer.gradient_clip_val == 0.01
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=cfg.optim.lr)
    per_epoch = 18069 // cfg.data.batch_size
    scheduler = build_scheduler(optimizer, dict(cfg.sched), cfg.trainer.max_epochs, per_epoch)
    constant = cfg.sched.warmup_epochs * per_epoch
    cosine = (cfg.trainer.max_epochs - cfg.sched.warmup_epochs) * per_epoch
    assert abs(constant - 92_000) < per_epoch and abs(cosine - 208_000) < per_epoch
    for step in (0, 45_000, constant - 1, constant + 1, constant + cosine // 3, constant + cosine - 1):
        scheduler.step_update(step)
        t = max(0, step - constant)
        official = 1e-6 + 0.5 * (3e-4 - 1e-6) * (1 + math.cos(math.pi * t / cosine))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(official, rel=1e-6)


@pytest.mark.slow
def test_train_py_runs_the_allweather_recipe_on_real_photo_pairs(tmp_path):
    """train.py with the recipe on an All-Weather-layout folder of hazed photos (tiny model, two short epochs of 60
    steps) removes much of the haze: its validation Y-PSNR beats both the hazed input itself (what an untrained
    model, whose output is the input plus a small residual, scores) and the untrained tiny model by over 3 dB."""
    from PIL import Image

    from chanzoo.data.restoration import PairedFolderDataModule
    from chanzoo.tasks.restoration import restoration_metrics
    from support import only_run_dir, run_entry

    def write(folder, name, image):
        (tmp_path / "aw" / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "aw" / folder / name)

    for split, names in (("", ("astronaut", "chelsea", "coffee")), ("test/Test1/", ("rocket",))):
        for name in names:
            clean = np.asarray(getattr(__import__("skimage.data").data, name)())[:64, :72]
            write(f"{split}gt", f"{name}.png", clean)
            write(f"{split}input", f"{name}.png", (0.5 * clean + 100).astype(np.uint8))
    runs = tmp_path / "runs"
    tiny = [f"+model.kwargs.{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY.items()]
    overrides = [
        "experiment=histoformer_allweather", f"data.root={tmp_path / 'aw'}", "data.patch_size=32", "data.batch_size=2",
        "data.dataset_enlarge_ratio=40", "data.num_workers=0", "sched.warmup_epochs=1", "trainer.max_epochs=2",
        "trainer.enable_progress_bar=false", "trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu", *tiny,
    ]
    result = run_entry("train.py", overrides, runs)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((only_run_dir(runs, "histoformer_allweather") / "metrics.json").read_text())

    def psnr_y(restore) -> float:  # the recipe's metric (Y, no border crop, 8-bit output) on the validation pair
        dm = PairedFolderDataModule(val={"gt_dir": str(tmp_path / "aw/test/Test1/gt"),
                                         "lq_dir": str(tmp_path / "aw/test/Test1/input")}, scale=1, num_workers=0)
        dm.setup("validate")
        lq, gt = dm.val_set[0]
        task = RestorationTask(torch.nn.Identity(), optim={"name": "adam"}, sched={"name": "none"}, crop_border=0)
        values = restoration_metrics()
        with torch.no_grad():
            task.update_metrics(values, restore(lq[None]), gt[None])
        return float(values.compute()["psnr_y"])

    hazed = psnr_y(lambda lq: lq)
    untrained = psnr_y(_tiny())
    assert 10.5 < hazed < 11.5  # rocket, contrast halved and a veil of 100/255: 11.05 dB
    assert metrics["val/psnr_y"] > max(hazed, untrained) + 3.0, (metrics["val/psnr_y"], hazed, untrained)
