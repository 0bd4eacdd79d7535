"""Stage 5: register the model in MLflow, alias it ``challenger``, and gate promotion to ``champion``.

The gate: a new version becomes ``champion`` only if its PQ beats the champion's by more than
``margin`` (strictly: a tie never moves the alias) and no category's PQ drops by more than
``tolerance`` (both in PQ points, 0-1 scale). The first version becomes champion. The decision and the per-category deltas are
logged (``gate.json`` and tags on the run and the model version).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

from components.common import storage
from components.common.tracking import log_parent, setup, stage_run, tracking_uri

MODEL_NAME = "panoptic-fpn"
PER_CLASS_PREFIX = "pq_class_"


@dataclass
class GateDecision:
    promote: bool
    reason: str
    champion_version: str | None = None
    pq: float = 0.0
    champion_pq: float | None = None
    deltas: dict[str, float] = field(default_factory=dict)   # category id -> PQ(new) - PQ(champion)

    def to_json(self) -> dict:
        return self.__dict__


@dataclass
class RegisterResult:
    name: str
    version: str
    run_id: str
    aliases: list[str]
    decision: GateDecision


def gate(pq: float, per_class: dict[str, float], champion_pq: float | None, champion_per_class: dict[str, float],
         margin: float, tolerance: float, champion_version: str | None = None) -> GateDecision:
    """The promotion decision (pure function: numbers in, decision out)."""
    if champion_pq is None:
        return GateDecision(True, "no champion yet: the first version becomes champion", None, pq)
    deltas = {c: per_class.get(c, 0.0) - v for c, v in champion_per_class.items()}
    deltas.update({c: v for c, v in per_class.items() if c not in champion_per_class})
    worst = min(deltas.items(), key=lambda kv: kv[1], default=(None, 0.0))
    if pq <= champion_pq + margin:
        reason = f"PQ {pq:.4f} does not beat the champion's {champion_pq:.4f} by more than the margin {margin:.4f}"
        return GateDecision(False, reason, champion_version, pq, champion_pq, deltas)
    if worst[1] < -tolerance:
        reason = (f"category {worst[0]} drops by {-worst[1]:.4f} PQ, more than the tolerance {tolerance:.4f}")
        return GateDecision(False, reason, champion_version, pq, champion_pq, deltas)
    reason = f"PQ {pq:.4f} beats {champion_pq:.4f} by more than {margin:.4f}; no category drops more than {tolerance:.4f}"
    return GateDecision(True, reason, champion_version, pq, champion_pq, deltas)


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except Exception:  # MlflowException when the model or alias does not exist
        return None


def _per_class(metrics: dict) -> dict[str, float]:
    return {k[len(PER_CLASS_PREFIX):]: v for k, v in metrics.items() if k.startswith(PER_CLASS_PREFIX)}


def register(model_uri: str, eval_dir: str, *, name: str = MODEL_NAME, margin: float = 0.0, tolerance: float = 1.0,
             parent_run_id: str | None = None, uri: str | None = None, experiment: str | None = None,
             promote: bool = True, lineage: dict | None = None) -> RegisterResult:
    """Log ``model_uri`` (a model.pt) as an MLflow pyfunc, register a version, alias it
    ``challenger``, decide the gate against the current ``champion`` and (if ``promote``)
    move ``champion`` when the gate passes. ``eval_dir`` holds ``metrics.json`` from
    ``panoptic evaluate``."""
    from mlflow.tracking import MlflowClient

    from components.register.pyfunc import log_pyfunc

    metrics = json.loads(storage.read_text(storage.join(eval_dir, "metrics.json")))
    per_class = {str(c): r["pq"] for c, r in metrics["results"]["per_class"].items()}
    client = MlflowClient(tracking_uri(uri))
    setup(uri, experiment)
    with tempfile.TemporaryDirectory() as tmp:
        local_model = os.path.join(tmp, "model.pt")
        with open(local_model, "wb") as f:
            f.write(storage.read_bytes(model_uri))
        with stage_run("register", parent_run_id, uri, experiment) as run_ml:
            run = run_ml.active_run()
            run_ml.log_metrics({"PQ": metrics["PQ"], "SQ": metrics["SQ"], "RQ": metrics["RQ"],
                                **{f"{PER_CLASS_PREFIX}{c}": v for c, v in per_class.items()}})
            run_ml.set_tags({f"lineage.{k}": v for k, v in (lineage or {}).items()})
            info = log_pyfunc(local_model, registered_model_name=name)
            version = str(info.registered_model_version)
            champion = _champion(client, name)
            champ_pq, champ_per = None, {}
            if champion is not None:
                champ_metrics = client.get_run(champion.run_id).data.metrics
                champ_pq, champ_per = champ_metrics.get("PQ"), _per_class(champ_metrics)
            decision = gate(metrics["PQ"], per_class, champ_pq, champ_per, margin, tolerance,
                            champion.version if champion else None)
            run_ml.log_dict(decision.to_json(), "gate.json")
            run_ml.set_tags({"gate.promote": str(decision.promote), "gate.reason": decision.reason[:4000]})
            run_ml.log_params({"gate.margin": margin, "gate.tolerance": tolerance})
            run_id = run.info.run_id
    client.set_registered_model_alias(name, "challenger", version)
    client.set_model_version_tag(name, version, "PQ", f"{metrics['PQ']:.6f}")
    client.set_model_version_tag(name, version, "gate", "pass" if decision.promote else "fail")
    client.set_model_version_tag(name, version, "gate.reason", decision.reason[:4000])
    aliases = ["challenger"]
    if promote and decision.promote:
        promote_champion(name, version, uri=uri)
        aliases.append("champion")
    log_parent(parent_run_id, tags={"model.name": name, "model.version": version,
                                    "model.aliases": ",".join(aliases), "gate.promote": decision.promote}, uri=uri)
    return RegisterResult(name, version, run_id, aliases, decision)


def promote_champion(name: str, version: str, uri: str | None = None) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri(uri)).set_registered_model_alias(name, "champion", str(version))
