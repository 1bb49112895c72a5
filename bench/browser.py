"""Patients page benchmark at the real ISIC 2020 scale (33,126 images, 2,056 patients).

    python bench/browser.py [--csv ../shared/data/isic2020/train.csv] [--repeats 5] [--no-server]

Registers the real ISIC 2020 table in a temporary MELREVIEW_HOME (only 4 of its
images exist here: every other row is shown as a stand-in image, which is what
the page does for a missing file) with two runs: one scoring every image (saved
threshold 0.3) and one scoring a 20% validation split. Then it times:

  1. melcore.browse: preparing the patient table (cold, once per dataset and run)
     and each filter (warm; median of --repeats);
  2. the Patients page through Streamlit's AppTest: the first visit (cold: cohort,
     predictions and patient table are read and cached), then each interaction
     (filters, sort, paging, opening the largest patient, a lesion): a whole
     script run plus rendering, median of --repeats. "filter + render" is the
     slowest warm filter interaction. Goal <= 1 s;
  3. app cold start: ``streamlit run app.py`` headless in a new process, polled on
     /_stcore/health, then a websocket session (what a browser does) until the
     home page's script has finished; then the Patients page in the same session
     (cold cache). Goal: process start to first page <= 5 s.

The machine is shared, so figures are medians (or the single cold value); the
last line holds the two headline times.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from melcore.devtools.ports import free_port  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "isic2020" / "train.csv"
GOAL_FILTER = 1.0
GOAL_START = 5.0


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def seed_store(csv: Path):
    """Register the table and two runs with seeded scores; returns (store, dataset_id, cohort, run ids)."""
    import numpy as np

    from melcore.store import Store

    store = Store()
    start = time.perf_counter()
    dataset_id, cohort = store.register_dataset("isic2020", csv)
    print(
        f"register ISIC 2020 table: {time.perf_counter() - start:.2f} s  "
        f"({len(cohort):,} images, {cohort.summary()['n_patients']:,} patients, "
        f"{cohort.table['image_path'].notna().sum()} image files present, the rest shown as stand-ins)"
    )
    table = cohort.table
    rng = np.random.default_rng(0)
    malignant = table["target"].eq(1).fillna(False).to_numpy()
    scores = np.clip(rng.beta(1.0, 12.0, len(table)) + malignant * rng.uniform(0.1, 0.6, len(table)), 0, 1)
    frame = table[["image_name", "patient_id", "clinic", "target"]].assign(prediction=scores)
    full = store.add_run("effnet-b3 (all images)", None, dataset_id=dataset_id, model="efficientnet-b3", threshold=0.3)
    start = time.perf_counter()
    store.add_predictions(full, frame, split="val")
    print(f"store 33k predictions: {time.perf_counter() - start:.2f} s")
    val = store.add_run("resnet50 (20% val)", None, dataset_id=dataset_id, model="resnet50")
    store.add_predictions(
        val,
        frame.sample(frac=0.2, random_state=0).assign(
            prediction=lambda f: np.clip(f["prediction"] + rng.normal(0, 0.05, len(f)), 0, 1)
        ),
    )
    return store, dataset_id, cohort, full, val


def bench_library(store, cohort, run_id: int, repeats: int) -> dict:
    from melcore.browse import Filters, PatientBrowser, paginate, prediction_counts

    out = {}
    start = time.perf_counter()
    predictions = store.get_predictions(run_id)
    out["read predictions"] = time.perf_counter() - start
    start = time.perf_counter()
    browser = PatientBrowser(cohort, predictions)
    out["prepare patient table (cold)"] = time.perf_counter() - start
    out["prediction version query"] = _median_time(lambda: prediction_counts(store, [run_id]), repeats)
    cases = {
        "no filter": Filters(threshold=0.3),
        "site torso": Filters(sites=("torso",), threshold=0.3),
        "female 45-59 head/neck": Filters(sexes=("female",), age_bands=("45-59",), sites=("head/neck",), threshold=0.3),
        "has malignant": Filters(malignant=True, threshold=0.3),
        "risk >= threshold": Filters(above_threshold=True, threshold=0.3),
    }
    for name, filters in cases.items():
        out[f"filter: {name}"] = _median_time(lambda f=filters: paginate(browser.patients(f), 1, 50), repeats)
    largest = browser.summary.sort_values("n_images").iloc[-1]["patient"]
    fresh = PatientBrowser(cohort, predictions)
    start = time.perf_counter()
    fresh.patient_lesions(largest)
    out[f"patient lesions, {int(browser.summary['n_images'].max())} images (cold)"] = time.perf_counter() - start
    out["patient lesions (warm)"] = _median_time(lambda: fresh.patient_lesions(largest), repeats)
    return out, browser, largest


def bench_page(run_id: int, largest: str, repeats: int) -> tuple[dict, float]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "pages" / "patients.py"), default_timeout=300)
    out = {}
    start = time.perf_counter()
    at.run()
    out["first visit (cold caches)"] = time.perf_counter() - start
    _check(at)
    at.selectbox(key="patients_run").set_value(run_id)
    start = time.perf_counter()
    at.run()
    out["choose the all-images run (cold for this run)"] = time.perf_counter() - start
    _check(at)

    def timed(action, label, repeat=repeats):
        times = []
        for _ in range(repeat):
            action(True)
            start = time.perf_counter()
            at.run()
            times.append(time.perf_counter() - start)
            _check(at)
            action(False)
            at.run()
        out[label] = statistics.median(times)

    filters = {
        "filter: site torso": lambda on: at.multiselect(key="patients_site").set_value(["torso"] if on else []),
        "filter: sex + age band": lambda on: (
            at.multiselect(key="patients_sex").set_value(["female"] if on else []),
            at.multiselect(key="patients_age").set_value(["45-59"] if on else []),
        ),
        "filter: has malignant": lambda on: at.checkbox(key="patients_malignant").set_value(on),
        "filter: risk >= threshold": lambda on: at.checkbox(key="patients_flagged").set_value(on),
    }
    for label, action in filters.items():
        timed(action, label)
    filter_worst = max(out[label] for label in filters)
    timed(
        lambda on: at.selectbox(key="patients_sort").set_value("lesions" if on else "highest risk"), "sort by lesions"
    )
    timed(lambda on: at.number_input(key="patients_page").set_value(7 if on else 1), "table page 7")

    at.selectbox(key="patients_open").set_value(largest)
    start = time.perf_counter()
    at.run()
    out[f"open patient {largest} (24 of its stand-in tiles)"] = time.perf_counter() - start
    _check(at)
    grid = [b.key for b in at.button if b.key and b.key.startswith("patients_grid_open_")]
    start = time.perf_counter()
    at.button(key=grid[5]).click().run()
    out["open a lesion from the grid"] = time.perf_counter() - start
    _check(at)
    timed(
        lambda on: at.multiselect(key="patients_site").set_value(["torso"] if on else []),
        "filter with a patient open",
        repeat=max(1, repeats // 2),
    )
    return out, filter_worst


def _check(at) -> None:
    if at.exception:
        raise SystemExit(f"the page failed: {at.exception[0].value}")
    if at.error:
        raise SystemExit(f"the page showed an error: {at.error[0].value}")


def _session_run(ws, page_name: str = "", timeout: float = 120.0) -> tuple[float, list[str]]:
    """Ask the server to run a page in this websocket session; (seconds until its script finished, the
    headings it sent)."""
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    msg = BackMsg()
    msg.rerun_script.query_string = ""
    msg.rerun_script.page_name = page_name
    start = time.perf_counter()
    ws.send(msg.SerializeToString())
    headings = []
    while True:
        forward = ForwardMsg()
        forward.ParseFromString(ws.recv(timeout=timeout))
        kind = forward.WhichOneof("type")
        if kind == "delta" and forward.delta.new_element.WhichOneof("type") == "heading":
            headings.append(forward.delta.new_element.heading.body)
        elif kind == "script_finished":
            status = ForwardMsg.ScriptFinishedStatus.Name(forward.script_finished)
            if status == "FINISHED_EARLY_FOR_RERUN":
                continue
            if status != "FINISHED_SUCCESSFULLY":
                raise SystemExit(f"the app script ended with {status}")
            return time.perf_counter() - start, headings


def bench_server(home: str) -> dict:
    from websockets.sync.client import connect

    port = free_port()
    env = dict(os.environ, MELREVIEW_HOME=home, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(ROOT / "app.py"),
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
    ]
    out = {}
    start = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        while True:
            if process.poll() is not None:
                raise SystemExit(f"streamlit exited: {process.stdout.read().decode(errors='replace')[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/_stcore/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - start > 120:
                raise SystemExit("streamlit did not become healthy within 120 s")
            time.sleep(0.05)
        out["server healthy (/_stcore/health)"] = time.perf_counter() - start
        with urllib.request.urlopen(base + "/", timeout=10) as response:
            response.read()
        out["page HTML served"] = time.perf_counter() - start
        with connect(
            f"ws://127.0.0.1:{port}/_stcore/stream", subprotocols=["streamlit"], max_size=2**26, open_timeout=30
        ) as ws:
            home_seconds, home_headings = _session_run(ws)
            if "melreview" not in home_headings:
                raise SystemExit(f"the home page did not render its title (headings: {home_headings})")
            out["home page script finished (process start to first page)"] = time.perf_counter() - start
            out["  of which the home page run"] = home_seconds
            patients_seconds, patient_headings = _session_run(ws, "patients")
            out["Patients page in the new server (cold caches)"] = patients_seconds
            again, _ = _session_run(ws, "patients")
            out["Patients page again (warm)"] = again
            if "Patients" not in patient_headings:
                raise SystemExit(f"the Patients page did not render its title (headings: {patient_headings})")
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return out


def _print(title: str, figures: dict) -> None:
    print(f"\n{title}")
    for label, seconds in figures.items():
        print(f"  {label:<58} {seconds * 1000:9.1f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-server", action="store_true", help="skip the streamlit server cold start")
    args = parser.parse_args(argv)
    if not args.csv.is_file():
        print(f"{args.csv}: not found (pass --csv with the ISIC 2020 train.csv)", file=sys.stderr)
        return 2
    home = tempfile.mkdtemp(prefix="melreview-bench-")
    os.environ["MELREVIEW_HOME"] = home
    os.environ.pop("MELREVIEW_DB_URL", None)
    # the table's folder must be a folder datasets may be registered from (README, Security)
    os.environ["MELREVIEW_DATA_ROOTS"] = str(args.csv.resolve().parent)
    try:
        store, _, cohort, full_run, _ = seed_store(args.csv)
        library, _, largest = bench_library(store, cohort, full_run, args.repeats)
        _print("melcore.browse", library)
        page, filter_worst = bench_page(full_run, largest, args.repeats)
        _print("Patients page (AppTest: script run + render, median)", page)
        start_time = float("nan")
        if not args.no_server:
            server = bench_server(home)
            _print("app cold start (streamlit run, headless)", server)
            start_time = server["home page script finished (process start to first page)"]
        print(f"\ngoals: filter + render <= {GOAL_FILTER:.0f} s, cold start to first page <= {GOAL_START:.0f} s")
        print(
            f"filter+render {filter_worst:.3f} s (goal {GOAL_FILTER:.0f} s); "
            f"cold start to first page {start_time:.3f} s (goal {GOAL_START:.0f} s)"
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
