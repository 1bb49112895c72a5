"""melcore.images: fast decode, on-disk cache, thumbnails, uploads, stand-ins."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps
from PIL.JpegImagePlugin import JpegImageFile

from melcore import images
from melcore.errors import ConfigError, ImageError
from melcore.images import ImageCache, load_image, load_images, read_upload, stand_in_image, thumbnail


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour picture with mild noise (compresses and resizes like a photo)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 220, (4, 5, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    noisy = smooth + rng.integers(-6, 7, smooth.shape, dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def save(path, array_or_image, **kwargs):
    im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    im.save(path, **kwargs)
    return path


def halves(width: int, height: int) -> np.ndarray:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = (220, 20, 20)
    arr[:, width // 2 :] = (20, 20, 220)
    return arr


@pytest.fixture
def jpeg(tmp_path):
    return save(tmp_path / "photo.jpg", photo(1200, 800), quality=92)


# --------------------------------------------------------------------------- decoding


def test_load_image_uses_draft_and_matches_naive_decode(jpeg, monkeypatch):
    decoded_sizes = []
    original_draft = JpegImageFile.draft

    def spy(self, mode, size):
        result = original_draft(self, mode, size)
        decoded_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImageFile, "draft", spy)
    out = load_image(jpeg, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and out.flags.writeable
    assert decoded_sizes == [(150, 100)]  # 1200x800 decoded at 1/8 scale, not in full

    with Image.open(jpeg) as im:
        naive = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)).astype(np.int16)
    assert np.abs(out.astype(np.int16) - naive).mean() < 2.0


def test_size_pair_squashes_without_crop(tmp_path):
    path = save(tmp_path / "wide.png", halves(100, 50))
    out = load_image(path, (32, 48))
    assert out.shape == (32, 48, 3)
    assert out[:, :20, 0].min() > 180 and out[:, :20, 2].max() < 60  # red stays on the left
    assert out[:, 28:, 2].min() > 180 and out[:, 28:, 0].max() < 60  # blue on the right


@pytest.mark.parametrize("size", [0, -3, 9000, (10,), (10, 0), "64", 2.5, True])
def test_bad_size_is_a_config_error(jpeg, size):
    with pytest.raises(ConfigError, match="size"):
        load_image(jpeg, size)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / f"o{orientation}.jpg", halves(160, 80), quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        upright = ImageOps.exif_transpose(im)
        expected = np.asarray(upright.convert("RGB").resize((20, 30), Image.Resampling.LANCZOS)).astype(np.int16)
    out = load_image(path, (30, 20))
    assert out.shape == (30, 20, 3)
    assert np.abs(out.astype(np.int16) - expected).mean() < 6
    assert images.verify_image(path) == ((80, 160) if orientation in (6, 8) else (160, 80))


def test_modes_are_converted_to_rgb(tmp_path):
    grey = save(tmp_path / "grey.jpg", Image.new("L", (40, 30), 200), quality=95)
    assert np.abs(load_image(grey, 16).astype(int) - 200).max() <= 2

    cmyk = save(tmp_path / "cmyk.jpg", Image.new("CMYK", (40, 30), (0, 255, 255, 0)), quality=95)
    red = load_image(cmyk, 16)
    assert red[..., 0].min() > 230 and red[..., 1:].max() < 30

    palette = Image.new("P", (40, 30))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 40, 30))
    assert (load_image(save(tmp_path / "pal.png", palette), 8) == (10, 200, 30)).all()

    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., :3] = (250, 250, 250)
    rgba[:, 20:, 3] = 255  # left half transparent
    out = load_image(save(tmp_path / "alpha.png", rgba), (30, 40))
    assert out[:, :15].max() == 0 and out[:, 25:].min() == 250  # transparency over black

    deep = np.full((30, 40), 65535, np.uint16)
    deep[:, :20] = 32896  # half of full scale -> 128
    path16 = save(tmp_path / "deep.png", Image.fromarray(deep))
    with Image.open(path16) as im:
        assert im.mode.startswith("I")
    out = load_image(path16, (30, 40))
    assert out.dtype == np.uint8 and out.shape == (30, 40, 3)
    assert (out[:, :15] == 128).all() and (out[:, 25:] == 255).all()


# --------------------------------------------------------------------------- bad files


def _truncated(tmp_path):
    data = tmp_path / "full.jpg"
    save(data, photo(400, 300), quality=90)
    raw = data.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(raw[: len(raw) // 2])
    return path


def write(name, data):
    def make(folder):
        path = folder / name
        path.write_bytes(data)
        return path

    return make


def make_dir(folder):
    (folder / "folder.jpg").mkdir()
    return folder / "folder.jpg"


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda folder: folder / "absent.jpg", "not found"),
        (write("empty.jpg", b""), "empty"),
        (make_dir, "directory"),
        (write("notes.jpg", b"patient notes, not a picture\n"), "not an image.*text"),
        (write("report.jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"), "not an image.*PDF"),
        (write("page.jpg", b"<!DOCTYPE html><html>403</html>"), "not an image.*HTML"),
        (write("head.jpg", b"\xff\xd8\xff\xe0" + b"\x13" * 300), "corrupt"),
        (_truncated, "truncated"),
    ],
)
def test_bad_files_raise_image_error_with_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageError, match=reason) as info:
        load_image(path, 32)
    assert info.value.path == os.path.abspath(path)
    with pytest.raises(ImageError, match=reason):
        load_image(path, 32, cache=ImageCache(tmp_path / "cache"))


def test_heic_named_jpg_says_what_it_is(tmp_path):
    path = tmp_path / "iphone.jpg"
    path.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200)
    with pytest.raises(ImageError, match="HEIC"):
        load_image(path, 32)


def test_pixel_limit_refuses_bombs(tmp_path, monkeypatch):
    path = save(tmp_path / "big.png", Image.new("RGB", (300, 200), (1, 2, 3)))
    with pytest.raises(ImageError, match=r"60000 pixels.*limit of 50000") as info:
        load_image(path, 32, max_pixels=50_000)
    assert info.value.path == os.path.abspath(path)
    assert load_image(path, 32, max_pixels=60_000).shape == (32, 32, 3)

    monkeypatch.setenv("MELREVIEW_MAX_PIXELS", "1000")
    with pytest.raises(ImageError, match="more than the limit of 1000"):
        load_image(path, 32)
    with pytest.raises(ImageError, match="limit"):
        ImageCache(tmp_path / "c").get(path, 32)
    with pytest.raises(ImageError, match="limit"):
        read_upload((tmp_path / "big.png").read_bytes())


def test_pillow_hard_bomb_limit_is_reported_as_image_error(tmp_path, monkeypatch):
    path = save(tmp_path / "bomb.png", Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2x this
    with pytest.raises(ImageError, match="10000 pixels"):
        load_image(path, 16, max_pixels=10**9)


# --------------------------------------------------------------------------- the cache


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(images, name)

    def wrapper(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(images, name, wrapper)
    return calls


def test_cache_hit_does_not_decode(jpeg, tmp_path, monkeypatch):
    calls = count_calls(monkeypatch, "_decode")
    cache = ImageCache(tmp_path / "cache")
    first = load_image(jpeg, 48, cache=cache)
    second = load_image(jpeg, 48, cache=cache)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, load_image(jpeg, 48))  # uncached decode: same pixels
    assert len(calls) == 2

    # Persisted on disk: a fresh cache object (another process) hits too; another size does not.
    again = ImageCache(tmp_path / "cache")
    np.testing.assert_array_equal(again.get(jpeg, 48), first)
    assert len(calls) == 2 and again.hits == 1
    assert again.get(jpeg, (48, 32)).shape == (48, 32, 3) and len(calls) == 3
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave nothing behind


def test_default_cache_lives_under_melreview_home(jpeg, melreview_home):
    load_image(jpeg, 16, cache=True)
    assert list((melreview_home / "cache" / "images").rglob("*.npy"))


def test_cache_is_invalidated_when_the_file_changes(tmp_path, monkeypatch):
    path = tmp_path / "lesion.png"
    save(path, np.full((20, 20, 3), 50, np.uint8))
    cache = ImageCache(tmp_path / "cache")
    assert (cache.get(path, 8) == 50).all()

    st = os.stat(path)
    save(path, np.full((20, 20, 3), 200, np.uint8))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # new content, later mtime
    assert (cache.get(path, 8) == 200).all()

    # Same mtime as before but a different size: still a new entry.
    st = os.stat(path)
    noisy = np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)
    save(path, noisy)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size != st.st_size
    np.testing.assert_array_equal(cache.get(path, 8), load_image(path, 8))
    assert cache.misses == 3 and cache.hits == 0


def test_corrupt_cache_entry_is_a_miss_and_is_rewritten(jpeg, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    good = cache.get(jpeg, 16)
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    entry.write_bytes(b"half a file")
    np.testing.assert_array_equal(cache.get(jpeg, 16), good)
    np.testing.assert_array_equal(np.load(entry), good)
    assert cache.clear() == 1 and not list((tmp_path / "cache").rglob("*.npy"))


def test_prune_removes_least_recently_used_entries(tmp_path):
    paths = [save(tmp_path / f"{i}.png", np.full((8, 8, 3), i, np.uint8)) for i in range(3)]
    cache = ImageCache(tmp_path / "cache")
    for path in paths:
        cache.get(path, 16)
    entries = {int(np.load(f)[0, 0, 0]): f for f in (tmp_path / "cache").rglob("*.npy")}
    for i, entry in entries.items():
        os.utime(entry, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # entry i last used at second i
    one = cache.size_bytes() // 3
    assert one == 16 * 16 * 3 + 128
    assert cache.prune(2 * one) == 1
    assert sorted(i for i, entry in entries.items() if entry.exists()) == [1, 2]
    assert cache.prune(10**9) == 0 and cache.size_bytes() == 2 * one


def test_unwritable_cache_still_returns_images(jpeg, tmp_path, monkeypatch):
    cache = ImageCache(tmp_path / "cache")

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(images, "_atomic_write", refuse)
    assert cache.get(jpeg, 16).shape == (16, 16, 3) and cache.write_errors == 1


# --------------------------------------------------------------------------- batches


def test_load_images_keeps_order_and_reports_progress(tmp_path):
    paths = [save(tmp_path / f"{i}.png", np.full((10, 10, 3), 20 * i, np.uint8)) for i in range(7)]
    seen = []
    out = load_images(
        paths, 4, workers=3, progress=lambda done, total: seen.append((done, total)), cache=ImageCache(tmp_path / "c")
    )
    assert out.shape == (7, 4, 4, 3) and out.dtype == np.uint8
    assert [int(a[0, 0, 0]) for a in out] == [20 * i for i in range(7)]
    assert seen[0] == (0, 7) and seen[-1] == (7, 7)
    assert all(b[0] >= a[0] for a, b in zip(seen, seen[1:]))
    np.testing.assert_array_equal(load_images(paths, 4, workers=1), out)
    assert load_images([], 4).shape == (0, 4, 4, 3)


def test_load_images_raises_naming_the_bad_file(tmp_path):
    paths = [save(tmp_path / f"{i}.png", np.full((10, 10, 3), 9, np.uint8)) for i in range(5)]
    bad = tmp_path / "3.png"
    bad.write_text("not an image")
    for workers in (1, 2):
        with pytest.raises(ImageError, match="not an image") as info:
            load_images(paths, 4, workers=workers)
        assert info.value.path == str(bad)


def test_load_images_on_error_callback_leaves_black_rows(tmp_path):
    paths = [save(tmp_path / f"{i}.png", np.full((10, 10, 3), 99, np.uint8)) for i in range(4)]
    paths.insert(1, tmp_path / "missing.png")
    errors = []
    out = load_images(paths, 4, workers=2, on_error=lambda i, e: errors.append((i, e.path)))
    assert errors == [(1, str(tmp_path / "missing.png"))]
    assert (out[1] == 0).all() and (out[[0, 2, 3, 4]] == 99).all()
    with pytest.raises(ConfigError, match="on_error"):
        load_images(paths, 4, on_error="skip")


# --------------------------------------------------------------------------- thumbnails


def test_thumbnail_fits_the_box_keeps_aspect_and_is_cached(tmp_path, monkeypatch):
    path = save(tmp_path / "wide.jpg", photo(400, 200), quality=90)
    data = thumbnail(path, 160)
    assert data[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(data)).size == (160, 80)

    small = save(tmp_path / "small.png", photo(60, 40))
    assert Image.open(io.BytesIO(thumbnail(small, 160))).size == (60, 40)  # never enlarged

    calls = count_calls(monkeypatch, "_encode_thumbnail")
    cache = ImageCache(tmp_path / "cache")
    first = thumbnail(path, 120, cache=cache)
    assert thumbnail(path, 120, cache=cache) == first and len(calls) == 1
    assert Image.open(io.BytesIO(first)).size == (120, 60)
    with pytest.raises(ImageError, match="not found"):
        thumbnail(tmp_path / "nope.jpg", cache=cache)


# --------------------------------------------------------------------------- uploads


def test_read_upload_decodes_jpeg_and_png(tmp_path, jpeg):
    data = jpeg.read_bytes()
    full = read_upload(data)
    assert full.shape == (800, 1200, 3) and full.dtype == np.uint8
    np.testing.assert_array_equal(read_upload(data, size=64), load_image(jpeg, 64))

    buf = io.BytesIO()
    Image.fromarray(halves(30, 20)).save(buf, format="PNG")
    upload = io.BytesIO(buf.getvalue())
    upload.name = "lesion.png"
    np.testing.assert_array_equal(read_upload(upload), halves(30, 20))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>", "not a JPEG or PNG.*PDF"),
        (b"Dear colleague, please find attached", "not a JPEG or PNG.*text"),
        (b"GIF89a" + b"\x00" * 40, "not a JPEG or PNG.*GIF"),
        (b"", "empty"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "corrupt"),
    ],
)
def test_read_upload_refuses_non_images(data, reason):
    with pytest.raises(ImageError, match=reason):
        read_upload(data)


def test_read_upload_limits(jpeg):
    data = jpeg.read_bytes()
    with pytest.raises(ImageError, match="MB limit") as info:
        read_upload(data, max_bytes=1000, name="scan.jpg")
    assert info.value.path == "scan.jpg"
    with pytest.raises(ImageError, match="more than the limit of 1000"):
        read_upload(data, max_pixels=1000)


# --------------------------------------------------------------------------- stand-ins and imports


def test_stand_in_is_grey_deterministic_and_labelled():
    a = stand_in_image("ISIC_0000001", 96)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, stand_in_image("ISIC_0000001", 96))
    assert not np.array_equal(a, stand_in_image("ISIC_0000002", 96))
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()  # no colour: never lesion-like
    band = a[40:56, 10:86, 0]
    assert (band < 80).sum() > 40 and (band > 200).sum() > 100  # dark text on the light band
    assert stand_in_image("x", (40, 64)).shape == (40, 64, 3)


def test_import_is_light():
    code = (
        "import sys, melcore.images, melcore.demo; "
        "heavy = [m for m in ('tensorflow', 'keras', 'cv2', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_dermoscopy_images(derm_real_dir, isic2020_dir, tmp_path):
    paths = sorted((derm_real_dir / "images").glob("*.jpg"))[:6]
    paths += sorted((isic2020_dir / "jpeg" / "train").glob("*.jpg"))
    cache = ImageCache(tmp_path / "cache")
    batch = load_images(paths, 64, cache=cache, workers=2)
    assert batch.shape == (len(paths), 64, 64, 3) and cache.misses == len(paths)
    for path, fast in zip(paths, batch):
        with Image.open(path) as im:
            naive = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)).astype(np.int16)
        assert np.abs(fast.astype(np.int16) - naive).mean() < 2.0, path
    np.testing.assert_array_equal(load_images(paths, 64, cache=cache), batch)
    assert cache.hits == len(paths)


def test_concurrent_fills_of_one_entry_are_safe(jpeg, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    batch = load_images([jpeg] * 12, 24, cache=cache, workers=4)
    assert (batch == batch[0]).all()
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    np.testing.assert_array_equal(np.load(entry), batch[0])
    assert not list((tmp_path / "cache").rglob("*.tmp"))
