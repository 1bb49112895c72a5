"""The README's commands run as written.

* Every command of the README's "Command line" section (its fenced ``bash`` blocks) runs, in order, in
  an empty folder on a fresh ``MELREVIEW_HOME``, and exits 0; what the text around them promises (job
  and run ids, the ``--json`` fields) holds. The first command and every one that is not a plain
  ``python -m melcore`` word list (another module, such as the worker, or any shell syntax) run in
  ``bash -c`` as a new process; the other ``python -m melcore ...`` commands run as
  ``melcore.__main__.main(argv)`` in this process, with file descriptors 1 and 2 captured, which is
  what ``python -m melcore`` runs (``sys.exit(main())``) with the argv bash would pass it.
* The ``--json`` fields documented in that section are the keys ``datasets``, ``runs list`` and
  ``jobs list`` print.
* The first screen gives exactly the two set-up commands, and the first one's second half
  (``streamlit run app.py``) answers its health check and runs the home page on a fresh home.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import run_main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Command line"
JSON_SUBSECTION = "### JSON output"
#: The command each --json field table documents, as its introducing paragraph names it.
JSON_TABLES = ("datasets list --json", "runs list --json", "jobs list --json")
DETAIL_FIELDS = ("options", "notes", "shortcut_audit")  # `datasets show --json` adds these


# --------------------------------------------------------------------------- reading the README


def section(text: str, heading: str) -> str:
    """The lines of ``text`` from the heading line ``heading`` to the next heading of its level or above."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == heading]
    if not starts:
        raise AssertionError(f"README.md has no {heading!r} section (a heading line exactly {heading!r})")
    body = []
    for line in lines[starts[0] + 1 :]:
        match = re.match(r"^(#+)\s", line)
        if match and len(match.group(1)) <= level and not _in_fence(body):
            break
        body.append(line)
    return "\n".join(body)


def _in_fence(lines: list[str]) -> bool:
    return sum(1 for line in lines if line.lstrip().startswith("```")) % 2 == 1


def fenced_blocks(markdown: str, languages=("bash", "sh", "shell", "console")) -> list[str]:
    """The contents of the fenced code blocks of ``markdown`` in one of ``languages``, in order."""
    blocks, current, language = [], None, None
    for line in markdown.splitlines():
        fence = re.match(r"^\s*```\s*([\w+-]*)", line)
        if fence and current is None:
            current, language = [], fence.group(1).lower()
        elif fence:
            if language in languages:
                blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    if current is not None:
        raise AssertionError("README.md: a fenced code block is never closed")
    return blocks


def commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines (ending in a backslash) joined, comments dropped."""
    out, pending = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.strip() and not line.strip().startswith("#"):
            out.append(line.strip())
    if pending:
        raise AssertionError(f"README.md: a command ends in a backslash with nothing after it: {pending!r}")
    return out


def readme_commands() -> list[str]:
    body = section(README.read_text(encoding="utf-8"), SECTION)
    found = [command for block in fenced_blocks(body) for command in commands(block)]
    if not found:
        raise AssertionError(f"README.md's {SECTION!r} section has no ```bash block with a command")
    return found


def documented_fields() -> dict[str, list[str]]:
    """{command: [field, ...]} from the tables of the JSON output subsection (first column, backticks off)."""
    body = section(README.read_text(encoding="utf-8"), JSON_SUBSECTION)
    tables: dict[str, list[str]] = {}
    paragraph: list[str] = []
    intro, rows = "", None
    for line in body.splitlines():
        if line.startswith("|"):
            if rows is None:
                intro = " ".join(paragraph) or intro
                owner = [name for name in JSON_TABLES if name in intro]
                assert len(owner) == 1, f"README.md: the table after {intro!r} names none or several of {JSON_TABLES}"
                rows = tables.setdefault(owner[0], [])
            cell = line.strip().strip("|").split("|")[0].strip()
            if cell != "field" and not set(cell) <= set("-: "):
                rows.append(cell.strip("`"))
            continue
        rows = None
        if line.strip():
            paragraph.append(line.strip())
        elif paragraph:
            intro, paragraph = " ".join(paragraph), []
    missing = [name for name in JSON_TABLES if not tables.get(name)]
    assert not missing, f"README.md's {JSON_SUBSECTION!r} has no field table for {missing}"
    return tables


# --------------------------------------------------------------------------- fast checks of the text


def test_the_first_screen_gives_exactly_the_two_set_up_commands():
    text = README.read_text(encoding="utf-8")
    before_first_section = text.split("\n## ", 1)[0]
    (block,) = fenced_blocks(before_first_section)
    assert commands(block) == [
        "pip install -r requirements.txt && streamlit run app.py",
        "pip install -r requirements-dev.txt && python -m pytest",
    ]


def test_the_command_line_section_names_only_real_commands():
    from melcore.__main__ import COMMANDS

    found = readme_commands()
    assert len(found) >= 20
    for command in found:
        words = command.split()
        assert words[:2] == ["python", "-m"], f"README command does not start with 'python -m': {command}"
        if words[2] == "melcore":
            assert words[3] in COMMANDS, f"README command uses an unknown melcore command {words[3]!r}: {command}"
        else:
            assert words[2] == "trainers.worker", f"README command runs an unexpected module: {command}"
    named = {command.split()[3] for command in found if command.split()[2] == "melcore"}
    assert named == set(COMMANDS), f"commands the README's walk never shows: {sorted(set(COMMANDS) - named)}"


def test_the_section_parser_fails_clearly_without_the_section():
    with pytest.raises(AssertionError, match="README.md has no '## Command line' section"):
        section("# melreview\n\n## Usage\n\n```bash\nls\n```\n", SECTION)
    assert commands("a \\\n  --b\n# note\n\nc  # trailing\n") == ["a --b", "c  # trailing"]


def test_documented_json_fields_are_the_keys_the_commands_print(tmp_path, capsys):
    from melcore.__main__ import main
    from melcore.commands.jobs import JOB_FIELDS
    from melcore.commands.runs import RUN_FIELDS
    from melcore.datasets import RECORD_FIELDS
    from melcore.store import Store

    documented = documented_fields()
    assert documented == {
        "datasets list --json": list(RECORD_FIELDS),
        "runs list --json": list(RUN_FIELDS),
        "jobs list --json": list(JOB_FIELDS),
    }
    store = Store()
    dataset_id = store.add_dataset("d", tmp_path / "labels.csv")
    store.add_run("r", tmp_path, dataset_id=dataset_id, metrics={"val_auroc": 0.7})
    store.submit_job({"model": "basic-cnn"}, dataset_id=dataset_id)
    printed = {}
    for command in JSON_TABLES:
        assert main(command.split()) == 0
        (printed[command],) = json.loads(capsys.readouterr().out)
    assert {command: list(obj) for command, obj in printed.items()} == documented
    assert main(["datasets", "show", "d", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)) == list(RECORD_FIELDS) + list(DETAIL_FIELDS)


# --------------------------------------------------------------------------- running them


def _env(home: Path, work: Path) -> dict:
    env = dict(
        os.environ,
        MELREVIEW_HOME=str(home),
        MELREVIEW_DATA_ROOTS=str(work),
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # `python` is this one
    env.pop("MELREVIEW_DB_URL", None)
    return env


def _check_json_fields(command: str, stdout: str, documented: dict[str, list[str]]) -> None:
    for name, fields in documented.items():
        if command.endswith(name):
            rows = json.loads(stdout)
            assert rows, f"{command} printed an empty list in the README's walk"
            for row in rows:
                assert list(row) == fields, f"{command}: keys {list(row)} are not the documented {fields}"
    if " datasets show " in f" {command} " and command.endswith("--json"):
        assert list(json.loads(stdout)) == documented["datasets list --json"] + list(DETAIL_FIELDS)


#: A word bash passes to the command as it is (no quoting, expansion, redirection or control operator).
_PLAIN_WORD = re.compile(r"^[A-Za-z0-9_./,=:+@%-]+$")


def in_process_argv(command: str) -> list[str] | None:
    """The argv ``main`` gets for a ``python -m melcore`` command of plain words, else None (needs a shell).

    A ``#`` after a blank starts a comment, as in bash; every other word must be made of characters bash
    gives no meaning to, so that its argv is exactly the words split on blanks.
    """
    words = re.split(r"\s+#", " " + command, maxsplit=1)[0].split()
    if words[:3] != ["python", "-m", "melcore"] or not all(_PLAIN_WORD.match(word) for word in words):
        return None
    return words[3:]


def _run_in_shell(command: str, work: Path, env: dict) -> tuple[int, str, str]:
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout, done.stderr


def test_plain_melcore_commands_get_the_argv_bash_would_pass():
    assert in_process_argv("python -m melcore runs archive 3") == ["runs", "archive", "3"]
    assert in_process_argv("python -m melcore cache --max-size 20G --dry-run     # what (--older-than 30d)") == [
        "cache",
        "--max-size",
        "20G",
        "--dry-run",
    ]
    assert in_process_argv("python -m melcore train --clinics a,b --out runs/cnn") == [
        "train",
        "--clinics",
        "a,b",
        "--out",
        "runs/cnn",
    ]
    for needs_a_shell in (
        "python -m trainers.worker --once",
        "python -m melcore runs list > runs.txt",
        "python -m melcore inspect --csv $HOME/labels.csv",
        "python -m melcore inspect --csv 'my labels.csv'",
        "python -m melcore inspect --csv ~/labels.csv",
        "python -m melcore demo && python -m melcore datasets list",
        "python -m melcore predict --images demo/*.jpg",
        "cd demo",
    ):
        assert in_process_argv(needs_a_shell) is None, needs_a_shell


@pytest.mark.slow
def test_every_readme_command_runs_as_written_on_a_fresh_home(tmp_path, monkeypatch, capfd):
    from melcore.store import Store

    found = readme_commands()
    documented = documented_fields()
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    env = _env(home, work)
    for name in ("MELREVIEW_HOME", "MELREVIEW_DATA_ROOTS", "TF_CPP_MIN_LOG_LEVEL"):
        monkeypatch.setenv(name, env[name])
    monkeypatch.delenv("MELREVIEW_DB_URL", raising=False)
    monkeypatch.chdir(work)
    timings = []
    for number, command in enumerate(found, 1):
        start = time.monotonic()
        argv = None if number == 1 else in_process_argv(command)
        if argv is None:
            returncode, stdout, stderr = _run_in_shell(command, work, env)
        else:
            done = run_main(argv, capfd)  # file descriptors 1 and 2, as the shell sees them
            returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
        timings.append((time.monotonic() - start, "shell" if argv is None else "in-process", command))
        assert returncode == 0, (
            f"README command {number} of {len(found)} exited {returncode}:\n"
            f"$ {command}\n--- stdout (end) ---\n{stdout[-2000:]}\n"
            f"--- stderr (end) ---\n{stderr[-4000:]}"
        )
        _check_json_fields(command, stdout, documented)
    with capfd.disabled():
        print("\n" + "\n".join(f"{seconds:6.1f}s  {where:<10}  {command}" for seconds, where, command in timings))

    # what the text around the commands says they did
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MELREVIEW_HOME", str(home))
        store = Store()
        assert {job["id"]: job["state"] for job in store.list_jobs()} == {1: "done", 2: "done", 3: "cancelled"}
        runs = {run["id"]: run for run in store.list_runs(archived=None)}
        assert sorted(runs) == [1, 2, 3] and runs[1]["job_id"] == 1 and runs[2]["kind"] == "meta"
        assert runs[3]["job_id"] is None and "imported from run.zip" in runs[3]["notes"]
        assert runs[3]["archived_at"] is None and runs[3]["metrics"] == runs[1]["metrics"]
        assert [d["name"] for d in store.list_datasets()] == ["demo"]
    for produced in ("runs/cnn/model.keras", "preds.csv", "overlay.png", "runs/meta", "runs/xclinic", "run.zip"):
        assert (work / produced).exists(), f"the README's walk wrote no {produced}"


@pytest.mark.slow
def test_streamlit_run_app_answers_its_health_check_and_runs_the_home_page_on_a_fresh_home(tmp_path):
    """The first set-up command's second half: ``streamlit run app.py`` (headless, a free port), fresh home."""
    from browser_helpers import StreamlitServer, kill_workers  # tests/ is on sys.path
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
    from websockets.sync.client import connect

    home = tmp_path / "home"
    server = StreamlitServer(home, tmp_path / "streamlit.log")
    try:
        server.wait_healthy(timeout=180)
        import urllib.request

        with urllib.request.urlopen(server.url + "/_stcore/health", timeout=10) as response:
            assert response.read().decode() == "ok"
        with connect(
            f"ws://127.0.0.1:{server.port}/_stcore/stream", subprotocols=["streamlit"], max_size=2**26, open_timeout=30
        ) as ws:
            message = BackMsg()
            message.rerun_script.query_string = ""
            message.rerun_script.page_name = ""
            ws.send(message.SerializeToString())
            headings, status = [], None
            deadline = time.monotonic() + 300
            while status is None and time.monotonic() < deadline:
                forward = ForwardMsg()
                forward.ParseFromString(ws.recv(timeout=300))
                kind = forward.WhichOneof("type")
                if kind == "delta" and forward.delta.new_element.WhichOneof("type") == "heading":
                    headings.append(forward.delta.new_element.heading.body)
                elif kind == "delta" and forward.delta.new_element.WhichOneof("type") == "exception":
                    raise AssertionError(f"the home page raised: {forward.delta.new_element.exception.message}")
                elif kind == "script_finished":
                    name = ForwardMsg.ScriptFinishedStatus.Name(forward.script_finished)
                    if name != "FINISHED_EARLY_FOR_RERUN":
                        status = name
        assert status == "FINISHED_SUCCESSFULLY", f"home page ended with {status}:\n{server.log()}"
        assert "melreview" in headings, f"the home page rendered no title (headings: {headings})"
    finally:
        server.stop()
        kill_workers(home)
    with pytest.MonkeyPatch.context() as mp:  # the fresh home got the demo cohort, as the README says
        mp.setenv("MELREVIEW_HOME", str(home))
        from melcore.store import Store

        (dataset,) = Store().list_datasets()
        assert dataset["is_demo"] and dataset["name"] == "demo"
