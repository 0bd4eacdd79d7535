"""Each new backbone learns on the CPU: PQ on the synthetic val split rises from the untrained
model's to a bar, in the setup of tests/integration/test_learning.py (80 iterations here).

Measured on the 2-core machine (seeded): swin_t_tiny PQ 0.456 (things 0.188, stuff 0.779),
convnext_t_tiny 0.515 (0.266, 0.813), about 30 s of training each; untrained: below 0.05.
"""

import pytest

from components.evaluate.core import EvaluateSettings, evaluate
from components.synthetic.generator import SynthSettings, generate
from components.train.trainer import train
from tests.training import make_shards
from tests.unit.test_backbones import TINY_CONFIGS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BAR = 0.30
ITERATIONS = 80


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("learn")
    root = str(tmp / "coco")
    generate(root, SynthSettings(train=64, val=16, seed=11, min_side=128, max_side=224), progress=False)
    return make_shards(root, str(tmp / "train")), make_shards(root, str(tmp / "val"), split="val2017")


def _pq(config: str, iterations: int, data, out) -> dict:
    import json

    from components.model.config import load_config
    from tests.training import MICRO

    over = json.loads(json.dumps(MICRO))
    over["input"].update({"min_size_train": [128, 160], "max_size_train": 224, "min_size_test": 160,
                          "max_size_test": 224, "flip_prob": 0.5})
    over["solver"].update({"ims_per_batch": 4, "reference_batch": 4, "base_lr": 0.02, "max_iter": iterations,
                           "warmup_iters": max(1, iterations // 8), "checkpoint_period": 1000,
                           "steps": [max(1, int(iterations * 0.75)), max(1, int(iterations * 0.94))]})
    over["log_period"] = 10
    result = train(load_config(config, over), data[0], str(out / "run"), progress=False)
    return evaluate(result.model_uri, data[1], str(out / "eval"), EvaluateSettings(report_samples=0),
                    progress=False).metrics


@pytest.mark.parametrize("backbone", [b for b in sorted(TINY_CONFIGS) if TINY_CONFIGS[b] != "tiny"])
def test_new_backbone_learns_on_cpu(backbone, data, tmp_path):
    untrained = _pq(TINY_CONFIGS[backbone], 1, data, tmp_path / "untrained")
    trained = _pq(TINY_CONFIGS[backbone], ITERATIONS, data, tmp_path / "trained")
    print(f"{backbone}: PQ {untrained['PQ']:.3f} -> {trained['PQ']:.3f} (things {trained['PQ_th']:.3f}, "
          f"stuff {trained['PQ_st']:.3f})")
    assert trained["PQ"] >= BAR and trained["PQ"] > untrained["PQ"] + 0.2
