"""Before a sweep: `pet-sweep lr-find` and `pet-sweep pretrain`."""

from __future__ import annotations

from pathlib import Path

import click

from pet_sweep.cli.common import config_option, fail_clearly, load, tracking_option
from pet_sweep.tracking import redact_url
from pet_sweep.train import quiet_fastai_import


@click.command("lr-find")
@click.argument("experiment", required=False)
@config_option
@click.option("--arch", "archs", multiple=True, help="Architecture to probe (repeatable; default: every one in the space).")
@click.option("--out", "out_dir", default="lr-find", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the loss-vs-LR plots.")
@click.option("--freeze-epochs", type=int,
              help="Frozen epochs before the unfrozen phase (default: the space's value, or its lower bound).")
@click.option("--num-it", type=click.IntRange(min=30), default=100, show_default=True,
              help="Mock-training steps per phase (fastai's num_it); fewer is faster and coarser.")
@tracking_option
@fail_clearly
def lr_find(experiment: str | None, config_path: str, archs: tuple[str, ...], out_dir: str,
            freeze_epochs: int | None, num_it: int, tracking_uri: str | None) -> None:
    """Run fastai's learning-rate finder for EXPERIMENT, frozen and then unfrozen.

    Prints fastai's four suggestions (minimum, steep, valley, slide) per phase, writes
    each phase's loss-vs-learning-rate plot, and logs a run `lr-find-<arch>` to MLflow.

    \b
    Example:
      pet-sweep lr-find digits --arch xresnet18 --out lr-find
    """
    exp = load(config_path, experiment, tracking_uri=tracking_uri)
    quiet_fastai_import()
    from pet_sweep.train.lrfind import find_for_experiment  # heavy: torch, fastai

    click.echo(f"experiment   {exp.name}  ({exp.config_path})")
    click.echo(f"MLflow       {redact_url(exp.tracking_uri)}  experiment '{exp.tracking_experiment}'")
    findings = find_for_experiment(exp, out_dir=Path(out_dir), archs=archs, freeze_epochs=freeze_epochs,
                                   num_it=num_it, echo=lambda line: click.echo(line))
    for found in findings:
        click.echo(f"plots        {', '.join(str(p) for p in found.plots)}")
        click.echo(f"MLflow run   lr-find-{found.arch} ({found.run_id})")


@click.command()
@click.argument("experiment", required=False)
@config_option
@click.option("--arch", "archs", multiple=True,
              help="Architecture to pretrain (repeatable; default: every ResNet in the space).")
@tracking_option
@fail_clearly
def pretrain(experiment: str | None, config_path: str, archs: tuple[str, ...], tracking_uri: str | None) -> None:
    """Train a body from scratch on EXPERIMENT's data, for experiments with `model.pretrained_on: EXPERIMENT`.

    Saves the full model's state dict in pet-sweep's cache (what `model.weights`
    loads) and logs a run `pretrain-<arch>` to MLflow. A checkpoint of the same data,
    architecture, image size, seed and `pretrain` settings is reused, not trained again.

    \b
    Example:
      pet-sweep pretrain digits-source
    """
    exp = load(config_path, experiment, tracking_uri=tracking_uri)
    quiet_fastai_import()
    from pet_sweep.train.pretrain import pretrain as pretrain_bodies  # heavy: torch, fastai, optuna

    click.echo(f"experiment   {exp.name}  ({exp.config_path})")
    click.echo(f"MLflow       {redact_url(exp.tracking_uri)}  experiment '{exp.tracking_experiment}'")
    for found in pretrain_bodies(exp, archs, echo=lambda line: click.echo(line)):
        click.echo(f"checkpoint   {found.arch}: {found.path}  sha256 {found.sha256[:16]}  "
                   f"(MLflow run pretrain-{found.arch} {found.run_id})")


