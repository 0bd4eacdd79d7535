"""The whole DAG through kfp.local (SubprocessRunner) on a small synthetic set, twice."""

import os

import pytest

from components.synthetic.generator import SynthConfig, generate
from pipeline.cli import run_local

OVERRIDES = ";".join(["input.min_size_train=[128]", "input.max_size_train=192", "input.min_size_test=128",
                      "input.max_size_test=192", "solver.ims_per_batch=2", "data.num_workers=0"])


@pytest.mark.slow
def test_local_pipeline_registers_a_champion_and_gates_the_next(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    generate(str(tmp_path / "coco"), SynthConfig(train=10, val=4, seed=5, min_side=128, max_side=192), progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    kw = dict(root=str(tmp_path / "root"), mlflow_uri=uri, config="tiny", iterations=4, shard_images=4,
              overrides=OVERRIDES)
    first = run_local(str(tmp_path / "coco"), **kw)
    assert first["tags"]["model.version"] == "1" and "champion" in first["tags"]["model.aliases"]
    for k in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert k in first["metrics"]
    assert first["report"] and os.path.getsize(first["report"]) > 10_000
    assert "<h2>Panoptic Quality</h2>" in open(first["report"]).read()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("panoptic-fpn", "champion").version) == "1"
    children = client.search_runs([client.get_run(first["run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{first['run_id']}'")
    stages = {r.data.tags["panoptic.stage"]: r for r in children}
    assert set(stages) == {"subset", "preprocess", "train", "evaluate", "register"}
    arts = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id, "evaluate")}
    assert {"evaluate/report.html", "evaluate/metrics.json", "evaluate/per_class.csv"} <= arts
    assert "train/loss_sem_seg" in stages["train"].data.metrics
    parent = client.get_run(first["run_id"])
    assert parent.data.tags["lineage.manifest_hash"] and parent.data.tags["lineage.shards_hash"]
    assert parent.data.tags["git_sha"] and parent.data.params["config"] == "tiny"

    # a second run must beat the champion by 0.5 PQ: the gate fails, the champion stays
    second = run_local(str(tmp_path / "coco"), gate_margin=0.5, **kw)
    assert second["tags"]["model.version"] == "2" and second["tags"]["model.aliases"] == "challenger"
    assert str(client.get_model_version_by_alias("panoptic-fpn", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("panoptic-fpn", "challenger").version) == "2"
    reg = client.search_runs([parent.info.experiment_id], filter_string=
                             f"tags.mlflow.parentRunId = '{second['run_id']}' and tags.`panoptic.stage` = 'register'")[0]
    assert reg.data.tags["gate.promote"] == "False" and "margin" in reg.data.tags["gate.reason"]

    # runs compare: both pipeline runs, current aliases from the registry
    import csv
    import io

    from components.register.compare import compare_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rows = list(csv.DictReader(io.StringIO(compare_runs(as_csv=True))))
    assert {r["version"]: r["aliases"] for r in rows} == {"1": "champion", "2": "challenger"}
    assert all(float(r["PQ"]) >= 0 for r in rows)
    assert "PQ" in compare_runs().splitlines()[0]
