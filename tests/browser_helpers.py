"""Helpers for the whole-app browser test: a Streamlit server, headless Chromium, and clean-up.

The server runs ``streamlit run app.py`` as a subprocess in its own process group
with a private ``MELREVIEW_HOME``; :func:`kill_workers` finds the background
training workers that server started (``python -m trainers.worker``, detached in
their own session) by their command line / environment naming that home, and the
pids recorded in the store's ``workers`` table, and kills only those.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from melcore.devtools.ports import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
EXCEPTION = '[data-testid="stException"]'
NAV_LINKS = '[data-testid="stSidebarNav"] a'
STATUS = '[data-testid="stStatusWidget"]'


class StreamlitServer:
    """``streamlit run app.py`` on a free local port with its own MELREVIEW_HOME; ``stop()`` kills it."""

    def __init__(self, home: Path, log_path: Path):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        env = dict(
            os.environ,
            MELREVIEW_HOME=str(self.home),
            PYTHONPATH=str(PROJECT_ROOT),
            TF_CPP_MIN_LOG_LEVEL="3",
            STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
            MELREVIEW_WARM_UP="1",
        )  # the app as users get it: models warmed in the background
        env.pop("MELREVIEW_DB_URL", None)
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                str(PROJECT_ROOT / "app.py"),
                "--server.headless",
                "true",
                "--server.port",
                str(self.port),
                "--server.address",
                "127.0.0.1",
                "--browser.gatherUsageStats",
                "false",
                "--server.fileWatcherType",
                "none",
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"streamlit exited with code {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        raise TimeoutError(f"streamlit not healthy after {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            _kill_group(self.process.pid)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._log.close()


def _kill_group(pid: int, grace: float = 5.0) -> None:
    """SIGTERM the process group led by ``pid`` (a process we started in its own session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _alive(pid):
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _read(path: Path) -> str:
    try:
        return path.read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(home: Path) -> set[int]:
    """Pids of live ``trainers.worker`` processes that belong to the store under ``home``."""
    home = str(Path(home))
    candidates: set[int] = set()
    db = Path(home) / "melreview.db"
    if db.exists():
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                candidates |= {int(pid) for (pid,) in conn.execute("SELECT pid FROM workers WHERE pid IS NOT NULL")}
        except sqlite3.Error:
            pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            candidates.add(int(entry.name))
    found = set()
    for pid in candidates:
        cmdline = _read(Path(f"/proc/{pid}/cmdline"))
        if "trainers.worker" not in cmdline:
            continue
        # Ours only: the command line (--db URL) or the environment names our private home.
        if home in cmdline or home in _read(Path(f"/proc/{pid}/environ")):
            found.add(pid)
    return found


def kill_workers(home: Path) -> set[int]:
    """Kill the training workers of the store under ``home`` (and their process groups); returns their pids."""
    pids = worker_pids(home)
    for pid in pids:
        try:
            leads_group = os.getpgid(pid) == pid
        except ProcessLookupError:
            continue
        if leads_group:  # started with start_new_session: the group is the worker's own
            _kill_group(pid)
        else:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(3)
    return pids


# --------------------------------------------------------------------------- page helpers


def wait_idle(page, timeout: float = 120.0, settle: float = 0.6) -> None:
    """Wait until no script run is in progress (the status widget gone and the app 'notRunning')."""
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        running = (
            page.locator(STATUS).filter(visible=True).count() > 0
            or page.locator('[data-testid="stApp"][data-test-script-state="running"]').count() > 0
        )
        if running:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= settle:
            return
        time.sleep(0.15)
    raise TimeoutError(f"the app was still running a script after {timeout:.0f} s")


def assert_no_exception(page, where: str) -> None:
    """No Streamlit exception box and no raw traceback on the page."""
    exceptions = page.locator(EXCEPTION)
    assert exceptions.count() == 0, f"{where}: Streamlit exception shown: {exceptions.first.inner_text()[:2000]}"
    body = page.locator("body").inner_text()
    assert "Traceback" not in body, f"{where}: a traceback is shown:\n{body[body.index('Traceback') :][:2000]}"


def nav_entries(page) -> list[str]:
    """The sidebar navigation's entry titles (the last line of each link: icons come first)."""
    page.locator(NAV_LINKS).first.wait_for(timeout=30_000)
    return [text.strip().splitlines()[-1].strip() for text in page.locator(NAV_LINKS).all_inner_texts()]


def go_to(page, title: str) -> None:
    """Click a sidebar navigation entry and wait for that page's script run to finish."""
    page.locator(NAV_LINKS).filter(has_text=title).first.click()
    page.get_by_role("heading", name=title, exact=True).first.wait_for(timeout=60_000)
    wait_idle(page)


def open_options(page, label: str):
    """Open the select box (or multiselect) labelled ``label`` and return its option locator.

    Streamlit's select box is a react-aria combobox: a click on its text field does not
    always open the list (it only focuses it when the field already shows a value), so
    the box's own "Open" chevron is pressed when no option shows up after the click.
    """
    field = page.get_by_label(label, exact=True).first
    field.click()
    options = page.get_by_role("option")
    try:
        options.first.wait_for(timeout=3_000)
    except Exception:  # playwright's TimeoutError: fall back to the chevron
        box = page.locator('[data-testid="stSelectbox"], [data-testid="stMultiSelect"]').filter(has=field)
        box.get_by_role("button", name="Open").first.click()
        options.first.wait_for(timeout=30_000)
    return options


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the select box labelled ``label``."""
    options = open_options(page, label)
    options.filter(has_text=option).get_by_text(option, exact=True).first.click()
    wait_idle(page)


def set_number(page, label: str, value) -> None:
    """Type a value into the number input labelled ``label`` and commit it (Enter)."""
    box = page.get_by_label(label, exact=True).first
    box.fill(str(value))
    box.press("Enter")
    wait_idle(page)


def click_curve_point(page, chart_title: str, trace: int, avoid: float, fractions=(0.3, 0.6, 0.15, 0.8)) -> float:
    """Click a point of a plotly curve whose ``customdata`` differs from ``avoid``; return that value.

    ``trace`` counts the chart's scatter traces from 0; ``fractions`` (0-1) are the places
    along it tried in turn. Plotly listens on an overlay above the points, so the mouse
    clicks at the point's position (a locator click would stop at the overlay).
    """
    chart = page.locator('[data-testid="stPlotlyChart"]').filter(has_text=chart_title).first
    chart.scroll_into_view_if_needed()
    page.wait_for_timeout(300)
    points = chart.locator(".scatterlayer .trace").nth(trace).locator("path.point")
    for fraction in fractions:
        point = points.nth(int(fraction * (points.count() - 1)))
        value = float(point.evaluate("(el) => el.closest('.trace').__data__[0].trace.customdata[el.__data__.i]"))
        if abs(value - avoid) > 1e-3:
            break
    else:
        raise AssertionError(f"{chart_title}: every point tried has the threshold {avoid}")
    box = point.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.wait_for_timeout(200)
    page.mouse.click(x, y)
    return value


def screenshot(page, path: Path, max_height: int = 8000) -> Path:
    """The whole page as a PNG.

    Streamlit scrolls inside its main container, not the document, so Playwright's
    ``full_page`` alone captures one viewport: the viewport is grown to the content's
    height for the shot, then restored.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("""() => {
        const main = document.querySelector('[data-testid="stMain"]')
            || document.querySelector('[data-testid="stAppViewContainer"]');
        return main ? main.scrollHeight : document.body.scrollHeight;
    }""")
    try:
        if size and height > size["height"]:
            page.set_viewport_size({"width": size["width"], "height": min(int(height) + 40, max_height)})
            page.wait_for_timeout(1200)  # charts re-layout to the new size
        page.screenshot(path=str(path), full_page=True)
    finally:
        if size:
            page.set_viewport_size(size)
    return path
