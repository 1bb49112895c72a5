"""Batch scoring: arrays, folders and cohorts, test-time augmentation, bad images, submission format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melcore.errors import ConfigError, ImageError

SIZE = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory holding an (untrained, seeded) model.keras: scoring does not need training."""
    import keras

    from melcore.models import build_model

    keras.utils.set_random_seed(5)
    model, _ = build_model("cnn-bn", SIZE)
    path = tmp_path_factory.mktemp("run")
    model.save(path / "model.keras")
    return path


@pytest.fixture(scope="module")
def model(run_dir):
    from melcore.predict import load_run_model

    return load_run_model(run_dir)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six asymmetric 40x40 images (so flips change them) in a folder."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("images")
    for i in range(6):
        pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        pixels[: 10 + i, :20] = 0  # a dark corner block: not symmetric under flips
        Image.fromarray(pixels).save(root / f"ISIC_{i:04d}.png")
    return root


def test_dihedral_views_are_the_eight_distinct_flips():
    from melcore.predict import dihedral_views

    x = np.arange(2 * 3 * 3 * 1).reshape(2, 3, 3, 1)
    views = dihedral_views(x)
    assert len(views) == 8 and all(v.shape == x.shape for v in views)
    np.testing.assert_array_equal(views[0], x)
    assert len({v.tobytes() for v in views}) == 8
    # closed under the group: the views of a transposed batch are the same set
    transposed = {v.tobytes() for v in dihedral_views(x.transpose(0, 2, 1, 3))}
    assert transposed == {v.tobytes() for v in views}
    with pytest.raises(Exception, match="square"):
        dihedral_views(np.zeros((1, 3, 4, 1)))


def test_predict_images_probabilities_and_tta(model, folder):
    from melcore.images import load_images
    from melcore.predict import dihedral_views, predict_images

    images = load_images(sorted(folder.iterdir()), SIZE)
    plain = predict_images(model, images)
    assert plain.shape == (6,) and plain.dtype == np.float64
    assert ((plain >= 0) & (plain <= 1)).all()
    np.testing.assert_allclose(predict_images(model, images, batch_size=4), plain, atol=1e-6)

    tta = predict_images(model, images, tta=True, batch_size=4)
    manual = np.mean(
        [model.predict(v.astype("float32"), verbose=0).reshape(-1) for v in dihedral_views(images)], axis=0
    )
    np.testing.assert_allclose(tta, manual, atol=1e-5)
    # TTA averages over the whole group, so it does not change when the input is flipped
    flipped = predict_images(model, np.ascontiguousarray(images[:, ::-1]), tta=True)
    rotated = predict_images(model, np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2))), tta=True)
    np.testing.assert_allclose(flipped, tta, atol=1e-5)
    np.testing.assert_allclose(rotated, tta, atol=1e-5)
    assert not np.allclose(predict_images(model, np.ascontiguousarray(images[:, ::-1])), plain, atol=1e-6)

    with pytest.raises(ConfigError, match=r"this model takes \(n, 32, 32, 3\)"):
        predict_images(model, np.zeros((2, 48, 48, 3), dtype=np.uint8))


def test_predict_folder_one_row_per_image_matching_arrays(run_dir, model, folder):
    from melcore.images import load_images
    from melcore.predict import predict_folder, predict_images

    calls = []
    result = predict_folder(run_dir, folder, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert list(result.columns) == ["image_name", "prediction"]
    assert result["image_name"].tolist() == [f"ISIC_{i:04d}" for i in range(6)]
    expected = predict_images(model, load_images(sorted(folder.iterdir()), SIZE))
    np.testing.assert_allclose(result["prediction"], expected, atol=1e-5)
    assert calls[-1] == (6, 6)
    assert result.attrs["skipped"] == []

    tta = predict_folder(model, folder, tta=True, batch_size=4)
    expected_tta = predict_images(model, load_images(sorted(folder.iterdir()), SIZE), tta=True)
    np.testing.assert_allclose(tta["prediction"], expected_tta, atol=1e-5)


def test_bad_images_raise_naming_the_file_or_are_skipped_and_listed(model, folder, tmp_path):
    import shutil

    from melcore.cohort import load_cohort
    from melcore.predict import predict_cohort, predict_folder

    images = tmp_path / "images"
    shutil.copytree(folder, images)
    (images / "ISIC_9999.jpg").write_bytes(b"%PDF-1.4 not an image")
    with pytest.raises(ImageError, match="ISIC_9999.jpg"):
        predict_folder(model, images)
    result = predict_folder(model, images, on_error="skip")
    assert len(result) == 6 and "ISIC_9999" not in set(result["image_name"])
    assert [name for name, _ in result.attrs["skipped"]] == ["ISIC_9999"]

    csv = tmp_path / "test.csv"
    names = ["ISIC_0003", "ISIC_0001", "ISIC_MISSING", "ISIC_9999", "ISIC_0000"]
    pd.DataFrame({"image_name": names, "patient_id": "P1"}).to_csv(csv, index=False)
    cohort = load_cohort(csv, images)
    scored = predict_cohort(model, cohort, on_error="skip")
    assert scored["image_name"].tolist() == ["ISIC_0003", "ISIC_0001", "ISIC_0000"]  # table order
    assert dict(scored.attrs["skipped"]).keys() == {"ISIC_MISSING", "ISIC_9999"}
    with pytest.raises(ImageError, match="ISIC_MISSING"):
        predict_cohort(model, cohort)
    one = predict_folder(model, folder)
    np.testing.assert_allclose(
        scored.set_index("image_name")["prediction"],
        one.set_index("image_name").loc[scored["image_name"], "prediction"],
        atol=1e-5,
    )


def test_write_submission_format(tmp_path):
    from melcore.predict import write_submission

    df = pd.DataFrame({"image_name": ["ISIC_2", "ISIC_1"], "prediction": [0.25, 0.875]})
    path = write_submission(df, tmp_path / "out" / "submission.csv")
    text = path.read_text().splitlines()
    assert text[0] == "image_name,target" and len(text) == 3
    back = pd.read_csv(path)
    assert back["image_name"].tolist() == ["ISIC_2", "ISIC_1"]
    np.testing.assert_allclose(back["target"], [0.25, 0.875])
    with pytest.raises(ConfigError, match="appears twice"):
        write_submission(pd.concat([df, df]), tmp_path / "dup.csv")


def test_load_run_model_errors(tmp_path):
    from melcore.predict import list_image_files, load_run_model

    with pytest.raises(ConfigError, match="holds no model.keras"):
        load_run_model(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_run_model(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="holds no image files"):
        list_image_files(tmp_path)
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "a.jpg")
    with pytest.raises(ConfigError, match="two images are named 'a'"):
        list_image_files(tmp_path)


def test_warm_up_loads_the_process_wide_model_once_on_the_model_thread(tmp_path):
    import gc
    import threading

    from melcore import explain, predict
    from melcore.models import build_model

    model, _ = build_model("basic-cnn", SIZE)
    model.save(tmp_path / "model.keras")
    gc.unfreeze()
    first = predict.warm_up_in_background(tmp_path)
    assert first is not None and predict.warm_up_in_background(tmp_path) is first  # once per model file
    seconds = first.result(timeout=300)
    assert seconds is not None and seconds > 0
    assert gc.get_freeze_count() > 0  # the model's objects are out of the collector's reach
    warmed = explain.load_run_model(tmp_path)  # the cache now holds the warmed model: no second load
    assert predict.in_model_thread(explain.load_run_model, tmp_path) is warmed
    names = {predict.in_model_thread(lambda: threading.current_thread().name) for _ in range(3)}
    assert len(names) == 1 and names.pop().startswith("melcore-model")
    assert predict.in_model_thread(lambda: threading.current_thread()) is not threading.current_thread()
    assert predict.warm_up_in_background(tmp_path / "no-such-run") is None
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.keras").write_bytes(b"not a model")
    assert predict.warm_up_in_background(broken).result(timeout=60) is None  # logged, not raised
