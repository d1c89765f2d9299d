"""Print docs/models.md rows: parameters and GMACs at each model's reference input, by chanzoo.profile's counters.

    python benchmarks/model_table.py [model ...]    (default: the DaViT and InceptionNeXt configs)

Models are built on the meta device (shapes only, no memory), so even davit_giant is counted in seconds. GMACs are
FlopCounterMode FLOPs / 2, the unit the papers call "FLOPs"; the reference input is the model's pretrained-cfg
``input_size`` (384 for the DaViT-L config's fine-tune variant).
"""
from __future__ import annotations

import sys

import torch

import chanzoo
from chanzoo.profile import count_flops, count_params

DEFAULT = {
    "davit_tiny": {}, "davit_small": {}, "davit_base": {},
    "davit_large": {"window_size": 12, "pretrained_cfg_overlay": {"input_size": (3, 384, 384)}},
    "davit_huge": {}, "davit_giant": {},
    "inception_next_atto": {}, "inception_next_tiny": {}, "inception_next_small": {}, "inception_next_base": {},
}


def row(name: str, kwargs: dict) -> str:
    with torch.device("meta"):
        model = chanzoo.create_model(name, **kwargs).eval()
        size = tuple(model.pretrained_cfg["input_size"])
        flops, _ = count_flops(model, torch.zeros(1, *size))
    params, _ = count_params(model)
    return f"| {name} | {size[-1]} | {params / 1e6:.2f} | {flops / 2e9:.2f} |"


def main(names: list[str]) -> None:
    print("| model | input | params (M) | GMACs |")
    print("|---|---|---|---|")
    for name in names or list(DEFAULT):
        print(row(name, DEFAULT.get(name, {})))


if __name__ == "__main__":
    main(sys.argv[1:])
