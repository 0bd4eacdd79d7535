"""`panoptic train` (also `python -m components.train`, torchrun-compatible)."""

from __future__ import annotations

import os

import click

from components.model.config import ConfigError, builtin_configs, load_config, parse_overrides


@click.command("train")
@click.option("--shards", required=True, help="Shard folder from `panoptic preprocess` (local or s3://).")
@click.option("--output", required=True, help="Folder for checkpoints and model.pt (local or s3://).")
@click.option("--val-shards", default=None,
              help="Validation shards to score PQ on every solver.eval_period iterations (--set "
                   "solver.eval_period=N); the best model is kept in OUTPUT/best/.")
@click.option("--config", "config_name", default="r50_1x", show_default=True,
              help=f"Built-in config ({', '.join(builtin_configs())}) or a YAML path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set solver.max_iter=200 (repeatable).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--no-resume", is_flag=True, help="Start over even if OUTPUT has checkpoints.")
@click.option("--allow-config-change", is_flag=True,
              help="Resume although the config differs from the checkpoint's (the changes are logged; refused "
                   "otherwise, naming them).")
@click.option("--mlflow/--no-mlflow", default=True, show_default=True,
              help="Log to MLflow when MLFLOW_TRACKING_URI is set.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(shards, output, val_shards, config_name, overrides, device, no_resume, allow_config_change, mlflow,
              quiet):
    """Train Panoptic FPN. Under torchrun (WORLD_SIZE > 1) it trains with DDP.

    Resumes automatically from the latest checkpoint in OUTPUT; SIGTERM saves a checkpoint
    and exits, so preemptible nodes lose no work.
    """
    from components.train.trainer import train

    try:
        cfg = load_config(config_name, parse_overrides(list(overrides)))
    except ConfigError as e:
        raise click.ClickException(str(e))
    log_fn = None
    if mlflow and os.environ.get("MLFLOW_TRACKING_URI") and int(os.environ.get("RANK", 0)) == 0:
        from components.common.tracking import metric_logger
        log_fn = metric_logger(prefix="train/")
    result = train(cfg, shards, output, device=device, resume=not no_resume, progress=not quiet, log_fn=log_fn,
                   allow_config_change=allow_config_change, val_shards=val_shards)
    if result.preempted:
        click.echo(f"stopped at iteration {result.iterations} (SIGTERM); checkpoint saved, re-run to resume")
        raise SystemExit(143)
    last = result.history[-1] if result.history else {}
    click.echo(f"trained {result.iterations} iterations (resumed from {result.resumed_from}); "
               f"final loss {last.get('total_loss', float('nan')):.4f}; model: {result.model_uri}")
    if result.best:
        from components.common import storage
        from components.train.trainer import BEST_DIR

        click.echo(f"best {result.best['metric']} {100 * result.best['value']:.2f} at iteration "
                   f"{result.best['iteration']}: {storage.join(output, BEST_DIR, 'model.pt')}")


train_cmd.name = "train"
