"""End to end in a real browser: a tiny sweep, `pet-sweep ui`, headless Chromium on the printed URL.

Checks that what pet-sweep logged is what a user sees: the sweep's parent run
with its trials nested under it, and a trial's per-epoch `error_rate` chart.
Screenshots go to $PET_SWEEP_SCREENSHOTS (default: the test's temporary folder).

Uses the system's Chromium (Debian's `chromium`, or $PET_SWEEP_CHROMIUM) through
Playwright; Playwright's own browser downloads are never used.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from click.testing import CliRunner

from pet_sweep.cli import cli

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
UI_START_TIMEOUT = 240  # seconds: MLflow's server takes a while on a busy two-core machine
PAGE_TIMEOUT = 90_000   # milliseconds, for each element the page must show


def chromium_path() -> str:
    path = os.environ.get("PET_SWEEP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip(f"no Chromium at {path} (install Debian's `chromium`, or set PET_SWEEP_CHROMIUM)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class UiProcess:
    """`pet-sweep ui` (or `dashboard`) as a user runs it; collects its output and finds the URL it prints."""

    def __init__(self, config: Path, port: int, command: str = "ui") -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pet_sweep", command, "--config", str(config), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith("open http"):
                    return line.split(" ", 1)[1]
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail("pet-sweep ui printed no URL:\n" + "\n".join(self.lines[-30:]))

    def interrupt(self) -> int:
        """Ctrl-C, as in a terminal; the server must go with it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.reader.join(5)


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("PET_SWEEP_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser_page() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    executable = chromium_path()
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except sync_api.Error as err:
            pytest.skip(f"Chromium at {executable} does not start: {str(err).splitlines()[0]}")
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(PAGE_TIMEOUT)
        yield page
        browser.close()


def close_assistant(page: Any) -> None:
    """MLflow 3 opens an assistant side panel; it hides half of the page in screenshots."""
    close = page.locator("button[data-component-id='mlflow.assistant.chat_panel.close']")
    if close.count():
        close.first.click()


@pytest.mark.train  # the tiny sweep it browses is trained here
def test_mlflow_ui_shows_the_sweep_and_its_trials(write_experiments: Callable[..., Path], browser_page: Any,
                                                  screenshots: Path) -> None:
    config = write_experiments()  # two trials, 1 frozen + 1 unfrozen epoch each
    run = CliRunner().invoke(cli, ["run", "--config", str(config), "--quiet"], catch_exceptions=False)
    assert run.exit_code == 0, run.output

    port = free_port()
    ui = UiProcess(config, port)
    try:
        url = ui.url(UI_START_TIMEOUT)
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/#/experiments/\d+\?workflowType=machine_learning", url)
        page = browser_page
        page.goto(url)

        # the runs table: the sweep's parent run, its trials nested under it
        page.get_by_text("sweep-tiny").first.wait_for()
        close_assistant(page)
        parent = page.locator("[role=row]", has_text="sweep-tiny").first
        expand = parent.locator("button[data-component-id*=runnamecellrenderer]")
        if page.locator("[role=row]", has_text="trial-1").count() == 0:
            expand.click()  # MLflow shows nested runs collapsed under their parent
        for name in ("trial-0", "trial-1"):
            page.locator("[role=row]", has_text=name).first.wait_for()
        assert page.locator("[role=row]", has_text=re.compile(r"trial-\d")).count() == 2
        page.screenshot(path=str(screenshots / "mlflow-runs.png"))

        # one trial: its per-epoch error_rate chart
        page.get_by_role("link", name="trial-1").first.click()
        page.get_by_role("tab", name="Model metrics").click()
        close_assistant(page)
        chart = (page.locator("div", has=page.locator("h4[title='error_rate']"))
                 .filter(has=page.locator(".js-plotly-plot")).last)  # the innermost: the chart's card
        chart.locator("path.js-line").first.wait_for(state="attached")  # drawn (a flat line has no height)
        assert chart.get_by_text("trial-1 (error_rate)").count() == 1  # the trial's series
        # one point per epoch, on the global epoch: 0 (frozen phase) and 1 (unfrozen phase)
        assert chart.locator("g.points path.point").count() == 2
        steps = {float(t) for t in chart.locator("g.xtick text").all_text_contents()}
        assert min(steps) == 0 and max(steps) == 1, steps
        page.screenshot(path=str(screenshots / "mlflow-trial.png"))
    finally:
        code = ui.interrupt()
    assert code == 0, "\n".join(ui.lines[-30:])
    assert "stopping the server" in ui.lines
    with socket.socket() as sock:  # the MLflow server went with it: nothing listens on its port
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    assert (screenshots / "mlflow-runs.png").stat().st_size > 10_000


def test_dashboard_shows_the_study(write_experiments: Callable[..., Path], browser_page: Any,
                                   screenshots: Path) -> None:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install 'pet-sweep[dashboard]')")
    import optuna

    config = write_experiments()
    (config.parent / "stores").mkdir()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{config.parent / 'stores' / 'optuna.db'}")
    study = optuna.create_study(study_name="tiny", storage=storage)
    for value in (0.30, 0.12, 0.2):  # a study as a sweep leaves it, without training
        trial = study.ask({"base_lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
        study.tell(trial, value)

    port = free_port()
    dashboard = UiProcess(config, port, "dashboard")
    try:
        url = dashboard.url(UI_START_TIMEOUT)
        assert url == f"http://127.0.0.1:{port}/dashboard/studies/{storage.get_study_id_from_name('tiny')}"
        page = browser_page
        page.goto(url)
        page.get_by_text("tiny").first.wait_for()
        page.get_by_text("Best Trial (number=1)").first.wait_for()  # the 0.12 trial
        page.screenshot(path=str(screenshots / "optuna-dashboard.png"))
    finally:
        code = dashboard.interrupt()
    assert code == 0, "\n".join(dashboard.lines[-30:])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
