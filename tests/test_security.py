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
@pytest.mark.parametrize("options", [{}, {"format": "generic"}, {"format": "isic2020"}, {"format": "ham10000"},
                                     {"mapping": {"image_name": "file"}}], ids=str)
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
    result = subprocess.run([sys.executable, "-m", "melcore", "inspect", "--csv", str(secret)], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
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
    with pytest.raises(MelcoreError, match=r"label table .*elsewhere/labels.csv is outside the folders datasets "
                                           r"may be registered from .*MELREVIEW_DATA_ROOTS"):
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
    rows = [("im0", 0), ("im1", 1), ("im2", 0), ("im3", 1), (str(secret), 0), ("../../private/up.jpg", 1),
            ("linked", 0)]
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


def test_the_started_worker_gets_the_store_url_from_its_environment_not_its_command_line(tmp_path):
    import signal
    import time

    from trainers.launch import ensure_worker

    url = f"sqlite:///{tmp_path / 'pw-store.db'}"
    pid = ensure_worker(Store(url))
    assert pid is not None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        environ = Path(f"/proc/{pid}/environ").read_bytes().decode()
        assert "trainers.worker" in cmdline
        assert url not in cmdline and "pw-store" not in cmdline
        assert f"MELREVIEW_DB_URL={url}\0" in environ
    finally:
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.05)


# --------------------------------------------------------------------------- 11. CSV export formula guard


@pytest.mark.parametrize("note", ["fine\r=cmd|' /C calc'!A0", "fine\n=cmd|' /C calc'!A0", "fine\r\n@SUM(A1)",
                                  "a\r\rb\r+HYPERLINK(\"http://x\")"])
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
