"""The `pet-sweep` command: thin click commands over the library.

Each command parses its options, calls the library, and turns a `PetSweepError` into
a one-line message with exit code 2 (`common.fail_clearly`). Heavy modules (torch,
fastai, mlflow, optuna) are imported inside the commands, so `pet-sweep --help`
answers at once. The commands live by stage: `prepare` (lr-find, pretrain), `run`
(run, the hidden worker), `results` (report, export, train, list, fail-stale, sync),
`browse` (ui, dashboard).
"""

from __future__ import annotations

import click

from pet_sweep.cli import browse, prepare, results, run


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pet-sweep")
def cli() -> None:
    """Optuna sweeps of fastai fine-tunes (fastbook chapter 5), every trial logged to MLflow.

    Start with `pet-sweep run` (the default experiment of ./experiments.yaml).
    """


for command in (run.run, run.worker, prepare.lr_find, prepare.pretrain, results.report, results.export,
                results.train, results.register, results.list_, results.fail_stale, results.sync, browse.ui, browse.dashboard, browse.serve):
    cli.add_command(command)
