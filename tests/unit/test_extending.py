"""docs/extending.md's recipes, followed as written in a scratch copy of the package: a backbone
is three files (the builder, its line in the name table, a config) and trains; a stage's setting
is one field, and `--set` reaches it from the pipeline's commands, typed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUILDER = '''"""A throwaway backbone: two convolutions (docs/extending.md's recipe, followed by a test)."""

import torch.nn as nn

from components.model.backbones import Backbone, register_backbone


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        c2 = self.a(x)
        c3 = self.b(c2)
        c4 = self.b(c3)
        return {"0": c2, "1": c3, "2": c4, "3": self.b(c4)}


@register_backbone("two_conv")
def two_conv(m, **options):
    return Backbone(_Body(), [8] * 4, m.fpn_channels, channels_last_helps=False)
'''


@pytest.fixture
def scratch(tmp_path):
    """The package copied, so that a recipe can be followed in files."""
    for folder in ("components", "pipeline"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _run(scratch, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=scratch, env={**os.environ, "PYTHONPATH": str(scratch)},
                          capture_output=True, text=True, timeout=600)


def _changed(scratch) -> list[str]:
    out = []
    for folder in ("components", "pipeline"):
        for d, _, files in os.walk(scratch / folder):
            for name in files:
                if name.endswith(".pyc"):
                    continue
                path = os.path.join(d, name)
                rel = os.path.relpath(path, scratch)
                original = os.path.join(ROOT, rel)
                if not os.path.exists(original) or open(original, "rb").read() != open(path, "rb").read():
                    out.append(rel)
    return sorted(out)


def test_a_backbone_is_three_files_and_trains(scratch, synth_root, tmp_path_factory):
    from tests.training import make_shards

    (scratch / "components/model/backbones/two_conv.py").write_text(BUILDER)
    names = scratch / "components/model/backbone_names.py"
    names.write_text(names.read_text().replace('"convnext_t": "convnext",', '"convnext_t": "convnext",\n'
                                                                         '    "two_conv": "two_conv",'))
    (scratch / "components/model/configs/two_conv_tiny.yaml").write_text(
        "_base_: tiny.yaml\nname: two_conv_tiny\nmodel:\n  backbone: two_conv\n")
    assert _changed(scratch) == ["components/model/backbone_names.py", "components/model/backbones/two_conv.py",
                                 "components/model/configs/two_conv_tiny.yaml"]
    shards = make_shards(synth_root, str(tmp_path_factory.mktemp("shards")), size=4)
    r = _run(scratch, "import sys; sys.argv = ['panoptic', 'train', '--shards', %r, '--output', 'run', '--config', "
             "'two_conv_tiny', '--set', 'solver.max_iter=1', '--set', 'solver.ims_per_batch=2', '--set', "
             "'data.num_workers=0', '--set', 'input.min_size_train=[96]', '--set', 'input.max_size_train=128', "
             "'--no-mlflow', '--quiet']; from components.cli import main; main()" % shards)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 1 iterations" in r.stdout
    # and the pipeline's settings check knows it
    r = _run(scratch, "from pipeline.cli import pipeline_arguments; "
                      "print(pipeline_arguments(['train.config=tiny', 'train.model.backbone=two_conv']))")
    assert r.returncode == 0 and "two_conv" in r.stdout, r.stderr[-2000:]


def test_a_setting_is_one_field_and_travels_typed(scratch):
    core = scratch / "components/preprocess/core.py"
    text = core.read_text()
    anchor = "    max_bad_fraction: float"
    assert anchor in text
    core.write_text(text.replace(anchor, "    shout_every: int = 0\n" + anchor, 1))
    assert _changed(scratch) == ["components/preprocess/core.py"]
    r = _run(scratch, "from pipeline.cli import pipeline_arguments; "
                      "print(pipeline_arguments(['preprocess.shout_every=5']))")
    assert r.returncode == 0 and "{'preprocess': {'shout_every': 5}}" in r.stdout, r.stderr[-2000:]
    r = _run(scratch, "from pipeline.cli import pipeline_arguments; pipeline_arguments(['preprocess.shout_every=x'])")
    assert r.returncode != 0 and "shout_every must be a whole number" in r.stderr
    # without the field, the same item is refused, naming the known settings
    r = _run(ROOT, "from pipeline.cli import pipeline_arguments; pipeline_arguments(['preprocess.shout_every=5'])")
    assert r.returncode != 0 and "preprocess has no setting 'shout_every'" in r.stderr
