import os
import shutil

import pytest

from components.synthetic.generator import SynthConfig, generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic COCO panoptic dataset, made once per test session. Do not modify."""
    root = str(tmp_path_factory.mktemp("synth") / "coco")
    generate(root, SynthConfig(train=16, val=8, seed=3, min_side=128, max_side=256), progress=False)
    return root


@pytest.fixture
def synth_copy(synth_root, tmp_path):
    """A private copy of the small synthetic dataset, free to break."""
    dst = str(tmp_path / "coco")
    shutil.copytree(synth_root, dst)
    return dst


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")
