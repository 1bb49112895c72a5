"""The synthetic ISIC 2020-style demo cohort.

``make_demo_cohort(out_dir, n_patients, seed)`` writes

* ``out_dir/labels.csv``: one row per image with the ISIC 2020 ``train.csv``
  columns plus ``lesion_id`` (placed as in ``ISIC_2020_Training_GroundTruth_v2.csv``)
  and ``clinic``: image_name, patient_id, lesion_id, sex, age_approx,
  anatom_site_general_challenge, diagnosis, benign_malignant, target, clinic.
  Rows are sorted by image_name; missing values are empty cells.
* ``out_dir/jpeg/train/<image_name>.jpg``: dermoscopy-like pictures.
* ``out_dir/demo.json``: generator version, parameters and counts.

What the cohort looks like
--------------------------
* Patients have 1-8 lesions each; about 6% of lesions have a second picture
  (same lesion_id, another view), so patient, lesion and image grouping differ.
* Metadata follows ISIC 2020 proportions: sex (about 1% missing), age in steps of
  5 years (about 1% missing), anatomical site (torso about half; about 2% missing),
  diagnosis "melanoma" for malignant lesions and mostly "unknown" or "nevus"
  otherwise.
* **Malignant rate: 12% of lesions** (``MALIGNANT_RATE``; at least one), chosen
  with weights that favour older patients (x e^(0.05 per year over 50)), men
  (x1.3) and head/neck sites (x1.5), and a patient's second melanoma is 4x less
  likely than the first, so metadata carries a little signal, as in ISIC 2020
  (malignant mean age about 58 there, benign about 49).
* Three clinics (``CLINICS``) with their own acquisition look, so that models
  trained on one clinic meet a real shift on another: clinic-north (384x384,
  warm cast, dermoscope circle on most images), clinic-south (320x320, cool
  cast, slight blur, more noise) and clinic-east (384x256 like ISIC's 3:2
  originals, pink cast, low contrast, strong JPEG compression). Patients belong
  to one clinic (about 40 / 35 / 25%).
* Benign lesions are round or oval, uniformly brown, with a regular border and
  sometimes a regular pigment network; about 8% are "atypical" (two shades,
  a little irregular). Malignant lesions are larger, asymmetric, with an
  irregular border and several colours (dark brown, black, blue-grey, red):
  blue-grey areas, blue-white veil, atypical network, eccentric dots, regression;
  about 12% are "early" (smaller, mostly brown, only a small blue-grey patch).
  The main cues (size, dark and blue-grey blotches) survive downscaling to
  64 px, so a small CNN can learn the task, but the overlap keeps it imperfect.
* Deterministic: the same seed gives a byte-identical labels.csv and identical
  pixels; every image has its own random stream (seed, image number).

These images are drawings, not medicine: use the demo to try the software,
never to judge a model's clinical value.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from melcore import settings
from melcore.errors import ConfigError, MelcoreError

__all__ = ["CLINICS", "COLUMNS", "DEMO_VERSION", "MALIGNANT_RATE", "make_demo_cohort", "ensure_demo", "render_lesion"]

DEMO_VERSION = 1
MALIGNANT_RATE = 0.12
COLUMNS = (
    "image_name",
    "patient_id",
    "lesion_id",
    "sex",
    "age_approx",
    "anatom_site_general_challenge",
    "diagnosis",
    "benign_malignant",
    "target",
    "clinic",
)
DEFAULT_PATIENTS = 120
DEFAULT_SEED = 0


@dataclass(frozen=True)
class ClinicLook:
    """How one clinic's camera and dermoscope render images."""

    width: int
    height: int
    share: float  # fraction of patients
    cast: tuple  # RGB gains
    brightness: float  # added after the cast, 0..255 scale
    contrast: float  # 1 = unchanged
    circle_prob: float  # chance of the black dermoscope circle
    vignette: float  # radial darkening at the corners (0..1)
    blur: float  # Gaussian blur radius in pixels (0 = sharp)
    noise: float  # sensor noise sigma, 0..255 scale
    quality: int  # JPEG quality
    hair_prob: float


CLINICS = {
    "clinic-north": ClinicLook(384, 384, 0.40, (1.05, 0.98, 0.91), 0.0, 1.05, 0.80, 0.25, 0.0, 2.0, 92, 0.30),
    "clinic-south": ClinicLook(320, 320, 0.35, (0.94, 1.02, 1.05), -6.0, 1.00, 0.15, 0.45, 0.8, 4.0, 88, 0.40),
    "clinic-east": ClinicLook(384, 256, 0.25, (1.07, 0.93, 1.00), 12.0, 0.85, 0.40, 0.15, 0.0, 3.0, 80, 0.25),
}

_SITES = ["torso", "lower extremity", "upper extremity", "head/neck", "palms/soles", "oral/genital", None]
_SITE_P = [0.50, 0.25, 0.15, 0.06, 0.012, 0.004, 0.024]
_BENIGN_DIAGNOSES = ["unknown", "nevus", "seborrheic keratosis", "lentigo NOS", "lichenoid keratosis"]
_BENIGN_DIAGNOSIS_P = [0.80, 0.16, 0.02, 0.01, 0.01]

_SKIN_LIGHT = np.array([238, 202, 180], np.float32)
_SKIN_DARK = np.array([165, 115, 85], np.float32)
_LIGHT_BROWN = np.array([178, 124, 86], np.float32)
_DARK_BROWN = np.array([104, 64, 42], np.float32)
_BLACK = np.array([38, 28, 28], np.float32)
_BLUE_GREY = np.array([96, 108, 136], np.float32)
_VEIL = np.array([150, 162, 192], np.float32)
_RED = np.array([178, 78, 82], np.float32)
_SCAR = np.array([222, 210, 208], np.float32)


# --------------------------------------------------------------------------- metadata


def _unique_ids(rng: np.random.Generator, n: int, prefix: str, taken: set) -> list[str]:
    ids = []
    while len(ids) < n:
        value = f"{prefix}{int(rng.integers(0, 10_000_000)):07d}"
        if value not in taken:
            taken.add(value)
            ids.append(value)
    return ids


def _make_table(n_patients: int, seed: int) -> list[dict]:
    """Rows (one per image) with metadata, labels and the rendering seeds."""
    rng = np.random.default_rng([seed, 2020])
    taken: set = set()
    clinics = list(CLINICS)
    shares = np.array([CLINICS[c].share for c in clinics])
    patient_ids = _unique_ids(rng, n_patients, "IP_", taken)
    lesions = []  # one dict per lesion
    for p, patient_id in enumerate(patient_ids):
        clinic = clinics[int(rng.choice(len(clinics), p=shares / shares.sum()))]
        sex_draw = rng.random()
        sex = None if sex_draw < 0.01 else ("male" if sex_draw < 0.53 else "female")
        age = float(np.clip(5 * np.round(rng.normal(48, 14) / 5), 15, 90))
        if rng.random() < 0.01:
            age = None
        n_lesions = int(rng.choice(np.arange(1, 9), p=[0.16, 0.18, 0.17, 0.14, 0.12, 0.10, 0.07, 0.06]))
        skin_tone = float(rng.beta(2.0, 3.5))
        for _ in range(n_lesions):
            site = _SITES[int(rng.choice(len(_SITES), p=_SITE_P))]
            lesions.append(
                {
                    "patient": p,
                    "patient_id": patient_id,
                    "clinic": clinic,
                    "sex": sex,
                    "age": age,
                    "site": site,
                    "skin_tone": skin_tone,
                    "n_views": 2 if rng.random() < 0.06 else 1,
                    "malignant": False,
                }
            )

    # Malignant lesions: sequential weighted draws (older, male, head/neck; fewer second melanomas).
    k = max(1, int(round(MALIGNANT_RATE * len(lesions))))
    base = np.array(
        [
            np.exp(0.05 * ((les["age"] if les["age"] is not None else 50.0) - 50.0))
            * (1.3 if les["sex"] == "male" else 1.0)
            * (1.5 if les["site"] == "head/neck" else 1.0)
            for les in lesions
        ]
    )
    patients_hit = np.zeros(n_patients, bool)
    chosen = np.zeros(len(lesions), bool)
    patient_of = np.array([les["patient"] for les in lesions])
    for _ in range(min(k, len(lesions))):
        weights = base * np.where(patients_hit[patient_of], 0.25, 1.0) * ~chosen
        pick = int(rng.choice(len(lesions), p=weights / weights.sum()))
        chosen[pick] = True
        patients_hit[patient_of[pick]] = True
    for les, is_malignant in zip(lesions, chosen):
        les["malignant"] = bool(is_malignant)
        les["diagnosis"] = (
            "melanoma"
            if is_malignant
            else _BENIGN_DIAGNOSES[int(rng.choice(len(_BENIGN_DIAGNOSES), p=_BENIGN_DIAGNOSIS_P))]
        )

    lesion_ids = _unique_ids(rng, len(lesions), "IL_", taken)
    n_images = sum(les["n_views"] for les in lesions)
    image_names = _unique_ids(rng, n_images, "ISIC_", taken)
    rows = []
    number = 0
    for lesion_number, (les, lesion_id) in enumerate(zip(lesions, lesion_ids)):
        for view in range(les["n_views"]):
            rows.append(
                {
                    "image_name": image_names[number],
                    "patient_id": les["patient_id"],
                    "lesion_id": lesion_id,
                    "sex": les["sex"],
                    "age_approx": les["age"],
                    "anatom_site_general_challenge": les["site"],
                    "diagnosis": les["diagnosis"],
                    "benign_malignant": "malignant" if les["malignant"] else "benign",
                    "target": int(les["malignant"]),
                    "clinic": les["clinic"],
                    "_lesion_seed": (seed, 7, lesion_number),
                    "_view_seed": (seed, 11, number),
                    "_view": view,
                    "_skin_tone": les["skin_tone"],
                    "_sex": les["sex"],
                }
            )
            number += 1
    return rows


# --------------------------------------------------------------------------- drawing


def _smooth_field(rng: np.random.Generator, cells: int, out: int = 128) -> np.ndarray:
    """A smooth random field (out x out, float32, roughly 0..1) from a cells x cells grid."""
    grid = rng.random((cells, cells), dtype=np.float32)
    field = np.asarray(Image.fromarray(grid, mode="F").resize((out, out), Image.Resampling.BICUBIC))
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _sample(field: np.ndarray, lx: np.ndarray, ly: np.ndarray, extent: float) -> np.ndarray:
    """Look ``field`` (covering [-extent, extent]^2 in lesion units) up at lesion coordinates."""
    n = field.shape[0]
    ix = np.clip(((lx / extent + 1) * 0.5 * (n - 1)).astype(np.int32), 0, n - 1)
    iy = np.clip(((ly / extent + 1) * 0.5 * (n - 1)).astype(np.int32), 0, n - 1)
    return field[iy, ix]


def _lesion_params(rng: np.random.Generator, malignant: bool) -> dict:
    """Shape and colour parameters of one lesion (shared by all its views)."""
    angles = np.linspace(-np.pi, np.pi, 721, dtype=np.float32)
    kind = "typical"
    if malignant:
        kind = "early" if rng.random() < 0.12 else "invasive"
        radius = rng.uniform(0.13, 0.2) if kind == "early" else rng.uniform(0.2, 0.34)
        ellipse = rng.uniform(0.0, 0.25)
        ks = np.arange(1, 15)
        amps = rng.normal(0, 0.2 if kind == "invasive" else 0.08, ks.size) / ks**1.1  # lobes + notches
        edge = 0.004 + 0.02 * _periodic_noise(rng, angles, 5)  # blurred sectors, abrupt elsewhere
    else:
        if rng.random() < 0.08:
            kind = "atypical"
        radius = rng.uniform(0.1, 0.24) if kind == "typical" else rng.uniform(0.16, 0.26)
        ellipse = rng.uniform(0.0, 0.18)
        ks = np.arange(3, 9)
        amps = rng.normal(0, 0.012 if kind == "typical" else 0.04, ks.size)
        edge = np.full_like(angles, rng.uniform(0.004, 0.01))
    phases = rng.uniform(0, 2 * np.pi, ks.size)
    tilt = rng.uniform(0, np.pi)
    border = (
        1
        + ellipse * np.cos(2 * (angles - tilt))
        + (amps[:, None] * np.cos(ks[:, None] * angles[None, :] + phases[:, None])).sum(0)
    )
    border = radius * np.clip(border, 0.45, None)
    params = {
        "kind": kind,
        "malignant": malignant,
        "radius": float(radius),
        "border": border.astype(np.float32),
        "edge": edge.astype(np.float32),
        "tone": float(rng.uniform(0.25, 0.75)),
        "extent": float(max(border.max(), 1.1 * radius + 0.03) * 1.1),
    }
    params["zones"] = _smooth_field(rng, 5)
    params["fine"] = _smooth_field(rng, 14)
    if malignant:
        params["blue"] = _smooth_field(rng, 4)
        params["blue_cover"] = 0.08 if kind == "early" else rng.uniform(0.18, 0.4)
        params["veil"] = _smooth_field(rng, 3) if (kind == "invasive" and rng.random() < 0.5) else None
        params["red"] = _smooth_field(rng, 6) if rng.random() < 0.4 else None
        params["scar"] = _smooth_field(rng, 5) if rng.random() < 0.25 else None
        params["network"] = rng.random() < 0.35
        n_dots = int(rng.integers(6, 20)) if rng.random() < 0.5 else 0
        side = rng.uniform(-np.pi, np.pi)
        dot_angles = side + rng.normal(0, 0.6, n_dots)
        dot_r = rng.uniform(0.55, 1.05, n_dots)
        params["dots"] = [
            (float(np.cos(a) * r), float(np.sin(a) * r), float(rng.uniform(0.012, 0.028)))
            for a, r in zip(dot_angles, dot_r)
        ]
    else:
        params["network"] = rng.random() < 0.4
        params["period"] = float(rng.uniform(0.025, 0.04))
    return params


def _periodic_noise(rng: np.random.Generator, angles: np.ndarray, k: int) -> np.ndarray:
    """Smooth, 2-pi periodic noise in 0..1 over ``angles``."""
    out = np.zeros_like(angles)
    for order in range(1, k + 1):
        out += rng.normal(0, 1 / order) * np.cos(order * angles + rng.uniform(0, 2 * np.pi))
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def _lesion_colour(params: dict, lx: np.ndarray, ly: np.ndarray, u: np.ndarray) -> np.ndarray:
    """RGB colour (h, w, 3) float32 of the lesion at lesion coordinates (u = 0 centre, 1 border)."""
    ext = params["extent"]
    zones = _sample(params["zones"], lx, ly, ext)
    fine = _sample(params["fine"], lx, ly, ext)
    if not params["malignant"]:
        density = params["tone"] + 0.18 * (1 - np.clip(u, 0, 1)) + 0.06 * (fine - 0.5)
        if params["kind"] == "atypical":
            density = density + 0.22 * (zones > 0.55)
        density = np.clip(density, 0, 1)[..., None]
        colour = _LIGHT_BROWN * (1 - density) + _DARK_BROWN * density
        if params["network"]:
            period = params["period"]
            lines = np.minimum(np.abs(np.sin(np.pi * lx / period)), np.abs(np.sin(np.pi * ly / period)))
            strength = (lines < 0.25) * np.clip(1.2 - u, 0, 1) * 0.22
            colour = colour * (1 - strength[..., None])
        return colour

    # Malignant: several colour zones from one smooth field (light brown -> dark brown -> black).
    z = np.clip(0.65 * zones + 0.25 * fine + 0.1 * params["tone"], 0, 1)
    if params["kind"] == "early":
        z = 0.25 + 0.45 * z
    colour = np.empty(z.shape + (3,), np.float32)
    for c in range(3):
        colour[..., c] = np.interp(
            z, [0.0, 0.45, 0.72, 1.0], [_LIGHT_BROWN[c], _DARK_BROWN[c], _BLACK[c] + 20, _BLACK[c]]
        )
    inside = u < 1
    blue = _sample(params["blue"], lx, ly, ext)
    level = np.quantile(blue[inside], 1 - params["blue_cover"]) if inside.any() else 1.0
    mask = np.clip((blue - level) * 12, 0, 0.9)[..., None]
    colour = colour * (1 - mask) + _BLUE_GREY * mask
    for key, tint, strength in (("veil", _VEIL, 0.6), ("red", _RED, 0.55), ("scar", _SCAR, 0.7)):
        field = params.get(key)
        if field is not None:
            f = _sample(field, lx, ly, ext)
            m = (np.clip((f - 0.7) * 8, 0, 1) * strength)[..., None]
            colour = colour * (1 - m) + tint * m
    if params["network"]:
        period = 0.03 * (0.7 + 0.8 * fine)  # irregular spacing and thickness
        lines = np.minimum(np.abs(np.sin(np.pi * lx / period)), np.abs(np.sin(np.pi * ly / period)))
        strength = (lines < 0.15 + 0.3 * zones) * 0.35
        colour = colour * (1 - strength[..., None])
    for dx, dy, r in params["dots"]:
        rad = params["radius"]
        m = np.clip(1.5 - np.hypot(lx - dx * rad, ly - dy * rad) / r, 0, 1)[..., None]
        colour = colour * (1 - m) + _BLACK * m
    return colour


def _upsample(grid: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC))


def render_lesion(
    lesion_seed, view_seed, malignant: bool, look: ClinicLook, skin_tone: float = 0.3, hairy: bool | None = None
) -> np.ndarray:
    """Draw one dermoscopy-like image, (look.height, look.width, 3) uint8.

    ``lesion_seed`` fixes the lesion (shape, colours); ``view_seed`` the picture
    (position, rotation, skin, hair, noise), so two views of one lesion share the lesion.
    """
    lesion = _lesion_params(np.random.default_rng(lesion_seed), malignant)
    rng = np.random.default_rng(view_seed)
    h, w = look.height, look.width
    s = float(min(h, w))

    # Skin: tone, large and small mottling, pores (uniform noise: cheaper than Gaussian, looks the same).
    base = _SKIN_LIGHT * (1 - skin_tone) + _SKIN_DARK * skin_tone
    big = _upsample(rng.random((6, 6), dtype=np.float32), w, h)
    mid = _upsample(rng.random((h // 8 + 2, w // 8 + 2), dtype=np.float32), w, h)
    shade = 1 + 0.06 * (big - 0.5) + 0.035 * (mid - 0.5) + 0.04 * (rng.random((h, w), dtype=np.float32) - 0.5)
    img = base[None, None, :] * shade[..., None]
    if rng.random() < 0.3:  # erythema
        red = np.clip(_upsample(rng.random((4, 4), dtype=np.float32), w, h) - 0.5, 0, 1)[..., None] * 0.5
        img = img * (1 - red) + np.array([215, 120, 115], np.float32) * red

    # Lesion coordinates: shift, rotation and scale of this view; computed on the lesion's box only.
    cx = w / 2 + rng.normal(0, 0.05) * s
    cy = h / 2 + rng.normal(0, 0.05) * s
    rot = rng.uniform(-np.pi, np.pi)
    zoom = rng.uniform(0.9, 1.1)
    half = lesion["extent"] * s * zoom
    x0, x1 = max(0, int(cx - half)), min(w, int(np.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(cy - half)), min(h, int(np.ceil(cy + half)) + 1)
    if x1 > x0 and y1 > y0:
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = (xx - cx) / (s * zoom), (yy - cy) / (s * zoom)
        lx = dx * np.cos(rot) + dy * np.sin(rot)
        ly = -dx * np.sin(rot) + dy * np.cos(rot)
        dist = np.hypot(lx, ly)
        idx = ((np.arctan2(ly, lx) + np.pi) * (720 / (2 * np.pi))).astype(np.int32) % 721
        border = lesion["border"][idx]
        alpha = np.clip((border - dist) / lesion["edge"][idx], 0, 1)
        colour = _lesion_colour(lesion, lx, ly, dist / border)
        a = alpha[..., None] * 0.96
        box = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = box * (1 - a) + colour * shade[y0:y1, x0:x1, None] * a

    # Hair, drawn on 8-bit pixels.
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if hairy if hairy is not None else rng.random() < look.hair_prob:
        draw = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(2, 13))):
            x0, y0 = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
            ang = rng.uniform(0, np.pi)
            length = rng.uniform(0.4, 1.2) * s
            bend = rng.normal(0, 0.15) * s
            t = np.linspace(0, 1, 12)
            px = x0 + np.cos(ang) * length * t - np.sin(ang) * bend * t * (1 - t)
            py = y0 + np.sin(ang) * length * t + np.cos(ang) * bend * t * (1 - t)
            tone = int(rng.integers(20, 60))
            draw.line(
                list(zip(px.tolist(), py.tolist())),
                fill=(tone, int(tone * 0.8), int(tone * 0.7)),
                width=max(1, int(round(s / 220 * rng.uniform(0.6, 1.6)))),
                joint="curve",
            )
    if look.blur > 0:
        pil = pil.filter(ImageFilter.GaussianBlur(look.blur))
    img = np.asarray(pil).astype(np.float32)

    # Acquisition: cast and contrast (one gain and offset), vignetting, dermoscope circle, noise.
    img *= np.array(look.cast, np.float32) * np.float32(look.contrast)
    img += np.float32(128 * (1 - look.contrast) + look.brightness)
    ys = (np.arange(h, dtype=np.float32) - h / 2)[:, None]
    xs = (np.arange(w, dtype=np.float32) - w / 2)[None, :]
    factor = 1 - look.vignette / 2 * ((xs / (w / 2)) ** 2 + (ys / (h / 2)) ** 2)
    if rng.random() < look.circle_prob:
        radius = rng.uniform(0.47, 0.56) * s
        circle = np.clip((radius - np.sqrt(xs**2 + ys**2)) / (0.02 * s), 0, 1)
        img *= (factor * circle)[..., None]
        img += (10 * (1 - circle))[..., None]
    else:
        img *= factor[..., None]
    noise = rng.random(img.shape, dtype=np.float32)  # uniform noise with sigma = look.noise
    noise *= np.float32(look.noise * np.sqrt(12))
    img += noise
    img += np.float32(0.5 - look.noise * np.sqrt(12) / 2)  # centre the noise; +0.5 rounds on truncation
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


# --------------------------------------------------------------------------- writing


def _validate(n_patients, seed) -> tuple[int, int]:
    if isinstance(n_patients, bool) or not isinstance(n_patients, (int, np.integer)) or n_patients < 1:
        raise ConfigError(f"n_patients={n_patients!r} must be a whole number of patients, at least 1")
    if n_patients > 100_000:
        raise ConfigError(f"n_patients={n_patients} is too many for a demo (at most 100000)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative whole number")
    return int(n_patients), int(seed)


def _csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sorted(rows, key=lambda r: r["image_name"]):
        values = []
        for col in COLUMNS:
            value = row[col]
            if value is None:
                values.append("")
            elif col == "age_approx":
                values.append(str(int(value)))
            else:
                values.append(str(value))
        writer.writerow(values)
    return buf.getvalue().encode("utf-8")


def make_demo_cohort(
    out_dir,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = DEFAULT_SEED,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write the synthetic cohort (labels.csv, jpeg/train/*.jpg, demo.json) into ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Created if needed. It must be empty or hold an earlier demo (which is replaced);
        anything else raises MelcoreError rather than mixing files.
    n_patients : int
        Number of patients (each with 1-8 lesions; about 4 images per patient).
    seed : int
        Same seed, same bytes in labels.csv and same pixels.
    progress : callable(done, total), optional
        Called after each image.

    Returns
    -------
    Path of ``out_dir``.
    """
    n_patients, seed = _validate(n_patients, seed)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise MelcoreError(f"{out} exists and is not a folder; choose a new folder for the demo")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "demo.json").is_file():
            raise MelcoreError(f"{out} is not empty and does not hold an earlier demo; choose a new or empty folder")
        for name in ("labels.csv", "demo.json"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "jpeg", ignore_errors=True)
    image_dir = out / "jpeg" / "train"
    image_dir.mkdir(parents=True, exist_ok=True)

    rows = _make_table(n_patients, seed)
    total = len(rows)
    if progress is not None:
        progress(0, total)
    for done, row in enumerate(rows, 1):
        look = CLINICS[row["clinic"]]
        pixels = render_lesion(
            row["_lesion_seed"], row["_view_seed"], bool(row["target"]), look, skin_tone=row["_skin_tone"]
        )
        Image.fromarray(pixels).save(image_dir / f"{row['image_name']}.jpg", format="JPEG", quality=look.quality)
        if progress is not None:
            progress(done, total)
    (out / "labels.csv").write_bytes(_csv_bytes(rows))

    n_malignant = sum(r["target"] for r in rows)
    manifest = {
        "generator": "melcore.demo",
        "version": DEMO_VERSION,
        "n_patients": n_patients,
        "seed": seed,
        "n_images": total,
        "n_lesions": len({r["lesion_id"] for r in rows}),
        "n_malignant_images": n_malignant,
        "malignant_rate": round(n_malignant / total, 4),
        "clinics": {c: sum(r["clinic"] == c for r in rows) for c in CLINICS},
        "labels": "labels.csv",
        "images": "jpeg/train",
    }
    (out / "demo.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def ensure_demo(
    home=None,
    *,
    n_patients: int = DEFAULT_PATIENTS,
    seed: int = DEFAULT_SEED,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The default demo cohort, made once; returns its folder.

    The folder is ``<home>/demo/isic2020-demo-v<version>-<n>p-seed<seed>`` where
    home is ``home`` or MELREVIEW_HOME (``settings.subdir("demo")``). It is
    written to a temporary sibling and renamed into place, so a half-written demo
    is never used and concurrent callers end up sharing one folder.
    """
    n_patients, seed = _validate(n_patients, seed)
    if home is None:
        root = settings.subdir("demo")
    else:
        root = Path(home).expanduser() / "demo"
        root.mkdir(parents=True, exist_ok=True)
    final = root / f"isic2020-demo-v{DEMO_VERSION}-{n_patients}p-seed{seed}"
    if (final / "demo.json").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the demo is ordinary data
    try:
        make_demo_cohort(tmp, n_patients, seed, progress=progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "demo.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
