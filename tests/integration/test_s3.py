"""The storage layer against a real S3 API: moto's server on 127.0.0.1."""

import json

import pytest

from components.common import storage
from components.common.coco_panoptic import load_split
from components.common.validation import validate_split
from components.data.reader import ShardDataset
from components.data.records import load_index
from components.preprocess.core import PreprocessSettings, preprocess
from components.select_subset.core import SplitSettings, select_subset
from components.synthetic.generator import SynthSettings, generate
from tests.servers import moto_s3

pytestmark = pytest.mark.integration


def test_synth_subset_preprocess_and_read_on_s3(tmp_path):
    with moto_s3("panoptic"):
        root = "s3://panoptic/coco"
        generate(root, SynthSettings(train=6, val=2, seed=1, min_side=96, max_side=160), progress=False)
        assert storage.listdir(root) == ["annotations", "train2017", "val2017"]
        assert validate_split(root, "train2017", progress=False).ok
        m = select_subset(SplitSettings(size=5, seed=0), root, "train2017", "s3://panoptic/runs/1/subset")
        r = preprocess(PreprocessSettings(shard_images=2, workers=2), m.manifest_uri, "s3://panoptic/runs/1/shards",
                       progress=False)
        assert (r.images_in, r.rows_written, r.quarantined, len(r.shards)) == (5, 5, 0, 3)
        again = preprocess(PreprocessSettings(shard_images=2, workers=0), m.manifest_uri, "s3://panoptic/runs/1/shards",
                           progress=False)
        assert again.skipped_shards == 3
        index = load_index("s3://panoptic/runs/1/shards")
        assert index["rows_written"] == 5
        ids = sorted(s["image_id"] for s in ShardDataset("s3://panoptic/runs/1/shards",
                                                         load_split(root, "train2017").categories, raw=True))
        assert ids == m.image_ids
        assert json.loads(storage.read_text("s3://panoptic/runs/1/subset/manifest.json"))["num_images"] == 5


def test_predict_reads_and_writes_s3(synth_root, tmp_path):
    """`panoptic predict` takes s3:// images (a folder or a file) and an s3:// model, and writes to s3://."""
    import os

    from click.testing import CliRunner

    from components.cli import main
    from components.train.trainer import train
    from tests.training import make_shards, micro_config

    model = train(micro_config(solver={"max_iter": 1}), make_shards(synth_root, str(tmp_path / "t")),
                  str(tmp_path / "m"), progress=False).model_uri
    val = os.path.join(synth_root, "val2017")
    names = sorted(os.listdir(val))[:2]
    with moto_s3("panoptic"):
        for n in names:
            storage.write_bytes(f"s3://panoptic/photos/{n}", open(os.path.join(val, n), "rb").read())
        storage.write_bytes("s3://panoptic/models/model.pt", open(model, "rb").read())
        r = CliRunner().invoke(main, ["predict", "s3://panoptic/photos", "--model", "s3://panoptic/models/model.pt",
                                      "--out", "s3://panoptic/pred"])
        assert r.exit_code == 0, r.output
        stems = [n.rsplit(".", 1)[0] for n in names]
        assert storage.listdir("s3://panoptic/pred") == sorted(f"{s}{x}" for s in stems
                                                              for x in (".json", ".png", "_overlay.png"))
        doc = json.loads(storage.read_text(f"s3://panoptic/pred/{stems[0]}.json"))
        assert doc["file_name"] == names[0] and isinstance(doc["segments_info"], list)
        one = CliRunner().invoke(main, ["predict", f"s3://panoptic/photos/{names[1]}", "--model",
                                        "s3://panoptic/models/model.pt", "--out", str(tmp_path / "local")])
        assert one.exit_code == 0 and os.path.exists(tmp_path / "local" / f"{stems[1]}.png")
        assert not os.path.exists("s3:")  # no local folder named after the URI
        missing = CliRunner().invoke(main, ["predict", "s3://panoptic/nope.jpg", "--model",
                                            "s3://panoptic/models/model.pt", "--out", str(tmp_path / "x")])
        assert missing.exit_code == 1 and "s3://panoptic/nope.jpg: no such file or folder" in missing.output
