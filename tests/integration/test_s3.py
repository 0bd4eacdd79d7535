"""The storage layer against a real S3 API: moto's server on 127.0.0.1."""

import json

import pytest

from components.common import storage
from components.common.coco_panoptic import load_split
from components.common.validation import validate_split
from components.preprocess.core import PreprocessConfig, load_index, preprocess
from components.preprocess.reader import ShardDataset
from components.select_subset.core import SubsetConfig, select_subset
from components.synthetic.generator import SynthConfig, generate
from tests.servers import moto_s3

pytestmark = pytest.mark.integration


def test_synth_subset_preprocess_and_read_on_s3(tmp_path):
    with moto_s3("panoptic"):
        root = "s3://panoptic/coco"
        generate(root, SynthConfig(train=6, val=2, seed=1, min_side=96, max_side=160), progress=False)
        assert storage.listdir(root) == ["annotations", "train2017", "val2017"]
        assert validate_split(root, "train2017", progress=False).ok
        m = select_subset(SubsetConfig(size=5, seed=0), root, "train2017", "s3://panoptic/runs/1/subset")
        r = preprocess(PreprocessConfig(shard_images=2, workers=2), m.manifest_uri, "s3://panoptic/runs/1/shards",
                       progress=False)
        assert (r.images_in, r.rows_written, r.quarantined, len(r.shards)) == (5, 5, 0, 3)
        again = preprocess(PreprocessConfig(shard_images=2, workers=0), m.manifest_uri, "s3://panoptic/runs/1/shards",
                           progress=False)
        assert again.skipped_shards == 3
        index = load_index("s3://panoptic/runs/1/shards")
        assert index["rows_written"] == 5
        ids = sorted(s["image_id"] for s in ShardDataset("s3://panoptic/runs/1/shards",
                                                         load_split(root, "train2017").categories, raw=True))
        assert ids == m.image_ids
        assert json.loads(storage.read_text("s3://panoptic/runs/1/subset/manifest.json"))["num_images"] == 5
