"""Browsing a sweep and serving its winner: `pet-sweep ui` (MLflow), `pet-sweep dashboard`
(optuna-dashboard), `pet-sweep serve` (a registered model behind `mlflow models serve`)."""

from __future__ import annotations

import shlex
from typing import Callable

import click

from pet_sweep import browse
from pet_sweep.cli.common import CliError, config_option, fail_clearly, load, storage_option, tracking_option
from pet_sweep.invocation import command


def _warn_host(host: str) -> None:
    warning = browse.host_warning(host)
    if warning:
        click.echo(warning, err=True)


def server_options(port: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """--config, --port (default `port`) and --host, the options of every command that starts a server."""
    host = click.option("--host", default="127.0.0.1", show_default=True,
                        help="Interface to bind; anything but loopback exposes it (no login).")
    listen = click.option("--port", type=click.IntRange(1, 65535), default=port, show_default=True,
                          help="Port to listen on.")
    return lambda command: config_option(listen(host(command)))


@click.command()
@click.argument("experiment", required=False)
@server_options(port=5000)
@tracking_option
@fail_clearly
def ui(experiment: str | None, config_path: str, port: int, host: str, tracking_uri: str | None) -> None:
    """Open the MLflow UI on EXPERIMENT's tracking store and print its page's URL.

    The sweep is a parent run `sweep-<study>` with the trials `trial-<n>` nested
    under it. With a remote tracking server (http[s]://), prints that server's
    page for the experiment instead of starting anything. Ctrl-C stops the UI.

    \b
    Example:
      pet-sweep ui digits --port 5001
    """
    exp = load(config_path, experiment, tracking_uri=tracking_uri)
    if browse.is_remote(exp.tracking_uri):
        url, note = browse.remote_experiment_url(exp.tracking_uri, exp.tracking_experiment)
        click.echo(f"MLflow experiment '{exp.tracking_experiment}' is on the tracking server")
        click.echo(f"open {browse.redact_url(url)}")
        if note:
            click.echo(f"note: {note}", err=True)
        return
    _warn_host(host)
    experiment_id = browse.mlflow_experiment_id(exp)
    browse.open_ui(f"the MLflow UI on {browse.redact_url(exp.tracking_uri)}",
                   browse.mlflow_command(exp.tracking_uri, host, port), host, port,
                   ready_path="/health", page_path=browse.mlflow_experiment_url("", experiment_id), echo=click.echo)


@click.command()
@click.argument("experiment", required=False)
@server_options(port=8080)
@storage_option
@fail_clearly
def dashboard(experiment: str | None, config_path: str, port: int, host: str, storage: str | None) -> None:
    """Open optuna-dashboard on EXPERIMENT's study storage and print the study's URL.

    Needs the optional extra: pip install 'pet-sweep[dashboard]'. Ctrl-C stops it.

    \b
    Example:
      pet-sweep dashboard digits
    """
    exp = load(config_path, experiment, storage=storage)
    browse.require_dashboard()
    _warn_host(host)
    state = browse.study_state(exp)
    if not state.found:
        raise CliError(f"no study {exp.study_name!r} in {state.storage}"
                       + (f" ({state.note})" if state.note else "") + f"; run `{command('run', exp.name)}` first")
    browse.open_ui(f"optuna-dashboard on {state.storage}",
                   browse.dashboard_command(exp.storage_url, host, port), host, port,
                   ready_path="/api/studies", page_path=f"/dashboard/studies/{state.study_id}", echo=click.echo)


@click.command()
@click.argument("name")
@click.option("--version", "version", default="latest", show_default=True,
              help="The registered version to serve (a number, or latest).")
@server_options(port=5001)
@tracking_option
@fail_clearly
def serve(name: str, version: str, config_path: str, port: int, host: str, tracking_uri: str | None) -> None:
    """Serve the registered model NAME (`pet-sweep train best.yaml --register NAME`) over HTTP.

    Runs `mlflow models serve` with this environment's packages, on 127.0.0.1 unless
    --host says otherwise, and prints a request to paste: one image, base64-encoded.
    The registry is the one of the default experiment's tracking store (or --tracking-uri).

    \b
    Example:
      pet-sweep serve digits-best --port 5001
    """
    from pet_sweep import serve as serving  # heavy: mlflow, pandas

    uri = tracking_uri or load(config_path, None).tracking_uri
    _warn_host(host)
    command = serving.serve_command(name, version, host, port, uri)
    sample = serving.sample_image(name, version, uri)
    how = ([f"(a request with {sample}, an image of the held-out split; put another image's path in its place)"]
           if sample else [f"(put an image's path in place of {serving.SAMPLE})"])
    # /invocations takes only POSTs: the request to paste, not a page to open
    browse.open_ui(f"model {name} version {version} from {browse.redact_url(uri)}", command, host, port,
                   ready_path="/ping", page_path=None, echo=click.echo,
                   ready_lines=[serving.curl_line("BASE", shlex.quote(str(sample or serving.SAMPLE))), *how])
