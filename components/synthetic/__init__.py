"""Synthetic dataset generator in COCO panoptic format."""
