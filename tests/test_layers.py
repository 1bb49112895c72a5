"""The import contract (melcore/devtools/layers.py) and the README's module map."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from melcore.devtools import layers

ROOT = Path(__file__).resolve().parents[1]


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("melcore", "melcore/commands", "pages", "ui", "trainers"):
        if (tmp_path / package).is_dir() and not (tmp_path / package / "__init__.py").exists():
            (tmp_path / package / "__init__.py").write_text("")
    return tmp_path


def test_repository_keeps_the_import_contract():
    violations = layers.check_tree(ROOT)
    assert violations == [], "\n".join(map(str, violations))


def test_upward_import_inside_a_function_is_reported(tmp_path):
    root = _tree(
        tmp_path,
        {
            "melcore/images.py": "def f():\n    from melcore.train import fit\n",
            "melcore/train.py": "from melcore import images\n",
        },
    )
    [violation] = layers.check_tree(root)
    assert (violation.path, violation.line, violation.target) == ("melcore/images.py", 2, "melcore.train")
    assert "'data' may not import layer 'training'" in violation.reason


def test_relative_upward_import_is_resolved_and_reported(tmp_path):
    root = _tree(tmp_path, {"melcore/metrics.py": "from .compare import x\n", "melcore/compare.py": ""})
    [violation] = layers.check_tree(root)
    assert violation.target == "melcore.compare"


def test_interface_rules(tmp_path):
    root = _tree(
        tmp_path,
        {
            "melcore/store.py": "import streamlit as st\n",
            "melcore/commands/jobs.py": "",
            "pages/train.py": "from melcore.commands.jobs import submit\nimport trainers.worker\nimport trainers.launch\n",
            "trainers/worker.py": "from pages import common\n",
            "trainers/launch.py": "",
            "pages/common.py": "",
        },
    )
    found = {(v.path, v.target) for v in layers.check_tree(root)}
    assert found == {
        ("melcore/store.py", "streamlit"),
        ("pages/train.py", "melcore.commands.jobs"),
        ("pages/train.py", "trainers.worker"),
        ("trainers/worker.py", "pages.common"),
    }


def test_dashboard_helper_rules(tmp_path):
    root = _tree(
        tmp_path,
        {
            "melcore/store.py": "from ui.common import get_store\n",
            "melcore/commands/jobs.py": "",
            "ui/common.py": "from pages import train\nfrom melcore.commands import jobs\nimport trainers.launch\n",
            "ui/widgets.py": "from ui.common import get_store\nfrom melcore import store\n",
            "pages/train.py": "from ui.common import get_store\n",
            "trainers/worker.py": "import ui.widgets\n",
            "trainers/launch.py": "",
        },
    )
    found = {(v.path, v.target) for v in layers.check_tree(root)}
    assert found == {
        ("melcore/store.py", "ui.common.get_store"),
        ("ui/common.py", "pages.train"),
        ("ui/common.py", "melcore.commands.jobs"),
        ("trainers/worker.py", "ui.widgets"),
    }


def _dashboard_sources() -> list[Path]:
    return [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")), *sorted((ROOT / "ui").glob("*.py"))]


#: The one private Streamlit use the dashboard needs, with why: Streamlit's runner calls
#: ``keras.backend.clear_session()`` after every script run (a TF1-era clean-up), which throws away
#: TensorFlow's compiled graphs of every model the server keeps loaded; no public option turns it off.
#: tests/test_score_page.py fails if a Streamlit upgrade moves the hook while still clearing.
PRIVATE_STREAMLIT_ALLOWED = {
    ("ui/common.py", "streamlit.runtime.scriptrunner"),
    ("ui/common.py", "streamlit.runtime.scriptrunner.script_runner"),
}


def test_the_dashboard_uses_public_streamlit_only():
    # Private Streamlit state (streamlit.runtime, streamlit.web, `_`-named modules or attributes) changes
    # without notice between releases; app.py, the pages and their helpers use `import streamlit as st`.
    found = []
    for path in _dashboard_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                parts = name.split(".")
                if (
                    parts[0] == "streamlit"
                    and (len(parts) > 1 and parts[1] != "testing" or any(p.startswith("_") for p in parts))
                    and (str(path.relative_to(ROOT)), name) not in PRIVATE_STREAMLIT_ALLOWED
                ):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {name}")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("st", "streamlit")
            ):
                if node.attr.startswith("_"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses st.{node.attr}")
    assert not found, "\n".join(found)


def test_pages_folder_holds_pages_only():
    # Streamlit offers every .py file of pages/ as a page until st.navigation runs; the shared helpers
    # live in ui/, so no file there needs a `__main__` guard.
    for path in sorted((ROOT / "pages").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert "__main__" not in text, f"{path.name} is a helper with a __main__ guard: move it to ui/"
        assert "page_start(" in text, f"{path.name} does not open as a page (ui.common.page_start)"


def test_unplaced_module_is_reported(tmp_path):
    root = _tree(tmp_path, {"melcore/newthing.py": "from melcore import errors\n", "melcore/errors.py": ""})
    [violation] = layers.check_tree(root)
    assert violation.target == "melcore.newthing" and "no layer" in violation.reason


def test_downward_and_same_layer_imports_pass(tmp_path):
    root = _tree(
        tmp_path,
        {
            "melcore/train.py": "from melcore import images, features\nfrom melcore.errors import X\n",
            "melcore/features.py": "",
            "melcore/images.py": "",
            "melcore/errors.py": "",
            "pages/train.py": "from melcore.train import fit\n",
        },
    )
    assert layers.check_tree(root) == []


def test_main_exit_status(tmp_path, capsys):
    assert layers.main([str(ROOT)]) == 0
    root = _tree(tmp_path, {"melcore/errors.py": "import pages\n"})
    assert layers.main([str(root)]) == 1
    assert "melcore never imports pages" in capsys.readouterr().out
    assert layers.main([str(tmp_path / "nowhere")]) == 2


def _module_map_rows() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## Module map\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README.md has no '## Module map' section"
    return match.group(1)


def test_every_melcore_module_is_in_the_readme_module_map():
    table = _module_map_rows()
    named = set(re.findall(r"`(melcore/[\w/]+(?:\.py|/))`", table))
    modules = set()
    for path in (ROOT / "melcore").iterdir():
        if path.suffix == ".py" and path.name not in ("__init__.py", "__main__.py"):
            modules.add(f"melcore/{path.name}")
        elif path.is_dir() and (path / "__init__.py").exists():
            modules.add(f"melcore/{path.name}/")
    missing = sorted(modules - named)
    assert not missing, f"README.md's module map does not name {missing}: add a row for each"
    stale = sorted(n for n in named if not (ROOT / n).exists())
    assert not stale, f"README.md's module map names modules that do not exist: {stale}"


@pytest.mark.parametrize("module", ["melcore.images", "melcore.training.api", "melcore.commands.jobs"])
def test_layer_of_known_modules(module):
    assert layers.layer_of(module) is not None


def test_the_app_and_its_pages_start_without_tensorflow():
    """What app.py and the pages import at the top never imports TensorFlow or Keras (the Keras
    boundary stays lazy: melcore.models and melcore.pipeline are imported inside functions)."""
    import ast
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    modules = set()
    for path in [root / "app.py", *sorted((root / "pages").glob("*.py"))]:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("melcore"):
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names if alias.name.startswith("melcore"))
    assert "melcore.browse" in modules and "melcore.store" in modules
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in sorted(modules))
        + "print(sorted(m for m in ('tensorflow', 'keras', 'tf_keras_vis', 'albumentations') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
