"""Train a model: ``python train.py [model=...] [data=...] [experiment=...] [key=value ...]``."""
import hydra
from omegaconf import DictConfig

from chanzoo.configs import CONFIG_DIR
from chanzoo.run import train


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric", ""), 0.0)


if __name__ == "__main__":
    main()
