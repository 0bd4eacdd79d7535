import os
import shutil

import pytest

from components.synthetic.generator import SynthSettings, generate


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic COCO panoptic dataset, made once per test session. Do not modify."""
    root = str(tmp_path_factory.mktemp("synth") / "coco")
    generate(root, SynthSettings(train=16, val=8, seed=3, min_side=128, max_side=256), progress=False)
    return root


@pytest.fixture
def synth_copy(synth_root, tmp_path):
    """A private copy of the small synthetic dataset, free to break."""
    dst = str(tmp_path / "coco")
    shutil.copytree(synth_root, dst)
    return dst


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")


TEST_IMAGE_REGISTRY, TEST_IMAGE_TAG = "panoptic-test", "ci"   # what `make test-images` tags


@pytest.fixture(scope="session")
def images():
    """Our two images, built from this tree as `make test-images` builds them (a Docker engine,
    a locally made base, the lock's torch): `make test` builds them in the background (the tests that
    need them run last and wait), a lone pytest run builds them here.
    Returns {"cpu": ..., "cuda": ..., "env": the variables that make the DAG use them}."""
    import subprocess
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    status = os.environ.get("PANOPTIC_TEST_IMAGES")
    if status and os.path.isdir(status):   # `make test` builds them in the background: wait for it
        deadline = time.time() + 3600
        while not os.path.exists(os.path.join(status, "rc")) and time.time() < deadline:
            time.sleep(2)
        rc = open(os.path.join(status, "rc")).read().strip() if os.path.exists(os.path.join(status, "rc")) else "?"
        log = open(os.path.join(status, "log")).read() if os.path.exists(os.path.join(status, "log")) else ""
        assert rc == "0", f"make test-images failed (rc {rc}):\n{log[-3000:]}"
        print("\n" + "\n".join(line for line in log.splitlines() if "built" in line or "debootstrap" in line))
    else:
        r = subprocess.run(["make", "-s", "-C", root, "test-images"], capture_output=True, text=True, timeout=3600)
        assert r.returncode == 0, f"make test-images failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    env = {"IMAGE_REGISTRY": TEST_IMAGE_REGISTRY, "IMAGE_TAG": TEST_IMAGE_TAG}
    return {"cpu": f"{TEST_IMAGE_REGISTRY}/panoptic-cpu:{TEST_IMAGE_TAG}",
            "cuda": f"{TEST_IMAGE_REGISTRY}/panoptic-cuda:{TEST_IMAGE_TAG}", "env": env}


def pytest_collection_modifyitems(session, config, items):
    """The tests that run our images go last: `make test` builds the images meanwhile."""
    items.sort(key=lambda item: "images" in getattr(item, "fixturenames", ()))
