"""Panoptic FPN built on torchvision's detection parts, with detectron2's design and defaults."""
