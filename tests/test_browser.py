"""Notebook 06 as a user sees it: JupyterLab in Debian's Chromium, Run All, then the dashboard's Run button.

Starts a private JupyterLab (free localhost port, random token, temporary root/config/settings dirs),
opens ``notebooks/06_live_training.ipynb`` in ``/usr/bin/chromium`` driven by Playwright (no browser
download: ``executable_path``), runs every cell with ``WORKBENCH_QUICK=1``, and asserts from the page that

- every code cell executed (a failing cell stops Run All, so later cells would have no count);
- the dashboard's widgets rendered (Run/Stop buttons, the perturbation and IS-mode dropdowns, the ρ slider);
- the live plotly figure rendered with the headless run's points, and *grows* after clicking Run
  (updates pushed from the kernel's background thread reach the browser), then Stop ends it;
- the static figure rendered too.

Screenshots go to the test's temp dir (``dashboard.png``, ``page.png``). Skips with a reason where
Chromium or Playwright is missing (``apt-get install chromium``; ``pip install -e '.[browser]'``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # ~1-2 min: starts JupyterLab and a browser

CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_live_training.ipynb"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# Selector of the live FigureWidget: a plotly plot inside the ipywidgets VBox (the static figure is not).
LIVE_PLOT = ".widget-vbox .js-plotly-plot"
JS_POINTS = f"() => {{ const gd = document.querySelector('{LIVE_PLOT}'); return gd && gd.data ? gd.data[0].x.length : -1; }}"
JS_DASHBOARD_BOX = """() => { const el = document.querySelector('.widget-vbox'); el.scrollIntoView();
    const r = el.getBoundingClientRect(); return {x: r.x, y: r.y, width: r.width, height: r.height}; }"""
JS_PROMPTS = """() => Array.from(document.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt'))
    .map(e => e.textContent.trim())"""


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[browser]' (no browser download needed)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_lab(root: Path, state: Path, port: int, token: str) -> subprocess.Popen[bytes]:
    settings = state / "lab-settings"
    notification = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {
        **os.environ,
        "WORKBENCH_QUICK": "1",
        "JUPYTER_CONFIG_DIR": str(state / "config"),
        "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"),
        "IPYTHONDIR": str(state / "ipython"),
    }
    cmd = [
        sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
        "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
        "--ServerApp.terminals_enabled=False",
    ]  # fmt: skip
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI often run as root
        cmd.append("--allow-root")
    with open(state / "lab.log", "wb") as log:  # the server keeps its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_lab(
    proc: subprocess.Popen[bytes], port: int, token: str, log: Path, timeout: float = 60
) -> None:
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"JupyterLab did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop_lab(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started (own session)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_until(page: object, js: str, check: object, timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = page.evaluate(js)  # type: ignore[attr-defined]
        if check(value):  # type: ignore[operator]
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last value {value!r}")


def run_notebook_in_browser(notebook: Path, tmp_path: Path) -> dict[str, object]:
    """Open ``notebook`` in JupyterLab in Chromium, run it, exercise the dashboard; returns what was seen."""
    from playwright.sync_api import sync_playwright

    root, state = tmp_path / "root", tmp_path / "state"
    root.mkdir()
    state.mkdir()
    shutil.copy(notebook, root / notebook.name)
    port, token = _free_port(), secrets.token_hex(16)
    proc = _start_lab(root, state, port, token)
    seen: dict[str, object] = {}
    t_start = time.monotonic()
    try:
        _wait_for_lab(proc, port, token, state / "lab.log")
        seen["t_server"] = time.monotonic() - t_start
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1100})
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{notebook.name}?token={token}")
                t0 = time.monotonic()
                page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=60_000)
                page.wait_for_selector("#jp-main-statusbar >> text=/Idle/", timeout=60_000)  # kernel ready
                seen["t_kernel_ready"] = time.monotonic() - t0
                page.click(".lm-MenuBar-itemLabel:text-is('Run')")
                page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
                prompts = _wait_until(
                    page, JS_PROMPTS,
                    lambda ps: bool(ps) and all(x.startswith("[") and x[1:-2].strip().isdigit() for x in ps),
                    240, "every code cell to finish (a failing cell stops Run All)",
                )  # fmt: skip
                seen["prompts"] = prompts
                # textContent, not innerText: JupyterLab skips rendering off-screen cells (content-visibility),
                # and innerText of skipped content is empty.
                seen["buttons"] = page.locator(".widget-button").all_text_contents()
                seen["dropdowns"] = page.locator(".widget-dropdown").count()
                seen["sliders"] = page.locator(".widget-hslider").count()
                seen["plots"] = page.locator(".js-plotly-plot").count()
                seen["points_after_run_all"] = _wait_until(
                    page, JS_POINTS, lambda n: n > 0, 20, "the live figure to show the headless run"
                )
                seen["t_run_all"] = time.monotonic() - t0
                # Ask for many steps, press the dashboard's Run: training continues in a background thread.
                steps_box = page.locator(".widget-inline-hbox", has=page.locator("label", has_text="steps"))
                steps_box.locator("input").fill("1000")
                steps_box.locator("input").press("Enter")
                page.locator(".widget-button", has_text="Run").first.click()
                n0 = int(seen["points_after_run_all"])  # type: ignore[call-overload]
                seen["points_after_click"] = _wait_until(
                    page, JS_POINTS, lambda n: n > n0, 60, "a new point in the live figure after clicking Run"
                )
                seen["t_live"] = time.monotonic() - t0
                page.locator(".widget-button", has_text="Stop").first.click()
                seen["status"] = _wait_until(
                    page,
                    "() => Array.from(document.querySelectorAll('.widget-html')).map(e => e.textContent).join(' ')",
                    lambda t: "stopped after round" in t,
                    30,
                    "the status line to say the loop stopped",
                )
                # Screenshots once the curves stand still (a page that redraws every step may never settle).
                page.screenshot(path=str(tmp_path / "dashboard.png"), clip=page.evaluate(JS_DASHBOARD_BOX))
                page.screenshot(path=str(tmp_path / "page.png"))
            finally:
                browser.close()
    finally:
        _stop_lab(proc)
    return seen


def test_notebook_06_dashboard_renders_and_updates_live_in_chromium(tmp_path: Path) -> None:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    seen = run_notebook_in_browser(NOTEBOOK, tmp_path)
    print({k: v for k, v in seen.items() if k.startswith("t_")})  # phase timings, shown with -s or on failure
    buttons = seen["buttons"]
    assert any("Run" in b for b in buttons) and any("Stop" in b for b in buttons), buttons  # type: ignore[union-attr]
    assert int(seen["dropdowns"]) >= 2 and int(seen["sliders"]) >= 1, seen  # type: ignore[call-overload]
    assert int(seen["plots"]) >= 2, "expected the live FigureWidget and the static figure"  # type: ignore[call-overload]
    assert int(seen["points_after_click"]) > int(seen["points_after_run_all"]) > 0  # type: ignore[call-overload]
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
