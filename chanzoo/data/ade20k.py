"""ADE20K scene parsing, the 150-class SceneParsing benchmark (Zhou et al., 2017) as ``ADEChallengeData2016``.

Layout as released: ``root/images/{training,validation}/*.jpg`` and ``root/annotations/{training,validation}/*.png``
(20,210 / 2,000 images). Label files hold 0 for "other" and 1..150 for the classes; as mmseg's
``reduce_zero_label`` does, 0 becomes 255 (ignored) and the classes become 0..149.
"""
from __future__ import annotations

from typing import Any

from chanzoo.data.dense import SegmentationDataModule, check_root

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


class ADE20KDataModule(SegmentationDataModule):
    """ADE20K (SceneParsing, 150 classes after reduce-zero-label), 512x512 crops in the UperNet protocol.

    Args:
        root: the ``ADEChallengeData2016`` folder.
        train_split/val_split: sub-folder names under ``images/`` and ``annotations/``; test uses ``val_split``.
        Other arguments as in ``SegmentationDataModule``.
    """

    def __init__(self, root: str, train_split: str = "training", val_split: str = "validation",
                 num_classes: int = 150, **kwargs: Any) -> None:
        check_root(root, "/data/ADEChallengeData2016")
        if num_classes != len(ADE20K_CLASSES):
            raise ValueError(f"num_classes must be {len(ADE20K_CLASSES)} for ADE20K, got {num_classes}")

        def split(name: str) -> dict[str, str]:
            return {"img_dir": f"images/{name}", "ann_dir": f"annotations/{name}"}

        super().__init__(root, train=split(train_split), val=split(val_split), test=None, num_classes=num_classes,
                         class_names=ADE20K_CLASSES, reduce_zero_label=True, img_suffix=".jpg", ann_suffix=".png",
                         **kwargs)
