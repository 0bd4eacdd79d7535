"""Stage 1: reproducible subset selection of a COCO panoptic split."""
