"""Train a model: ``python train.py [model=...] [data=...] [experiment=...] [key=value ...]``."""
from omegaconf import DictConfig

from chanzoo.entry import hydra_entry


def run(cfg: DictConfig) -> float:
    """Fit, test and return the metric named by ``optimized_metric`` (for Hydra sweepers)."""
    from chanzoo.run import train

    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", ""), 0.0)


main = hydra_entry("config", run)

if __name__ == "__main__":
    main()
