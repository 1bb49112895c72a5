"""Regression tests of issue 14: what a hostile or careless user reached, one section per defect.

Each test reproduces the defect first (it failed before the fix) and then holds the guarantee
listed in the README's "Security" section.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from melcore import settings
from melcore.cohort import load_cohort
from melcore.errors import CohortError, ImageError, MelcoreError
from melcore.store import Store

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cret-token"

# Files a path typed into the app may name: their first line must never reach a message.
SECRET_FILES = {
    ".env": f"DB_PASSWORD={SECRET}\n",
    ".env-with-rows": f"DB_PASSWORD={SECRET}\nAPI_KEY={SECRET}\n",
    ".pgpass": f"localhost:5432:*:melreview:{SECRET}\n",
    "two-columns": f"user,{SECRET}\nalice,{SECRET}\n",
}


def _tiny_images(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24, 24), (100 + 20 * i, 80, 60)).save(folder / f"im{i}.jpg")
    return folder


# --------------------------------------------------------------------------- 1. file contents in messages


@pytest.mark.parametrize("name", sorted(SECRET_FILES))
@pytest.mark.parametrize(
    "options",
    [{}, {"format": "generic"}, {"format": "isic2020"}, {"format": "ham10000"}, {"mapping": {"image_name": "file"}}],
    ids=str,
)
def test_a_secret_file_read_as_the_table_is_named_but_never_quoted(tmp_path, name, options):
    path = tmp_path / name
    path.write_text(SECRET_FILES[name])
    with pytest.raises(CohortError) as info:
        load_cohort(path, **options)
    message = str(info.value)
    assert str(path) in message
    assert SECRET not in message and "DB_PASSWORD" not in message and "localhost" not in message


def test_a_secret_file_read_as_metadata_or_clinic_table_is_never_quoted(tmp_path):
    images = _tiny_images(tmp_path / "img")
    pd.DataFrame({"image_name": ["im0", "im1"], "target": [0, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    secret = tmp_path / ".env"
    secret.write_text(f"DB_PASSWORD={SECRET}\nX={SECRET}\n")
    for options in ({"metadata": secret}, {"clinic_csv": secret}):
        with pytest.raises(CohortError) as info:
            load_cohort(tmp_path / "labels.csv", images, **options)
        assert str(secret) in str(info.value) and SECRET not in str(info.value)


def test_inspect_cli_names_a_secret_file_without_quoting_it(tmp_path):
    secret = tmp_path / ".pgpass"
    secret.write_text(SECRET_FILES[".pgpass"])
    result = subprocess.run(
        [sys.executable, "-m", "melcore", "inspect", "--csv", str(secret)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert ".pgpass" in result.stderr and SECRET not in result.stderr + result.stdout


def test_a_lesion_table_with_a_wrong_column_still_lists_its_columns(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("picture,target\na,1\n")
    with pytest.raises(CohortError, match="the table has picture, target"):
        load_cohort(csv, format="generic")


def test_home_page_registration_of_a_secret_file_shows_no_content(tmp_path, demo_dir):
    from streamlit.testing.v1 import AppTest

    Store().add_dataset("already", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    secret = tmp_path / ".env"
    secret.write_text(SECRET_FILES[".env"])
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=180).run()
    at.text_input(key="reg_name").input("stolen")
    at.text_input(key="reg_csv").input(str(secret))
    at.text_input(key="reg_metadata").input(str(secret))
    at.button[0].click()
    at.run()
    assert not at.exception
    shown = "\n".join(str(e.value) for e in [*at.error, *at.warning, *at.markdown, *at.code])
    assert "Not registered" in shown and ".env" in shown
    assert SECRET not in shown
    assert [d["name"] for d in Store().list_datasets()] == ["already"]


def test_registration_is_confined_to_the_data_roots(tmp_path, monkeypatch):
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    for folder in (allowed, elsewhere):
        _tiny_images(folder / "img")
        pd.DataFrame({"image_name": ["im0", "im1"], "target": [0, 1]}).to_csv(folder / "labels.csv", index=False)
    monkeypatch.setenv("MELREVIEW_DATA_ROOTS", str(allowed))
    store = Store()
    with pytest.raises(
        MelcoreError,
        match=r"label table .*elsewhere/labels.csv is outside the folders datasets "
        r"may be registered from .*MELREVIEW_DATA_ROOTS",
    ):
        store.register_dataset("out", elsewhere / "labels.csv", elsewhere / "img")
    with pytest.raises(MelcoreError, match="image folder .*elsewhere/img is outside"):
        store.register_dataset("mixed", allowed / "labels.csv", elsewhere / "img")
    with pytest.raises(MelcoreError, match="outside"):  # a .. path that climbs out of the root
        store.register_dataset("climb", allowed / ".." / "elsewhere" / "labels.csv")
    assert store.list_datasets() == []
    store.register_dataset("in", allowed / "labels.csv", allowed / "img")
    assert [d["name"] for d in store.list_datasets()] == ["in"]


def test_data_roots_default_to_home_and_the_demo_folder(monkeypatch):
    monkeypatch.delenv("MELREVIEW_DATA_ROOTS")
    assert settings.data_roots() == [Path.home(), settings.home() / "demo"]
    monkeypatch.setenv("MELREVIEW_DATA_ROOTS", os.pathsep.join(["/data/a", "", "/data/b"]))
    assert settings.data_roots() == [Path("/data/a"), Path("/data/b"), settings.home() / "demo"]


def test_the_demo_registers_whatever_the_data_roots(monkeypatch):
    monkeypatch.setenv("MELREVIEW_DATA_ROOTS", "/nonexistent-root")
    store = Store()
    store.ensure_demo_dataset()
    assert [d["name"] for d in store.list_datasets()] == ["demo"]


# --------------------------------------------------------------------------- 2. image paths confined


def _escaping_cohort(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A table whose rows name files outside its folders: absolute, ``../`` and a symlink in the image folder."""
    data = tmp_path / "data"
    images = _tiny_images(data / "img")
    outside = tmp_path / "private"
    outside.mkdir()
    secret = outside / "secret.jpg"
    secret.write_text(f"PASSWORD={SECRET}\n")
    (images / "linked.jpg").symlink_to(secret)
    (outside / "up.jpg").write_text(f"TOKEN={SECRET}\n")
    rows = [
        ("im0", 0),
        ("im1", 1),
        ("im2", 0),
        ("im3", 1),
        (str(secret), 0),
        ("../../private/up.jpg", 1),
        ("linked", 0),
    ]
    pd.DataFrame(rows, columns=["image_name", "target"]).to_csv(data / "labels.csv", index=False)
    return data / "labels.csv", images, secret


@pytest.mark.parametrize("check", ["none", "exists", "decode"])
def test_cohort_rows_outside_the_dataset_folders_get_no_image_path(tmp_path, check):
    csv, images, _ = _escaping_cohort(tmp_path)
    cohort = load_cohort(csv, images, check_images=check)
    paths = dict(zip(cohort.table["image_name"], cohort.table["image_path"]))
    assert all(paths[f"im{i}"] is not None for i in range(4))
    assert paths["secret"] is None and paths["up"] is None and paths["linked"] is None
    assert {"secret", "up", "linked"} <= {name for name, _ in cohort.report.unreadable_images}
    warnings = "\n".join(cohort.report.warnings)
    assert "3 image paths lie outside the dataset's folders" in warnings
    assert SECRET not in warnings


def test_a_symlinked_image_folder_inside_the_roots_is_still_read(tmp_path):
    images = _tiny_images(tmp_path / "real")
    (tmp_path / "alias").symlink_to(images)
    pd.DataFrame({"image_name": ["im0", "im1"], "target": [0, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    cohort = load_cohort(tmp_path / "labels.csv", tmp_path / "alias")
    assert cohort.table["image_path"].notna().all()


def test_an_image_that_holds_text_is_refused_without_quoting_it(tmp_path):
    from melcore.images import load_image

    path = tmp_path / "notes.jpg"
    path.write_text(f"PASSWORD={SECRET}\n")
    with pytest.raises(ImageError) as info:
        load_image(path, 32)
    assert "text" in info.value.reason and SECRET not in str(info.value) and "PASSWORD" not in str(info.value)


def test_predict_folder_skips_symlinks_that_leave_the_folder(tmp_path):
    from melcore.predict import list_image_files

    images = _tiny_images(tmp_path / "img", 2)
    (tmp_path / "secret.jpg").write_text(SECRET)
    (images / "zz.jpg").symlink_to(tmp_path / "secret.jpg")
    assert [p.name for p in list_image_files(images)] == ["im0.jpg", "im1.jpg"]


# --------------------------------------------------------------------------- 9. named pipes


def test_a_named_pipe_as_the_table_is_refused_at_once(tmp_path):
    fifo = tmp_path / "labels.csv"
    os.mkfifo(fifo)
    with pytest.raises(CohortError, match=r"labels.csv is a named pipe \(FIFO\), not a CSV file"):
        load_cohort(fifo)


def test_a_named_pipe_as_an_image_is_reported_not_read(tmp_path):
    images = _tiny_images(tmp_path / "img", 2)
    os.mkfifo(images / "pipe.jpg")
    pd.DataFrame({"image_name": ["im0", "im1", "pipe"], "target": [0, 1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    cohort = load_cohort(tmp_path / "t.csv", images, check_images="decode")
    assert cohort.report.missing_images == ["pipe"]  # a FIFO is not an image file of the folder
    from melcore.images import load_image

    with pytest.raises(ImageError, match=r"is a named pipe \(FIFO\), not an image file"):
        load_image(images / "pipe.jpg", 16)


# --------------------------------------------------------------------------- 3. store URL off the command line


def test_the_started_worker_gets_the_store_url_from_its_environment_not_its_command_line(tmp_path, monkeypatch):
    import trainers.launch as launch

    started = {}

    class FakeProcess:
        pid = 4242

    def fake_popen(args, **kwargs):
        started.update(args=list(args), env=kwargs["env"])
        return FakeProcess()

    monkeypatch.setattr(launch.subprocess, "Popen", fake_popen)
    url = f"postgresql+psycopg://melreview:{SECRET}@db.example/melreview"
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    monkeypatch.setattr(store, "url", url)
    assert launch.ensure_worker(store) == 4242
    assert started["args"][1:] == ["-m", "trainers.worker"]
    assert not any(SECRET in arg for arg in started["args"])
    assert started["env"]["MELREVIEW_DB_URL"] == url


def test_the_worker_reads_the_store_url_from_the_environment(tmp_path, monkeypatch):
    from trainers import worker

    url = f"sqlite:///{tmp_path / 'env-store.db'}"
    monkeypatch.setenv("MELREVIEW_DB_URL", url)
    assert worker.main(["--once", "--poll", "0"]) == 0
    assert (tmp_path / "env-store.db").exists()  # the worker opened the store named by the environment


# --------------------------------------------------------------------------- 11. CSV export formula guard


@pytest.mark.parametrize(
    "note",
    ["fine\r=cmd|' /C calc'!A0", "fine\n=cmd|' /C calc'!A0", "fine\r\n@SUM(A1)", 'a\r\rb\r+HYPERLINK("http://x")'],
)
def test_export_quotes_line_breaks_and_guards_every_line(note):
    import csv
    import io
    import re

    from melcore.review import reviews_csv

    store = Store()
    run_id = store.add_run("r", model="m")
    store.add_review(run_id, "IMG_1", "Dr A", "agree", note)
    text = reviews_csv(store.review_history(run_id))
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert len(rows) == 2  # the header and one decision: the line break did not start a row
    note_back = rows[1][rows[0].index("note")]
    assert note_back.replace("'", "") == note.replace("'", "")
    # a reader that splits rows at every CR or LF sees no line that starts like a formula
    for line in re.split(r"\r\n|\r|\n", text):
        assert not line.lstrip('"').startswith(("=", "+", "@")), line
    assert '"' + note_back.replace('"', '""') + '"' in text  # the field holding line breaks is quoted


def test_export_keeps_plain_numbers_on_every_line():
    from melcore.review import _spreadsheet_safe

    assert _spreadsheet_safe("-1.5\n-2") == "-1.5\n-2"
    assert _spreadsheet_safe("ok\r\n=1+1") == "ok\r\n'=1+1"


# --------------------------------------------------------------------------- 4. Markdown injection

REMOTE_IMAGE = "![x](http://attacker.example/x.png)"
PHISHING = "[Re-login here](https://attacker.example/login)"
FAKE_LINE = "ok\n\n**Current decision: no biopsy needed** by Dr Chief"


def _unsafe(text: str) -> list[str]:
    """The live Markdown constructs of a hostile string that survive in ``text`` (a page's Markdown source)."""
    found = []
    for live in ("[x](", "[Re-login here](", "http://", "https://", "no biopsy needed**"):
        if live in text:
            found.append(live)
    return found


def test_escape_markdown_renders_the_characters_typed():
    from melcore.safety import escape_markdown

    assert escape_markdown(REMOTE_IMAGE) == r"!\[x\](http\://attacker.example/x.png)"
    assert escape_markdown(PHISHING) == r"\[Re-login here\](https\://attacker.example/login)"
    assert escape_markdown(FAKE_LINE) == r"ok \*\*Current decision\: no biopsy needed\*\* by Dr Chief"
    assert escape_markdown(":red[alarm] <b>x</b> www.x.org $x$") == r"\:red\[alarm\] \<b\>x\</b\> www\.x.org \$x\$"
    assert escape_markdown("- item") == r"\- item" and escape_markdown("1. item") == r"1\. item"
    assert escape_markdown("# Title") == r"\# Title" and escape_markdown("run #1 (a)") == "run #1 (a)"
    assert escape_markdown("ISIC_0001234 _x_") == r"ISIC_0001234 \_x\_"  # intraword _ is plain text
    assert escape_markdown(None) == ""


def test_review_page_shows_hostile_reviewer_names_and_notes_as_text(demo_dir):
    import numpy as np
    from page_helpers import open_page

    store = Store()
    dataset_id, cohort = store.register_dataset(PHISHING, demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    table = cohort.table.iloc[:10]
    predictions = table[["image_name", "patient_id", "clinic", "target"]].assign(
        prediction=np.linspace(0.9, 0.1, len(table))
    )
    run_id = store.add_run("run", dataset_id=dataset_id, model="cnn-bn", threshold=0.5)
    store.add_predictions(run_id, predictions, split="val")
    riskiest = str(table["image_name"].iloc[0])
    store.add_review(run_id, riskiest, PHISHING, "agree", f"{REMOTE_IMAGE} {FAKE_LINE}")
    at = open_page("review.py")
    shown = "\n".join(str(e.value) for e in [*at.markdown, *at.caption, *at.info, *at.warning, *at.error, *at.success])
    assert r"\[Re-login here\]" in shown and r"!\[x\]" in shown  # the note and the name are shown ...
    assert r"\*\*Current decision\: no biopsy needed\*\* by Dr Chief" in shown
    assert _unsafe(shown) == []  # ... as text only


def test_saving_a_decision_as_a_hostile_reviewer_shows_the_name_as_text(demo_dir):
    import numpy as np
    from page_helpers import open_page, run

    store = Store()
    dataset_id, cohort = store.register_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
    table = cohort.table.iloc[:5]
    run_id = store.add_run("run", dataset_id=dataset_id, model="cnn-bn", threshold=0.5)
    store.add_predictions(
        run_id,
        table[["image_name", "patient_id", "clinic", "target"]].assign(prediction=np.linspace(0.9, 0.1, len(table))),
        split="val",
    )
    at = open_page("review.py")
    at.text_input(key="review_reviewer").input(PHISHING)
    image = at.session_state["review_current"]
    at.radio(key=f"review_decision_{run_id}_{image}").set_value("agree")
    at.text_area(key=f"review_note_{run_id}_{image}").input(REMOTE_IMAGE)
    at.button(key="review_save").click()
    run(at)
    assert store.review_history(run_id, image)["reviewer"].tolist() == [PHISHING]  # stored as typed
    shown = "\n".join(str(e.value) for e in [*at.markdown, *at.caption, *at.success, *at.info, *at.error])
    assert r"\[Re-login here\]" in shown and _unsafe(shown) == []


def test_home_page_shows_hostile_dataset_names_and_paths_as_text(demo_dir, tmp_path):
    from streamlit.testing.v1 import AppTest

    folder = tmp_path / "[Re-login here](https:"
    folder.mkdir()
    csv = folder / "labels.csv"
    csv.write_bytes((demo_dir / "labels.csv").read_bytes())
    Store().add_dataset(
        PHISHING,
        csv,
        demo_dir / "jpeg" / "train",
        summary={"n_images": 1, "warnings": [f"image {REMOTE_IMAGE} missing"]},
    )
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=180).run()
    assert not at.exception
    shown = "\n".join(str(e.value) for e in [*at.subheader, *at.caption, *at.warning, *at.markdown])
    assert r"\[Re-login here\]" in shown
    assert _unsafe(shown) == []


# --------------------------------------------------------------------------- 5. upload memory


def _flat_png(path: Path, width: int, height: int, colour_type: int = 6) -> Path:
    """A real PNG of ``width`` x ``height`` pixels of one colour (RGBA by default), written row by row.

    Such a file is a few hundred KB however large it is decoded: the upload of issue 14.
    """
    import struct
    import zlib

    channels = {0: 1, 2: 3, 6: 4}[colour_type]

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    row = b"\x00" + bytes([90, 60, 40, 255][:channels]) * width
    compressor, parts = zlib.compressobj(9), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")
    )
    return path


def test_a_small_png_that_decodes_to_400_mb_is_refused_from_its_header(tmp_path):
    bomb = _flat_png(tmp_path / "bomb.png", 10_000, 10_000)
    assert bomb.stat().st_size < 1_000_000
    script = (
        "import sys\n"
        "from melcore.errors import ImageError\n"
        "from melcore.images import read_upload, read_upload_views\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "for call in (lambda: read_upload(data, size=224), lambda: read_upload_views(data, 224, 512)):\n"
        "    try:\n"
        "        call()\n"
        "    except ImageError as exc:\n"
        "        print(exc.reason)\n"
        "peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0]\n"
        "print(int(peak.split()[1]) // 1024)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(bomb)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    *reasons, peak_mb = result.stdout.split("\n")[:-1]
    assert len(reasons) == 2
    assert all("10000x10000 RGBA image takes 400 MB of memory to decode" in r for r in reasons)
    assert int(peak_mb) < 150  # the interpreter, numpy and Pillow (peak resident memory); no pixel buffer


def test_decoded_bytes_count_channels_and_bit_depth():
    from melcore.images import decoded_bytes

    assert decoded_bytes(Image.new("L", (100, 10))) == 1000
    assert decoded_bytes(Image.new("I;16", (100, 10))) == 2000
    assert decoded_bytes(Image.new("RGB", (100, 10))) == 4000  # Pillow stores RGB in 4 bytes
    assert decoded_bytes(Image.new("RGBA", (100, 10))) == 4000


def test_a_large_accepted_upload_is_decoded_once_and_reduced(tmp_path, monkeypatch):
    import numpy as np

    from melcore import images
    from melcore.models import build_model
    from melcore.predict import score_upload

    data = _flat_png(tmp_path / "big.png", 4000, 3000).read_bytes()
    calls = []
    original = images._open_rgb

    def counting(*args, **kwargs):
        image, upright = original(*args, **kwargs)
        calls.append((image.size, upright))
        return image, upright

    monkeypatch.setattr(images, "_open_rgb", counting)
    model, _ = build_model("basic-cnn", 32)
    result = score_upload(model, data, "big.png", method=None)
    assert len(calls) == 1  # one decode for the model's input and the preview
    assert calls[0] == ((512, 384), (4000, 3000))  # decoded straight to the preview's box
    assert result.image.shape == (384, 512, 3) and result.input_size == (32, 32)
    assert np.isfinite(result.probability)


# --------------------------------------------------------------------------- 14. offline pages


def test_the_page_icon_is_a_file_this_server_serves(monkeypatch):
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    configs = []
    original = st.set_page_config

    def recording(**kwargs):
        configs.append(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(st, "set_page_config", recording)
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=180).run()
    assert not at.exception
    icon = configs[0]["page_icon"]
    assert not str(icon).startswith((":material", "http://", "https://"))  # no font or image CDN
    with Image.open(icon) as image:
        assert image.format == "PNG" and image.size == (64, 64)


# --------------------------------------------------------------------------- 6. run folders never collide


def test_two_stores_sharing_a_home_never_share_a_run_folder(tmp_path):
    from melcore.jobs import new_run_dir

    job = {"id": 1}
    other_store_run = settings.subdir("runs") / "job-00001-basic-cnn"  # the naming that collided
    other_store_run.mkdir(parents=True)
    (other_store_run / "metrics.json").write_text('{"val_auroc": 0.9}')
    made = {new_run_dir(job, "basic-cnn") for _ in range(50)}
    assert len(made) == 50 and other_store_run not in made
    assert all(p.is_dir() and not any(p.iterdir()) and p.name.startswith("job-00001-basic-cnn-") for p in made)
    assert (other_store_run / "metrics.json").read_text() == '{"val_auroc": 0.9}'


def test_the_worker_trains_each_job_in_a_new_folder(tmp_path, monkeypatch, demo_dir):
    import melcore.jobs as jobs
    import trainers.worker as worker

    store_a, store_b = Store(f"sqlite:///{tmp_path / 'a.db'}"), Store(f"sqlite:///{tmp_path / 'b.db'}")
    seen = []

    def fake_train(config, cohort, *, run_dir, **kwargs):
        assert not any(Path(run_dir).iterdir())  # empty: nobody else's files
        seen.append(Path(run_dir))
        raise MelcoreError("stop after the folder was chosen")

    for store in (store_a, store_b):
        dataset_id = store.add_dataset("demo", demo_dir / "labels.csv", demo_dir / "jpeg" / "train")
        job = {"id": 1, "dataset_id": dataset_id, "config": {}}
        ctx = worker.JobContext(store, job, None)
        with pytest.raises(MelcoreError, match="stop after"):
            jobs._train_and_record(ctx, None, "basic-cnn", fake_train)
    assert len(seen) == 2 and seen[0] != seen[1]
    assert all(p.parent == settings.subdir("runs") for p in seen)


# --------------------------------------------------------------------------- 10. an unusable store


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def _unusable_stores(tmp_path: Path) -> dict[str, dict]:
    home_file = tmp_path / "home-is-a-file"
    home_file.write_text("")
    read_only = Store(f"sqlite:///{tmp_path / 'ro.db'}")
    read_only.add_dataset("demo", tmp_path / "labels.csv")
    read_only.close()
    return {
        "home is a file": {"MELREVIEW_HOME": str(home_file)},
        "missing folder": {"MELREVIEW_DB_URL": f"sqlite:///{tmp_path / 'no' / 'such' / 'folder' / 'x.db'}"},
        "read-only": {"MELREVIEW_DB_URL": f"sqlite:///file:{tmp_path / 'ro.db'}?mode=ro&uri=true"},
    }


@pytest.mark.parametrize("case", ["home is a file", "missing folder", "read-only"])
def test_cli_and_worker_say_in_one_line_why_the_store_is_unusable(tmp_path, case):
    env = _unusable_stores(tmp_path)[case]
    for args in (
        ("-m", "melcore", "jobs", "submit", "--dataset", "demo", "--model", "basic-cnn"),
        ("-m", "trainers.worker", "--once"),
    ):
        result = _cli(*args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert ("MELREVIEW_HOME" if case == "home is a file" else "cannot use the store") in lines[0]


def test_a_page_on_an_unusable_store_shows_a_message(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    for name, value in _unusable_stores(tmp_path)["home is a file"].items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(str(PROJECT_ROOT / "app.py"), default_timeout=180).run()
    assert not at.exception
    assert "The store cannot be used" in at.error[0].value and "MELREVIEW_HOME" in at.error[0].value


def test_an_unexpected_error_shows_neither_sql_nor_parameters():
    from streamlit.testing.v1 import AppTest

    def script():
        import sqlalchemy as sa

        from ui.common import show_error

        show_error(
            sa.exc.DataError(
                "INSERT INTO reviews (note) VALUES (?)", ("hunter2-s3cret-token",), Exception("value too long")
            ),
            "Not saved",
        )

    at = AppTest.from_function(script).run()
    shown = "\n".join(str(e.value) for e in [*at.error, *at.code, *at.markdown])
    assert "Not saved: unexpected error (DataError)" in shown
    assert "INSERT" not in shown and SECRET not in shown


def test_the_streamlit_config_hides_uncaught_error_details():
    import tomllib

    config = tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "type"


# --------------------------------------------------------------------------- 8. string lengths


def test_overlong_strings_are_refused_with_a_clear_message_on_both_backends(db_url, tmp_path):
    store = Store(db_url)
    long_name = "n" * 201
    with pytest.raises(
        MelcoreError,
        match=r"dataset not registered: the name is 201 characters long, more than "
        r"the 200 the store keeps; shorten it",
    ):
        store.add_dataset(long_name, tmp_path / "labels.csv")
    dataset_id = store.add_dataset("ok", tmp_path / "labels.csv")
    with pytest.raises(MelcoreError, match=r"job not queued: the clinic is 250 characters"):
        store.submit_job({"model": "basic-cnn", "clinic": "c" * 250}, dataset_id)
    assert store.list_jobs() == []
    run_id = store.add_run("r" * 400, dataset_id=dataset_id, model="basic-cnn")  # a display name is shortened
    assert len(store.get_run(run_id)["name"]) == 300
    with pytest.raises(MelcoreError, match=r"decision not saved: the reviewer is 300 characters"):
        store.add_review(run_id, "IMG_1", "r" * 300, "agree")
    frame = pd.DataFrame({"image_name": ["i" * 301], "prediction": [0.5]})
    with pytest.raises(MelcoreError, match=r"predictions not stored: the image name is 301 characters"):
        store.add_predictions(run_id, frame)


# --------------------------------------------------------------------------- 13. a dead worker leaves no traces


def test_a_requeued_job_starts_a_fresh_curve_keeps_its_note_and_forgets_the_dead_worker():
    store = Store()
    job_id = store.submit_job({"model": "basic-cnn"})
    dead = store.claim_job("host:111:dead")
    store.worker_beat("host:111:dead", job_id)
    for epoch in (1, 2):
        store.heartbeat(
            job_id,
            dead["claim_token"],
            progress={"epoch": epoch},
            history_point={"epoch": epoch, "loss": 0.5, "end_of_epoch": True},
        )
    assert len(store.get_job(job_id)["history"]) == 2
    assert store.requeue_stale(stale_after=-1.0) == [{"id": job_id, "state": "queued"}]  # its heartbeat is stale
    requeued = store.get_job(job_id)
    assert requeued["history"] == [] and requeued["progress"] == {}  # no epochs 1, 2, 1, 2, 3 on the curve
    assert "host:111:dead" not in {w["worker_id"] for w in store.live_workers(within=1e9)}
    alive = store.claim_job("host:222:alive")
    store.heartbeat(job_id, alive["claim_token"], history_point={"epoch": 1, "loss": 0.4, "end_of_epoch": True})
    assert [p["epoch"] for p in store.get_job(job_id)["history"]] == [1]
    assert store.finish_job(job_id, alive["claim_token"], "done")
    assert store.get_job(job_id)["error"] == "requeued: worker host:111:dead stopped responding (attempt 1 of 3)"


def test_a_job_that_fails_on_its_retry_says_why_it_failed():
    store = Store()
    job_id = store.submit_job({"model": "basic-cnn"})
    store.claim_job("host:1:dead")
    store.requeue_stale(stale_after=-1.0)
    retry = store.claim_job("host:2:alive")
    store.finish_job(job_id, retry["claim_token"], "failed", error="out of memory")
    assert store.get_job(job_id)["error"] == "out of memory"


# --------------------------------------------------------------------------- 12. misleading checks


def test_a_trailing_comma_on_every_row_is_not_read_as_an_index(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("image_name,target\nim0,0,\nim1,1,\nim2,0,\n")
    cohort = load_cohort(csv, check_images="none")
    assert cohort.table["image_name"].tolist() == ["im0", "im1", "im2"]
    assert cohort.table["target"].tolist() == [0, 1, 0]


def test_implausible_ages_are_warned_about_and_unknown(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("image_name,target,age_approx\na,0,inf\nb,1,1e308\nc,0,-5\nd,0,45\n")
    cohort = load_cohort(csv, check_images="none")
    ages = cohort.table["age_approx"].tolist()
    assert ages[3] == 45.0 and all(pd.isna(a) for a in ages[:3])
    assert any("3 age values are outside 0-120 years" in w and "line 2 (a): 'inf'" in w for w in cohort.report.warnings)


def test_decode_check_applies_the_same_pixel_limit_as_training(tmp_path, monkeypatch):
    images = _tiny_images(tmp_path / "img", 2)
    Image.new("RGB", (200, 100)).save(images / "big.jpg")
    pd.DataFrame({"image_name": ["im0", "im1", "big"], "target": [0, 1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    monkeypatch.setenv("MELREVIEW_MAX_PIXELS", "10000")
    cohort = load_cohort(tmp_path / "t.csv", images, check_images="decode")
    assert [name for name, _ in cohort.report.unreadable_images] == ["big"]
    assert "more than the limit of 10000" in dict(cohort.report.unreadable_images)["big"]


def test_folders_named_like_images_are_not_counted_as_images(tmp_path):
    images = _tiny_images(tmp_path / "img", 2)
    (images / "folder.jpg").mkdir()
    pd.DataFrame({"image_name": ["im0", "im1", "folder"], "target": [0, 1, 0]}).to_csv(tmp_path / "t.csv", index=False)
    cohort = load_cohort(tmp_path / "t.csv", images)
    assert cohort.report.missing_images == ["folder"]


# --------------------------------------------------------------------------- 7. concurrent first open


def test_four_processes_opening_a_new_postgresql_database_at_once_all_succeed(fresh_postgres_url):
    import time

    start = time.time() + 3.0  # every process imports first, then opens the store at the same moment
    script = (
        "import sys, time\n"
        "from melcore.store import Store\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "print(Store(sys.argv[1]).version())\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, fresh_postgres_url, str(start)],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in processes]
    from melcore.store import SCHEMA_VERSION

    assert [(code, out.strip()) for code, out, _ in results] == [(0, str(SCHEMA_VERSION))] * 4, [
        err[-500:] for _, _, err in results
    ]


def test_one_non_numeric_prediction_is_the_only_one_named(tmp_path):
    from melcore.commands.evaluate import read_predictions

    csv = tmp_path / "preds.csv"
    csv.write_text("image_name,prediction,target\na,0.1,0\nb,oops,1\nc,0.9,1\nd,0.3,0\n")
    with pytest.raises(MelcoreError) as info:
        read_predictions(csv)
    message = str(info.value)
    assert "not a number" in message and "(1 of 4 bad)" in message and "b" in message
    good = tmp_path / "good.csv"
    good.write_text("image_name,prediction,target\na,0.1,0\nb,0.2,1\n")
    assert read_predictions(good)["prediction"].tolist() == [0.1, 0.2]


def test_evaluate_names_a_secret_file_without_quoting_it(tmp_path):
    from melcore.commands.evaluate import read_predictions

    secret = tmp_path / ".env"
    secret.write_text(SECRET_FILES[".env-with-rows"])
    with pytest.raises(MelcoreError) as info:
        read_predictions(secret)
    assert ".env" in str(info.value) and SECRET not in str(info.value) and "DB_PASSWORD" not in str(info.value)


def test_training_never_reads_or_quotes_files_outside_the_dataset(demo_dir, tmp_path):
    import json

    private = tmp_path / "private"
    private.mkdir()
    (private / "secret.jpg").write_text(f"PASSWORD={SECRET}\n")
    (private / "up.jpg").write_text(f"TOKEN={SECRET}\n")
    table = pd.read_csv(demo_dir / "labels.csv", dtype=str)
    hostile = table.iloc[:2].copy()
    hostile["image_name"] = [str(private / "secret.jpg"), "../private/up.jpg"]
    (tmp_path / "ds").mkdir()
    pd.concat([table, hostile]).to_csv(tmp_path / "ds" / "labels.csv", index=False)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "melcore",
            "train",
            "--csv",
            str(tmp_path / "ds" / "labels.csv"),
            "--images",
            str(demo_dir / "jpeg" / "train"),
            "--model",
            "basic-cnn",
            "--image-size",
            "32",
            "--epochs",
            "1",
            "--augment",
            "none",
            "--out",
            str(run_dir),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = "\n".join(
        p.read_text(errors="replace") for p in run_dir.iterdir() if p.suffix in (".json", ".log", ".csv")
    )
    assert SECRET not in written + result.stdout + result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics  # the run finished and recorded its metrics without the two rows' files
