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

Everything is computed at a fixed working size (:data:`WORK_SIZE`, the input is
resized first), in float64, with no randomness: the same image gives the same vector
in training and at prediction time, whatever the caller's image size.

Only numpy and OpenCV are imported (no TensorFlow).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from melcore.errors import MelcoreError

__all__ = ["WORK_SIZE", "FEATURE_NAMES", "lesion_mask", "colour_features", "colour_feature_matrix", "ColourModel",
           "COLOUR_MODEL_FILE", "colour_features_of_files", "fit_colour_model", "colour_probabilities"]

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

FEATURE_NAMES: tuple[str, ...] = (
    "mask_fallback", "area_fraction", "border_touch",
    "asymmetry_major", "asymmetry_minor", "asymmetry_mean",
    "compactness", "solidity", "eccentricity", "border_gradient",
    *(f"{c}_{s}" for c in ("L", "a", "b", "S") for s in ("mean", "std", "p10", "p90")),
    "contrast_L", "contrast_a", "contrast_b",
    *(f"colour_{name}" for name in _DERM_COLOURS), "n_colours",
    "blue_white_veil", "variegation", "texture_gradient", "texture_contrast",
)


def _check_image(image) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise MelcoreError(f"colour features need a uint8 RGB image of shape (H, W, 3), got dtype "
                           f"{array.dtype} and shape {array.shape}")
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
    flipped_minor = grid[::-1, :]   # mirror across the major axis
    flipped_major = grid[:, ::-1]   # mirror across the minor axis
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
    compactness = perimeter ** 2 / (4.0 * np.pi * area)
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


def colour_features(image) -> np.ndarray:
    """The feature vector of one image: float64, shape ``(len(FEATURE_NAMES),)``, all finite.

    Parameters
    ----------
    image : uint8 array (H, W, 3), RGB, any size >= 8x8 (resized to :data:`WORK_SIZE`)
    """
    import cv2

    rgb = _resize(_check_image(image))
    lab = _lab(rgb)
    mask, fallback = _mask_of(rgb, lab)
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
    local_std = np.sqrt(np.maximum(local_sq - local_mean ** 2, 0.0))

    values = [float(fallback), float(mask.mean()), border_touch, *asym, *shape, *stats, *contrast,
              *shares, n_colours, float(veil.mean()), variegation, float(magnitude[mask].mean()),
              float(local_std[mask].mean())]
    out = np.asarray(values, dtype=np.float64)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def colour_feature_matrix(images: Sequence | np.ndarray,
                          progress: Callable[[int, int], None] | None = None) -> np.ndarray:
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

class ColourModel:
    """Standardised L2 logistic regression on colour features (optionally plus an image-model logit).

    Stored as plain JSON (feature names, means, scales, coefficients, intercept): no pickle,
    nothing executed on load, and prediction is a dot product, so a saved model gives the
    same scores on any machine.

    Parameters
    ----------
    C : float
        Inverse L2 strength of scikit-learn's ``LogisticRegression`` (default 0.1, the value
        ``bench/quality.py`` used; not tuned).

    Attributes (after :meth:`fit` or :meth:`from_dict`)
    ----------
    feature_names : list[str]   :data:`FEATURE_NAMES`, plus ``"cnn_logit"`` when fitted with one
    mean, scale : float64 arrays (n_features,)
    coef : float64 array (n_features,)   on the standardised features
    intercept : float
    """

    FORMAT = "melreview-colour-model/1"

    def __init__(self, C: float = 0.1):
        self.C = float(C)
        self.feature_names: list[str] = []
        self.mean = self.scale = self.coef = None
        self.intercept = 0.0

    @staticmethod
    def _design(features, cnn_logit=None) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURE_NAMES):
            raise MelcoreError(f"colour features must have shape (n, {len(FEATURE_NAMES)}) "
                               f"(colour_feature_matrix), got {x.shape}")
        if cnn_logit is not None:
            z = np.asarray(cnn_logit, dtype=np.float64).reshape(-1)
            if len(z) != len(x):
                raise MelcoreError(f"{len(z)} image-model logits for {len(x)} feature rows")
            x = np.column_stack([x, z])
        if not np.isfinite(x).all():
            raise MelcoreError("colour features or logits hold NaN or infinite values")
        return x

    def fit(self, features, y, cnn_logit=None) -> "ColourModel":
        """Fit on ``features`` (n, n_features) float and 0/1 labels ``y`` (n,); returns self."""
        from sklearn.linear_model import LogisticRegression

        x = self._design(features, cnn_logit)
        labels = np.asarray(y).astype(np.int64).reshape(-1)
        if len(labels) != len(x) or set(np.unique(labels)) != {0, 1}:
            raise MelcoreError("colour model needs one 0/1 label per row and both classes")
        self.mean = x.mean(axis=0)
        scale = x.std(axis=0)
        self.scale = np.where(scale > 0, scale, 1.0)
        model = LogisticRegression(C=self.C, max_iter=5000).fit((x - self.mean) / self.scale, labels)
        self.coef = model.coef_.reshape(-1).astype(np.float64)
        self.intercept = float(model.intercept_[0])
        self.feature_names = list(FEATURE_NAMES) + (["cnn_logit"] if cnn_logit is not None else [])
        return self

    @property
    def uses_cnn(self) -> bool:
        return "cnn_logit" in self.feature_names

    def decision_function(self, features, cnn_logit=None) -> np.ndarray:
        """Logits, float64 (n,)."""
        if self.coef is None:
            raise MelcoreError("colour model is not fitted")
        if self.uses_cnn and cnn_logit is None:
            raise MelcoreError("this colour model was fitted with the image model's logit; pass cnn_logit")
        x = self._design(features, cnn_logit if self.uses_cnn else None)
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def predict_proba(self, features, cnn_logit=None) -> np.ndarray:
        """Melanoma probabilities, float64 (n,) in [0, 1]."""
        return 1.0 / (1.0 + np.exp(-self.decision_function(features, cnn_logit)))

    def to_dict(self) -> dict:
        if self.coef is None:
            raise MelcoreError("colour model is not fitted")
        return {"format": self.FORMAT, "work_size": WORK_SIZE, "C": self.C, "feature_names": self.feature_names,
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept}

    @classmethod
    def from_dict(cls, data: dict) -> "ColourModel":
        """Inverse of :meth:`to_dict`; MelcoreError when the dict is not a colour model of this version."""
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise MelcoreError(f"not a colour model of format {cls.FORMAT!r}")
        expected = list(FEATURE_NAMES)
        names = list(data.get("feature_names", []))
        if names not in (expected, expected + ["cnn_logit"]) or int(data.get("work_size", -1)) != WORK_SIZE:
            raise MelcoreError("colour model was saved with other features than this melcore computes; "
                               "retrain it")
        model = cls(C=float(data["C"]))
        model.feature_names = names
        model.mean, model.scale, model.coef = (np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "coef"))
        if not (len(model.mean) == len(model.scale) == len(model.coef) == len(names)):
            raise MelcoreError("colour model arrays do not match its feature names")
        model.intercept = float(data["intercept"])
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


def colour_features_of_files(paths: Sequence, *, cache=None, workers: int | None = None,
                             progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Features of image files: decoded with :func:`melcore.images.load_images` at :data:`WORK_SIZE`.

    Training and prediction must both go through this function (same decoder, same size),
    so a file gives the same vector in both. Returns float64 (n, len(FEATURE_NAMES));
    raises :class:`melcore.errors.ImageError` for an unreadable file.
    """
    from melcore.images import load_images

    return colour_feature_matrix(load_images(list(paths), WORK_SIZE, cache=cache, workers=workers),
                                 progress=progress)


def fit_colour_model(paths: Sequence, targets: Sequence, *, C: float = 0.1, cache=None,
                     workers: int | None = None) -> ColourModel:
    """A :class:`ColourModel` fitted on image files and their 0/1 targets (colour features only)."""
    return ColourModel(C=C).fit(colour_features_of_files(paths, cache=cache, workers=workers),
                                np.asarray(targets, dtype=np.float64).astype(np.int64))


def colour_probabilities(model: ColourModel, paths: Sequence, *, cache=None,
                         workers: int | None = None) -> np.ndarray:
    """Melanoma probabilities (float64 (n,)) of a colour-only :class:`ColourModel` for image files."""
    return model.predict_proba(colour_features_of_files(paths, cache=cache, workers=workers))
