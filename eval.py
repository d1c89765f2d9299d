"""Evaluate a checkpoint or pretrained weights: ``python eval.py ckpt_path=... | model=... model.pretrained=true``."""
from omegaconf import DictConfig

from chanzoo.entry import hydra_entry


def run(cfg: DictConfig) -> None:
    """Test ``ckpt_path`` (or the model's pretrained weights) on ``data``; writes metrics.json."""
    from chanzoo.run import evaluate

    evaluate(cfg)


main = hydra_entry("eval", run)

if __name__ == "__main__":
    main()
