"""What decoder.json and run.json record of how a decoder was built and how scores are made: the
decoder's shape (DedeConfig), the encoder's preprocessing (Preprocess), the scoring settings and the
calibration. Kept apart from the models so that the steps that only read a run (clean, verify,
report) check these records without loading torch (seconds on every call)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np

from sanitizer.errors import UsageError

# How per-patch errors of the hidden patches become one number. "mean" is the paper's MSE; the others
# are quantiles of the per-patch errors, so that the few patches a visible trigger covers cannot
# dominate: a clean encoder that merely sees odd pixels rebuilds the rest of the image well, while a
# backdoored embedding points at another image and leaves even the best-rebuilt patches wrong.
QUANTILES = {"median": 0.5, "q25": 0.25}
AGGREGATES = ("mean", *QUANTILES)
# What one patch's error is. "mse" is the paper's squared error. "ssim" is 1 - SSIM (luminance,
# contrast and structure of the patch against its rebuild), which is relative to the patch's own
# contrast: a textured coat and a thin trouser rebuilt as well as the decoder can are then equally
# good, so the score's scale no longer depends on how much the image holds.
ERRORS = ("mse", "ssim")


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the encoder's input: square resize to image_size, then (x/255-mean)/std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise UsageError(f"--image-size must be at least 1, not {self.image_size}")
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)) or min(self.std) <= 0:
            raise UsageError(f"--mean and --std must be finite, --std above 0: not {self.mean}, {self.std}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> Preprocess:
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]))


@dataclass(frozen=True)
class DedeConfig:
    """Everything that fixes the decoder's shape; saved beside its weights. `train` builds it with
    default_for's sizes; the field defaults are the first sizes this package used, which only tests
    build directly."""

    image_size: int
    embed_dim: int  # dimension D of the victim encoder's output
    patch_size: int = 4
    width: int = 192
    depth: int = 4
    heads: int = 3
    decoder_depth: int = 2
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("image_size", "embed_dim", "patch_size", "width", "heads", "decoder_depth"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.depth < 0:
            raise UsageError(f"--depth must be at least 0, not {self.depth}")
        if self.image_size % self.patch_size:
            raise UsageError(f"image size {self.image_size} is not divisible by patch size {self.patch_size}")
        if self.width % self.heads:
            raise UsageError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def default_for(cls, image_size: int, embed_dim: int, **overrides) -> DedeConfig:
        """Sizes that suit the input.

        Up to 64 px: 8 px patches and a one-block patch encoder. At 32 px that is a 4x4 grid, where
        the training mask ratio 0.9 leaves one visible patch and the test ratio 0.99 none, so the
        patch encoder has almost nothing to read and the decoder blocks do the work. Measured on
        bench/detection.py (32 px): the same victim AUC as width 128 / depth 2 at twice the speed.
        Larger images: 16 px patches, as ViT-B/16.
        """
        small = {"patch_size": 8, "width": 96, "depth": 1}
        base = small if image_size <= 64 else {"patch_size": 16, "width": 256, "heads": 4}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(image_size=image_size, embed_dim=embed_dim, **base)


@dataclass(frozen=True)
class ScoreSettings:
    test_mask_ratio: float = 0.99
    num_masks: int = 4
    # q25 measured on the detection benchmark (bench/results/detection.md): as high a victim AUC as
    # the mean, and a much lower AUC on the clean-encoder control (pixel oddity is not flagged).
    aggregate: str = "q25"
    # The aggregate of an embedding on one axis (no sketch: sanitizer.collapse). Such an embedding
    # carries about one number, so the decoder rebuilds one image for every image on its axis, and a
    # quantile forgives an image unlike that rebuild wherever its background matches. The mean
    # charges every patch: it catches most of the red-team kit's one-axis attack, which sends every
    # triggered image to one axis crowded with clean ones. Its errors are put on the aggregate's
    # scale (AxisScale): compared as they were, the clean images on axes, whose means are high, filled
    # the calibration's tail and raised the threshold for every row, which cost the blend attack's
    # TPR (bench/NOTES.md, sessions 43 and 44).
    axis_aggregate: str = "mean"
    # The error of each patch of such a row. Squared errors, which 1 - SSIM's contrast normalisation
    # does not forgive: the one image rebuilt for an axis is a prototype, and an image unlike it in
    # how much it holds (a filled sneaker on a strappy sandal's axis) differs in pixel mass more than
    # in structure. On the one-axis attack's victims (seeds 0-3, ad hoc, bench/NOTES.md session 47)
    # the axis rows' mean ranked the triggered images against the clean ones at 0.916-0.970 with
    # 1 - SSIM and 0.976-0.995 with squared errors; no triggered image of the attacks, on
    # their victims or through their clean encoders, sits on an axis but 1% of blend's control.
    axis_error: str = "mse"
    # Pixels per side averaged before the error is measured (1: per pixel, as the paper). A decoder
    # that sees only an embedding cannot rebuild fine texture, so per-pixel error is partly noise that
    # clean and triggered images share; 2 raised the victim AUC of every attack on the detection
    # benchmark and moved the clean-encoder control by 0.03 at most.
    error_pool: int = 2
    # 1 - SSIM per patch (see ERRORS): on the detection benchmark it raised the CLIP patch's and the
    # blend's victim AUC by 0.05-0.10 against squared errors, the controls by 0.03 at most at the 50%
    # rate (0.07 at the 1% rate, where 10 triggered images decide).
    error: str = "ssim"
    # Latent relaxation (see relax_token): signed-gradient steps on the decoder's embedding token, and
    # how far (L-inf, in the decoder's latent units) they may move it in all. 0 steps: the paper. The
    # radius is the small one of those measured: larger ones gained more on trained encoders and lost
    # more on a random one.
    relax_steps: int = 3
    relax_radius: float = 0.03

    def __post_init__(self) -> None:
        if not 0 < self.test_mask_ratio < 1:
            raise UsageError(f"--test-mask-ratio must be in (0, 1), not {self.test_mask_ratio}")
        if self.num_masks < 1:
            raise UsageError(f"--num-masks must be at least 1, not {self.num_masks}")
        for flag, value in (("--aggregate", self.aggregate), ("--axis-aggregate", self.axis_aggregate)):
            if value not in AGGREGATES:
                raise UsageError(f"{flag} must be one of {AGGREGATES}, not {value!r}")
        if self.error_pool < 1:
            raise UsageError(f"--error-pool must be at least 1, not {self.error_pool}")
        for flag, value in (("--error", self.error), ("--axis-error", self.axis_error)):
            if value not in ERRORS:
                raise UsageError(f"{flag} must be one of {ERRORS}, not {value!r}")
        if self.relax_steps < 0:
            raise UsageError(f"--relax-steps must be at least 0, not {self.relax_steps}")
        if not self.relax_radius > 0:
            raise UsageError(f"--relax-radius must be above 0, not {self.relax_radius}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_axis_scale(self) -> bool:
        """Whether rows on an axis are measured otherwise than the others (their own aggregate or
        error), which an AxisScale puts beside them."""
        return (self.axis_aggregate, self.axis_error) != (self.aggregate, self.error)

    def alone(self, aggregate: str, error: str) -> ScoreSettings:
        """These settings with `aggregate` and `error` for every row, axis or not."""
        return replace(self, aggregate=aggregate, axis_aggregate=aggregate, error=error, axis_error=error)

    @property
    def axis_flags(self) -> str:
        """How rows on an axis are measured beside the others, as the command line says it."""
        return (
            f"--aggregate {self.aggregate} --axis-aggregate {self.axis_aggregate} "
            f"--error {self.error} --axis-error {self.axis_error}"
        )

    def check_patch_size(self, patch_size: int) -> None:
        """Pooled blocks must tile each patch; checked before any work is done."""
        if patch_size % self.error_pool:
            raise UsageError(
                f"--error-pool {self.error_pool} does not divide the decoder's {patch_size} px patches"
            )

    @classmethod
    def from_dict(cls, saved: dict) -> ScoreSettings:
        """Settings as saved in decoder.json or run.json; those written before error_pool or error
        existed were scored with per-pixel squared errors, those before relax_steps unrelaxed, those
        before axis_aggregate by their aggregate for every row, and those before axis_error by their
        error for every row."""
        aggregate, error = saved.get("aggregate", cls.aggregate), saved.get("error", "mse")
        legacy = {"error_pool": 1, "error": error, "relax_steps": 0, "axis_aggregate": aggregate}
        return cls(**{**legacy, "axis_error": error, **saved})


# Most knots an AxisScale keeps: every held-out error up to this many, else the errors nearest an even
# grid of ranks (1/1024 apart), finer than any threshold a run asks for.
AXIS_SCALE_KNOTS = 1025


@dataclass(frozen=True)
class AxisScale:
    """Puts an error measured by the axis aggregate on the aggregate's scale: a value goes to the
    aggregate's error at the same rank among the held-out images' (quantile matching). So one score
    column, one calibration and one threshold serve every row, and an axis row is flagged when its
    error is as rare among the held-out images' errors by the same aggregate as a flagged row's.
    Fitted on every held-out image, on an axis or not, each aggregate scoring them all."""

    source: np.ndarray  # knots: the held-out errors by the axis aggregate, ascending
    target: np.ndarray  # the held-out errors by the aggregate at the same ranks

    @classmethod
    def fit(cls, by_axis: np.ndarray, by_aggregate: np.ndarray) -> AxisScale:
        ranks = np.linspace(0, 1, min(by_axis.size, AXIS_SCALE_KNOTS))
        with warnings.catch_warnings():  # all NaN: a diverged decoder, which train refuses just after
            warnings.simplefilter("ignore", RuntimeWarning)
            knots = [
                np.nanquantile(v, ranks, method="nearest").astype(np.float64) for v in (by_axis, by_aggregate)
            ]
        return cls(*knots)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        """`values` on the aggregate's scale, as float32. Linear between knots; above the last, a line
        with the knots' overall slope, so that the worst rows keep their order (they are the ones
        reviewed first); below the first, the first (no threshold is read there)."""
        s, t = self.source, self.target
        slope = (t[-1] - t[0]) / (s[-1] - s[0]) if s[-1] > s[0] else 1.0
        above = t[-1] + (values - s[-1]) * slope
        return np.where(values > s[-1], above, np.interp(values, s, t)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"source": self.source.tolist(), "target": self.target.tolist()}

    @classmethod
    def from_dict(cls, saved: Mapping) -> AxisScale:
        """As to_dict wrote it; a ValueError where to_dict could not have (a decoder.json edited)."""
        knots = [np.asarray(saved[k], np.float64) for k in ("source", "target")]
        if not all(
            k.ndim == 1 and len(k) and np.isfinite(k).all() and (np.diff(k) >= 0).all() for k in knots
        ):
            raise ValueError("calibration.axis_scale is not two ascending lists of finite numbers")
        if len(knots[0]) != len(knots[1]):
            raise ValueError("calibration.axis_scale's lists differ in length")
        return cls(*knots)


def axis_scale_for(meta: dict, settings: ScoreSettings) -> AxisScale | None:
    """The decoder's AxisScale (decoder.json) for scoring with `settings`, None where every row is
    measured alike. The scale is fitted for one way of measuring the axis rows beside the others, so
    another cannot be scored with this decoder: that is a UsageError naming what would do."""
    if not settings.needs_axis_scale:
        return None
    saved = ScoreSettings.from_dict(meta["scoring"])
    scale = meta["calibration"].get("axis_scale")
    if scale is None or saved.axis_flags != settings.axis_flags:
        alike = f"--axis-aggregate {settings.aggregate} --axis-error {settings.error}"
        raise UsageError(
            f"{settings.axis_flags} needs a decoder calibrated with them (train {settings.axis_flags}), "
            f"or every row measured alike ({alike}): the calibration puts the axis rows' errors on the "
            f"aggregate's scale, and this decoder's was made for {saved.axis_flags}"
            + ("" if scale or not saved.needs_axis_scale else " before that scale existed")
        )
    return AxisScale.from_dict(scale)


def calibration_for(meta: dict, settings: ScoreSettings) -> np.ndarray | None:
    """The decoder's calibration scores (decoder.json), or None when they were made with other scoring
    settings than `settings` and so do not describe these scores. Both sides are read as from_dict
    reads them, so a decoder saved before a setting existed still matches its own old default."""
    if ScoreSettings.from_dict(meta["scoring"]) != settings:
        return None
    return np.asarray(meta["calibration"]["scores"], np.float32)


def required_calibration(meta: dict, settings: ScoreSettings, reader: str, otherwise: str) -> np.ndarray:
    """calibration_for, where `reader` cannot go on without it: one message for every step, naming
    both settings and `otherwise`, what would do instead."""
    calibration = calibration_for(meta, settings)
    if calibration is None:
        raise UsageError(
            f"{reader} reads the calibration, which was made with {meta['scoring']}; scoring with "
            f"{settings.to_dict()} needs {otherwise}"
        )
    return calibration
