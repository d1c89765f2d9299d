"""Dense prediction: backbone -> feature pyramid adapter, torchvision detectors and smp segmentation decoders."""
from chanzoo.dense.backbone import PyramidBackbone, SimplePyramid, default_out_indices, freeze_stages
from chanzoo.dense.detection import DETECTION_HEADS, BackboneFPN, build_detector
from chanzoo.dense.optim import dense_param_groups
from chanzoo.dense.profile import dense_profile
from chanzoo.dense.segmentation import SEGMENTATION_DECODERS, SegmentationModel, build_segmenter

__all__ = [
    "DETECTION_HEADS", "SEGMENTATION_DECODERS", "BackboneFPN", "PyramidBackbone", "SegmentationModel", "SimplePyramid",
    "build_detector", "build_segmenter", "default_out_indices", "dense_param_groups", "dense_profile",
    "freeze_stages",
]
