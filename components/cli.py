"""The `panoptic` command: one CLI over every stage of the pipeline."""

from __future__ import annotations

import importlib

import click

# (module, attribute, one line for `panoptic --help`) of each sub-command: imported only when
# it runs, so `panoptic --help` and light commands (pq) start at once, and a stage's heavy
# imports (torch, mlflow, kfp) load only for that stage.
COMMANDS = {
    "data": ("components.synthetic.cli", "data", "Datasets: synthetic ones, validating a split, augmentation preview."),
    "subset": ("components.select_subset.cli", "subset", "Stage 1: a reproducible subset of a split."),
    "preprocess": ("components.preprocess.cli", "preprocess_cmd", "Stage 2: Parquet shards, quality gate, quarantine."),
    "train": ("components.train.cli", "train_cmd", "Stage 3: train Panoptic FPN (DDP under torchrun)."),
    "evaluate": ("components.evaluate.cli", "evaluate_cmd", "Stage 4: predictions, PQ, report.html."),
    "register": ("components.register.cli", "register_cmd", "Stage 5: MLflow version and the promotion gate."),
    "pq": ("components.evaluate.cli", "pq", "PQ/SQ/RQ of prediction files, panopticapi's numbers."),
    "predict": ("components.predict.cli", "predict_cmd", "Panoptic PNG, overlay and JSON for images."),
    "pipeline": ("pipeline.cli", "pipeline", "The KFP DAG: compile, run-local, submit, schedule."),
    "runs": ("pipeline.runs", "runs", "Compare pipeline runs and registered versions tracked in MLflow."),
}


def _worded(e: Exception) -> click.ClickException | None:
    """An input or environment error as the one line click prints; None for a bug."""
    from components.common.errors import one_line

    message = one_line(e)
    return None if message is None else click.ClickException(message)


class LazyGroup(click.Group):
    """Sub-commands imported when they run; errors from bad input end in one line (see ``invoke``)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:
            worded = _worded(e)
            if worded is None:   # not an input or environment error: a bug, with its traceback
                raise
            raise worded from None

    def list_commands(self, ctx):
        return list(COMMANDS)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][2]) for name in self.list_commands(ctx)])

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)


def run_alone(command: click.Command, prog_name: str) -> None:
    """Run one stage's command as its own program (``python -m components.<stage>``, what the
    containers and the training pods run), its errors worded as ``panoptic`` words them."""
    import sys

    from components.common.logs import setup_logging

    setup_logging()
    try:
        command.main(prog_name=prog_name, standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(1)
    except Exception as e:
        worded = _worded(e)
        if worded is None:
            raise
        worded.show()
        sys.exit(1)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="panoptic-pipeline")
def main():
    """Panoptic FPN on COCO panoptic: data, the five stages, PQ, predict, the KFP pipeline."""
    from components.common.logs import setup_logging

    setup_logging()


if __name__ == "__main__":
    main()
