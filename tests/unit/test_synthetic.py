import filecmp
import json
import os

import numpy as np
from PIL import Image

from components.common.coco_panoptic import load_split
from components.common.validation import validate_split
from components.synthetic.generator import SynthSettings, generate


def test_synth_passes_validation_and_panopticapi(synth_root):
    from panopticapi.utils import rgb2id as ref_rgb2id
    for split in ("train2017", "val2017"):
        report = validate_split(synth_root, split, progress=False)
        assert report.ok, report.render()
        data = load_split(synth_root, split)
        for image in data.images:
            ann = data.annotations[image["id"]]
            png = np.array(Image.open(data.png_uri(ann)), dtype=np.uint32)
            ids = set(np.unique(ref_rgb2id(png)).tolist()) - {0}
            assert ids == {s["id"] for s in ann["segments_info"]}


def test_synth_is_varied_and_coco_like(synth_root):
    data = load_split(synth_root, "train2017")
    cats = data.categories
    assert all(1 <= c <= 90 for c in cats.thing_ids) and all(92 <= c <= 200 for c in cats.stuff_ids)
    sizes = {(im["height"], im["width"]) for im in data.images}
    assert len(sizes) == len(data.images)  # sizes and aspect ratios vary
    segs = [s for a in data.annotations.values() for s in a["segments_info"]]
    used = {s["category_id"] for s in segs}
    assert len(used & set(cats.thing_ids)) >= 4 and len(used & set(cats.stuff_ids)) >= 3
    assert any(s["iscrowd"] for s in segs)
    per_image_things = [sum(cats.is_thing(s["category_id"]) for s in a["segments_info"])
                        for a in data.annotations.values()]
    assert max(per_image_things) >= 3
    void = 0
    for ann in data.annotations.values():
        void += int((np.array(Image.open(data.png_uri(ann)))[..., :].sum(-1) == 0).sum())
    assert void > 0
    assert all(im["id"] < 1_000_000 for im in data.images)
    assert all(im["id"] > 1_000_000 for im in load_split(synth_root, "val2017").images)


def test_synth_is_byte_identical_for_a_seed(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    cfg = SynthSettings(train=3, val=2, seed=7, min_side=96, max_side=200)
    generate(a, cfg, progress=False)
    generate(b, cfg, progress=False, workers=2)  # rendered in 2 processes: the same bytes
    generate(c, SynthSettings(train=3, val=2, seed=8, min_side=96, max_side=200), progress=False)
    files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
    assert len(files) == 2 + 5 + 5
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors
    with open(os.path.join(a, "annotations/panoptic_train2017.json")) as f1, \
            open(os.path.join(c, "annotations/panoptic_train2017.json")) as f2:
        assert json.load(f1) != json.load(f2)
