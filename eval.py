"""Evaluate a checkpoint or pretrained weights: ``python eval.py ckpt_path=... | model=... model.pretrained=true``."""
import hydra
from omegaconf import DictConfig

from chanzoo.configs import CONFIG_DIR
from chanzoo.run import evaluate


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
