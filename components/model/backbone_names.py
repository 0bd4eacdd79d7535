"""The backbone table's names: ``model.backbone`` -> the file of this folder that builds it.

Kept apart from the builders (which import torch), so that a config, and every stage setting
that names one, is checked in a blink before anything starts. A builder registers under a name
listed here (``register_backbone`` refuses any other).
"""

BACKBONES = {
    "resnet18": "resnet", "resnet34": "resnet", "resnet50": "resnet", "resnet101": "resnet",
    "swin_t": "swin",
    "convnext_t": "convnext",
}
