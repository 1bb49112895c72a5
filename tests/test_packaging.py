"""The installable package: metadata, `import melcore` and the two commands from outside the checkout.

The install tests build the package into a fresh virtual environment that sees this
machine's already-installed dependencies (``--system-site-packages``) and install it with
``--no-deps --no-build-isolation``, so they need no network and take seconds per install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from melcore.devtools.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
# What a source distribution of the project holds: the package, the dashboard and the build files.
SOURCES = [
    "melcore",
    "trainers",
    "pages",
    "ui",
    "assets",
    ".streamlit",
    "app.py",
    "pyproject.toml",
    "README.md",
    "requirements.txt",
    "requirements-dev.txt",
]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirement_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_runtime_requirements_are_plain_pinned_requirements():
    # pyproject reads its dependencies from requirements.txt: pip options (-r, -c, --index-url) would break that.
    for line in _requirement_lines(ROOT / "requirements.txt"):
        assert not line.startswith("-"), f"requirements.txt: {line!r} is a pip option, not a requirement"
        requirement = Requirement(line)
        assert str(requirement.specifier).startswith("=="), f"requirements.txt: {line!r} is not pinned"


def test_dev_extra_holds_the_pins_of_requirements_dev():
    dev_file = [line for line in _requirement_lines(ROOT / "requirements-dev.txt") if not line.startswith("-r")]
    extra = _pyproject()["project"]["optional-dependencies"]["dev"]
    assert sorted(extra) == sorted(dev_file)
    for tool in ("ruff", "mypy", "pre-commit"):
        assert any(Requirement(line).name == tool and "==" in line for line in dev_file), tool


def test_version_is_one_value():
    import melcore

    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "melcore.__version__"}
    parts = melcore.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts), melcore.__version__


def test_metrics_json_records_the_melcore_version_and_config_json_is_unchanged(tmp_path):
    import json

    import melcore
    from melcore.training.rundir import RunDir  # every training run's metrics.json goes through it

    out = RunDir(tmp_path)
    out.write_metrics({"auroc": 0.8})
    out.write_json("config.json", {"model": "small-cnn"})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"auroc": 0.8, "melcore_version": melcore.__version__}
    assert json.loads((tmp_path / "config.json").read_text()) == {"model": "small-cnn"}


def test_the_dashboard_is_found_in_a_checkout():
    from melcore.dashboard import app_path, command

    assert app_path() == ROOT / "app.py"
    assert command(["--server.port", "1"])[1:] == ["-m", "streamlit", "run", str(ROOT / "app.py"), "--server.port", "1"]


# --------------------------------------------------------------------------- fresh virtual environments


def _copy_sources(dest: Path) -> Path:
    dest.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=ignore)
        else:
            shutil.copy2(source, dest / name)
    return dest


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def _venv_with(tmp_path: Path, *pip_args: str) -> Path:
    """A fresh venv (seeing the installed dependencies) with this project installed by ``pip install ARGS``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    result = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            *pip_args,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / args[0]), *args[1:]], capture_output=True, text=True, env=_env(), cwd=cwd, timeout=120
    )


def _where_melcore_comes_from(venv: Path, cwd: Path) -> tuple[str, str, str]:
    result = _run(
        venv,
        "python",
        "-c",
        "import melcore, melcore.dashboard as d; print(melcore.__file__); print(melcore.__version__); "
        "print(d.app_path())",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    module, version, app = result.stdout.split()
    return module, version, app


def _serve_and_check_health(venv: Path, cwd: Path, home: Path) -> str:
    """Start ``melreview --home HOME`` and return its log once /_stcore/health answers "ok"."""
    port = free_port()
    log_path = cwd / "melreview.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(venv / "bin" / "melreview"), "--home", str(home), "--server.port", str(port)],
            cwd=cwd,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline, body = time.monotonic() + 60, ""
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as response:
                    body = response.read().decode()
                    break
            except OSError:
                time.sleep(0.5)
        assert body == "ok", f"no health answer (exit code {server.poll()}): {log_path.read_text()[-3000:]}"
    finally:
        server.terminate()
        server.wait(timeout=30)
    return log_path.read_text()


@pytest.mark.slow
@pytest.mark.install
def test_pip_install_gives_both_commands_and_the_app_outside_the_checkout(tmp_path):
    source = _copy_sources(tmp_path / "src")
    venv = _venv_with(tmp_path, str(source))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    module, version, app = _where_melcore_comes_from(venv, elsewhere)
    site_packages = Path(module).parents[1]
    assert site_packages.is_relative_to(venv) and site_packages.name == "site-packages", module
    import melcore

    assert version == melcore.__version__
    assert Path(app) == site_packages / "melreview_app" / "app.py"
    assert (site_packages / "melreview_app" / ".streamlit" / "config.toml").is_file()

    cli = _run(venv, "melcore", "--help", cwd=elsewhere)
    assert cli.returncode == 0 and "train" in cli.stdout and "evaluate" in cli.stdout, cli.stderr
    assert _run(venv, "melcore", "no-such-command", cwd=elsewhere).returncode == 2

    # The installed app runs (its pages import from the installed folder), on a data folder of its own.
    home = tmp_path / "home"
    script = textwrap.dedent(f"""
        import os
        os.environ["MELREVIEW_HOME"] = {str(home)!r}
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({app!r}, default_timeout=180).run()
        assert not at.exception, [e.message for e in at.exception]
        print(at.title[0].value, len(at.metric))
    """)
    apptest = _run(venv, "python", "-c", script, cwd=elsewhere)
    assert apptest.returncode == 0, apptest.stdout[-2000:] + apptest.stderr[-3000:]
    assert apptest.stdout.split()[0] == "melreview" and int(apptest.stdout.split()[1]) >= 4
    assert (home / "melreview.db").is_file()  # --home / MELREVIEW_HOME is where the data went

    log = _serve_and_check_health(venv, elsewhere, tmp_path / "served-home")
    # The shipped .streamlit/config.toml applies although the server was started elsewhere: localhost only.
    assert "127.0.0.1" in log and "0.0.0.0" not in log, log[-2000:]


@pytest.mark.slow
@pytest.mark.install
def test_editable_install_serves_the_checkout(tmp_path):
    source = _copy_sources(tmp_path / "src")
    venv = _venv_with(tmp_path, "-e", str(source))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    module, _, app = _where_melcore_comes_from(venv, elsewhere)
    assert Path(module) == source / "melcore" / "__init__.py"
    assert Path(app) == source / "app.py"
    cli = _run(venv, "melcore", "--help", cwd=elsewhere)
    assert cli.returncode == 0 and "train" in cli.stdout, cli.stderr
    log = _serve_and_check_health(venv, elsewhere, tmp_path / "home")
    assert "127.0.0.1" in log
