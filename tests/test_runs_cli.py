"""``python -m melcore runs list|archive|restore``."""

from __future__ import annotations

import json

from melcore.__main__ import main
from melcore.store import Store


def test_list_archive_and_restore(tmp_path, capsys):
    store = Store()
    dataset_id = store.add_dataset("d", tmp_path / "t.csv")
    first = store.add_run(
        "cnn-bn · all clinics", tmp_path, dataset_id=dataset_id, metrics={"val_auroc": 0.8123}, threshold=0.50512
    )
    second = store.add_run("patient context", tmp_path, kind="meta", metrics={"oof_auroc": 0.79})
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [int(line.split()[0]) for line in out] == [second, first]
    assert "val AUROC 0.812" in out[1] and "threshold 0.50512" in out[1] and "OOF AUROC 0.790" in out[0]

    assert main(["runs", "archive", str(first)]) == 0
    assert f"run {first}: archived" in capsys.readouterr().out
    assert main(["runs", "list", "--dataset", "d"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["runs", "list", "--archived", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in listed] == [first] and listed[0]["archived_at"] is not None
    assert main(["runs", "list", "--all"]) == 0
    assert "ARCHIVED" in capsys.readouterr().out

    # an unknown id changes nothing, even beside a good one
    assert main(["runs", "restore", str(first), "999"]) == 2
    assert "no run with id 999" in capsys.readouterr().err
    assert store.get_run(first)["archived_at"] is not None
    assert main(["runs", "restore", str(first)]) == 0
    assert store.get_run(first)["archived_at"] is None
