import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from components.common.devices import pick_device
from components.train.trainer import latest_checkpoint, lr_factor, train
from tests.training import load_state, make_shards, max_abs_diff, micro_config


@pytest.fixture(scope="module")
def shards(synth_root, tmp_path_factory):
    return make_shards(synth_root, str(tmp_path_factory.mktemp("train")))


def test_schedule_is_detectrons_warmup_multistep():
    cfg = micro_config(solver={"warmup_iters": 10, "warmup_factor": 0.001, "steps": [20, 30], "gamma": 0.1})
    assert lr_factor(0, cfg) == pytest.approx(0.001)
    assert lr_factor(5, cfg) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(10, cfg) == 1.0 and lr_factor(25, cfg) == pytest.approx(0.1)
    assert lr_factor(30, cfg) == pytest.approx(0.01)
    assert micro_config(solver={"ims_per_batch": 8, "reference_batch": 16, "base_lr": 0.02}).solver.lr() == 0.01


def test_device_names_get_an_index(monkeypatch):
    # `--device cuda` failed on a GPU: torch.cuda.set_device refuses a cuda device without an index
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert str(pick_device("cuda")) == "cuda:0" and str(pick_device("cuda:1")) == "cuda:1"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert str(pick_device("cuda")) == "cuda:3"
    assert str(pick_device("cpu")) == "cpu"


def test_resume_after_preemption_ends_with_the_same_weights(shards, tmp_path):
    cfg = micro_config()
    full = train(cfg, shards, str(tmp_path / "a"), progress=False)
    assert full.iterations == 6 and not full.preempted
    first = train(cfg, shards, str(tmp_path / "b"), stop_after=3, progress=False)
    assert first.preempted and first.iterations == 3
    assert latest_checkpoint(str(tmp_path / "b")).endswith("model_0000003.pth")
    assert not os.path.exists(tmp_path / "b" / "model.pt")
    second = train(cfg, shards, str(tmp_path / "b"), progress=False)
    assert second.resumed_from == 3 and second.iterations == 6
    assert max_abs_diff(load_state(full.model_uri), load_state(second.model_uri)) <= 1e-6
    history = json.load(open(tmp_path / "b" / "train_metrics.json"))["history"]
    assert [h["iter"] for h in history] == [1, 2, 3, 4, 5, 6]


def test_sigterm_checkpoints_and_a_rerun_resumes(shards, tmp_path):
    """A real process killed by SIGTERM mid-run, with a DataLoader worker, then resumed."""
    over = ["--set", "solver.max_iter=10", "--set", "solver.checkpoint_period=2", "--set", "data.num_workers=1"]
    base = [sys.executable, "-m", "components.train", "--shards", shards, "--config", "tiny", "--quiet", "--no-mlflow",
            "--set", "input.min_size_train=[128]", "--set", "input.max_size_train=192",
            "--set", "solver.ims_per_batch=2",
            "--set", "solver.reference_batch=2", "--set", "solver.warmup_iters=2", "--set", "solver.steps=[6]",
            "--set", "solver.base_lr=0.01", "--set", "data.shuffle_buffer=4"] + over
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    ref = subprocess.run(base + ["--output", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(base + ["--output", str(tmp_path / "run")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while latest_checkpoint(str(tmp_path / "run")) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "checkpoint saved, re-run to resume" in out
    stopped_at = int(latest_checkpoint(str(tmp_path / "run")).rsplit("_", 1)[1][:7])
    assert 2 <= stopped_at < 10
    again = subprocess.run(base + ["--output", str(tmp_path / "run")], env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {stopped_at}" in again.stdout
    ref, run = load_state(str(tmp_path / "ref" / "model.pt")), load_state(str(tmp_path / "run" / "model.pt"))
    assert max_abs_diff(ref, run) <= 1e-6


def test_a_non_finite_loss_stops_training_at_the_next_sync_before_any_checkpoint(shards, tmp_path, monkeypatch):
    """The loop keeps the finiteness check on the device and reads it only where it syncs anyway
    (log period, checkpoints, the end): a NaN at iteration 3 stops the run at iteration 4 (a
    checkpoint iteration), naming iteration 3, and no checkpoint holds what followed it."""
    import math

    import torch

    from components.model.panoptic_fpn import PanopticFPN

    forward, calls = PanopticFPN.forward, []

    def nan_at_third(self, batch):
        out = forward(self, batch)
        if self.training:
            calls.append(1)
            if len(calls) == 3:
                out = {**out, "loss_sem_seg": out["loss_sem_seg"] + torch.tensor(math.nan)}  # no NaN gradient
        return out

    monkeypatch.setattr(PanopticFPN, "forward", nan_at_third)
    cfg = micro_config(solver={"max_iter": 6, "checkpoint_period": 2}, log_period=5)
    with pytest.raises(FloatingPointError, match="stopped being finite at iteration 3 .*losses at 4"):
        train(cfg, shards, str(tmp_path / "run"), progress=False)
    assert latest_checkpoint(str(tmp_path / "run")).endswith("model_0000002.pth")
    assert len(calls) == 4


@pytest.mark.parametrize("key,value,message", [
    ("solver.checkpoint_period", 0, "solver.checkpoint_period = 0: must be in 1.."),
    ("solver.checkpoint_period", -1, "solver.checkpoint_period = -1"),
    ("input.min_size_test", 30000, "input.min_size_test = 30000: must be in 1..8192"),
    ("model.fpn_channels", -3, "model.fpn_channels = -3"),
    ("input.min_size_train", [0, 128], "input.min_size_train = (0, 128)"),
    ("model.detections_per_image", 0, "model.detections_per_image = 0"),
    ("data.num_workers", -3, "data.num_workers = -3"),
    ("input.copy_paste_prob", 1.5, "input.copy_paste_prob = 1.5"),
])
def test_config_values_out_of_range_are_refused_where_they_are_read(key, value, message):
    """In a --set, a YAML, or the config inside a model artifact (read by the same from_dict)."""
    import copy

    from components.model.config import ConfigError, from_dict, load_config, nested

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", {key: value})
    doc = copy.deepcopy(load_config("tiny").to_dict())
    section, field = key.split(".")
    doc[section][field] = nested({key: value})[section][field]
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(doc, "model.pt")
