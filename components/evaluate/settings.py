"""The evaluate stage's settings (no torch here: every stage's settings are checked before a run starts)."""

from __future__ import annotations

from dataclasses import dataclass

from components.common.metrics import PER_IMAGE_FILE  # noqa: F401 (where evaluate writes it)


@dataclass(frozen=True)
class EvaluateSettings:
    batch_size: int = 2
    device: str = "auto"
    num_workers: int = 1
    max_images: int | None = None   # the first N images only (None: all)
    report_samples: int = 8
    write_predictions: bool = True
    post_workers: int = 4  # threads turning predictions into PQ counts and PNGs while inference
    #                        runs; 0 = in the inference loop itself, one image after another
    pair_counts: str = "auto"   # where (gt, pred) pixel pairs are counted: device (the inference
    #                             device, torch), host (numpy), auto (device on CUDA, else host)
    coco_ap: bool = True   # box AP and mask AP of the thing classes (COCOeval) beside PQ

    def __post_init__(self):
        for name, low in (("batch_size", 1), ("num_workers", 0), ("report_samples", 0), ("post_workers", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"evaluate: {name} must be a whole number >= {low}, not {value!r}")
        if self.pair_counts not in ("auto", "device", "host"):
            raise ValueError(f"evaluate: pair_counts must be auto, device or host, not {self.pair_counts!r}")
        if self.max_images is not None and (not isinstance(self.max_images, int) or isinstance(self.max_images, bool)
                                            or self.max_images < 1):
            raise ValueError(f"evaluate: max_images must be a whole number >= 1 (leave it out for every image), "
                             f"not {self.max_images!r}")
