"""The stages of the DAG and how a setting reaches one: the table, the grammar, the check.

One table (``STAGES``: stage name -> its settings dataclass) serves the DAG (a ``dict``
parameter per stage), every CLI command (compile, run-local, submit, schedule) and the hints
they print. One grammar for all of them, ``--set NAME=VALUE``:

* ``STAGE.KEY=VALUE``: a field of the stage's settings (``train.iterations=300``,
  ``subset.size=0.1``, ``register.margin=0.01``); VALUE is YAML (``true``, ``[128, 160]``,
  ``{"trials": 3}``), typed by the field.
* ``train.SECTION.KEY=VALUE``: a key of the training config (``train.solver.base_lr=0.01``,
  ``train.input.min_size_train=[128]``); it lands in ``train.overrides``, typed by the config's
  dataclasses.
* ``STAGE=MAPPING``: a whole stage at once (``train={"config": "r50_3x", "nodes": 2}``).
* ``NAME=VALUE`` for the run's own parameters: ``data_uri``, ``mlflow_uri``, ``experiment``,
  ``run_name``, ``force``.

``check`` parses every stage's settings (and resolves the training config) before anything
starts: a misspelt key fails at once, naming the known ones.
"""

from __future__ import annotations

import importlib

import yaml

# stage -> "module:SettingsClass" (imported when asked for: none of them imports torch)
STAGES = {
    "subset": "components.select_subset.core:SubsetSettings",
    "preprocess": "components.preprocess.core:PreprocessSettings",
    "train": "components.train.settings:TrainSettings",
    "evaluate": "components.evaluate.settings:EvaluateSettings",
    "register": "components.register.core:RegisterSettings",
}
RUN_PARAMETERS = {"data_uri": str, "mlflow_uri": str, "experiment": str, "run_name": str, "force": bool,
                  "kfp_ui": str, "mlflow_run_id": str}
CONFIG_SECTIONS = ("model", "input", "solver", "data")   # the training config's (components/model/config.py)
# ``train.seed`` / ``train.log_period``: the config's own top-level keys, also overrides


class SettingError(ValueError):
    """A ``--set`` item or a stage setting that does not fit; the message names the known ones."""


def settings_class(stage: str) -> type:
    if stage not in STAGES:
        raise SettingError(f"{stage!r} is not a stage; stages: {', '.join(STAGES)}")
    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


def stage_keys(stage: str) -> list[str]:
    import dataclasses

    return sorted(f.name for f in dataclasses.fields(settings_class(stage)))


def _value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_sets(items, settings: dict | None = None, run: dict | None = None) -> tuple[dict, dict]:
    """``--set`` items -> (run parameters, {stage: {key: value}}), added to ``run`` and
    ``settings`` (later items win). Names are checked here; values by ``check``."""
    from components.common.settings import close_to

    run = dict(run or {})
    settings = {stage: dict(values) for stage, values in (settings or {}).items()}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise SettingError(f"{item!r}: use NAME=VALUE (e.g. train.iterations=300)")
        stage, _, key = name.partition(".")
        if not key:
            if name in RUN_PARAMETERS:
                run[name] = _value(text) if RUN_PARAMETERS[name] is bool else text
                continue
            if name in STAGES:
                value = _value(text)
                if not isinstance(value, dict):
                    raise SettingError(f"{item!r}: {name} takes a mapping ({name}={{...}}), or use {name}.KEY=VALUE")
                settings.setdefault(name, {}).update(value)
                continue
            hint = next((f" (did you mean {s}.{name}?)" for s in STAGES if name in stage_keys(s)), "") or \
                close_to(name, [*RUN_PARAMETERS, *STAGES])
            raise SettingError(f"{item!r}: no run parameter or stage {name!r}{hint}; run parameters: "
                               f"{', '.join(RUN_PARAMETERS)}; stages: {', '.join(STAGES)}")
        if stage not in STAGES:
            raise SettingError(f"{item!r}: {stage!r} is not a stage{close_to(stage, STAGES)}; stages: "
                               f"{', '.join(STAGES)}")
        first = key.split(".", 1)[0]
        if stage == "train" and ((first in CONFIG_SECTIONS and "." in key) or key in ("seed", "log_period")):
            settings.setdefault("train", {}).setdefault("overrides", {})[key] = _value(text)
            continue
        keys = stage_keys(stage)
        if key not in keys:
            extra = f"; or a training config key: train.{{{','.join(CONFIG_SECTIONS)}}}.KEY" if stage == "train" else ""
            raise SettingError(f"{item!r}: {stage} has no setting {key!r}{close_to(key, keys)}; its settings: "
                               f"{', '.join(keys)}{extra}")
        settings.setdefault(stage, {})[key] = _value(text)
    return run, settings


def check(settings: dict) -> dict:
    """Every stage's settings parsed by its dataclass, and the training config resolved (keys,
    types, backbone, the run's length): the first problem raises ``SettingError`` naming it.
    Returns the parsed settings objects by stage."""
    from components.common.settings import SettingsError, parse_settings
    from components.model.config import ConfigError
    from components.train.settings import resolve_config

    parsed = {}
    try:
        for stage in STAGES:
            parsed[stage] = parse_settings(settings_class(stage), settings.get(stage) or {}, f"{stage} settings")
        resolve_config(parsed["train"])
    except (SettingsError, ConfigError, ValueError) as e:
        raise SettingError(str(e)) from None
    unknown = sorted(set(settings) - set(STAGES))
    if unknown:
        raise SettingError(f"{', '.join(unknown)}: not stages; stages: {', '.join(STAGES)}")
    return parsed
