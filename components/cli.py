"""The `panoptic` command: one CLI over every stage of the pipeline."""

from __future__ import annotations

import importlib

import click

# (module, attribute) of each sub-command; imported lazily so `panoptic --help` stays fast
# and a stage's heavy imports (torch, mlflow, kfp) load only when that stage runs.
COMMANDS = {
    "data": ("components.synthetic.cli", "data"),
    "subset": ("components.select_subset.cli", "subset"),
    "preprocess": ("components.preprocess.cli", "preprocess_cmd"),
    "pq": ("components.evaluate.cli", "pq"),
    "train": ("components.train.cli", "train_cmd"),
    "evaluate": ("components.evaluate.cli", "evaluate_cmd"),
    "register": ("components.register.cli", "register_cmd"),
    "runs": ("components.register.cli", "runs"),
    "predict": ("components.predict.cli", "predict_cmd"),
    "pipeline": ("pipeline.cli", "pipeline"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="panoptic-pipeline")
def main():
    """Panoptic FPN on COCO panoptic: data, the five stages, PQ, predict, the KFP pipeline."""


if __name__ == "__main__":
    main()
