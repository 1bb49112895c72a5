"""Fast image decoding to working size, an on-disk resize cache, thumbnails and uploads.

ISIC 2020 originals reach 6000x4000 pixels; decoding one in full costs about a
quarter of a second. Models work at 64-512 px, so JPEGs are decoded with
DCT-domain downscaling (Pillow's ``Image.draft``: libjpeg decodes directly at 1/2,
1/4 or 1/8 scale, the largest reduction that stays at or above the target) and
then resized to the exact size with a Lanczos filter. Other formats (PNG, TIFF,
BMP, WebP...) are decoded in full and resized the same way.

Every function returns RGB ``uint8`` arrays whatever the file holds: greyscale,
palette, CMYK and 16-bit images are converted (16-bit values scaled by 1/257),
transparency is composited over black (the colour of a dermoscope's vignette)
and the EXIF orientation tag is applied, so a phone photo taken sideways comes
out upright.

Resizing squashes to the requested shape (no crop, no padding): a 6000x4000
image loaded at ``size=256`` becomes 256x256. Thumbnails are the exception:
they keep the aspect ratio and fit inside a ``size`` x ``size`` box.

Files that cannot be used raise :class:`melcore.errors.ImageError` with the path
and a precise reason: missing, empty, a directory, not an image (the message
says what the bytes look like: PDF, text, HTML, HEIC...), truncated, corrupt, or
larger than the pixel limit (a guard against decompression bombs, default
100 megapixels; change it with ``max_pixels=`` or the ``MELREVIEW_MAX_PIXELS``
environment variable).

:class:`ImageCache` keeps resized arrays as ``.npy`` files (and thumbnails as
JPEG bytes) keyed by absolute path, size, modification time (ns) and file size,
so an edited or replaced file is decoded again. Entries are written to a
temporary file and renamed into place, so processes sharing the cache never read
half a file; unreadable entries are treated as misses and rewritten.

Only numpy and Pillow are imported; no TensorFlow, no OpenCV.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import struct
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from PIL.JpegImagePlugin import JpegImageFile

from melcore import settings
from melcore.caches import prune_files
from melcore.errors import ConfigError, ImageError
from melcore.safety import inside, not_a_regular_file, resolve_roots

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_UPLOAD_BYTES",
    "DEFAULT_MAX_UPLOAD_DECODED_BYTES",
    "decoded_bytes",
    "read_upload_views",
    "ImageCache",
    "load_image",
    "load_images",
    "thumbnail",
    "read_upload",
    "verify_image",
    "stand_in_image",
    "max_pixels_default",
]

PathLike = Union[str, os.PathLike]
Size = Union[int, Sequence[int]]

DEFAULT_MAX_PIXELS = 100_000_000
"""Pixel limit (width x height) above which an image is refused as a possible decompression bomb."""

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
"""Largest upload :func:`read_upload` accepts by default (20 MB)."""

DEFAULT_MAX_UPLOAD_DECODED_BYTES = 200_000_000
"""Most memory an upload may take once decoded (see :func:`decoded_bytes`): 50 megapixels of RGB or RGBA.

A 400 KB PNG can hold 10000 x 10000 RGBA pixels (400 MB decoded); uploads are refused
from their header, before any pixel is decoded. JPEGs count at the reduced size they are
decoded at, so a 24-megapixel phone photo scored at 256 px costs a few MB."""

MAX_SIZE = 8192
"""Largest working size accepted for ``size`` (per side)."""

_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
_RESAMPLE = Image.Resampling.LANCZOS


# --------------------------------------------------------------------------- helpers


def max_pixels_default() -> int:
    """The pixel limit in force: ``MELREVIEW_MAX_PIXELS`` if set, else :data:`DEFAULT_MAX_PIXELS`."""
    raw = os.environ.get("MELREVIEW_MAX_PIXELS")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise ConfigError(
            f"MELREVIEW_MAX_PIXELS={raw!r} is not a number; set it to a pixel count such as 100000000"
        ) from None
    if value <= 0:
        raise ConfigError(f"MELREVIEW_MAX_PIXELS={raw!r} must be a positive pixel count")
    return value


def _limit(max_pixels: int | None) -> int:
    if max_pixels is None:
        return max_pixels_default()
    if int(max_pixels) <= 0:
        raise ConfigError(f"max_pixels={max_pixels!r} must be a positive pixel count")
    return int(max_pixels)


def _size_hw(size: Size) -> tuple[int, int]:
    """Normalise ``size`` (int or (height, width)) to a (height, width) tuple, validating it."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        hw = (int(size), int(size))
    else:
        try:
            h, w = size  # type: ignore[misc]
            hw = (int(h), int(w))
        except (TypeError, ValueError):
            raise ConfigError(f"size={size!r} must be an int or a (height, width) pair of ints") from None
        if hw != tuple(size) or any(isinstance(v, bool) for v in size):  # type: ignore[arg-type]
            raise ConfigError(f"size={size!r} must hold whole numbers of pixels")
    if not all(1 <= v <= MAX_SIZE for v in hw):
        raise ConfigError(f"size={size!r}: each side must be between 1 and {MAX_SIZE} pixels")
    return hw


def _describe_bytes(head: bytes) -> str:
    """What a file or upload looks like from its first bytes (for error messages)."""
    signatures = [
        (b"\xff\xd8\xff", "a JPEG image"),
        (b"\x89PNG\r\n\x1a\n", "a PNG image"),
        (b"%PDF", "a PDF document"),
        (b"PK\x03\x04", "a ZIP archive (or a .docx/.xlsx/.pptx document)"),
        (b"GIF87a", "a GIF image"),
        (b"GIF89a", "a GIF image"),
        (b"II*\x00", "a TIFF image"),
        (b"MM\x00*", "a TIFF image"),
        (b"\x1f\x8b", "gzip-compressed data"),
        (b"\x7fELF", "an executable program"),
        (b"{\\rtf", "an RTF document"),
        (b"\xd0\xcf\x11\xe0", "an old Microsoft Office document"),
    ]
    for magic, what in signatures:
        if head.startswith(magic):
            return what
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "a WebP image"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"):
            return "a HEIC/HEIF image (the iPhone photo format)"
        if brand in (b"avif", b"avis"):
            return "an AVIF image"
        return "a video or MP4-family file"
    if len(head) > 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    if head.startswith(b"BM") and len(head) > 14:
        return "a BMP image"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped[:1] == b"<":
        lowered = stripped[:64].lower()
        if lowered.startswith((b"<!doctype html", b"<html")):
            return "an HTML page (a download that returned a web page instead of the image?)"
        if lowered.startswith(b"<svg") or b"<svg" in head.lower():
            return "an SVG drawing"
        return "XML/HTML text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and text and sum(ch.isprintable() or ch in "\r\n\t" for ch in text) >= 0.95 * len(text):
        return "text (its content is not shown)"
    if not head.strip(b"\x00"):
        return "only zero bytes"
    return "unrecognised binary data"


_OTHER_IMAGE_FORMATS = {
    "a GIF image",
    "a TIFF image",
    "a WebP image",
    "a BMP image",
    "an AVIF image",
    "a HEIC/HEIF image (the iPhone photo format)",
    "an SVG drawing",
    "a DICOM file",
}


def _read_head(path: str, n: int = 512) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def _check_file(path: str) -> os.stat_result:
    """Stat ``path`` with an ImageError for missing files, directories and empty files."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(
            path,
            "file not found; check the images folder (or the image path) and that the file was not moved or renamed",
        ) from None
    except PermissionError:
        raise ImageError(path, "permission denied; make the file readable for this user") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read the file ({exc.strerror or exc})") from None
    kind = not_a_regular_file(path)
    if kind == "a folder":
        raise ImageError(path, "is a directory, not an image file")
    if kind is not None:
        raise ImageError(path, f"is {kind}, not an image file; refusing to read it")
    if st.st_size == 0:
        raise ImageError(path, "file is empty (0 bytes); the copy or download probably failed, copy it again")
    return st


def _orientation(im: Image.Image) -> int:
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a corrupt EXIF block must not make a readable image unusable
        return 1
    return value if value in _TRANSPOSE else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB (16-bit scaled, transparency composited over black)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(im)
        if mode == "F":
            grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        else:  # I;16, I;16B, I;16L and I (Pillow's 32-bit mode for 16-bit PNGs) hold 0..65535
            grey = np.clip(np.rint(arr.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return im.convert("RGB")


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
# Bytes per pixel of Pillow's image memory by mode; every other mode (RGB too) takes 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decoded_bytes(im: Image.Image) -> int:
    """Memory Pillow allocates to decode ``im`` at its current size (after ``draft`` for a JPEG).

    Counts channels and bit depth as Pillow stores them: 1 byte per pixel for greyscale
    and palette images, 2 for 16-bit greyscale, 4 for RGB, RGBA, CMYK, 32-bit and float.
    """
    width, height = im.size
    return width * height * _PIXEL_BYTES.get(im.mode, 4)


def _check_decoded_bytes(im: Image.Image, label: str, limit: int | None) -> None:
    if limit is not None and decoded_bytes(im) > limit:
        width, height = im.size
        raise ImageError(
            label,
            f"a {width}x{height} {im.mode} image takes {decoded_bytes(im) / 1e6:,.0f} MB of "
            f"memory to decode, more than the limit of {limit / 1e6:,.0f} MB; resize it (e.g. "
            "to at most 4000 pixels a side) or save it as a JPEG",
        )


def _reduced(im: Image.Image, stored: tuple[int, int]) -> Image.Image:
    """``im`` shrunk by a whole factor towards ``stored`` (width, height) before a conversion to RGB.

    Converting a large RGBA, palette or 16-bit image makes several full-size copies;
    shrinking first by the factor ``resize(..., reducing_gap=3.0)`` would use keeps them
    small. RGB images (no conversion) and modes Pillow cannot reduce are returned as they are.
    """
    if im.mode == "RGB":
        return im
    factor = min(im.size[0] // (3 * stored[0]), im.size[1] // (3 * stored[1]))
    if factor < 2:
        return im
    try:
        return im.reduce(factor)
    except (ValueError, NotImplementedError):
        return im


def _plan(width: int, height: int, orientation: int, target_hw: tuple[int, int] | None, fit: bool) -> tuple[int, int]:
    """Pillow (width, height) to resize to, in the file's own (not yet rotated) axes."""
    swapped = orientation in _SWAPS_AXES
    up_w, up_h = (height, width) if swapped else (width, height)
    if target_hw is None:
        tw, th = up_w, up_h
    elif fit:
        scale = min(target_hw[1] / up_w, target_hw[0] / up_h, 1.0)
        tw, th = max(1, round(up_w * scale)), max(1, round(up_h * scale))
    else:
        th, tw = target_hw
    return (th, tw) if swapped else (tw, th)


def _load_failure(label: str, fmt: str, exc: BaseException) -> ImageError:
    message = str(exc)
    if "truncated" in message or isinstance(exc, EOFError):
        return ImageError(
            label, f"truncated {fmt}: the file ends before the image data is complete; copy it again from the source"
        )
    return ImageError(label, f"corrupt {fmt} data ({message or type(exc).__name__}); re-export or replace the file")


def _open_rgb(
    source,
    label: str,
    target_hw: tuple[int, int] | None,
    *,
    fit: bool,
    max_pixels: int,
    allowed_formats: tuple[str, ...] | None = None,
    max_decoded_bytes: int | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``source`` (a path or a binary file object) to an RGB Pillow image.

    target_hw: None keeps the full size; otherwise (height, width) of the result
    (squashed), or with ``fit=True`` the box the result must fit in (aspect kept,
    never enlarged). The EXIF orientation is applied. ``max_decoded_bytes`` refuses,
    before decoding, an image whose pixels would take more memory (:func:`decoded_bytes`).
    Returns the image and the original (width, height) once upright.
    """
    try:
        im = Image.open(source, formats=allowed_formats)
    except Image.DecompressionBombError as exc:
        match = _BOMB_PIXELS.search(str(exc))
        pixels = match.group(1) if match else "too many"
        raise ImageError(
            label,
            f"image has {pixels} pixels, more than Pillow's hard limit of "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} (possible decompression bomb)",
        ) from None
    except UnidentifiedImageError:
        head = _read_head(source) if isinstance(source, str) else _peek(source)
        what = _describe_bytes(head)
        if what in ("a JPEG image", "a PNG image"):
            reason = f"looks like {what} but its header is corrupt; re-export or replace the file"
        elif allowed_formats:
            reason = f"not a JPEG or PNG image: the data looks like {what}; upload a .jpg or .png file"
        elif what in _OTHER_IMAGE_FORMATS:
            reason = f"{what}, which this installation cannot read; convert it to JPEG or PNG"
        else:
            reason = f"not an image: the file holds {what}; expected a JPEG or PNG image"
        raise ImageError(label, reason) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        head = _read_head(source) if isinstance(source, str) else _peek(source)
        what = _describe_bytes(head)
        kind = what[2:] if what in ("a JPEG image", "a PNG image") else "image"
        raise ImageError(label, f"corrupt or cut-short {kind} header ({exc}); re-export or replace the file") from None

    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageError(
                label,
                f"image has {width * height} pixels ({width}x{height}), more than the limit of "
                f"{max_pixels} (possible decompression bomb); if the image is genuine, raise "
                "the limit with max_pixels= or MELREVIEW_MAX_PIXELS",
            )
        fmt = im.format or "image"
        try:
            if isinstance(im, JpegImageFile):  # JPEG, MPO: EXIF parsed with the header, orientation known now
                orientation = _orientation(im)
                stored = _plan(width, height, orientation, target_hw, fit)
                if target_hw is not None:
                    im.draft("RGB", stored)
                _check_decoded_bytes(im, label, max_decoded_bytes)
                im.load()
            else:  # e.g. PNG keeps EXIF after the image data
                _check_decoded_bytes(im, label, max_decoded_bytes)
                im.load()
                orientation = _orientation(im)
                stored = _plan(width, height, orientation, target_hw, fit)
        except ImageError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageError(label, f"possible decompression bomb ({exc})") from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError, struct.error) as exc:
            raise _load_failure(label, fmt, exc) from None
        try:
            rgb = _to_rgb(im if max_decoded_bytes is None else _reduced(im, stored))
            if rgb.size != stored:
                rgb = rgb.resize(stored, _RESAMPLE, reducing_gap=3.0)
        except (ValueError, OSError) as exc:
            raise ImageError(
                label,
                f"cannot convert this {fmt} (colour mode {im.mode}) to RGB ({exc}); "
                "re-export it as an 8-bit RGB JPEG or PNG",
            ) from None
        if orientation in _TRANSPOSE:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
        if rgb is im:
            rgb = im.copy()
    upright = (height, width) if orientation in _SWAPS_AXES else (width, height)
    return rgb, upright


def _peek(fh) -> bytes:
    try:
        pos = fh.tell()
        fh.seek(0)
        head = fh.read(512)
        fh.seek(pos)
        return head
    except Exception:
        return b""


def _as_array(im: Image.Image) -> np.ndarray:
    arr = np.array(im, dtype=np.uint8)  # a copy: writable and C-contiguous
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise AssertionError(f"internal error: decoded array has shape {arr.shape}")
    return arr


def _decode(path: str, size_hw: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Decode the file at ``path`` to an (h, w, 3) uint8 RGB array (no cache)."""
    _check_file(path)
    return _as_array(_open_rgb(path, path, size_hw, fit=False, max_pixels=max_pixels)[0])


def _encode_thumbnail(path: str, size: int, max_pixels: int, quality: int) -> bytes:
    """Decode ``path`` to fit in a size x size box and encode it as JPEG bytes (no cache)."""
    _check_file(path)
    im, _ = _open_rgb(path, path, (size, size), fit=True, max_pixels=max_pixels)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _atomic_write(target: Path, write: Callable[[object], None]) -> None:
    """Write a file through a temporary sibling and ``os.replace`` (readers never see half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- the cache


class ImageCache:
    """On-disk cache of resized images (``.npy`` arrays) and thumbnails (JPEG bytes).

    Parameters
    ----------
    root : path, optional
        Cache folder; default ``settings.subdir("cache/images")`` (under MELREVIEW_HOME).
        Several processes may share it.
    max_pixels : int, optional
        Pixel limit applied when a miss has to decode (default :func:`max_pixels_default`).

    Entries are keyed by (absolute path, size, mtime_ns, file size) and a format
    version, so a changed file is decoded again; stale entries are simply never
    read again. Nothing is evicted automatically (an entry is h*w*3 bytes plus
    128: 192 KiB at 256 px, so 33k ISIC images take 6.5 GB per size): call
    ``prune(max_bytes)`` or ``clear()``. ``hits`` and ``misses`` count lookups
    made through this object.
    """

    VERSION = 1  # bump when decoding changes so old entries are not reused

    def __init__(self, root: PathLike | None = None, *, max_pixels: int | None = None):
        if root is None:
            root = settings.subdir("cache/images")
        self.root = Path(root).expanduser().absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_pixels = max_pixels
        self.hits = 0
        self.misses = 0
        self.write_errors = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ImageCache(root={str(self.root)!r}, hits={self.hits}, misses={self.misses})"

    def _entry(self, kind: str, path: str, st: os.stat_result, detail: str, suffix: str) -> Path:
        key = f"v{self.VERSION}\0{kind}\0{path}\0{detail}\0{st.st_mtime_ns}\0{st.st_size}"
        digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()
        return self.root / kind / digest[:2] / f"{digest}{suffix}"

    def _count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1

    def _store(self, entry: Path, path: str, st: os.stat_result, write: Callable[[object], None]) -> None:
        try:
            after = os.stat(path)
        except OSError:
            return
        if (after.st_mtime_ns, after.st_size) != (st.st_mtime_ns, st.st_size):
            return  # the file changed while we decoded it: do not file the result under the old key
        try:
            _atomic_write(entry, write)
        except OSError:
            with self._lock:
                self.write_errors += 1  # a read-only or full cache must not break loading

    def get(self, path: PathLike, size: Size, *, max_pixels: int | None = None) -> np.ndarray:
        """The image at ``path`` as an (h, w, 3) uint8 RGB array, from the cache or decoded and stored.

        size: int (square) or (height, width). Raises ImageError like :func:`load_image`.
        """
        size_hw = _size_hw(size)
        path = os.path.abspath(os.fspath(path))
        st = _check_file(path)
        entry = self._entry("arrays", path, st, f"{size_hw[0]}x{size_hw[1]}", ".npy")
        try:
            arr = np.load(entry, allow_pickle=False)
            if arr.shape == (size_hw[0], size_hw[1], 3) and arr.dtype == np.uint8:
                self._count(True)
                return arr
        except (OSError, ValueError, EOFError):
            pass  # missing or unreadable entry: decode again
        self._count(False)
        limit = _limit(max_pixels if max_pixels is not None else self.max_pixels)
        arr = _decode(path, size_hw, limit)
        self._store(entry, path, st, lambda fh: np.save(fh, arr, allow_pickle=False))
        return arr

    def thumbnail(self, path: PathLike, size: int = 160, *, quality: int = 85, max_pixels: int | None = None) -> bytes:
        """JPEG bytes of the image fitted in a ``size`` x ``size`` box (aspect kept), cached."""
        size = _thumb_size(size)
        path = os.path.abspath(os.fspath(path))
        st = _check_file(path)
        entry = self._entry("thumbs", path, st, f"{size}q{quality}", ".jpg")
        try:
            data = entry.read_bytes()
            if data.startswith(b"\xff\xd8\xff") and data.endswith(b"\xff\xd9"):
                self._count(True)
                return data
        except OSError:
            pass
        self._count(False)
        limit = _limit(max_pixels if max_pixels is not None else self.max_pixels)
        data = _encode_thumbnail(path, size, limit, quality)
        self._store(entry, path, st, lambda fh: fh.write(data))
        return data

    def clear(self) -> int:
        """Delete every cached entry; returns the number of files removed."""
        removed = 0
        for file, _ in self._files():
            try:
                file.unlink()
                removed += 1
            except OSError:
                pass
        return removed

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        found = []
        for kind in ("arrays", "thumbs"):
            for file in (self.root / kind).rglob("*"):
                try:
                    st = file.stat()
                except OSError:
                    continue  # removed by another process meanwhile
                if not file.name.startswith(".") and file.is_file():
                    found.append((file, st))
        return found

    def size_bytes(self) -> int:
        """Total size of the cached files, in bytes."""
        return sum(st.st_size for _, st in self._files())

    def prune(self, max_bytes: int) -> int:
        """Delete the least recently used entries until the cache holds at most ``max_bytes``.

        Recency is the later of the entry's access and modification times (coarse
        on ``relatime`` mounts, which is enough here). Returns the number of files removed.
        """
        removed, _ = prune_files(self._files(), max_bytes=max_bytes)
        return len(removed)


def _resolve_cache(cache) -> ImageCache | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        return ImageCache()
    if isinstance(cache, ImageCache):
        return cache
    raise ConfigError(f"cache={cache!r} must be an ImageCache, True (the default cache) or None (no cache)")


def _thumb_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 1 <= int(size) <= MAX_SIZE:
        raise ConfigError(f"thumbnail size={size!r} must be an int between 1 and {MAX_SIZE}")
    return int(size)


# --------------------------------------------------------------------------- public functions


def load_image(
    path: PathLike, size: Size, *, cache: ImageCache | bool | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Load one image as RGB uint8 at the working size.

    Parameters
    ----------
    path : str or Path
        Image file (JPEG fast path; PNG, TIFF, BMP, WebP... decoded in full).
    size : int or (height, width)
        Output size; the image is squashed to it (no crop). Each side 1..8192.
    cache : ImageCache, True or None
        None (default) decodes every time; an :class:`ImageCache` reads and fills
        it; True uses the default cache under MELREVIEW_HOME.
    max_pixels : int, optional
        Refuse images with more pixels (width x height) than this.

    Returns
    -------
    np.ndarray of shape (height, width, 3), dtype uint8, RGB.

    Raises
    ------
    ImageError
        Missing, empty, non-image, truncated, corrupt or too-large file.
    """
    size_hw = _size_hw(size)
    store = _resolve_cache(cache)
    if store is not None:
        return store.get(path, size_hw, max_pixels=max_pixels)
    return _decode(os.path.abspath(os.fspath(path)), size_hw, _limit(max_pixels))


def load_images(
    paths: Iterable[PathLike],
    size: Size,
    *,
    cache: ImageCache | bool | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_error: str | Callable[[int, ImageError], None] = "raise",
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load many images in a thread pool (Pillow releases the GIL while decoding).

    Parameters
    ----------
    paths : iterable of str or Path
    size : int or (height, width)
    cache : ImageCache, True or None
        As in :func:`load_image`.
    workers : int, optional
        Threads; default ``min(8, cpu count, len(paths))``. 1 decodes in the calling thread.
    progress : callable(done, total), optional
        Called from the calling thread with (0, total) first, then at most about
        ten times a second, and always with (total, total) at the end.
    on_error : "raise" or callable(index, ImageError)
        "raise" (default): stop at the first bad file, cancel the rest and raise its
        ImageError (the lowest position among the failures seen). A callable is
        called (in the calling thread) for each bad file, whose row is left all
        zeros (black), and loading continues.

    Returns
    -------
    np.ndarray of shape (n, height, width, 3), dtype uint8, in the order of ``paths``.
    """
    size_hw = _size_hw(size)
    paths = [os.fspath(p) for p in paths]
    if on_error != "raise" and not callable(on_error):
        raise ConfigError(f"on_error={on_error!r} must be 'raise' or a callable(index, error)")
    store = _resolve_cache(cache)
    limit = _limit(max_pixels)
    total = len(paths)
    out = np.zeros((total, size_hw[0], size_hw[1], 3), dtype=np.uint8)
    if workers is None:
        workers = min(8, os.cpu_count() or 1, max(total, 1))
    workers = max(1, int(workers))

    def one(index: int) -> None:
        out[index] = load_image(paths[index], size_hw, cache=store, max_pixels=limit)

    last_report = [0.0]

    def report(done: int) -> None:
        if progress is None:
            return
        now = time.monotonic()
        if done == total or done == 0 or now - last_report[0] >= 0.1:
            last_report[0] = now
            progress(done, total)

    report(0)
    if total == 0:
        return out
    if workers == 1:
        for index in range(total):
            try:
                one(index)
            except ImageError as exc:
                if on_error == "raise":
                    raise
                on_error(index, exc)
            report(index + 1)
        return out

    failures: list[tuple[int, ImageError]] = []
    done = 0
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="melcore-images")
    try:
        futures = {pool.submit(one, index): index for index in range(total)}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = futures[future]
                exc = future.exception()
                if exc is None:
                    pass
                elif isinstance(exc, ImageError):
                    if on_error == "raise":
                        failures.append((index, exc))
                    else:
                        on_error(index, exc)
                else:
                    raise exc
                done += 1
            if failures:
                break
            report(done)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        raise min(failures, key=lambda item: item[0])[1]
    return out


def thumbnail(
    path: PathLike,
    size: int = 160,
    *,
    cache: ImageCache | bool | None = None,
    quality: int = 85,
    max_pixels: int | None = None,
) -> bytes:
    """JPEG bytes of the image fitted inside a ``size`` x ``size`` box, aspect ratio kept, never enlarged.

    With an :class:`ImageCache` (or True for the default one) the bytes are cached
    on disk. Raises ImageError like :func:`load_image`.
    """
    size = _thumb_size(size)
    store = _resolve_cache(cache)
    if store is not None:
        return store.thumbnail(path, size, quality=quality, max_pixels=max_pixels)
    return _encode_thumbnail(os.path.abspath(os.fspath(path)), size, _limit(max_pixels), quality)


def verify_image(path: PathLike, *, max_pixels: int | None = None) -> tuple[int, int]:
    """Check that ``path`` decodes completely; return its (width, height) once upright.

    JPEGs are decoded at 1/8 scale, which still reads every byte of image data,
    so truncation and corruption are caught quickly. Raises ImageError.
    """
    path = os.path.abspath(os.fspath(path))
    _check_file(path)
    _, upright = _open_rgb(path, path, (1, 1), fit=False, max_pixels=_limit(max_pixels))
    return upright


def _upload_bytes(data, label: str, max_bytes: int) -> bytes:
    """The bytes of an upload (bytes-like or file-like), checked to be a non-empty JPEG or PNG within ``max_bytes``."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    elif hasattr(data, "getvalue"):
        raw = bytes(data.getvalue())
    elif hasattr(data, "read"):
        raw = data.read(max_bytes + 1)
        if not isinstance(raw, (bytes, bytearray)):
            raise ImageError(label, "the upload must be opened in binary mode")
        raw = bytes(raw)
    else:
        raise ImageError(label, f"expected bytes or a file-like object, got {type(data).__name__}")
    if not raw:
        raise ImageError(label, "the upload is empty (0 bytes)")
    if len(raw) > max_bytes:
        raise ImageError(
            label,
            f"the upload is {len(raw) / 1e6:.1f} MB, more than the {max_bytes / 1e6:.1f} MB "
            "limit; resize or re-compress the image",
        )
    what = _describe_bytes(raw[:512])
    if what not in ("a JPEG image", "a PNG image"):
        raise ImageError(label, f"not a JPEG or PNG image: the data looks like {what}; upload a .jpg or .png file")
    return raw


def read_upload(
    data,
    *,
    size: Size | None = None,
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    name: str | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_UPLOAD_DECODED_BYTES,
) -> np.ndarray:
    """Decode an uploaded JPEG or PNG to an RGB uint8 array.

    Parameters
    ----------
    data : bytes, bytearray, memoryview, or a file-like object (e.g. Streamlit's
        UploadedFile: its ``name`` is used in messages).
    size : int or (height, width), optional
        Decode straight to this size (fast for big JPEGs); default full size.
    max_bytes : int
        Refuse larger uploads (default 20 MB).
    max_pixels : int, optional
        Pixel limit (decompression-bomb guard).
    name : str, optional
        How to name the upload in error messages (default the object's ``name`` or "upload").
    max_decoded_bytes : int
        Refuse, from its header, an image that would take more memory to decode
        (:func:`decoded_bytes`; default :data:`DEFAULT_MAX_UPLOAD_DECODED_BYTES`).

    Returns
    -------
    np.ndarray (height, width, 3) uint8 RGB.

    Raises
    ------
    ImageError
        Empty, too large, not a JPEG/PNG (the message says what it looks like), corrupt, too many pixels
        or too much memory to decode.
    """
    label = name or getattr(data, "name", None) or "upload"
    raw = _upload_bytes(data, label, max_bytes)
    size_hw = None if size is None else _size_hw(size)
    im, _ = _open_rgb(
        io.BytesIO(raw),
        label,
        size_hw,
        fit=False,
        max_pixels=_limit(max_pixels),
        allowed_formats=("JPEG", "PNG"),
        max_decoded_bytes=max_decoded_bytes,
    )
    return _as_array(im)


def read_upload_views(
    data,
    size: int,
    preview_side: int,
    *,
    max_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    name: str | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_UPLOAD_DECODED_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode an upload once into what scoring needs: the model's input and a picture to show.

    The image is decoded a single time, reduced (JPEG ``draft``, whole-factor
    ``reduce``) to fit a box of ``max(size, preview_side)`` pixels, and both views are
    resized from it. Checks and parameters as :func:`read_upload`.

    Returns
    -------
    (model_input, preview) : uint8 RGB arrays; ``model_input`` is squashed to
        ``size`` x ``size`` as training images are, ``preview`` keeps the aspect ratio
        and fits in ``preview_side`` x ``preview_side`` (never enlarged).
    """
    label = name or getattr(data, "name", None) or "upload"
    raw = _upload_bytes(data, label, max_bytes)
    size_hw, side = _size_hw(size), _thumb_size(preview_side)
    box = max(size_hw[0], side)
    base, _ = _open_rgb(
        io.BytesIO(raw),
        label,
        (box, box),
        fit=True,
        max_pixels=_limit(max_pixels),
        allowed_formats=("JPEG", "PNG"),
        max_decoded_bytes=max_decoded_bytes,
    )
    model_input = base if base.size == size_hw[::-1] else base.resize(size_hw[::-1], _RESAMPLE, reducing_gap=3.0)
    preview = base.copy()
    preview.thumbnail((side, side), _RESAMPLE)
    return _as_array(model_input), _as_array(preview)


# --------------------------------------------------------------------------- stand-ins


def _font(px: int):
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def stand_in_image(image_name: str, size: Size) -> np.ndarray:
    """A placeholder for a row whose image file is absent (e.g. most of ISIC 2020 here).

    Grey only (no skin or lesion colours), a diagonal stripe pattern whose angle
    and period depend deterministically on ``image_name`` (so neighbouring tiles
    differ), and the word ``STAND-IN`` on a light band across the middle; at
    96 px and more the image name is written below it. Never mistaken for a
    lesion; never feed it to a model.

    Returns an (height, width, 3) uint8 array; same name and size → identical pixels.
    """
    h, w = _size_hw(size)
    digest = hashlib.sha256(str(image_name).encode("utf-8")).digest()
    angle = np.deg2rad(20 + digest[0] % 50)
    period = max(4.0, min(h, w) / (6 + digest[1] % 6))
    light, dark = 150 + digest[2] % 30, 95 + digest[3] % 30
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = ((xx * np.cos(angle) + yy * np.sin(angle)) // period).astype(np.int64) % 2
    grey = np.where(stripes == 1, light, dark).astype(np.uint8)
    im = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
    draw = ImageDraw.Draw(im)
    border = max(1, min(h, w) // 40)
    draw.rectangle([0, 0, w - 1, h - 1], outline=(40, 40, 40), width=border)
    label = "STAND-IN"
    font = _font(max(6, int(min(w / 6.5, h / 3))))
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    tw, th = right - left, bottom - top
    band_h = th + max(4, h // 16)
    y0 = (h - band_h) // 2
    draw.rectangle([0, y0, w - 1, y0 + band_h], fill=(228, 228, 228))
    draw.text(((w - tw) / 2 - left, y0 + (band_h - th) / 2 - top), label, fill=(30, 30, 30), font=font)
    if min(h, w) >= 96:
        small = _font(max(8, w // 14))
        name = str(image_name)[:24]
        left, top, right, bottom = draw.textbbox((0, 0), name, font=small)
        ny = y0 + band_h + max(2, h // 40)
        draw.rectangle(
            [(w - (right - left)) / 2 - 3, ny - 2, (w + (right - left)) / 2 + 3, ny + (bottom - top) + 3],
            fill=(228, 228, 228),
        )
        draw.text(((w - (right - left)) / 2 - left, ny - top), name, fill=(30, 30, 30), font=small)
    return np.array(im, dtype=np.uint8)


# --------------------------------------------------------------------------- path confinement


def confine(path: PathLike, roots: Iterable[PathLike | None]) -> Path:
    """The real location of ``path``, provided it lies inside one of ``roots``; ImageError otherwise.

    Image paths come from user-supplied tables (a CSV may name ``../../etc/passwd``
    or an absolute path anywhere). Pages read a file only after this check against
    the folders registered for the dataset (its image folder and the folder of its
    table), so a crafted table cannot make the app serve other files.

    Both sides are resolved first (``..`` removed, symbolic links followed), so a
    symlink inside an image folder that points elsewhere is refused as well.
    The file itself need not exist: existence is checked when it is read.

    Parameters
    ----------
    path : str or Path
        The image path to check (relative paths are taken from the working directory).
    roots : iterable of str, Path or None
        Allowed folders; None entries are ignored.

    Returns
    -------
    Path
        The resolved absolute path, to be used for the actual read.

    Raises
    ------
    ImageError
        ``path`` resolves outside every root, or no root was given.
    """
    raw = os.fspath(path)
    if "\x00" in raw:
        raise ImageError(raw.replace("\x00", "\\0"), "the path contains a NUL byte; refusing to read it")
    allowed = resolve_roots(roots)
    if not allowed:
        raise ImageError(
            raw,
            "no dataset folder is registered to read images from; refusing to read it "
            "(register the dataset with its image folder)",
        )
    resolved = inside(raw, allowed)
    if resolved is not None:
        return resolved
    resolved = Path(raw).expanduser().resolve(strict=False)
    where = " or ".join(str(r) for r in allowed)
    shown = raw if str(resolved) == raw else f"{raw} (resolves to {resolved})"
    raise ImageError(
        shown,
        f"outside the dataset's registered folders ({where}); refusing to read it. "
        "Move the image into the dataset's image folder, or register the folder that "
        "holds it as the dataset's image folder",
    )


__all__.append("confine")
