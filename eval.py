"""Evaluate a checkpoint or pretrained weights: ``python eval.py ckpt_path=... | model=... model.pretrained=true``."""
from chanzoo.entry import hydra_entry
from chanzoo.run import evaluate

main = hydra_entry("eval", evaluate)

if __name__ == "__main__":
    main()
