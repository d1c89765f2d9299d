"""Accuracy per channel subset: subset parsing, ChannelViT (channel ids) and plain models (zero + rescale), eval.py."""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chanzoo.data.make_multichannel import build
from chanzoo.models.channelvit import ChannelVisionTransformer
from chanzoo.data.multichannel import MultiChannelDataModule
from chanzoo.run import build_model, evaluate
from chanzoo.tasks.channel_subsets import evaluate_channel_subsets, parse_subsets, write_subset_table
from chanzoo.configs import CONFIG_DIR

REPO = Path(__file__).resolve().parents[2]
NAMES = ["intensity", "edges", "lowpass", "highpass"]


def test_parse_all_and_lists() -> None:
    subsets = parse_subsets("all", NAMES)
    assert len(subsets) == 15 and subsets[0] == (0,) and subsets[-1] == (0, 1, 2, 3)
    assert len(set(subsets)) == 15
    assert parse_subsets([[0], ["edges", 3]], NAMES) == [(0,), (1, 3)]
    for bad, match in (("some", "null, 'all' or a list"), ([[]], "non-empty list"), ([[4]], "channel 4 in subset"),
                       ([["rgb"]], "'rgb' in subset"), ([[1, 1]], "names a channel twice")):
        with pytest.raises(ValueError, match=match):
            parse_subsets(bad, NAMES)


class Recorder(nn.Module):
    """A 'classifier' that predicts class = round(sum of its input) and records what it saw."""

    def __init__(self, with_ids: bool) -> None:
        super().__init__()
        self.num_classes, self.seen, self.w = 4, [], nn.Parameter(torch.zeros(()))
        if with_ids:
            self.forward = self.forward_ids  # type: ignore[method-assign]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.shape, None))
        return nn.functional.one_hot(x.sum(dim=(1, 2, 3)).round().long().clamp(0, 3), 4).float()

    def forward_ids(self, x: torch.Tensor, channel_ids: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.shape, channel_ids.tolist()))
        return nn.functional.one_hot(x.sum(dim=(1, 2, 3)).round().long().clamp(0, 3), 4).float()


def test_channel_ids_for_channelvit_and_zero_rescale_for_plain_models() -> None:
    x = torch.zeros(6, 4, 2, 2)
    x[:, :, 0, 0] = torch.tensor([0.25, 0.25, 0.25, 0.25])  # each channel sums to 0.25
    targets = torch.tensor([1, 1, 1, 2, 2, 2])
    loader = DataLoader(TensorDataset(x, targets), batch_size=3)

    with_ids = Recorder(with_ids=True)
    rows = evaluate_channel_subsets(with_ids, loader, [(1, 3), (0, 1, 2, 3)], NAMES)
    assert with_ids.seen[0] == (torch.Size([3, 2, 2, 2]), [1, 3])
    assert [r["subset"] for r in rows] == ["edges+highpass", "intensity+edges+lowpass+highpass"]
    assert [r["acc1"] for r in rows] == [0.0, 0.5]  # sums 0.5 -> class 0 (round half to even), 1.0 -> class 1
    plain = Recorder(with_ids=False)
    rows = evaluate_channel_subsets(plain, loader, [(2,), (1, 3)], NAMES)
    assert plain.seen[0][0] == torch.Size([3, 4, 2, 2])
    # plain-ViT HCS: one kept channel scaled by 4 -> sum 1.0 -> class 1; two kept scaled by 2 -> also 1.0
    assert [r["acc1"] for r in rows] == [0.5, 0.5]


def test_subset_accuracy_of_channelvit_matches_direct_computation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ChannelVisionTransformer(img_size=8, patch_size=4, in_chans=3, num_classes=3, embed_dim=24, depth=1,
                                     num_heads=2).eval()
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images[:40] / 16.0, dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    x[:, 1] = x[:, 1].flip(-1)
    y = torch.tensor(digits.target[:40] % 3)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    rows = evaluate_channel_subsets(model, loader, [(2,), (0, 1)], ["a", "b", "c"])
    with torch.no_grad():
        direct = [(model(x[:, [2]], torch.tensor([2])).argmax(1) == y).float().mean().item(),
                  (model(x[:, [0, 1]], torch.tensor([0, 1])).argmax(1) == y).float().mean().item()]
    assert [r["acc1"] for r in rows] == pytest.approx(direct)
    csv_path, md_path = write_subset_table(rows, tmp_path)
    written = [(r["subset"], r["channels"], r["k"], float(r["acc1"])) for r in csv.DictReader(open(csv_path))]
    assert written == [("c", "2", "1", pytest.approx(direct[0], abs=1e-6)),
                       ("a+b", "0 1", "2", pytest.approx(direct[1], abs=1e-6))]
    assert md_path.read_text().splitlines() == [
        "| subset | k | top-1 (%) |", "|---|---|---|",
        f"| c | 1 | {100 * direct[0]:.2f} |", f"| a+b | 2 | {100 * direct[1]:.2f} |",
    ]


def test_eval_with_channel_subsets_writes_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.py's ``eval_channel_subsets=all`` on a checkpoint: one row per subset, each accuracy equal to that of the
    checkpoint's model given only the subset's channels (and their ids) on the test images, computed here."""
    data_root = tmp_path / "data"
    build(data_root, n_train=20, n_test=48)
    overrides = ["model=channelvit_tiny_p8", "data=multichannel", f"data.root={data_root}",
                 "+model.kwargs.img_size=32", "+model.kwargs.depth=1", "trainer.accelerator=cpu",
                 "trainer.enable_progress_bar=false"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=overrides)
    torch.manual_seed(7)
    model = build_model(cfg.model).eval()
    ckpt = tmp_path / "channelvit.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[*overrides, f"ckpt_path={ckpt}", "eval_channel_subsets=all"])
    monkeypatch.chdir(tmp_path)
    evaluate(cfg)
    rows = list(csv.DictReader(open(tmp_path / "channel_subsets.csv")))
    dm = MultiChannelDataModule(str(data_root))
    dm.setup("test")
    images, labels = next(iter(DataLoader(dm.test_set, batch_size=48)))
    expected = []
    with torch.no_grad():
        for k in range(1, 5):
            for subset in itertools.combinations(range(4), k):
                index = torch.tensor(subset)
                accuracy = (model(images[:, index], channel_ids=index).argmax(1) == labels).float().mean().item()
                expected.append(("+".join(NAMES[i] for i in subset), " ".join(map(str, subset)), str(k), accuracy))
    assert [(r["subset"], r["channels"], r["k"]) for r in rows] == [e[:3] for e in expected]
    assert [float(r["acc1"]) for r in rows] == pytest.approx([e[3] for e in expected], abs=1e-6)
    assert len({e[3] for e in expected}) >= 3  # the subsets really score differently: a row swap would show
    payload = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["acc1"] for r in payload["channel_subsets"]] == pytest.approx([e[3] for e in expected], abs=1e-6)
    md = (tmp_path / "channel_subsets.md").read_text().splitlines()
    assert md[2] == f"| intensity | 1 | {100 * expected[0][3]:.2f} |" and len(md) == 2 + 15
