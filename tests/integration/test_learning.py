"""The tiny config learns on CPU: the loss falls and PQ on the synthetic val split clears a bar.

Measured on the 2-core CI machine (seeded, CPU-deterministic): see LEARNING_BAR below.
"""

import json
import os

import pytest

from components.evaluate.core import EvaluateSettings, evaluate
from components.synthetic.generator import SynthSettings, generate
from components.train.trainer import train
from tests.training import make_shards, micro_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Measured for this exact setup on the 2-core machine: loss 3.158 -> 1.407, PQ 0.696 (things
# 0.561, stuff 0.857), 114 s. The bar leaves room for float differences across CPUs while
# failing a model that learned little (20 iterations give PQ ~0.03).
LEARNING_BAR = 0.50
ITERATIONS = 160


def test_tiny_learns_on_cpu(tmp_path):
    root = str(tmp_path / "coco")
    generate(root, SynthSettings(train=64, val=16, seed=11, min_side=128, max_side=224), progress=False)
    shards = make_shards(root, str(tmp_path / "train"))
    val = make_shards(root, str(tmp_path / "val"), split="val2017")
    cfg = micro_config(input={"min_size_train": [128, 160], "max_size_train": 224, "min_size_test": 160,
                              "max_size_test": 224, "flip_prob": 0.5},
                       solver={"ims_per_batch": 4, "reference_batch": 4, "base_lr": 0.02, "max_iter": ITERATIONS,
                               "warmup_iters": 20, "steps": [120, 150], "checkpoint_period": 1000},
                       log_period=10)
    result = train(cfg, shards, str(tmp_path / "run"), progress=False)
    losses = [h["total_loss"] for h in result.history]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    m = evaluate(result.model_uri, val, str(tmp_path / "eval"), EvaluateSettings(report_samples=0),
                 progress=False).metrics
    print(f"loss {first:.3f} -> {last:.3f}; PQ {m['PQ']:.3f} (things {m['PQ_th']:.3f}, stuff {m['PQ_st']:.3f})")
    assert last < 0.6 * first
    assert m["PQ"] >= LEARNING_BAR, json.dumps({k: m[k] for k in ("PQ", "PQ_th", "PQ_st")})
    assert os.path.exists(tmp_path / "eval" / "report.html")
