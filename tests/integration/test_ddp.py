"""DDP on CPU (gloo) through torchrun: 2 processes on one node, and 2 "nodes" of 1 process
running the rendered PyTorchJob's own Master and Worker commands.

The data are identical images without flips, and the RPN/RoI samplers take every candidate,
so each image's loss is the same function in every process. Then 2 processes x 1 image
compute, per rank, exactly what 1 process x 1 image computes, and averaging two equal
gradients is exact: the weights must agree to float precision. Against 1 process x 2 images
the math is equal too (per-batch means), but float summation order differs; that difference
is bounded relative to how far training moved the weights.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from components.common.cluster import ClusterSettings
from components.common.coco_panoptic import CategoryMaps
from components.data.records import load_index
from components.model.config import load_config, parse_overrides
from components.model.panoptic_fpn import PanopticFPN
from components.train.launcher import JobSpec, expand_command, render_pytorchjob
from components.train.trainer import train
from tests.servers import free_port
from tests.training import duplicate_image_split, load_state, make_shards, max_abs_diff, micro_config

pytestmark = pytest.mark.integration

EXACT = {"model": {"rpn_batch_size_per_image": 100000, "rpn_positive_fraction": 1.0,
                   "roi_batch_size_per_image": 100000, "roi_positive_fraction": 1.0},
         "input": {"flip_prob": 0.0}, "solver": {"max_iter": 4, "scale_lr": False}}
OVERRIDES = ["model.rpn_batch_size_per_image=100000", "model.rpn_positive_fraction=1.0",
             "model.roi_batch_size_per_image=100000", "model.roi_positive_fraction=1.0", "input.flip_prob=0.0",
             "solver.max_iter=4", "input.min_size_train=[128]", "input.max_size_train=192", "solver.ims_per_batch=2",
             "solver.reference_batch=2", "solver.warmup_iters=2", "solver.steps=[4]", "solver.base_lr=0.01",
             "solver.checkpoint_period=100", "solver.scale_lr=false", "data.num_workers=0", "data.shuffle_buffer=4",
             "log_period=1"]


@pytest.fixture(scope="module")
def dup_shards(synth_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    root = duplicate_image_split(synth_root, str(tmp / "coco"))
    return make_shards(root, str(tmp), split="dup2017")


def _torchrun(args: list[str], node_rank: int | None = None, nnodes: int = 1, nproc: int = 2, port: int = 0):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}"]
    if node_rank is not None:
        cmd.append(f"--node_rank={node_rank}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd + ["-m", "components.train"] + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("layout", ["2 processes on 1 node", "2 nodes x 1 process, as the PyTorchJob runs"])
def test_ddp_equals_single_process(dup_shards, tmp_path, layout):
    # the references run with 1 thread, as each torchrun process does: kernels block their sums
    # by thread count, and a last-bit difference can flip an NMS or top-k decision in 4 iterations
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(micro_config(**EXACT), dup_shards, str(tmp_path / "single"), progress=False)
        one = train(micro_config(**{**EXACT, "solver": {**EXACT["solver"], "ims_per_batch": 1}}), dup_shards,
                    str(tmp_path / "one"), progress=False)
    finally:
        torch.set_num_threads(threads)
    args = ["--shards", dup_shards, "--output", str(tmp_path / "ddp"), "--config", "tiny", "--quiet", "--no-mlflow",
            "--device", "cpu"]
    for o in OVERRIDES:
        args += ["--set", o]
    port = free_port()
    if layout == "2 processes on 1 node":
        procs = [_torchrun(args, port=port)]
    else:  # the PyTorchJob's own commands, expanded as Kubernetes does with the operator's env
        config_uri = str(tmp_path / "train_config.json")  # what the train step writes for the pods
        with open(config_uri, "w") as f:
            json.dump(load_config("tiny", parse_overrides(OVERRIDES)).to_dict(), f)
        job = render_pytorchjob(JobSpec(name="ddp", image="panoptic-cuda:test", nodes=2, gpus_per_node=0,
                                        shards=dup_shards, output=str(tmp_path / "ddp"), config_uri=config_uri,
                                        cluster=ClusterSettings(accelerator="")))
        procs = []
        for rank, role in enumerate(("Master", "Worker")):
            command = job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]["command"]
            command = expand_command(command, {"RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
            assert command[0] == "torchrun"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run"] + command[1:] +
                                          ["--no-mlflow", "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    assert "trained 4 iterations" in outs[0]
    a, b = load_state(single.model_uri), load_state(str(tmp_path / "ddp" / "model.pt"))
    diff = max_abs_diff(a, b)
    # how far training moved the weights from their (seeded, shared) initial values
    cfg = micro_config(**EXACT)
    torch.manual_seed(cfg.seed)
    init = PanopticFPN.from_config(cfg, CategoryMaps.from_json(load_index(dup_shards)["categories"])).state_dict()
    moved = max_abs_diff(a, {k: v for k, v in init.items() if k in a})
    exact = max_abs_diff(load_state(one.model_uri), b)
    print(f"{layout}: max |1x1 - ddp| = {exact:.2e}; max |1x2 - ddp| = {diff:.2e}; max |trained - init| = {moved:.2e}")
    assert exact <= 1e-5
    # a different sample or a summed (not averaged) gradient would differ by the order of the movement
    assert diff <= 0.05 * moved


def test_ddp_evaluation_during_training_shares_the_images_and_scores_as_one_process(synth_root, dup_shards, tmp_path):
    """Each of 2 ranks scores half of the validation images; the gathered PQ is what the evaluate
    stage gives the same model file on the same images, and rank 0 alone keeps the best."""
    from components.evaluate.core import evaluate
    from components.evaluate.settings import EvaluateSettings

    val = make_shards(synth_root, str(tmp_path / "val"), split="val2017")
    args = ["--shards", dup_shards, "--val-shards", val, "--output", str(tmp_path / "ddp"), "--config", "tiny",
            "--quiet", "--no-mlflow", "--device", "cpu"]
    for o in OVERRIDES + ["solver.eval_period=2", "solver.eval_images=3", "input.min_size_test=128",
                          "input.max_size_test=192"]:
        args += ["--set", o]
    p = _torchrun(args, port=free_port())
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    doc = json.load(open(tmp_path / "ddp" / "train_metrics.json"))
    assert [e["iter"] for e in doc["evals"]] == [2, 4] and all(e["val/images"] == 3 for e in doc["evals"])
    assert "best PQ" in out and os.path.exists(tmp_path / "ddp" / "best" / "model.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as each torchrun process ran
    try:
        m = evaluate(str(tmp_path / "ddp" / "model.pt"), val, str(tmp_path / "ev"),
                     EvaluateSettings(max_images=3, batch_size=1, report_samples=0, device="cpu"),
                     progress=False).metrics
    finally:
        torch.set_num_threads(threads)
    assert m["PQ"] == pytest.approx(doc["evals"][-1]["val/PQ"], abs=1e-12)
