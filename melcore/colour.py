"""Hand-crafted colour and shape features of a dermoscopy image (the "ABCD" cues, computed).

:func:`colour_features` turns one uint8 RGB image into a fixed-length float vector;
:func:`colour_feature_matrix` does it for a stack. The features follow the dermoscopy
rules a clinician applies by eye:

* lesion mask: Otsu threshold on a blurred darkness map (low Lab L, high
  saturation), the largest connected component not glued to the image border when
  possible, holes filled; when Otsu finds nothing sensible (less than 2% or more than
  90% of the image) a centred ellipse covering a quarter of the image is used and the
  ``mask_fallback`` feature says so;
* Asymmetry: share of the mask not overlapping its mirror image about each
  principal axis (after centring on the centroid);
* Border: compactness (perimeter^2 / 4 pi area), solidity (area / convex hull area),
  eccentricity, and the mean gradient across the border (a sharp cut-off vs a fading
  edge);
* Colour: mean, standard deviation and 10th/90th percentiles of Lab L, a, b and of HSV
  saturation inside the lesion; lesion-minus-skin contrast of L, a, b; the share of
  lesion pixels nearest to each of the six dermoscopic colours (white, red, light brown,
  dark brown, blue-grey, black) in Lab, and how many of them cover at least 5%;
  blue-white veil share; colour variegation (mean Lab distance to the lesion's mean
  colour);
* Texture: mean gradient magnitude and local contrast inside the lesion.

Those 40 are :data:`BASE_FEATURE_NAMES` (version 1). Version 2 appends
:data:`EXTENDED_FEATURE_NAMES` (174), after the classic dermoscopy CAD literature:

* LBP: rotation-invariant uniform local binary pattern histograms (8 neighbours, radii
  1, 2, 3) inside the lesion and (radii 1, 2) in a band across its border;
* GLCM: contrast, homogeneity, energy, correlation, entropy of the lesion's lightness
  quantised to 8 levels, at distances 1 and 3 (mean of 4 directions);
* multi-scale: difference-of-Gaussians, gradient and structure-tensor coherence
  statistics at sigma 1, 2, 4;
* 8-bin histograms of Lab L, a, b and HSV hue, saturation inside the lesion;
* colour relative to the surrounding skin (log RGB ratios, Lab offsets, the skin colour);
* zones: centre-minus-rim colour, colour difference between the halves about each
  principal axis, colour spread over 8 angular sectors;
* outline: radial-profile spread, roughness and spectrum, unevenness of edge sharpness;
* Lab statistics after Shades-of-Grey colour constancy (p = 6).

:class:`ColourModel` scores the features (logistic regression or an RBF SVM, stored as
JSON); :func:`fit_colour_model` / :func:`colour_probabilities` are what training runs
(``TrainConfig.colour_model``, the ``cpu-default`` preset) and prediction use.

Everything is computed at a fixed working size (:data:`WORK_SIZE`, the input is
resized first), in float64, with no randomness: the same image gives the same vector
in training and at prediction time, whatever the caller's image size.

Only numpy and OpenCV are imported (no TensorFlow).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from melcore.errors import MelcoreError
from melcore.splits import group_kfold

__all__ = [
    "WORK_SIZE",
    "FEATURE_NAMES",
    "BASE_FEATURE_NAMES",
    "EXTENDED_FEATURE_NAMES",
    "DEFAULT_KERNEL",
    "RBF_C_GRID",
    "lesion_mask",
    "outline_overlay",
    "colour_features",
    "colour_feature_matrix",
    "ColourModel",
    "COLOUR_MODEL_FILE",
    "colour_features_of_files",
    "fit_colour_model",
    "colour_probabilities",
]

#: Side (pixels) every image is resized to before features are computed.
WORK_SIZE = 128

# The six dermoscopic colours as reference Lab values (L 0..100, a/b -128..127),
# after the colour palettes used in computer-aided dermoscopy (e.g. Seidenari et al.).
_DERM_COLOURS = {
    "white": (90.0, 0.0, 5.0),
    "red": (50.0, 50.0, 25.0),
    "light_brown": (60.0, 15.0, 30.0),
    "dark_brown": (35.0, 15.0, 20.0),
    "blue_grey": (45.0, -2.0, -12.0),
    "black": (12.0, 2.0, 2.0),
}

#: The version-1 features (colour, shape, a little texture), unchanged since; models saved in
#: format ``melreview-colour-model/1`` use exactly these.
BASE_FEATURE_NAMES: tuple[str, ...] = (
    "mask_fallback",
    "area_fraction",
    "border_touch",
    "asymmetry_major",
    "asymmetry_minor",
    "asymmetry_mean",
    "compactness",
    "solidity",
    "eccentricity",
    "border_gradient",
    *(f"{c}_{s}" for c in ("L", "a", "b", "S") for s in ("mean", "std", "p10", "p90")),
    "contrast_L",
    "contrast_a",
    "contrast_b",
    *(f"colour_{name}" for name in _DERM_COLOURS),
    "n_colours",
    "blue_white_veil",
    "variegation",
    "texture_gradient",
    "texture_contrast",
)

_LBP_RADII = (1, 2, 3)
_LBP_BORDER_RADII = (1, 2)
_LBP_CODES = tuple(range(9)) + ("other",)  # riu2 codes for 8 neighbours: 0..8 uniform, 9 the rest
_GLCM_LEVELS = 8
_GLCM_DISTANCES = (1, 3)
_SCALES = (1.0, 2.0, 4.0)
_HIST_BINS = 8
_HIST_RANGES = {"L": (0.0, 100.0), "a": (-10.0, 50.0), "b": (-20.0, 50.0), "hue": (0.0, 180.0), "sat": (0.0, 256.0)}

#: Added in version 2 (texture, colour histograms, relative colour, zones, border, colour constancy).
EXTENDED_FEATURE_NAMES: tuple[str, ...] = (
    *(f"lbp_r{r}_{code}" for r in _LBP_RADII for code in _LBP_CODES),
    *(f"lbp_border_r{r}_{code}" for r in _LBP_BORDER_RADII for code in _LBP_CODES),
    *(
        f"glcm_d{d}_{stat}"
        for d in _GLCM_DISTANCES
        for stat in ("contrast", "homogeneity", "energy", "correlation", "entropy")
    ),
    *(
        f"scale{int(s)}_{stat}"
        for s in _SCALES
        for stat in ("dog_mean", "dog_std", "gradient_mean", "gradient_std", "gradient_p90", "coherence")
    ),
    *(f"hist_{channel}_{k}" for channel in _HIST_RANGES for k in range(_HIST_BINS)),
    *(f"skin_log_ratio_{stat}_{c}" for stat in ("mean", "std", "p10", "p90") for c in "RGB"),
    *(f"skin_offset_{stat}_{c}" for stat in ("std", "p05", "p95") for c in "Lab"),
    *(f"skin_{c}" for c in "Lab"),
    *(f"centre_minus_rim_{c}" for c in "Lab"),
    "centre_L_std",
    "rim_L_std",
    "colour_asymmetry_major",
    "L_std_asymmetry_major",
    "colour_asymmetry_minor",
    "L_std_asymmetry_minor",
    *(f"sector_std_{c}" for c in "Lab"),
    "radius_cv",
    "radius_range",
    "radius_roughness",
    "radius_spectrum_low",
    "radius_spectrum_mid",
    "radius_spectrum_high",
    "edge_sharpness_cv",
    "edge_sharpness_min_max",
    *(f"balanced_{c}_{stat}" for stat in ("mean", "std", "p10", "p90") for c in "Lab"),
)

#: Every feature :func:`colour_features` returns, in order: version 1 then version 2's.
FEATURE_NAMES: tuple[str, ...] = BASE_FEATURE_NAMES + EXTENDED_FEATURE_NAMES
_FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}


def _check_image(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise MelcoreError(
            f"colour features need a uint8 RGB image of shape (H, W, 3), got dtype "
            f"{array.dtype} and shape {array.shape}"
        )
    if array.shape[0] < 8 or array.shape[1] < 8:
        raise MelcoreError(f"image of shape {array.shape} is too small for colour features (at least 8x8)")
    return array


def _resize(image: np.ndarray) -> np.ndarray:
    import cv2

    if image.shape[:2] == (WORK_SIZE, WORK_SIZE):
        return np.ascontiguousarray(image)
    interpolation = cv2.INTER_AREA if min(image.shape[:2]) > WORK_SIZE else cv2.INTER_LINEAR
    return cv2.resize(image, (WORK_SIZE, WORK_SIZE), interpolation=interpolation)


def _lab(image: np.ndarray) -> np.ndarray:
    """Lab in float64 with L in 0..100 and a, b in about -128..127 (OpenCV float conversion)."""
    import cv2

    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB).astype(np.float64)


def _fallback_mask(n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2.0
    r = n * np.sqrt(0.25 / np.pi)  # ellipse (circle) covering a quarter of the image
    return ((yy - c) ** 2 + (xx - c) ** 2) <= r * r


def lesion_mask(image) -> tuple[np.ndarray, bool]:
    """Boolean lesion mask at :data:`WORK_SIZE` and whether the centred fallback was used.

    Parameters
    ----------
    image : uint8 array (H, W, 3), RGB

    Returns
    -------
    (mask, fallback) : (bool array (WORK_SIZE, WORK_SIZE), bool)
    """
    rgb = _resize(_check_image(image))
    return _mask_of(rgb, _lab(rgb))


def outline_overlay(image, *, colour: tuple[int, int, int] = (0, 255, 255)) -> tuple[np.ndarray, bool]:
    """The image with the outline of the lesion region the colour model measures.

    The colour/texture/shape features describe the region inside :func:`lesion_mask`
    (and the skin around it), so its outline is what a reviewer checks to trust a
    colour-model score: a mask that missed the lesion means features of the wrong region.

    Parameters
    ----------
    image : uint8 array (H, W, 3), RGB
    colour : RGB of the outline (default cyan, visible on skin and pigment)

    Returns
    -------
    (overlay, fallback) : (uint8 array (H, W, 3), bool)
        A copy of ``image`` with the outline drawn at its own resolution, and whether the
        mask is the centred fallback (no lesion could be separated from the skin).
    """
    import cv2

    array = _check_image(image)
    mask, fallback = lesion_mask(array)
    height, width = array.shape[:2]
    full = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(full, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    overlay = np.ascontiguousarray(array.copy())
    cv2.drawContours(overlay, contours, -1, tuple(int(c) for c in colour), max(1, round(min(height, width) / 120)))
    return overlay, fallback


def _mask_of(rgb: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, bool]:
    import cv2

    n = rgb.shape[0]
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    # Darkness plus saturation separates pigmented lesion from skin better than grey alone.
    score = (100.0 - lab[..., 0]) / 100.0 + 0.5 * hsv[..., 1].astype(np.float64) / 255.0
    score = cv2.GaussianBlur(score, (0, 0), sigmaX=2.0)
    # Ignore the dark dermoscope vignette in the corners when thresholding.
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2.0
    inside = ((yy - c) ** 2 + (xx - c) ** 2) <= (0.5 * n) ** 2
    lo, hi = float(score[inside].min()), float(score[inside].max())
    if hi - lo < 1e-6:
        return _fallback_mask(n), True
    grey = np.clip((score - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    threshold, _ = cv2.threshold(grey[inside].reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    raw = ((grey > threshold) & inside).astype(np.uint8)
    raw = cv2.morphologyEx(raw, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(raw, connectivity=8)
    if count <= 1:
        return _fallback_mask(n), True
    # Prefer large components near the centre (the lesion is framed by the photographer).
    best, best_score = 0, -np.inf
    for k in range(1, count):
        area = stats[k, cv2.CC_STAT_AREA]
        distance = np.hypot(centroids[k][0] - c, centroids[k][1] - c) / n
        value = area * (1.0 - distance)
        if value > best_score:
            best, best_score = k, value
    mask = (labels == best).astype(np.uint8)
    # Fill holes: flood the background from the corner, everything not reached is inside.
    flood = mask.copy()
    pad = np.zeros((n + 2, n + 2), np.uint8)
    cv2.floodFill(flood, pad, (0, 0), 1)
    mask = (mask | (1 - flood)).astype(bool)
    fraction = mask.mean()
    if fraction < 0.02 or fraction > 0.9:
        return _fallback_mask(n), True
    return mask, False


def _asymmetry(mask: np.ndarray) -> tuple[float, float, float]:
    ys, xs = np.nonzero(mask)
    if len(xs) < 5:
        return 0.0, 0.0, 0.0
    cy, cx = ys.mean(), xs.mean()
    coords = np.stack([xs - cx, ys - cy], axis=1)
    cov = np.cov(coords.T)
    eigvals, eigvecs = np.linalg.eigh(cov)
    order = np.argsort(eigvals)[::-1]
    eigvecs = eigvecs[:, order]
    rotated = coords @ eigvecs  # columns: major, minor axis coordinates
    # Rasterise on a grid twice the size so the mirrored shape stays inside.
    points = np.round(rotated).astype(int)
    span = int(np.abs(points).max()) + 1
    grid = np.zeros((2 * span + 1, 2 * span + 1), bool)
    grid[points[:, 1] + span, points[:, 0] + span] = True
    area = grid.sum()
    flipped_minor = grid[::-1, :]  # mirror across the major axis
    flipped_major = grid[:, ::-1]  # mirror across the minor axis
    a_major = float((grid ^ flipped_minor).sum() / (2.0 * area))
    a_minor = float((grid ^ flipped_major).sum() / (2.0 * area))
    return a_major, a_minor, (a_major + a_minor) / 2.0


def _shape(mask: np.ndarray, grey: np.ndarray) -> tuple[list[float], np.ndarray]:
    import cv2

    m8 = mask.astype(np.uint8)
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    area = max(float(mask.sum()), 1.0)
    perimeter = float(cv2.arcLength(contour, True))
    compactness = perimeter**2 / (4.0 * np.pi * area)
    hull_area = float(cv2.contourArea(cv2.convexHull(contour)))
    solidity = min(1.0, area / hull_area) if hull_area > 0 else 1.0
    ys, xs = np.nonzero(mask)
    if len(xs) >= 5:
        eig = np.sort(np.linalg.eigvalsh(np.cov(np.stack([xs, ys]))))
        eccentricity = float(np.sqrt(max(0.0, 1.0 - eig[0] / eig[1]))) if eig[1] > 0 else 0.0
    else:
        eccentricity = 0.0
    gx = cv2.Sobel(grey, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_64F, 0, 1, ksize=3)
    magnitude = np.hypot(gx, gy)
    border = cv2.morphologyEx(m8, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    border_gradient = float(magnitude[border].mean()) if border.any() else 0.0
    return [compactness, solidity, eccentricity, border_gradient], magnitude


def _base_features(rgb: np.ndarray, lab: np.ndarray, mask: np.ndarray, fallback: bool) -> list[float]:
    """The :data:`BASE_FEATURE_NAMES` values (the version-1 feature set, unchanged)."""
    import cv2

    n = rgb.shape[0]
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV).astype(np.float64)
    grey = lab[..., 0] / 100.0

    edge = np.zeros_like(mask)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    border_touch = float((mask & edge).sum() / edge.sum())
    asym = _asymmetry(mask)
    shape, magnitude = _shape(mask, grey)

    lesion = lab[mask]
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2.0
    ring = (((yy - c) ** 2 + (xx - c) ** 2) <= (0.5 * n) ** 2) & ~mask
    skin = lab[ring] if ring.sum() >= 20 else lab[~mask]
    stats = []
    for values in (lesion[:, 0], lesion[:, 1], lesion[:, 2], hsv[..., 1][mask] / 255.0):
        stats += [values.mean(), values.std(), np.percentile(values, 10), np.percentile(values, 90)]
    contrast = list(np.median(skin, axis=0) - np.median(lesion, axis=0)) if len(skin) else [0.0, 0.0, 0.0]

    refs = np.array(list(_DERM_COLOURS.values()))
    nearest = np.argmin(((lesion[:, None, :] - refs[None, :, :]) ** 2).sum(axis=2), axis=1)
    shares = np.bincount(nearest, minlength=len(refs)) / len(lesion)
    n_colours = float((shares >= 0.05).sum())
    # Blue-white veil: bluish (b below the lesion's typical brown) and mid-light, after Celebi et al.
    veil = (lesion[:, 2] < 0.0) & (lesion[:, 0] > 30.0) & (lesion[:, 0] < 80.0)
    variegation = float(np.sqrt(((lesion - lesion.mean(axis=0)) ** 2).sum(axis=1)).mean())
    local_mean = cv2.blur(grey, (5, 5))
    local_sq = cv2.blur(grey * grey, (5, 5))
    local_std = np.sqrt(np.maximum(local_sq - local_mean**2, 0.0))

    return [
        float(fallback),
        float(mask.mean()),
        border_touch,
        *asym,
        *shape,
        *stats,
        *contrast,
        *shares,
        n_colours,
        float(veil.mean()),
        variegation,
        float(magnitude[mask].mean()),
        float(local_std[mask].mean()),
    ]


# --------------------------------------------------------------------------- extended features (version 2)


def _lbp_codes(grey: np.ndarray, radius: float, points: int = 8) -> np.ndarray:
    """Rotation-invariant uniform LBP codes (Ojala et al. 2002, "riu2"): int array like ``grey``.

    Codes 0..points count the neighbours at least as bright as the centre for uniform patterns
    (at most two 0/1 transitions around the circle); ``points + 1`` marks every other pattern.
    Neighbours are bilinearly interpolated on a circle of ``radius`` pixels (reflected edges).
    """
    import cv2

    n_rows, n_cols = grey.shape
    pad = int(np.ceil(radius)) + 1
    padded = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    bits = np.empty((points, n_rows, n_cols), dtype=np.int8)
    for p in range(points):
        angle = 2.0 * np.pi * p / points
        dy, dx = -radius * np.sin(angle), radius * np.cos(angle)
        y0, x0 = int(np.floor(dy)), int(np.floor(dx))
        wy, wx = dy - y0, dx - x0
        sample = np.zeros_like(grey)
        for oy, ox, w in (
            (y0, x0, (1 - wy) * (1 - wx)),
            (y0 + 1, x0, wy * (1 - wx)),
            (y0, x0 + 1, (1 - wy) * wx),
            (y0 + 1, x0 + 1, wy * wx),
        ):
            if w > 1e-12:
                sample += w * padded[pad + oy : pad + oy + n_rows, pad + ox : pad + ox + n_cols]
        bits[p] = sample >= grey - 1e-9
    transitions = np.abs(np.diff(bits, axis=0, append=bits[:1])).sum(axis=0)
    return np.where(transitions <= 2, bits.sum(axis=0), points + 1)


def _lbp_histogram(codes: np.ndarray, region: np.ndarray, points: int = 8) -> np.ndarray:
    counts = np.bincount(codes[region], minlength=points + 2).astype(np.float64)
    return counts / max(counts.sum(), 1.0)


def _glcm_stats(levels_image: np.ndarray, region: np.ndarray, levels: int, distance: int) -> list[float]:
    """Grey-level co-occurrence statistics (Haralick) inside ``region``, averaged over 4 directions.

    Returns [contrast, homogeneity, energy, correlation, entropy] of the symmetric,
    normalised co-occurrence matrix of pixel pairs ``distance`` apart (0, 45, 90, 135 degrees)
    whose both pixels lie in ``region``.
    """
    n_rows, n_cols = levels_image.shape
    i, j = np.mgrid[0:levels, 0:levels]
    rows = []
    for dy, dx in ((0, distance), (distance, 0), (distance, distance), (distance, -distance)):
        ys, xs = slice(0, n_rows - dy), slice(max(0, -dx), n_cols - max(0, dx))
        ys2, xs2 = slice(dy, n_rows), slice(max(0, dx), n_cols - max(0, -dx))
        pair = region[ys, xs] & region[ys2, xs2]
        codes = levels_image[ys, xs][pair] * levels + levels_image[ys2, xs2][pair]
        matrix = np.bincount(codes, minlength=levels * levels).reshape(levels, levels).astype(np.float64)
        matrix = matrix + matrix.T
        matrix /= max(matrix.sum(), 1.0)
        mu = (matrix * i).sum()
        var = (matrix * (i - mu) ** 2).sum()
        nonzero = matrix[matrix > 0]
        rows.append(
            [
                (matrix * (i - j) ** 2).sum(),
                (matrix / (1.0 + (i - j) ** 2)).sum(),
                (matrix**2).sum(),
                (matrix * (i - mu) * (j - mu)).sum() / var if var > 1e-12 else 0.0,
                -(nonzero * np.log(nonzero)).sum(),
            ]
        )
    return list(np.mean(rows, axis=0))


def _extended_features(rgb: np.ndarray, lab: np.ndarray, mask: np.ndarray) -> list[float]:
    """The :data:`EXTENDED_FEATURE_NAMES` values, in that order (see the module docstring)."""
    import cv2

    n = rgb.shape[0]
    grey = lab[..., 0] / 100.0
    lesion = lab[mask]
    m8 = mask.astype(np.uint8)
    kernel = np.ones((9, 9), np.uint8)
    dilated = cv2.dilate(m8, kernel).astype(bool)
    border_band = dilated & ~cv2.erode(m8, kernel).astype(bool)
    yy, xx = np.mgrid[0:n, 0:n]
    c = (n - 1) / 2.0
    skin = ((yy - c) ** 2 + (xx - c) ** 2 <= (0.5 * n) ** 2) & ~dilated
    if skin.sum() < 20:
        skin = ~mask
    values: list[float] = []

    # LBP texture inside the lesion (radii 1, 2, 3) and across its border (radii 1, 2).
    codes = {radius: _lbp_codes(grey, float(radius)) for radius in _LBP_RADII}
    for radius in _LBP_RADII:
        values += list(_lbp_histogram(codes[radius], mask))
    for radius in _LBP_BORDER_RADII:
        values += list(_lbp_histogram(codes[radius], border_band))

    # GLCM on L quantised to 8 levels between the lesion's 1st and 99th percentiles.
    low, high = np.percentile(lesion[:, 0], [1, 99])
    quantised = np.clip((lab[..., 0] - low) / max(high - low, 1e-6) * _GLCM_LEVELS, 0, _GLCM_LEVELS - 1e-3)
    quantised = quantised.astype(np.int64)
    for distance in _GLCM_DISTANCES:
        values += _glcm_stats(quantised, mask, _GLCM_LEVELS, distance)

    # Multi-scale blob (difference of Gaussians), gradient and orientation-coherence statistics.
    for sigma in _SCALES:
        smooth = cv2.GaussianBlur(grey, (0, 0), sigma)
        dog = np.abs(smooth - cv2.GaussianBlur(grey, (0, 0), 2.0 * sigma))[mask]
        gx = cv2.Sobel(smooth, cv2.CV_64F, 1, 0, ksize=3)
        gy = cv2.Sobel(smooth, cv2.CV_64F, 0, 1, ksize=3)
        gradient = np.hypot(gx, gy)[mask]
        jxx = cv2.GaussianBlur(gx * gx, (0, 0), 2.0 * sigma)
        jyy = cv2.GaussianBlur(gy * gy, (0, 0), 2.0 * sigma)
        jxy = cv2.GaussianBlur(gx * gy, (0, 0), 2.0 * sigma)
        coherence = np.sqrt((jxx - jyy) ** 2 + 4.0 * jxy**2) / (jxx + jyy + 1e-9)
        values += [
            dog.mean(),
            dog.std(),
            gradient.mean(),
            gradient.std(),
            np.percentile(gradient, 90),
            coherence[mask].mean(),
        ]

    # Colour histograms of the lesion (shares of lesion pixels, fixed bin edges).
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    for channel, (lo, hi) in zip(
        (lesion[:, 0], lesion[:, 1], lesion[:, 2], hsv[..., 0][mask], hsv[..., 1][mask]), _HIST_RANGES.values()
    ):
        values += list(np.histogram(channel, bins=_HIST_BINS, range=(lo, hi))[0] / len(lesion))

    # Colour relative to the surrounding skin (removes part of the camera / lighting differences).
    rgb1 = rgb.astype(np.float64) + 1.0
    relative = np.log(rgb1[mask] / np.median(rgb1[skin], axis=0))
    skin_lab = np.median(lab[skin], axis=0)
    lab_offset = lesion - skin_lab
    values += [
        *relative.mean(axis=0),
        *relative.std(axis=0),
        *np.percentile(relative, 10, axis=0),
        *np.percentile(relative, 90, axis=0),
        *lab_offset.std(axis=0),
        *np.percentile(lab_offset, 5, axis=0),
        *np.percentile(lab_offset, 95, axis=0),
        *skin_lab,
    ]

    # Zones: centre vs periphery (distance to the border), colour asymmetry about the principal axes,
    # colour spread over 8 angular sectors.
    distance_map = cv2.distanceTransform(m8, cv2.DIST_L2, 5)
    median_depth = np.median(distance_map[mask])
    inner, outer = mask & (distance_map > median_depth), mask & (distance_map <= median_depth)
    inner_lab = lab[inner] if inner.any() else lesion
    outer_lab = lab[outer] if outer.any() else lesion
    values += [*(inner_lab.mean(axis=0) - outer_lab.mean(axis=0)), inner_lab[:, 0].std(), outer_lab[:, 0].std()]
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    axes = np.linalg.eigh(np.cov(np.stack([xs - cx, ys - cy])) if len(xs) >= 3 else np.eye(2))[1][:, ::-1]
    projected = np.stack([xx - cx, yy - cy], axis=-1) @ axes
    for k in range(2):
        side_a, side_b = mask & (projected[..., k] > 0), mask & (projected[..., k] <= 0)
        if side_a.sum() > 5 and side_b.sum() > 5:
            values += [
                float(np.linalg.norm(lab[side_a].mean(axis=0) - lab[side_b].mean(axis=0))),
                abs(lab[side_a][:, 0].std() - lab[side_b][:, 0].std()),
            ]
        else:
            values += [0.0, 0.0]
    angle = np.arctan2(yy - cy, xx - cx)
    sector = np.minimum(((angle + np.pi) / (np.pi / 4)).astype(np.int64), 7)
    sector_means = np.array(
        [
            lab[mask & (sector == k)].mean(axis=0) if (mask & (sector == k)).sum() > 3 else lesion.mean(axis=0)
            for k in range(8)
        ]
    )
    values += list(sector_means.std(axis=0))

    # Border irregularity: radial profile of the outline, its roughness and spectrum, and how
    # unevenly sharp the edge is around the lesion.
    contours, _ = cv2.findContours(m8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64)
    radius = np.hypot(outline[:, 0] - cx, outline[:, 1] - cy)
    radius = radius / max(radius.mean(), 1e-6)
    if len(radius) >= 16:
        smooth_radius = np.convolve(np.concatenate([radius[-5:], radius, radius[:5]]), np.ones(11) / 11.0, "valid")
        roughness = float(np.abs(radius - smooth_radius).mean())
        spectrum = np.abs(np.fft.rfft(radius - radius.mean()))[1:]
        total = spectrum.sum() + 1e-9
        bands = [spectrum[:3].sum() / total, spectrum[3:10].sum() / total, spectrum[10:].sum() / total]
    else:
        roughness, bands = 0.0, [0.0, 0.0, 0.0]
    gradient = np.hypot(cv2.Sobel(grey, cv2.CV_64F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_64F, 0, 1, ksize=3))
    edge = cv2.morphologyEx(m8, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)).astype(bool)
    sharpness = np.array(
        [gradient[edge & (sector == k)].mean() if (edge & (sector == k)).any() else 0.0 for k in range(8)]
    )
    values += [
        radius.std(),
        radius.max() - radius.min(),
        roughness,
        *bands,
        sharpness.std() / (sharpness.mean() + 1e-9),
        sharpness.min() / (sharpness.max() + 1e-9),
    ]

    # Lab statistics after Shades-of-Grey colour constancy (p = 6, Finlayson & Trezzi 2004).
    illuminant = (rgb1**6).reshape(-1, 3).mean(axis=0) ** (1.0 / 6.0)
    balanced = np.clip(rgb1 / illuminant * illuminant.mean(), 0, 255).astype(np.uint8)
    balanced_lesion = _lab(balanced)[mask]
    values += [
        *balanced_lesion.mean(axis=0),
        *balanced_lesion.std(axis=0),
        *np.percentile(balanced_lesion, 10, axis=0),
        *np.percentile(balanced_lesion, 90, axis=0),
    ]
    return values


def colour_features(image) -> np.ndarray:
    """The feature vector of one image: float64, shape ``(len(FEATURE_NAMES),)``, all finite.

    The first ``len(BASE_FEATURE_NAMES)`` values are the version-1 features, then
    :data:`EXTENDED_FEATURE_NAMES`.

    Parameters
    ----------
    image : uint8 array (H, W, 3), RGB, any size >= 8x8 (resized to :data:`WORK_SIZE`)
    """
    rgb = _resize(_check_image(image))
    lab = _lab(rgb)
    mask, fallback = _mask_of(rgb, lab)
    values = _base_features(rgb, lab, mask, fallback) + _extended_features(rgb, lab, mask)
    out = np.asarray(values, dtype=np.float64)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def colour_feature_matrix(
    images: Sequence | np.ndarray, progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """Features of many images: float64 array ``(n, len(FEATURE_NAMES))``, rows in input order.

    ``images`` is an array (n, H, W, 3) uint8 or a sequence of such images;
    ``progress(done, total)`` is called every 64 images and at the end.
    """
    total = len(images)
    out = np.empty((total, len(FEATURE_NAMES)), dtype=np.float64)
    for i in range(total):
        try:
            out[i] = colour_features(images[i])
        except MelcoreError as exc:
            raise MelcoreError(f"image {i}: {exc}") from None
        if progress is not None and ((i + 1) % 64 == 0 or i + 1 == total):
            progress(i + 1, total)
    return out


# --------------------------------------------------------------------------- model (JSON, no pickle)

#: The kernel :func:`fit_colour_model` uses (and so ``cpu-default`` runs): see ``bench/quality.py``.
DEFAULT_KERNEL = "rbf"
#: Values of the SVM's C the inner cross-validation chooses from (``kernel="rbf"``, ``C=None``).
RBF_C_GRID: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
_INNER_FOLDS = 5
_KERNELS = ("linear", "rbf")
_FORMATS = ("melreview-colour-model/1", "melreview-colour-model/2")


class ColourModel:
    """A melanoma scorer on colour features (optionally plus an image-model logit), stored as JSON.

    Two kernels, both on features standardised with the training mean and standard deviation:

    * ``"linear"``: L2 logistic regression (scikit-learn ``LogisticRegression(C)``).
    * ``"rbf"``: support-vector machine with a Gaussian kernel (``SVC(kernel="rbf",
      gamma="scale")``, i.e. gamma = 1 / n_features on standardised features). With
      ``C=None`` its C is chosen from :data:`RBF_C_GRID` by a 5-fold cross-validation
      (ROC AUC) inside the training rows only, grouped by the ``groups`` given to
      :meth:`fit` (patient, else lesion) and stratified by group malignancy
      (:func:`melcore.splits.group_kfold`), so near-identical images of one lesion never
      sit on both sides. Its decision values are mapped to probabilities by Platt
      scaling: a 1-D logistic regression fitted on the out-of-fold decision values of
      that same inner cross-validation (so the probabilities are not over-confident on
      the training images).

    Stored as plain JSON (format ``melreview-colour-model/2``: kernel, feature names,
    means, scales, coefficients or support vectors and dual coefficients, intercept,
    Platt parameters): no pickle, nothing executed on load, and prediction is numpy
    arithmetic, so a saved model gives the same scores on any machine. Models saved by
    version 1 (logistic regression on :data:`BASE_FEATURE_NAMES`) still load and score.

    Parameters
    ----------
    C : float or None
        Inverse regularisation strength (default 0.1 for ``"linear"``, the value
        ``bench/quality.py`` used for version 1). None: 0.1 for ``"linear"``, chosen by inner
        cross-validation for ``"rbf"``.
    kernel : "linear" or "rbf"
    features : sequence of str or None
        Names (a subset of :data:`FEATURE_NAMES`) of the columns the model uses; None = all.
        The feature matrices passed to :meth:`fit` and :meth:`predict_proba` always hold
        every :data:`FEATURE_NAMES` column; the model picks its own.

    Attributes (after :meth:`fit` or :meth:`from_dict`)
    ----------
    feature_names : list[str]   the used features, plus ``"cnn_logit"`` when fitted with one
    mean, scale : float64 arrays (n_features,)
    coef : float64 array (n_features,) on the standardised features (``"linear"`` only)
    support_vectors : float64 array (n_support, n_features), standardised; dual_coef :
        float64 (n_support,); gamma : float (``"rbf"`` only)
    intercept : float
    platt : (slope, offset) applied to the SVM decision value (``"rbf"``; (1, 0) for linear)
    chosen_C : float  the C used (chosen by inner CV when ``C`` was None)
    inner_auroc : float or None  the grouped inner-CV AUROC of ``chosen_C`` (``"rbf"`` with inner
        folds; not saved)
    """

    FORMAT = "melreview-colour-model/2"

    def __init__(self, C: float | None = 0.1, *, kernel: str = "linear", features: Sequence[str] | None = None):
        if kernel not in _KERNELS:
            raise MelcoreError(f"unknown colour-model kernel {kernel!r}; valid: {', '.join(_KERNELS)}")
        if C is not None and not float(C) > 0:
            raise MelcoreError(f"colour-model C must be positive, got {C!r}")
        self.C = None if C is None else float(C)
        self.kernel = kernel
        self.features = list(FEATURE_NAMES) if features is None else list(features)
        unknown = [name for name in self.features if name not in FEATURE_NAMES]
        if unknown or not self.features:
            raise MelcoreError(
                f"unknown colour features {unknown[:5]} (see melcore.colour.FEATURE_NAMES)"
                if unknown
                else "a colour model needs at least one feature"
            )
        self.feature_names: list[str] = []
        self.mean = self.scale = self.coef = self.support_vectors = self.dual_coef = None
        self.gamma = 0.0
        self.intercept = 0.0
        self.platt = (1.0, 0.0)
        self.chosen_C = self.C
        self.inner_auroc: float | None = None

    def _design(self, features, cnn_logit=None) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES):
            raise MelcoreError(
                f"colour features must have shape (n, {len(FEATURE_NAMES)}) (colour_feature_matrix), got {x.shape}"
            )
        x = x[:, [_FEATURE_INDEX[name] for name in self.features]]
        if cnn_logit is not None:
            z = np.asarray(cnn_logit, dtype=np.float64).reshape(-1)
            if len(z) != len(x):
                raise MelcoreError(f"{len(z)} image-model logits for {len(x)} feature rows")
            x = np.column_stack([x, z])
        if not np.isfinite(x).all():
            raise MelcoreError("colour features or logits hold NaN or infinite values")
        return x

    def fit(self, features, y, cnn_logit=None, *, groups=None) -> "ColourModel":
        """Fit on colour features and labels; returns self.

        Parameters
        ----------
        features : float array (n, len(FEATURE_NAMES))
        y : 0/1 array (n,)
        cnn_logit : float array (n,), optional; the image model's logit as one more feature.
        groups : array (n,) of group keys, optional
            Patient (else lesion, else image) of each row, e.g. ``Cohort.groups``: the ``"rbf"``
            inner cross-validation keeps each group in one fold. None treats every row as its own
            group, which is right only when no two rows show the same patient or lesion.
        """
        x = self._design(features, cnn_logit)
        labels = np.asarray(y).astype(np.int64).reshape(-1)
        if len(labels) != len(x) or set(np.unique(labels)) != {0, 1}:
            raise MelcoreError("colour model needs one 0/1 label per row and both classes")
        groups = np.arange(len(labels)).astype(str) if groups is None else np.asarray(groups, dtype=object)
        if groups.shape != labels.shape:
            raise MelcoreError(
                f"colour model: {len(groups)} group keys for {len(labels)} rows; pass one patient/lesion key per row"
            )
        self.mean = x.mean(axis=0)
        scale = x.std(axis=0)
        self.scale = np.where(scale > 0, scale, 1.0)
        z = (x - self.mean) / self.scale
        if self.kernel == "linear":
            from sklearn.linear_model import LogisticRegression

            self.chosen_C = 0.1 if self.C is None else self.C
            model = LogisticRegression(C=self.chosen_C, max_iter=5000).fit(z, labels)
            self.coef = model.coef_.reshape(-1).astype(np.float64)
            self.intercept = float(model.intercept_[0])
            self.support_vectors = self.dual_coef = None
            self.platt = (1.0, 0.0)
        else:
            self._fit_rbf(z, labels, groups)
        self.feature_names = list(self.features) + (["cnn_logit"] if cnn_logit is not None else [])
        return self

    def _fit_rbf(self, z: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.svm import SVC

        self.gamma = 1.0 / z.shape[1]  # sklearn's gamma="scale" on standardised features
        malignant_groups = set(groups[labels == 1].tolist())
        n_inner = min(_INNER_FOLDS, len(malignant_groups), len(set(groups.tolist()) - malignant_groups))
        grid = RBF_C_GRID if self.C is None else (self.C,)
        best_C, best_auc, best_oof = grid[0], -np.inf, None
        if n_inner >= 2:
            folds = group_kfold(groups, labels, n_inner, seed=0)
            splits = [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(n_inner)]
            for C in grid:
                oof = np.empty(len(labels))
                for fit_rows, held in splits:
                    if len(np.unique(labels[fit_rows])) < 2:
                        continue
                    svm = SVC(kernel="rbf", C=C, gamma=self.gamma).fit(z[fit_rows], labels[fit_rows])
                    oof[held] = svm.decision_function(z[held])
                score = roc_auc_score(labels, oof)
                if score > best_auc + 1e-12:  # ties keep the smaller (first) C
                    best_C, best_auc, best_oof = C, score, oof
        svm = SVC(kernel="rbf", C=best_C, gamma=self.gamma).fit(z, labels)
        self.chosen_C = float(best_C)
        self.inner_auroc = float(best_auc) if best_oof is not None else None
        self.support_vectors = svm.support_vectors_.astype(np.float64)
        self.dual_coef = svm.dual_coef_.reshape(-1).astype(np.float64)
        self.intercept = float(svm.intercept_[0])
        self.coef = None
        # Platt scaling on out-of-fold decision values (training ones when too few rows for folds).
        decision = best_oof if best_oof is not None else svm.decision_function(z)
        platt = LogisticRegression(C=1e6, max_iter=5000).fit(decision.reshape(-1, 1), labels)
        self.platt = (float(platt.coef_[0, 0]), float(platt.intercept_[0]))

    @property
    def uses_cnn(self) -> bool:
        return "cnn_logit" in self.feature_names

    def _raw_decision(self, z: np.ndarray) -> np.ndarray:
        if self.kernel == "linear":
            return z @ self.coef + self.intercept
        out = np.empty(len(z))
        sv_sq = (self.support_vectors**2).sum(axis=1)
        for start in range(0, len(z), 512):
            block = z[start : start + 512]
            sq = (block**2).sum(axis=1)[:, None] + sv_sq[None, :] - 2.0 * block @ self.support_vectors.T
            out[start : start + 512] = np.exp(-self.gamma * np.maximum(sq, 0.0)) @ self.dual_coef + self.intercept
        return out

    def decision_function(self, features, cnn_logit=None) -> np.ndarray:
        """Logits (calibrated for ``"rbf"``), float64 (n,)."""
        if self.mean is None or (self.coef is None and self.support_vectors is None):
            raise MelcoreError("colour model is not fitted")
        if self.uses_cnn and cnn_logit is None:
            raise MelcoreError("this colour model was fitted with the image model's logit; pass cnn_logit")
        x = self._design(features, cnn_logit if self.uses_cnn else None)
        slope, offset = self.platt
        return slope * self._raw_decision((x - self.mean) / self.scale) + offset

    def predict_proba(self, features, cnn_logit=None) -> np.ndarray:
        """Melanoma probabilities, float64 (n,) in [0, 1]."""
        from scipy.special import expit  # no overflow warning for large margins

        return expit(self.decision_function(features, cnn_logit))

    def to_dict(self) -> dict:
        if self.mean is None:
            raise MelcoreError("colour model is not fitted")
        data = {
            "format": self.FORMAT,
            "work_size": WORK_SIZE,
            "kernel": self.kernel,
            "C": self.C,
            "chosen_C": self.chosen_C,
            "feature_names": self.feature_names,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "intercept": self.intercept,
            "platt": list(self.platt),
        }
        if self.kernel == "linear":
            data["coef"] = self.coef.tolist()
        else:
            data.update(
                {
                    "gamma": self.gamma,
                    "support_vectors": self.support_vectors.tolist(),
                    "dual_coef": self.dual_coef.tolist(),
                }
            )
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ColourModel":
        """Inverse of :meth:`to_dict`; also reads version-1 models (logistic regression on
        :data:`BASE_FEATURE_NAMES`). MelcoreError when the dict is not a colour model this melcore reads."""
        if not isinstance(data, dict) or data.get("format") not in _FORMATS:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise MelcoreError(
                f"not a colour model this melcore reads: format {found!r}, expected one of "
                f"{', '.join(map(repr, _FORMATS))}; retrain it with this melcore"
            )
        names = list(data.get("feature_names", []))
        used = names[:-1] if names[-1:] == ["cnn_logit"] else names
        version1 = data["format"] == _FORMATS[0]
        if (
            (version1 and used != list(BASE_FEATURE_NAMES))
            or not used
            or any(n not in _FEATURE_INDEX for n in used)
            or int(data.get("work_size", -1)) != WORK_SIZE
        ):
            raise MelcoreError("colour model was saved with other features than this melcore computes; retrain it")
        kernel = "linear" if version1 else data.get("kernel")
        try:
            model = cls(C=data.get("C"), kernel=kernel, features=used)
            model.feature_names = names
            model.mean, model.scale = (np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale"))
            model.intercept = float(data["intercept"])
            model.chosen_C = float(data.get("chosen_C") or data["C"])
            if kernel == "linear":
                model.coef = np.asarray(data["coef"], dtype=np.float64)
                widths = [len(model.coef)]
            else:
                model.support_vectors = np.asarray(data["support_vectors"], dtype=np.float64).reshape(-1, len(names))
                model.dual_coef = np.asarray(data["dual_coef"], dtype=np.float64)
                model.gamma = float(data["gamma"])
                widths = [model.support_vectors.shape[1]]
                if len(model.dual_coef) != len(model.support_vectors):
                    raise MelcoreError("colour model dual coefficients do not match its support vectors")
            model.platt = tuple(float(v) for v in data.get("platt", (1.0, 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MelcoreError(f"colour model JSON is incomplete or malformed ({exc!r}); retrain it") from None
        if not (len(model.mean) == len(model.scale) == widths[0] == len(names)) or len(model.platt) != 2:
            raise MelcoreError("colour model arrays do not match its feature names")
        return model

    def save(self, path) -> None:
        """Write JSON to ``path``."""
        import json
        from pathlib import Path

        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path) -> "ColourModel":
        import json
        from pathlib import Path

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise MelcoreError(f"cannot read colour model {path}: {exc}") from None
        return cls.from_dict(data)


# --------------------------------------------------------------------------- from image files (train == predict)

#: File name of a run's colour model (JSON) when a run carries one.
COLOUR_MODEL_FILE = "colour_model.json"


def colour_features_of_files(
    paths: Sequence, *, cache=None, workers: int | None = None, progress: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """Features of image files: decoded with :func:`melcore.images.load_images` at :data:`WORK_SIZE`.

    Training and prediction must both go through this function (same decoder, same size),
    so a file gives the same vector in both. Returns float64 (n, len(FEATURE_NAMES));
    raises :class:`melcore.errors.ImageError` for an unreadable file.
    """
    from melcore.images import load_images

    return colour_feature_matrix(load_images(list(paths), WORK_SIZE, cache=cache, workers=workers), progress=progress)


def fit_colour_model(
    paths: Sequence,
    targets: Sequence,
    groups: Sequence,
    *,
    kernel: str = DEFAULT_KERNEL,
    C: float | None = None,
    cache=None,
    workers: int | None = None,
) -> ColourModel:
    """A :class:`ColourModel` fitted on image files and their 0/1 targets (colour features only).

    ``groups`` holds each file's patient (else lesion, else image) key (``Cohort.groups``), so the
    inner cross-validation that picks C and fits Platt scaling is grouped. The defaults are the
    ``cpu-default`` recipe: RBF SVM on all :data:`FEATURE_NAMES`, C chosen by that inner
    cross-validation. ``kernel="linear"`` with ``C=None`` gives logistic regression with C=0.1.
    """
    return ColourModel(C=C, kernel=kernel).fit(
        colour_features_of_files(paths, cache=cache, workers=workers),
        np.asarray(targets, dtype=np.float64).astype(np.int64),
        groups=np.asarray(groups, dtype=object),
    )


def colour_probabilities(model: ColourModel, paths: Sequence, *, cache=None, workers: int | None = None) -> np.ndarray:
    """Melanoma probabilities (float64 (n,)) of a colour-only :class:`ColourModel` for image files."""
    return model.predict_proba(colour_features_of_files(paths, cache=cache, workers=workers))
