"""Speed of the running app in a real browser (headless Chromium) on the real derm-real-dev images.

    python bench/browser_speed.py [--repeats 3] [--image-size 224] [--home DIR] [--json OUT.json]
                                  [--baseline BEFORE.json] [--write]

Set-up (a few minutes, skipped when ``--home`` already holds the run): a fresh
``MELREVIEW_HOME``; ``python -m melcore datasets add`` registers
``../shared/data/derm-real-dev`` (1,209 dermoscopy JPEGs, clinic column ``source``);
``python -m melcore jobs submit --preset cpu-default`` queues the default recipe (frozen
ImageNet EfficientNet-Lite0, cached multi-level features, logistic head) and
``python -m trainers.worker --once`` trains it. Then ``streamlit run app.py`` starts
headless on a free port and Playwright drives ``/usr/bin/chromium`` (never a downloaded
browser) through what a user does, timing each step from the click until the page has
settled: the expected element is shown and Streamlit has run no script for 0.4 s (the
time recorded is the start of that quiet period, so the settle wait is not counted).

Steps (median of ``--repeats``; the cold ones once, in a server that has not yet loaded
TensorFlow):

* page switch: every page to the next (Home -> Patients -> Train -> Compare -> Review ->
  Score -> Home), goal 1.5 s;
* Compare: the Youden preset, a click on the ROC curve, a slider step, saving the
  threshold, goal 0.5 s each;
* Review: the first Grad-CAM (cold: TensorFlow and the model loaded), the first Grad-CAM
  of another lesion (model warm, goal 3 s), a cached one (back to a lesion already
  shown, goal 0.5 s);
* Score: the first upload (cold model), then new uploads with the model warm (goal 2 s).

The machine's load (``uptime``) is printed with the numbers: on 2 shared cores the
figures move with what else runs. ``--json`` keeps the figures; ``--baseline`` prints
each step against an earlier such file; ``--write`` adds the section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from browser_helpers import CHROMIUM, CHROMIUM_ARGS, NAV_LINKS, StreamlitServer, kill_workers  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "derm-real-dev"
DATASET = "derm-real-dev"
PAGES = ["Patients", "Train", "Compare", "Review", "Score", "Home"]
HOME_HEADING = "melreview"
GOALS = {"page switch": 1.5, "threshold": 0.5, "gradcam cached": 0.5, "gradcam first": 3.0, "upload warm": 2.0}
SETTLE = 0.4
RUNNING_JS = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    if (app && app.getAttribute('data-test-script-state') === 'running') return true;
    const status = document.querySelector('[data-testid="stStatusWidget"]');
    return !!(status && status.offsetParent !== null && status.innerText.trim().length > 0);
}"""


# --------------------------------------------------------------------------- set-up


def _env(home: Path) -> dict:
    env = dict(
        os.environ,
        MELREVIEW_HOME=str(home),
        TF_CPP_MIN_LOG_LEVEL="3",
        MELREVIEW_DATA_ROOTS=str(DATA.resolve().parent),
        PYTHONPATH=str(ROOT),
    )
    env.pop("MELREVIEW_DB_URL", None)
    return env


def _cli(home: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_env(home), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(
            f"{' '.join(args[:3])} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return done.stdout


def _has_run(home: Path) -> bool:
    import sqlite3

    db = home / "melreview.db"
    if not db.exists():
        return False
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return bool(conn.execute("SELECT COUNT(*) FROM runs WHERE run_dir IS NOT NULL").fetchone()[0])


def set_up(home: Path, image_size: int | None) -> float:
    """Register derm-real-dev and train one cpu-default run into ``home``; seconds taken (0 when already there)."""
    if _has_run(home):
        return 0.0
    start = time.perf_counter()
    _cli(
        home,
        "melcore",
        "datasets",
        "add",
        DATASET,
        "--csv",
        str(DATA / "labels.csv"),
        "--images",
        str(DATA / "images"),
        "--clinic-column",
        "source",
    )
    submit = ["melcore", "jobs", "submit", "--dataset", DATASET, "--preset", "cpu-default"]
    if image_size:
        submit += ["--image-size", str(image_size)]
    _cli(home, *submit)
    _cli(home, "trainers.worker", "--once")
    if not _has_run(home):
        raise SystemExit(f"the training job left no run in {home}: see {home / 'logs'}")
    return time.perf_counter() - start


# --------------------------------------------------------------------------- timing


def settled(page, start: float, ready=None, timeout: float = 240.0) -> float:
    """Seconds from ``start`` until ``ready()`` holds and no script has run for SETTLE s (the quiet start)."""
    deadline = start + timeout
    quiet_since = None
    while True:
        now = time.perf_counter()
        if now > deadline:
            raise TimeoutError(f"the page did not settle within {timeout:.0f} s")
        busy = page.evaluate(RUNNING_JS) or (ready is not None and not ready())
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= SETTLE:
            return quiet_since - start
        time.sleep(0.03)


def _heading(page, name: str):
    return page.get_by_role("heading", name=name, exact=True)


def _check(page, where: str) -> None:
    exceptions = page.locator('[data-testid="stException"]')
    if exceptions.count():
        raise SystemExit(f"{where}: Streamlit exception: {exceptions.first.inner_text()[:2000]}")


def switch(page, title: str) -> float:
    heading = HOME_HEADING if title == "Home" else title
    start = time.perf_counter()
    page.locator(NAV_LINKS).filter(has_text=title).first.click()
    seconds = settled(page, start, lambda: _heading(page, heading).count() > 0)
    _check(page, title)
    return seconds


def _thumb(page):
    return (
        page.locator('[data-testid="stSlider"]')
        .filter(has_text="Decision threshold")
        .locator('[data-testid="stSliderThumbValue"]')
    )


def _changed(page, before: str):
    return lambda: _thumb(page).count() > 0 and _thumb(page).inner_text() != before


def compare_steps(page, repeats: int, times: dict) -> None:
    from browser_helpers import click_curve_point

    page.get_by_role("heading", name="Operating point").wait_for(timeout=240_000)
    settled(page, time.perf_counter())
    for _ in range(repeats):
        # the slider moved off the Youden point first, so the preset always changes it
        thumb = page.locator('[data-testid="stSlider"]').filter(has_text="Decision threshold").get_by_role("slider")
        before = _thumb(page).inner_text()
        start = time.perf_counter()
        thumb.focus()
        thumb.press("ArrowRight")
        times.setdefault("Compare: slider step", []).append(settled(page, start, _changed(page, before)))
        before = _thumb(page).inner_text()
        start = time.perf_counter()
        page.get_by_role("button", name="Youden", exact=True).click()
        times.setdefault("Compare: Youden preset", []).append(settled(page, start, _changed(page, before)))
        before = _thumb(page).inner_text()
        click_curve_point(page, "ROC curves", trace=1, avoid=float(before))  # scrolls, hovers, waits, clicks
        start = time.perf_counter()  # just after the click: the helper's own waits are not counted
        times.setdefault("Compare: ROC click", []).append(settled(page, start, _changed(page, before)))
        save = page.get_by_role("button", name=re.compile(r"^Save \d\.\d{3,6} as this run's threshold"))
        start = time.perf_counter()
        save.click()
        saved = page.get_by_text(re.compile(r"Saved threshold \d\.\d{3,6} for"))
        times.setdefault("Compare: save threshold", []).append(
            settled(page, start, lambda saved=saved: saved.count() > 0)
        )
        _check(page, "Compare")


GRADCAM_CAPTION = re.compile(r"Grad-CAM \(standard\) · .*red = raised the melanoma score")


def review_steps(page, repeats: int, times: dict) -> None:
    page.get_by_text(re.compile(r"^Rank \d+ by risk")).first.wait_for(timeout=120_000)
    settled(page, time.perf_counter())
    overlay = page.get_by_text(GRADCAM_CAPTION)

    def rank() -> str:
        return page.get_by_text(re.compile(r"^Rank \d+ by risk")).first.inner_text().split("·")[0]

    start = time.perf_counter()
    page.locator('[data-testid="stCheckbox"]').filter(has_text="Show the overlay").first.click()
    times["Review: first Grad-CAM (cold: TensorFlow + model)"] = [settled(page, start, lambda: overlay.count() > 0)]
    _check(page, "Review Grad-CAM")
    for _ in range(repeats):
        here = rank()
        start = time.perf_counter()
        page.get_by_role("button", name="Next ▶").click()
        times.setdefault("Review: first Grad-CAM of a lesion (model warm)", []).append(
            settled(page, start, lambda here=here: rank() != here and overlay.count() > 0)
        )
        here = rank()
        start = time.perf_counter()
        page.get_by_role("button", name="◀ Previous").click()
        times.setdefault("Review: cached Grad-CAM (lesion shown before)", []).append(
            settled(page, start, lambda here=here: rank() != here and overlay.count() > 0)
        )
        page.get_by_role("button", name="Next ▶").click()
        settled(page, time.perf_counter())
        _check(page, "Review Grad-CAM")


def _lesion_png(path: Path, seed: int) -> Path:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    picture = Image.new("RGB", (320, 320), tuple(int(v) for v in rng.integers(150, 220, 3)))
    draw = ImageDraw.Draw(picture)
    x, y = rng.integers(60, 120, 2)
    draw.ellipse((int(x), int(y), int(x) + 140, int(y) + 150), fill=tuple(int(v) for v in rng.integers(30, 90, 3)))
    picture.save(path)
    return path


def score_steps(page, repeats: int, times: dict, folder: Path) -> None:
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Probability of melanoma")
    uploader = page.locator('[data-testid="stFileUploader"] input[type="file"]')
    shown = page.locator('[data-testid="stImage"] img').first

    def source() -> str | None:
        return shown.get_attribute("src") if shown.count() else None

    for i in range(repeats + 1):
        png = _lesion_png(folder / f"upload-{i}.png", i)
        name = "Score: first upload (cold model)" if i == 0 else "Score: upload scored (model warm)"
        before = source()
        start = time.perf_counter()
        uploader.set_input_files(str(png))
        times.setdefault(name, []).append(
            settled(page, start, lambda before=before: metric.count() > 0 and source() not in (None, before))
        )
        _check(page, "Score")


def drive(server: StreamlitServer, repeats: int, folder: Path) -> dict:
    from playwright.sync_api import sync_playwright

    times: dict[str, list[float]] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(120_000)
            page = context.new_page()
            start = time.perf_counter()
            page.goto(server.url + "/")
            times["Home: first page of a new server"] = [
                settled(
                    page,
                    start,
                    lambda: _heading(page, HOME_HEADING).count() > 0 and page.get_by_text(DATASET).count() > 0,
                )
            ]
            # one warm-up lap: every page's caches filled once (the cold visits are timed separately)
            for title in PAGES:
                times.setdefault(f"first visit: {title}", []).append(switch(page, title))
            for _ in range(repeats):
                for before, title in zip(["Home"] + PAGES, PAGES):
                    times.setdefault(f"page switch: {before} -> {title}", []).append(switch(page, title))
            switch(page, "Compare")
            compare_steps(page, repeats, times)
            switch(page, "Review")
            review_steps(page, repeats, times)
            switch(page, "Score")
            score_steps(page, repeats, times, folder)
            for title in ("Compare", "Review"):  # TensorFlow is loaded now: pages must stay quick
                times.setdefault(f"page switch after TensorFlow: -> {title}", []).append(switch(page, title))
            context.close()
        finally:
            browser.close()
    return times


# --------------------------------------------------------------------------- report


def goal_of(step: str) -> float | None:
    if step.startswith("page switch"):
        return GOALS["page switch"]
    if step.startswith("Compare:"):
        return GOALS["threshold"]
    if "cached Grad-CAM" in step:
        return GOALS["gradcam cached"]
    if "first Grad-CAM of a lesion" in step:
        return GOALS["gradcam first"]
    if "model warm" in step:
        return GOALS["upload warm"]
    return None


def medians(times: dict) -> dict:
    return {step: statistics.median(values) for step, values in times.items()}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def table(result: dict, baseline: dict | None) -> list[str]:
    head = "| step | n | median s | goal s | met |" + (" before s | before/after |" if baseline else "")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for step, value in result["median"].items():
        goal = goal_of(step)
        met = "" if goal is None else ("yes" if value <= goal else "**no**")
        row = f"| {step} | {len(result['times'][step])} | {value:.2f} | {'' if goal is None else goal} | {met} |"
        if baseline:
            before = baseline["median"].get(step)
            row += f" {before:.2f} | {before / value:.1f}x |" if before else " | |"
        lines.append(row)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=None, help="override cpu-default's 224 px")
    parser.add_argument("--home", type=Path, help="MELREVIEW_HOME to use (kept; default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--baseline", type=Path, help="an earlier --json file to compare with")
    parser.add_argument("--label", default="", help="what this measurement is (e.g. the commit)")
    parser.add_argument("--write", action="store_true", help="add the section to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if not (DATA / "labels.csv").is_file():
        print(f"{DATA}: not found (the shared derm-real-dev data)", file=sys.stderr)
        return 2
    if not CHROMIUM.exists():
        print(f"{CHROMIUM}: not found (Debian's chromium)", file=sys.stderr)
        return 2
    temporary = args.home is None
    home = Path(tempfile.mkdtemp(prefix="melreview-speed-")) if temporary else args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        setup_seconds = set_up(home, args.image_size)
        print(f"set-up (register + train cpu-default): {setup_seconds:.0f} s", flush=True)
        # every Grad-CAM is computed in this measurement (a kept --home holds the last one's heatmaps)
        shutil.rmtree(home / "cache" / "gradcam", ignore_errors=True)
        load_before = load()
        os.environ.update({k: v for k, v in _env(home).items() if k.startswith("MELREVIEW")})
        server = StreamlitServer(home, home / "streamlit.log")
        server.wait_healthy()
        times = drive(server, args.repeats, home)
        result = {
            "label": args.label,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "machine": f"{platform.node()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "load_before": load_before,
            "load_after": load(),
            "setup_seconds": setup_seconds,
            "times": times,
            "median": medians(times),
        }
    finally:
        if server is not None:
            server.stop()
        kill_workers(home)
        if temporary:
            shutil.rmtree(home, ignore_errors=True)
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    lines = table(result, baseline)
    print(
        f"\n{result['date']} · {result['machine']}\nload before: {result['load_before']}\n"
        f"load after:  {result['load_after']}"
    )
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.write:
        section = [
            f"\n### {args.label or 'measurement'} ({result['date']})\n",
            f"Machine: {result['machine']}. Load before: `{result['load_before']}`; after: "
            f"`{result['load_after']}` (2 cores shared with other jobs: times are inflated).\n",
            *lines,
            "",
        ]
        with open(ROOT / "bench" / "RESULTS.md", "a") as out:
            out.write("\n".join(section) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
