"""The focus run (Compare) and the Grad-CAM settings (every lesion panel) persist across pages (session
state) and reloads (the URL), as the chosen dataset and run do."""

from __future__ import annotations

from page_helpers import PAGES, run  # tests/ is on sys.path (pytest rootdir-relative import)
from streamlit.testing.v1 import AppTest
from test_compare_page import seeded  # noqa: F401  (the fixture)
from test_patients_page import _page
from test_patients_page import seeded as patients_seeded  # noqa: F401  (the fixture)


def compare() -> AppTest:
    return AppTest.from_file(str(PAGES / "compare.py"), default_timeout=90)


def focus_label(at: AppTest) -> str:
    return at.selectbox(key="compare_focus").value


def test_the_focus_run_persists_across_pages_and_reloads(seeded):  # noqa: F811
    at = run(compare())
    options = at.selectbox(key="compare_focus").options
    assert len(options) == 2 and f"#{seeded['strong']} " in focus_label(at)
    weak = next(o for o in options if o.startswith(f"#{seeded['weak']} "))
    at.selectbox(key="compare_focus").select(weak)
    run(at)
    assert at.query_params["focus"] in (str(seeded["weak"]), [str(seeded["weak"])])
    assert at.session_state["melreview_focus_run"] == seeded["weak"]
    reloaded = compare()
    reloaded.query_params["focus"] = str(seeded["weak"])
    assert focus_label(run(reloaded)) == weak
    other_page = compare()  # the session's shared key, as after a visit to another page
    other_page.session_state["melreview_focus_run"] = seeded["weak"]
    assert focus_label(run(other_page)) == weak
    stale = compare()
    stale.query_params["focus"] = "999"  # a run not shown: the default focus
    assert f"#{seeded['strong']} " in focus_label(run(stale))


def _gradcam_page(data: dict, **params) -> AppTest:
    at = _page()
    for name, value in params.items():
        at.query_params[name] = value
    run(at)
    patient = data["table"]["patient_id"].value_counts().index[-1]
    at.selectbox(key="patients_open").select(patient)
    return run(at)


def test_gradcam_settings_persist_across_pages_and_reloads(patients_seeded, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.keras").write_bytes(b"placeholder: never loaded, the overlay stays off")
    store = patients_seeded["store"]
    store.add_run("with model", run_dir, dataset_id=patients_seeded["dataset_id"], model="basic-cnn")
    at = _gradcam_page(patients_seeded)
    assert at.slider(key="patients_panel_gc_opacity").value == 0.4  # the defaults
    at.slider(key="patients_panel_gc_opacity").set_value(0.8)
    at.radio(key="patients_panel_gc_method").set_value("gradcam++")
    at.radio(key="patients_panel_gc_detail").set_value("fine")
    run(at)
    params = {k: (v[0] if isinstance(v, list) else v) for k, v in at.query_params.items()}
    assert params["gc_opacity"] == "0.80" and params["gc_method"] == "gradcam++" and params["gc_detail"] == "fine"
    assert params["gc_show"] == "0"
    reloaded = _gradcam_page(patients_seeded, gc_opacity="0.80", gc_method="gradcam++", gc_detail="fine")
    assert reloaded.slider(key="patients_panel_gc_opacity").value == 0.8
    assert reloaded.radio(key="patients_panel_gc_method").value == "gradcam++"
    assert reloaded.radio(key="patients_panel_gc_detail").value == "fine"
    assert not reloaded.toggle(key="patients_panel_gc_show").value
    bad = _gradcam_page(patients_seeded, gc_opacity="7", gc_method="nonsense")
    assert bad.slider(key="patients_panel_gc_opacity").value == 0.4  # unreadable values: the defaults
    assert bad.radio(key="patients_panel_gc_method").value == "gradcam"
