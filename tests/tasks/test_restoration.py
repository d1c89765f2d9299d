"""Restoration task, metrics, datamodules, eval.py and chanzoo.restore on real photos (scikit-image)."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from skimage import color, data
from skimage.metrics import structural_similarity
from torch import nn

from chanzoo.data.restoration import BicubicSRDataModule, PairedFolderDataModule, bicubic_downsample, find_pairs
from chanzoo.models.rgt import RGT
from chanzoo.restore import restore, restore_image
from chanzoo.tasks.restoration import RestorationTask, quantize, restoration_metrics, rgb_to_y
from support import REPO, only_run_dir, run_entry

TINY = dict(embed_dim=32, num_heads=2, depth=[2], drop_path_rate=0.0)
ADAM = {"name": "adam", "lr": 2e-3, "weight_decay": 0.0, "betas": [0.9, 0.99]}


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255.0  # a writable copy


def _task(scale: int = 2, **kwargs) -> RestorationTask:
    return RestorationTask(RGT(upscale=scale, **TINY), optim=ADAM, sched={"name": "none"}, **kwargs)


def _computed(task: RestorationTask, output: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    metrics = restoration_metrics()
    task.update_metrics(metrics, output, gt)
    return {k: float(v) for k, v in metrics.compute().items()}


def test_y_channel_is_bt601() -> None:
    rgb = data.astronaut()[:64, :64]
    expected = color.rgb2ycbcr(rgb)[..., 0] / 255.0  # scikit-image's ITU-R BT.601 conversion
    ours = rgb_to_y(_tensor(rgb))[0, 0].numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    r, g, b = (rgb[10, 20] / 255.0).tolist()
    assert ours[10, 20] == pytest.approx((16 + 65.481 * r + 128.553 * g + 24.966 * b) / 255, abs=1e-6)


def test_psnr_on_an_offset_pair_equals_closed_form() -> None:
    gt = _tensor(data.coffee()[:80, :120]) * 0.8 + 0.1
    c = 0.02
    values = _computed(_task(crop_border=0, quantize_output=False), gt + c, gt)
    assert values["psnr"] == pytest.approx(-20 * math.log10(c), abs=1e-3)
    assert values["psnr_y"] == pytest.approx(-20 * math.log10(c * 219 / 255), abs=1e-3)  # Y gains 219/255 per unit


def test_ssim_on_constant_images_equals_closed_form() -> None:
    a, b = 0.3, 0.5
    c1 = 0.01**2
    task = _task(crop_border=0, quantize_output=False)
    values = _computed(task, torch.full((1, 3, 32, 32), a), torch.full((1, 3, 32, 32), b))
    assert values["ssim"] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), abs=1e-5)


def test_ssim_matches_scikit_image_on_real_pair() -> None:
    gt = data.chelsea()[:96, :128]
    noisy = np.clip(gt.astype(float) + np.random.default_rng(0).normal(0, 12, gt.shape), 0, 255).astype(np.uint8)
    values = _computed(_task(crop_border=0), _tensor(noisy), _tensor(gt))
    y_gt, y_noisy = color.rgb2ycbcr(gt)[..., 0] / 255, color.rgb2ycbcr(noisy)[..., 0] / 255
    reference = structural_similarity(y_noisy, y_gt, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=1.0)
    assert values["ssim_y"] == pytest.approx(reference, abs=1e-4)


def test_border_of_width_scale_is_ignored() -> None:
    gt = _tensor(data.rocket()[:60, :90])
    out = gt.clone()
    out[..., :3, :] = 1 - out[..., :3, :]
    out[..., :, -3:] = 0.0
    c = 4 / 255
    out[..., 3:-3, 3:-3] = (gt[..., 3:-3, 3:-3] + c).clamp(max=1)
    task = _task(scale=3, quantize_output=False)
    assert task.crop_border == 3
    inner = _computed(_task(scale=3, crop_border=0, quantize_output=False), out[..., 3:-3, 3:-3], gt[..., 3:-3, 3:-3])
    assert _computed(task, out, gt) == pytest.approx(inner, abs=1e-5)


def test_quantize_rounds_to_8_bit() -> None:
    x = torch.tensor([-0.2, 0.0, 0.1234, 0.5, 1.3])
    torch.testing.assert_close(quantize(x), torch.tensor([0.0, 0.0, 31 / 255, 128 / 255, 1.0]))


def test_aux_loss_is_weighted() -> None:
    task = _task(aux_loss=nn.MSELoss(), aux_loss_weight=0.5)
    out, gt = torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), 0.2)
    losses = task.loss(out, gt)
    assert float(losses["total"]) == pytest.approx(0.3 + 0.5 * 0.09)


def test_bad_task_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="crop_border must be.*got -1"):
        _task(crop_border=-1)
    with pytest.raises(ValueError, match="aux_loss_weight=0.5 given without an aux_loss"):
        _task(aux_loss_weight=0.5)
    with pytest.raises(ValueError, match="num_classes=0.*got num_classes=10"):
        RestorationTask(_classifier(), {}, {})


def _classifier() -> nn.Module:
    model = nn.Linear(2, 2)
    model.num_classes = 10
    return model


def _write(path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _benchmark_folder(root, scale: int) -> None:
    """A Set5-like folder in BasicSR's layout from three real photos (HR/, LR_bicubic/X{scale}/<name>x{scale}.png)."""
    crops = (("chelsea", data.chelsea()[:90, :120]), ("coffee", data.coffee()[:60, :75]),
             ("rocket", data.rocket()[:45, :60]))
    for name, image in crops:
        hr = image[: image.shape[0] // scale * scale, : image.shape[1] // scale * scale]
        _write(root / "HR" / f"{name}.png", hr)
        _write(root / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png", bicubic_downsample(hr, scale))


def _set_folders(root) -> dict[str, str]:
    """The ``train``/``val`` entry of ``PairedFolderDataModule`` for a folder made by ``_benchmark_folder``."""
    return {"gt_dir": str(root / "HR"), "lq_dir": str(root / "LR_bicubic" / "X{scale}"), "lq_template": "{key}x{scale}"}


def test_paired_folders_div2k_and_raindrop_layouts(tmp_path) -> None:
    _benchmark_folder(tmp_path / "set", 3)
    pairs = find_pairs(tmp_path / "set" / "HR", tmp_path / "set" / "LR_bicubic" / "X{scale}", "{key}x{scale}", scale=3)
    assert [(lq.name, gt.name) for lq, gt in pairs] == [
        ("chelseax3.png", "chelsea.png"), ("coffeex3.png", "coffee.png"), ("rocketx3.png", "rocket.png")]
    _write(tmp_path / "rd" / "gt" / "0_clean.png", data.astronaut()[:40, :40])
    _write(tmp_path / "rd" / "data" / "0_rain.jpg", data.astronaut()[:40, :40])
    raindrop = find_pairs(tmp_path / "rd" / "gt", tmp_path / "rd" / "data", "{key}_rain", "_clean")
    assert [lq.name for lq, _ in raindrop] == ["0_rain.jpg"]
    with pytest.raises(ValueError, match=r"have no LQ image.*0_clean.png -> 0_clean\.\*"):
        find_pairs(tmp_path / "rd" / "gt", tmp_path / "rd" / "data")
    with pytest.raises(ValueError, match="lq_dir='.*nowhere' is not a folder"):
        find_pairs(tmp_path / "rd" / "gt", tmp_path / "nowhere")

    dm = PairedFolderDataModule(
        train=_set_folders(tmp_path / "set"), val=_set_folders(tmp_path / "set"),
        patch_size=12, batch_size=2, num_workers=0,
    )
    dm.set_model(RGT(upscale=3, **TINY))
    dm.setup("fit")
    lq, gt = next(iter(dm.train_dataloader()))
    assert lq.shape == (2, 3, 12, 12) and gt.shape == (2, 3, 36, 36)
    torch.testing.assert_close(F.avg_pool2d(gt, 3), lq, atol=0.15, rtol=0)  # aligned patches: the LR is the blurred HR
    lq, gt = dm.val_set[0]
    assert gt.shape[-2:] == (lq.shape[-2] * 3, lq.shape[-1] * 3) == (90, 120)
    assert dm.test_set is dm.val_set  # test defaults to val: one dataset, the folders listed once
    with pytest.raises(ValueError, match="data scale=3 but the model up-scales x2"):
        dm.set_model(RGT(upscale=2, **TINY))


def test_corrupt_image_and_bad_sources_are_named(tmp_path) -> None:
    (tmp_path / "hr").mkdir()
    (tmp_path / "hr" / "broken.png").write_bytes(b"not a png")
    dm = BicubicSRDataModule(val=str(tmp_path / "hr"), scale=2)
    dm.setup("validate")
    assert dm.test_set is dm.val_set  # test defaults to val: one dataset (and image cache)
    with pytest.raises(ValueError, match="cannot read image '.*broken.png'"):
        dm.val_set[0]
    with pytest.raises(ValueError, match="skimage.data has no image 'nope'"):
        BicubicSRDataModule(val="skimage:nope", scale=2)
    with pytest.raises(ValueError, match="'/no/such' is neither a folder"):
        BicubicSRDataModule(train=["/no/such"])
    with pytest.raises(ValueError, match="patch_size must be a positive int.*got 0"):
        BicubicSRDataModule(train="skimage:astronaut", patch_size=0)


@pytest.mark.parametrize("cache", [True, False])
def test_bicubic_sr_image_cache_is_configurable(cache: bool) -> None:
    dm = BicubicSRDataModule(train="skimage:camera", val="skimage:coffee", scale=2, patch_size=8, cache=cache)
    dm.setup("fit")
    lq, gt = dm.val_set[0]
    dm.train_set[0]
    assert [len(s._cache) for s in (dm.train_set, dm.val_set)] == ([1, 1] if cache else [0, 0])
    # cached or not, the same whole-image pair: coffee cut to even size, and its bicubic half
    hr = data.coffee()[: data.coffee().shape[0] // 2 * 2, : data.coffee().shape[1] // 2 * 2]
    torch.testing.assert_close(gt, _tensor(hr)[0], rtol=0, atol=0)
    torch.testing.assert_close(lq, _tensor(bicubic_downsample(hr, 2))[0], rtol=0, atol=0)
    assert [torch.equal(a, b) for a, b in zip(dm.val_set[0], (lq, gt))] == [True, True]  # a second read: the same


def _bicubic_psnr_y(task: RestorationTask, lq: torch.Tensor, gt: torch.Tensor) -> float:
    """Y-PSNR of bicubic up-sampling of ``lq`` by the task's metric code: the higher of PIL's (Keys a = -0.5, MATLAB
    ``imresize``'s kernel, the SR papers' baseline) and torch's (a = -0.75, slightly sharper)."""
    scale = gt.shape[-1] // lq.shape[-1]
    lq_uint8 = (lq.permute(1, 2, 0) * 255).round().byte().numpy()  # the 8-bit LR image the datamodule made
    pil = Image.fromarray(lq_uint8).resize((gt.shape[-1], gt.shape[-2]), Image.Resampling.BICUBIC)
    torch_bicubic = F.interpolate(lq[None], scale_factor=scale, mode="bicubic", align_corners=False)
    candidates = (_tensor(np.array(pil)), torch_bicubic)
    return max(_computed(task, up, gt[None])["psnr_y"] for up in candidates)


@pytest.mark.slow
def test_short_training_on_real_photos_beats_bicubic() -> None:
    """A small RGT x2 trained for 800 steps on four photos beats bicubic up-sampling on a fifth, held out (Y-PSNR).

    One residual group of two blocks, width 32, L-SA windows 4x16 (16x16 LR patches fill them without the padding
    the default 8x32 needs); Adam 4e-3 with a 40-step warm-up and a cosine decay, batch 16. About 30 s of training on
    two CPU cores; measured +0.81 to +0.86 dB over bicubic on chelsea for seeds 0-2 (docs/restoration.md).
    """
    import lightning as L

    L.seed_everything(0)
    steps, batch = 800, 16
    train = ["skimage:astronaut", "skimage:coffee", "skimage:rocket", "skimage:immunohistochemistry"]
    model = RGT(upscale=2, embed_dim=32, num_heads=2, depth=[2], split_size=[4, 16], drop_path_rate=0.0)
    dm = BicubicSRDataModule(train=train, val=["skimage:chelsea"], patch_size=16, batch_size=batch,
                             dataset_enlarge_ratio=steps * batch // len(train), num_workers=0)
    dm.set_model(model)
    task = RestorationTask(
        model, optim={**ADAM, "lr": 4e-3},
        sched={"name": "cosine", "warmup_epochs": 40 / steps, "warmup_lr": 4e-5, "min_lr": 1e-6},  # one epoch = the run
    )
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == steps
    after = float(trainer.callback_metrics["val/psnr_y"])
    lq, gt = dm.val_set[0]
    assert gt.shape[-2:] == (300, 450)  # the whole held-out photo
    bicubic = _bicubic_psnr_y(task, lq, gt)
    assert 35.0 < bicubic < 36.0  # chelsea x2; PIL 35.25 dB, torch 35.4 dB
    assert after > bicubic, f"trained RGT {after:.2f} dB <= bicubic {bicubic:.2f} dB (Y, crop 2)"


@pytest.mark.slow
def test_eval_py_scores_official_layout_weights_on_a_set5_folder(tmp_path) -> None:
    _benchmark_folder(tmp_path / "Set5", 2)
    model = RGT(upscale=2, embed_dim=32, num_heads=2, depth=[2], drop_path_rate=0.0)
    torch.save({"params": model.state_dict()}, tmp_path / "RGT_tiny_x2.pth")
    runs = tmp_path / "runs"
    overrides = [
        "model=rgt_s_x2", f"model.pretrained_file={tmp_path / 'RGT_tiny_x2.pth'}", "data=set5",
        f"data.root={tmp_path / 'Set5'}", "+model.kwargs.depth=[2]", "+model.kwargs.embed_dim=32",
        "+model.kwargs.num_heads=2", "trainer.enable_progress_bar=false",
    ]
    result = run_entry("eval.py", overrides, runs)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((only_run_dir(runs, "eval") / "metrics.json").read_text())
    assert payload["model"] == "rgt_s_x2"
    # the same numbers computed here, image by image
    task = RestorationTask(model.eval(), optim=ADAM, sched={"name": "none"})
    metrics = restoration_metrics()
    dm = PairedFolderDataModule(val=_set_folders(tmp_path / "Set5"), scale=2, num_workers=0)
    dm.setup("test")
    with torch.no_grad():
        for i in range(len(dm.test_set)):
            lq, gt = dm.test_set[i]
            task.update_metrics(metrics, model(lq[None]), gt[None])
    expected = {k: float(v) for k, v in metrics.compute().items()}
    for name in ("psnr_y", "ssim_y", "psnr", "ssim"):
        assert payload["metrics"][f"test/{name}"] == pytest.approx(expected[name], abs=1e-4)


SMALL = dict(embed_dim=32, num_heads=2, depth=[2], split_size=[4, 16], drop_path_rate=0.0)


@pytest.fixture(scope="module")
def trained_x2(tmp_path_factory) -> tuple[RGT, Path]:
    """A small RGT x2 after 150 Adam steps on bicubic pairs from two photos, and its weights in the official layout
    (``{"params": state_dict}``): known weights whose output is an up-sampled image (several dB above fresh
    weights on the test crop), not saturated noise."""
    torch.manual_seed(0)
    model = RGT(upscale=2, **SMALL)
    dm = BicubicSRDataModule(train=["skimage:astronaut", "skimage:coffee"], patch_size=16, batch_size=8,
                             dataset_enlarge_ratio=600, num_workers=0)
    dm.set_model(model)
    dm.setup("fit")
    optimizer = torch.optim.Adam(model.parameters(), lr=4e-3)
    for lq, gt in itertools.islice(torch.utils.data.DataLoader(dm.train_set, batch_size=8), 150):
        loss = (model(lq) - gt).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("weights") / "rgt_small_x2.pth"
    torch.save({"params": model.state_dict()}, path)
    return model.eval(), path


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.mark.slow
def test_restore_cli_writes_what_the_given_weights_compute(tmp_path, trained_x2) -> None:
    """``python -m chanzoo.restore`` with a weights file writes, to the 8-bit level, the image the same weights give
    in this process; a model that ignored the file (fresh weights) would write a very different, worse image."""
    model, weights = trained_x2
    hr = data.chelsea()[100:164, 150:230]
    _write(tmp_path / "cat_lr.png", bicubic_downsample(hr, 2))
    kwargs = [f"+model.kwargs.{k}={v}" for k, v in SMALL.items()]
    command = [sys.executable, "-m", "chanzoo.restore", "model=rgt_s_x2", f"model.pretrained_file={weights}", *kwargs,
               f"input={tmp_path / 'cat_lr.png'}", f"output={tmp_path / 'cat_x2.png'}", "device=cpu", "progress=false"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = np.asarray(Image.open(tmp_path / "cat_x2.png"))
    assert written.shape == hr.shape
    expected = restore_image(model, bicubic_downsample(hr, 2), scale=2)
    difference = np.abs(written.astype(int) - expected.astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01  # equal up to float rounding between processes
    torch.manual_seed(1)
    fresh = restore_image(RGT(upscale=2, **SMALL).eval(), bicubic_downsample(hr, 2), scale=2)
    assert np.abs(written.astype(int) - fresh.astype(int)).mean() > 10
    assert _psnr(written, hr) > _psnr(fresh, hr) + 3, (_psnr(written, hr), _psnr(fresh, hr))


def test_restore_writes_each_image_of_a_folder_as_png(tmp_path, trained_x2) -> None:
    """A folder in, a folder of PNGs out (any input format), each equal to the tiled restoration of its own input."""
    model, weights = trained_x2
    inputs = {"cat.png": data.chelsea()[:21, :30], "cup.jpg": data.coffee()[:17, :19]}
    for name, image in inputs.items():
        _write(tmp_path / "in" / name, image)
    cfg = OmegaConf.create({
        "model": {"name": "rgt_s_x2", "pretrained_file": str(weights), "num_classes": 0, "in_chans": 3,
                  "kwargs": SMALL},
        "input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "tile": 12, "tile_overlap": 4, "device": "cpu",
        "progress": False,
    })
    written = restore(cfg)
    assert written == [tmp_path / "out" / "cat.png", tmp_path / "out" / "cup.png"]
    for name, path in zip(inputs, written):
        source = np.asarray(Image.open(tmp_path / "in" / name).convert("RGB"))  # the JPEG as decoded
        expected = restore_image(model, source, scale=2, tile=12, tile_overlap=4)
        assert np.abs(np.asarray(Image.open(path)).astype(int) - expected.astype(int)).max() <= 1, name
    assert Image.open(written[0]).size == (60, 42) and Image.open(written[1]).size == (38, 34)
    with pytest.raises(ValueError, match="input='.*missing' is neither an image file nor a folder"):
        restore(OmegaConf.merge(cfg, {"input": str(tmp_path / "missing")}))
