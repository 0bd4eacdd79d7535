"""The one setting for container images: IMAGE_REGISTRY and IMAGE_TAG (as `make images` uses them)."""

import os

IMAGE_REGISTRY = os.environ.get("IMAGE_REGISTRY", "ghcr.io/panoptic-pipeline")
IMAGE_TAG = os.environ.get("IMAGE_TAG", "0.1.0")
CPU_IMAGE = f"{IMAGE_REGISTRY}/panoptic-cpu:{IMAGE_TAG}"
GPU_IMAGE = f"{IMAGE_REGISTRY}/panoptic-cuda:{IMAGE_TAG}"
