import subprocess
import sys

import pytest

from components.common.validation import FIXES, validate_split
from tests.corrupt import KINDS, corrupt


@pytest.mark.parametrize("kind", KINDS)
def test_validator_catches_each_broken_input(synth_copy, kind):
    image_id, target = corrupt(synth_copy, "train2017", kind)
    report = validate_split(synth_copy, "train2017", progress=False)
    assert not report.ok
    assert kind in report.counts(), report.render()
    p = next(p for p in report.problems if p.kind == kind)
    assert p.image_id == image_id and p.file == target
    assert FIXES[kind] in str(p) and target in str(p)
    assert report.bad_images == 1


def test_annotation_without_image(synth_copy):
    corrupt(synth_copy, "train2017", "missing_annotation")  # leaves image; now drop the image instead
    import json
    import os
    path = os.path.join(synth_copy, "annotations", "panoptic_val2017.json")
    doc = json.load(open(path))
    doc["images"] = doc["images"][1:]
    json.dump(doc, open(path, "w"))
    assert validate_split(synth_copy, "val2017", progress=False).counts() == {"annotation_without_image": 1}


def test_cli_exit_codes_and_report(synth_copy):
    cmd = [sys.executable, "-m", "components.cli", "data", "validate", synth_copy, "--split", "val2017", "--quiet"]
    ok = subprocess.run(cmd, capture_output=True, text=True)
    assert ok.returncode == 0 and "OK: every check passed" in ok.stdout
    corrupt(synth_copy, "val2017", "unknown_category")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "unknown_category" in bad.stdout and "category_id 7777" in bad.stdout
    missing = subprocess.run(cmd[:5] + [synth_copy + "/nope", "--split", "val2017"], capture_output=True, text=True)
    assert missing.returncode != 0 and "panoptic_val2017.json" in missing.stderr
