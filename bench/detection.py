"""Detection benchmark: does the sanitizer catch real backdoors in real encoders?

For each attack (badencoder, drupe, ctrl, blend, clip-backdoor) it implants a backdoor (reporting the
attack's own ASR), trains DeDe decoders on in-distribution data (1% poisoned) and on OOD data, and
scores test sets with 50% and 1% triggered images. Methods: `dede` (what `sanitizer score` flags by
default: the score's test with its neighbours' scores, or the collapse pass's evidence), `dede-score`
(the score alone, as `score --no-collapse`), `collapse` (the collapse statistic alone), `dede-paper`
(one mask, mean squared error per pixel, median-of-scored-set threshold), each with its `-control`
(the same data through the CLEAN encoder with its own decoder: a detector of unusual pixels scores
high there too), and the embedding-space baselines `embedding-norm` and `knn-distance`.

    bench/install_data.sh                           # once: Fashion-MNIST, MNIST, ImageNet weights
    .venv/bin/python bench/detection.py --quick     # ~CPU-sized; full mode: --device cuda
    .venv/bin/python bench/detection.py --quick --encoder timm:NAME --encoder-weights W --json mine.json
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sanitizer import decoder_meta as decoder_meta_module
from sanitizer import encoders as encoders_module
from sanitizer import model as model_module
from sanitizer import scoring as scoring_module
from sanitizer import train as train_module
from sanitizer.atomic import write_bytes_atomic
from sanitizer.checkpoint import save_tensors
from sanitizer.cli import EXIT_INTERRUPTED, EXIT_USAGE
from sanitizer.collapse import SKETCH_DIM, THUMBNAIL_SIDE, HeldOut, Sketched, Weighed, score_evidence
from sanitizer.data.tario import describe
from sanitizer.decoder_meta import AGGREGATES, AxisScale, DedeConfig, ScoreSettings
from sanitizer.device import bf16_units, precision, resolve_device
from sanitizer.encoders import (
    FILE_KINDS,
    MODEL_KINDS,
    PREFIX_OPTION,
    VictimEncoder,
    as_prefix,
    check_weights_file,
    embed_pixels,
    load_encoder,
    parse_spec,
)
from sanitizer.errors import EncoderError, SanitizerError, UsageError
from sanitizer.model import DedeDecoder
from sanitizer.neighbours import (
    MIN_EFFECTIVE_DIM,
    Reference,
    effective_dim,
    embedding_axis,
    embedding_sketch,
    sketch_images,
    thumbnail,
)
from sanitizer.redteam import datasets
from sanitizer.redteam.implant import (
    ContrastiveSettings,
    Implant,
    ImplantSettings,
    ProbeData,
    badencoder,
    clip_backdoor,
    ctrl_simclr,
    drupe,
    measure_attack,
    one_axis,
)
from sanitizer.redteam.metrics import knn_distance, rates, tpr_at_fpr
from sanitizer.redteam.probes import fit_linear_probe
from sanitizer.redteam.triggers import MIN_SIDE, TRIGGERS, Trigger
from sanitizer.scoring import Scorer, Scores, calibrate, key_seeds
from sanitizer.stats import SHIFT_LIMIT, above_median, roc_auc
from sanitizer.thresholds import DEFAULT_COLLAPSE_RULE, DEFAULT_RULE, parse_rule, resolve_threshold
from sanitizer.train import (
    FitResult,
    ImageSet,
    TrainSettings,
    auto_epochs,
    decoder_config,
    fit_decoder,
    holdout_size,
)

log = logging.getLogger("bench.detection")
# The first victim is built with every thread (nothing trains yet), so it is the implant that gains most
# from them: CTRL's two SimCLR phases took 232 s with 2 threads alone and 500 s with 1 beside two
# decoder fits on the 2-core dev VM (session 15). Then the cheapest victims first.
ATTACKS = ("ctrl", "clip-backdoor", "blend", "badencoder", "drupe")
# Run only when --attacks names them: `one-axis` is an adaptive attack on the collapse pass, beyond the
# issue's five (bench/NOTES.md, session 42)
OPT_IN_ATTACKS = ("one-axis",)
POISON_RATES = (0.5, 0.01)
TARGET = 0  # Fashion-MNIST "t-shirt"
DATA_SIZE = 32  # px: the victims built here take Fashion-MNIST's 28 px grey resized to 32 px RGB
# The largest side an own encoder's data are resized to, an ImageNet encoder's input. The quick mode
# holds its 18,000 images in memory (2.7 GB at 224 px, 14 GB at 512, 57 GB at 1024), and the decoders
# attend over every patch: on the CPU, a tiny run (35 decoder images) stayed under 5 GB at 224 px, and at
# 512 px (1024 patches) failed in the scoring past 14 GB. At 1024 px the data's resize ended in a
# RuntimeError traceback asking for 16 GB.
MAX_SIDE = 224
DEFAULT_SEED = 0  # `--seed`: another draws other slices, triggered images, victims and decoders
DEFAULT_THREADS = 2
RESULTS = Path(__file__).parent / "results"
DEFAULT_JSON = RESULTS / "detection.json"
# An attack whose victim ASR stays below this did not implant: the victim has no backdoor, so its rows
# neither meet nor miss a detection target, and only its ID decoder is trained (see submit_decoders).
IMPLANTED_ASR = 0.5


@dataclass(frozen=True)
class Sizes:
    pretrain: int  # images for the CLIP victim (the SimCLR victim uses the first `simclr_images`)
    simclr_images: int
    shadow: int  # attacker's unlabelled images for BadEncoder / DRUPE
    probe: int  # labelled clean images for the probes
    decoder: int  # decoder images (ID: Fashion-MNIST with 1% triggered; OOD: MNIST), HOLDOUT of them held out
    test_clean: int  # clean test images (the 1% set uses all; the 50% set half)
    decoder_epochs: int | None
    implant: ImplantSettings
    simclr: ContrastiveSettings
    clip: ContrastiveSettings
    decoder_model: dict


QUICK = Sizes(
    pretrain=4000,
    simclr_images=2000,
    shadow=640,
    probe=2000,
    # 6000 trained on, 1000 held out. 8 epochs of 1500 left the decoders too blurry to show activation;
    # with the untrimmed loss more images lowered DRUPE's AUC (the decoder learnt the 1% triggered
    # ones), with the trimmed loss 6000 x 20 beat 1500 x 40 on every attack.
    decoder=7000,
    # 1000 left the 1% set 10 triggered images, so that one of them moved a TPR by 0.1 (session 34).
    test_clean=3000,
    # The package's automatic choice, as a user's run gets: 34 epochs of 6000 (200k image visits). At 20
    # (120k) the score's AUC on seed 2's CLIP victim swung from 0.89 to 0.98 with the decoder's seed
    # alone; at 34 it was 0.96-1.00 (bench/NOTES.md, session 36).
    decoder_epochs=None,
    # 3 epochs left BadEncoder at ASR ~0.5-0.6; lr 1e-3 or more collapses the MobileNetV2 embeddings.
    implant=ImplantSettings(epochs=8, batch_size=32, lr=5e-4, tail_fraction=0.4),
    simclr=ContrastiveSettings(clean_epochs=4, poison_epochs=4, poison_rate=0.05),
    # 5% of 4000 pairs for 8 epochs left ASR at chance; 15% for 16 epochs implanted at seeds 0, 2 and 3
    # but not 1 (ASR 0.36). 24 epochs: ASR 1.000 at seeds 0-5, 0.50 at 6. The ASR is not monotonic in
    # the budget: 32 epochs gave 0.87 and 0.85 at seeds 0 and 1, 20% for 24 epochs 0.06 at seed 6.
    clip=ContrastiveSettings(clean_epochs=12, poison_epochs=24, poison_rate=0.15, batch_size=128),
    decoder_model={},
)
# Fashion-MNIST has 60,000 training and 10,000 test images, and the slices are disjoint: they take
# all 60,000 (split_indices checks) and the 50% test set pairs 3000 clean with 3000 triggered images.
FULL = Sizes(
    pretrain=30_000,
    simclr_images=30_000,
    shadow=5000,
    probe=5000,
    decoder=19_500,  # 17,500 trained on, 2000 (the package's most) held out; OOD: MNIST's 10,000 digits
    test_clean=6000,
    decoder_epochs=None,  # the package's automatic choice (about 200k image visits)
    implant=ImplantSettings(epochs=20, batch_size=64, lr=1e-4),
    simclr=ContrastiveSettings(clean_epochs=200, poison_epochs=200, poison_rate=0.01),
    clip=ContrastiveSettings(clean_epochs=100, poison_epochs=50, poison_rate=0.001),
    decoder_model={},
)
# `dede-score`: the package's scoring defaults; `dede-paper`: the reference code's (one mask, per-pixel
# MSE, median of the scored set).
DEDE = ScoreSettings()
DEDE_RULE = DEFAULT_RULE
PAPER = ScoreSettings(num_masks=1, aggregate="mean", error_pool=1, error="mse", relax_steps=0)
PAPER_RULE = "paper"
# Every decoder (victim, OOD, control) is trained with the package's defaults, the trimmed loss and the
# second pass included (`--trim` and `--refit` change them): `dede-paper` is the paper's scoring of
# that decoder. Except the share held out to calibrate the threshold: the package's 5% of the quick
# mode's images would be 300, whose 97th percentile moved the FPR at the default threshold between
# 0.01 and 0.04 from decoder to decoder (session 12); a user with 20,000 images or more holds out
# 1000-2000.
HOLDOUT = 1 / 7
DECODER_TRAINING = TrainSettings(seed=DEFAULT_SEED, holdout=HOLDOUT)
# The ablation behind the defaults: `dede-score` without the latent relaxation (the default before session
# 12), with squared errors (the default before session 7), with 1 - SSIM for rows on an axis too (the
# default before session 47), with each per-patch aggregate and error for every row (axis or not), and
# per pixel.
ABLATION = {
    "dede-unrelaxed": replace(DEDE, relax_steps=0),
    "dede-mse": replace(DEDE, error="mse"),
    "dede-axis-ssim": replace(DEDE, axis_error="ssim"),
    **{f"dede-{a}": DEDE.alone(a, DEDE.error) for a in AGGREGATES if DEDE.alone(a, DEDE.error) != DEDE},
    "dede-pixel": replace(DEDE, error_pool=1),
}


@dataclass
class Data:
    pretrain: tuple[np.ndarray, np.ndarray]
    shadow: np.ndarray
    reference: np.ndarray  # target-class images the attacker holds
    probe: tuple[np.ndarray, np.ndarray]
    decoder: tuple[np.ndarray, np.ndarray]  # ID decoder images (clean; triggered per attack) + labels
    ood: np.ndarray
    test: tuple[np.ndarray, np.ndarray]  # clean test images
    trigger_source: tuple[np.ndarray, np.ndarray]  # non-target test images that get the trigger
    seed: int = DEFAULT_SEED  # the run's: it also draws the ID set's triggered images and the probes' init


REFERENCE_DRAW = 500  # training images the attacker's target-class reference images are drawn from


def split_indices(
    s: Sizes, train_labels: np.ndarray, test_labels: np.ndarray, n_ood: int, seed: int = DEFAULT_SEED
) -> dict:
    """Positions of each of Data's slices: disjoint slices of one fixed order of Fashion-MNIST's
    training images, the clean test images and the non-target test images that get the trigger, and
    the OOD digits. A slice that the data cannot fill is an error, not a shorter slice."""
    rng = np.random.default_rng(seed)
    order, test_order = rng.permutation(len(train_labels)), rng.permutation(len(test_labels))
    wanted = [s.pretrain, s.shadow, REFERENCE_DRAW, s.probe, s.decoder]
    if sum(wanted) > len(order):
        raise ValueError(f"the sizes take {sum(wanted)} training images; the data have {len(order)}")
    pretrain, shadow, reference, probe, decoder = np.split(order, np.cumsum(wanted))[:5]
    test, rest = test_order[: s.test_clean], test_order[s.test_clean :]
    trigger_source = rest[test_labels[rest] != TARGET][: s.test_clean // 2]
    if len(trigger_source) < s.test_clean // 2:
        raise ValueError(
            f"the test images left after {s.test_clean} clean ones hold {len(trigger_source)} of another "
            f"class than the target to trigger; the sizes take {s.test_clean // 2}"
        )
    return {
        "pretrain": pretrain, "shadow": shadow, "reference": reference[train_labels[reference] == TARGET],
        "probe": probe, "decoder": decoder, "test": test, "trigger_source": trigger_source,
        "ood": np.random.default_rng(seed).permutation(n_ood)[: s.decoder],
    }  # fmt: skip


def load_data(s: Sizes, size: int = DATA_SIZE, pretrain: bool = True, seed: int = DEFAULT_SEED) -> Data:
    """Fashion-MNIST's slices (split_indices) and MNIST digits as OOD data, at `size` px. Only the
    slices taken are resized: at an encoder's 224 px the whole of both would be 12 GB. The victims'
    pretraining slice only where a victim is built here (`pretrain`): it was resized for every run,
    4000 images of the quick mode's 22,000 and 30,000 of the full mode's 78,500, never read by the
    attacks that fine-tune an encoder (so never by an --encoder run)."""
    (x, y), (xt, yt) = datasets.fashion_mnist_grey("train"), datasets.fashion_mnist_grey("test")
    ood = datasets.mnist_grey()[0]
    at = split_indices(s, y, yt, len(ood), seed)

    def px(grey: np.ndarray) -> np.ndarray:
        return datasets.resize_grey(grey, size)

    def labelled(images: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        return px(images[at[name]]), labels[at[name]]

    if not pretrain:
        at["pretrain"] = at["pretrain"][:0]
    return Data(
        labelled(x, y, "pretrain"), px(x[at["shadow"]]), px(x[at["reference"]]), labelled(x, y, "probe"),
        labelled(x, y, "decoder"), px(ood[at["ood"]]), labelled(xt, yt, "test"),
        labelled(xt, yt, "trigger_source"), seed,
    )  # fmt: skip


@dataclass
class Victim:
    attack: str
    trigger: Trigger
    implant: Implant
    clean: VictimEncoder  # the encoder before the implant: the control

    @property
    def implanted(self) -> bool:
        return self.implant.report.asr >= IMPLANTED_ASR

    @property
    def target(self) -> int:
        """TARGET but for `one-axis`, whose target is the class its axis reads as."""
        return self.implant.report.target


@dataclass(frozen=True)
class BaseEncoder:
    """A clean encoder for the attacks that fine-tune one: a spec, its weights, its input size."""

    spec: str
    weights: Path | None
    image_size: int | None  # None: the encoder's own preprocessing size
    weights_prefix: str | None = None  # where in `weights` the encoder is (None: found by its names)

    def load(self, device: str) -> VictimEncoder:
        return load_encoder(
            self.spec,
            self.weights,
            image_size=self.image_size,
            device=device,
            weights_prefix=self.weights_prefix,
        )


def _mobilenet() -> BaseEncoder:
    return BaseEncoder("timm:mobilenetv2_tv", datasets.mobilenet_v2_weights(), 32)


def _efficientnet() -> BaseEncoder:
    return BaseEncoder("timm:tf_efficientnet_lite0", datasets.efficientnet_lite0_weights(), 32)


# The attacks that fine-tune an existing encoder (`--encoder` replaces these ImageNet ones); CTRL and
# the CLIP backdoor instead poison the training of a victim built here.
FINE_TUNED = {
    "blend": (badencoder, _efficientnet),
    "badencoder": (badencoder, _mobilenet),
    "drupe": (drupe, _mobilenet),
    "one-axis": (one_axis, _mobilenet),
}


def iter_victims(
    data: Data, s: Sizes, attacks: tuple[str, ...], work: Path, device: str, own: BaseEncoder | None = None
) -> Iterator[Victim]:
    """Implant each asked-for backdoor in turn, into `own` encoder where the attack fine-tunes one.
    The encoders to fine-tune are found first: the ImageNet weights not installed used to be found
    after the victims built before them (CTRL's and the CLIP backdoor's, minutes)."""
    probe = ProbeData(*data.probe, *data.test, TARGET)
    bases = {a: own or FINE_TUNED[a][1]() for a in attacks if a in FINE_TUNED}
    loaded: dict[BaseEncoder, VictimEncoder] = {}  # BadEncoder and DRUPE share one clean encoder
    for attack in attacks:
        trigger = TRIGGERS[attack]
        log.info("implanting %s", attack)
        if attack in FINE_TUNED:
            implanter, base = FINE_TUNED[attack][0], bases[attack]
            if base not in loaded:
                loaded[base] = base.load(device)
            clean = loaded[base]
            out = work / f"{attack}.safetensors"
            imp = implanter(clean, data.shadow, data.reference, out, trigger, s.implant, probe)
            victim = Victim(attack, trigger, imp, clean)
        elif attack == "ctrl":
            x, y = (a[: s.simclr_images] for a in data.pretrain)
            clean, imp = ctrl_simclr(x, y, TARGET, work, s.simclr, probe, device=device)
            victim = Victim(attack, trigger, imp, clean.encoder)
        elif attack == "clip-backdoor":
            clean, imp = clip_backdoor(
                *data.pretrain, datasets.FASHION_CLASSES, TARGET, work, s.clip, probe, device=device
            )
            victim = Victim(attack, trigger, imp, clean.encoder)
        log.info("%s: %s (%.0f s)", attack, imp.report, imp.seconds)
        yield victim


def id_training_set(data: Data, trigger: Trigger) -> tuple[ImageSet, np.ndarray]:
    """The victim's own data with 1% of it triggered: (images, which ones are triggered)."""
    pixels = data.decoder[0].copy()
    poisoned = np.zeros(len(pixels), bool)
    rng = np.random.default_rng(data.seed + 1)
    poisoned[rng.choice(len(pixels), len(pixels) // 100, replace=False)] = True
    pixels[poisoned] = trigger(pixels[poisoned])
    return ImageSet(pixels, [f"id{i:06d}" for i in range(len(pixels))], {}), poisoned


# What a decoder fit computes with: a cached fit is used only while these are unchanged. How samples
# are flagged (the collapse pass, the thresholds) is not among them, so that a change to it re-runs in
# minutes, not in the decoders' hour.
FIT_CODE = (train_module, model_module, scoring_module, encoders_module, decoder_meta_module,
            effective_dim, embedding_sketch, embedding_axis, thumbnail)  # fmt: skip


def fit_key(encoder: VictimEncoder, images: ImageSet, training: TrainSettings, model: dict) -> str:
    """A digest of everything a fit's result depends on: the encoder's weights, the images, the
    settings, the code above, torch's version and its thread count (a bf16 CPU fit's arithmetic
    differs with it)."""
    found = hashlib.sha256()
    for part in (
        json.dumps([encoder.spec, encoder.weights_sha256, training.to_dict(), model, DEDE.to_dict()]),
        json.dumps(
            [SKETCH_DIM, MIN_EFFECTIVE_DIM, THUMBNAIL_SIDE, torch.__version__, torch.get_num_threads()]
        ),
        *(inspect.getsource(code) for code in FIT_CODE),
        "\n".join(images.keys),
    ):
        found.update(part.encode())
    found.update(np.ascontiguousarray(images.pixels).tobytes())
    return found.hexdigest()[:32]


def save_fit(path: Path, fitted: FitResult) -> None:
    """The whole FitResult in one safetensors file (no pickle): the decoder's weights, its calibration
    and held-out images, and the embeddings that the downstream table reuses."""
    held = fitted.holdout_images
    arrays = {
        "calibration": fitted.calibration, "holdout": fitted.holdout, "embeddings": fitted.embeddings,
        "holdout_sketches": held.sketches, "holdout_thumbnails": held.thumbnails, "holdout_axes": held.axes,
    }  # fmt: skip
    if fitted.axis_scale is not None:
        arrays |= {
            "axis_scale_source": fitted.axis_scale.source,
            "axis_scale_target": fitted.axis_scale.target,
        }
    tensors = {f"decoder.{k}": v for k, v in fitted.decoder.state_dict().items()}
    tensors |= {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    scalars = {
        k: getattr(fitted, k) for k in ("epochs", "losses", "n_train", "left_out", "nonfinite", "seconds")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, path, {"fit": json.dumps(scalars)})


def load_fit(path: Path, encoder: VictimEncoder, model: dict) -> FitResult:
    """What save_fit kept, with the decoder rebuilt for `encoder` and moved to its device."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        scalars = json.loads(f.metadata()["fit"])
    decoder = DedeDecoder(decoder_config(encoder, model))
    decoder.load_state_dict(
        {k.removeprefix("decoder."): v for k, v in tensors.items() if k.startswith("decoder.")}
    )
    a = {k: v.numpy() for k, v in tensors.items() if not k.startswith("decoder.")}
    held = Sketched(a["holdout_sketches"], a["holdout_thumbnails"], a["holdout_axes"])
    scale = AxisScale(a["axis_scale_source"], a["axis_scale_target"]) if "axis_scale_source" in a else None
    return FitResult(
        decoder.to(encoder.device), a["calibration"], scale, held, a["holdout"], a["embeddings"], **scalars
    )


class FitCache:
    """Decoder fits, kept in `folder` (the --work folder's decoders/) under fit_key and taken from there
    when found; None keeps none. It counts both kinds, since a run whose fits came from here did not
    measure the quick mode's time. The pool's threads share it (list.append is atomic)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.trained: list[str] = []
        self.taken: list[str] = []

    def fit(
        self, encoder: VictimEncoder, images: ImageSet, training: TrainSettings, model: dict
    ) -> FitResult:
        """A decoder trained with the package's own fit_decoder, calibrated at the `dede-score` settings."""
        key = fit_key(encoder, images, training, model)
        path = self.folder and self.folder / f"{key}.safetensors"
        if path and path.exists():
            log.info("decoder %s: taken from %s", encoder.spec, path)
            self.taken.append(key)
            return load_fit(path, encoder, model)
        result = fit_decoder(encoder, images, training, DEDE, model, progress=False)
        log.info(
            "decoder %s: %d epochs, loss %.4f, %d images left out, %.0f s",
            encoder.spec,
            result.epochs,
            result.losses[-1],
            result.left_out,
            result.seconds,
        )
        self.trained.append(key)
        if path:
            save_fit(path, result)
        return result

    def counts(self) -> dict:
        return {"trained": len(self.trained), "from_cache": len(self.taken)}


@dataclass
class Embedded:
    """Images with their embeddings under one encoder: embedded once, then scored by every method and
    decoder (at 32 px the encoder pass costs 2x the decoder's for MobileNetV2, 8x for EfficientNet)."""

    pixels: np.ndarray
    embeddings: np.ndarray
    prefix: str  # of the keys that seed each image's masks

    @classmethod
    def of(cls, encoder: VictimEncoder, pixels: np.ndarray, prefix: str) -> Embedded:
        return cls(pixels, embed_pixels(encoder, pixels), prefix)


def score(
    encoder: VictimEncoder, decoder, images: Embedded, settings: ScoreSettings, scale: AxisScale | None = None
) -> Scores:
    keys = [f"{images.prefix}{i:06d}" for i in range(len(images.pixels))]
    scorer = Scorer(encoder, decoder, settings, scale)
    return scorer.score(images.pixels, key_seeds(keys), images.embeddings)


def calibrated(
    encoder: VictimEncoder, fitted: FitResult, holdout: Embedded, settings: ScoreSettings
) -> tuple[np.ndarray, AxisScale | None]:
    """The decoder's held-out scores at `settings` and their axis scale: FitCache.fit's own (the
    package's calibration) at the `dede-score` settings, else made from `holdout` as the package does."""
    if settings == DEDE:
        return fitted.calibration, fitted.axis_scale
    held, scale = calibrate(lambda s: score(encoder, fitted.decoder, holdout, s), settings)
    return held.score, scale


@dataclass
class TestSets:
    clean: np.ndarray
    triggered: np.ndarray
    clean_labels: np.ndarray
    sources: np.ndarray  # the class of each triggered image before the trigger
    # Which triggered images the backdoor fires on: the undefended downstream probe sends them to the
    # target class (`downstream`). None until it is known.
    fired: np.ndarray | None = None

    def mix(self, rate: float) -> tuple[slice, slice]:
        """(clean slice, triggered slice): 50% uses half the clean images, 1% all of them."""
        if rate >= 0.5:
            n = min(len(self.triggered), len(self.clean) // 2)
            return slice(0, n), slice(0, n)
        return slice(0, len(self.clean)), slice(0, max(1, round(rate * len(self.clean))))

    def fired_in(self, triggered: slice) -> np.ndarray | None:
        """`fired` for one mix's triggered slice (None while unknown: its rows get no `tpr_fired`)."""
        return None if self.fired is None else self.fired[triggered]


def detection_rows(
    attack: str, train_data: str, method: str, tests: TestSets, clean_scores: np.ndarray,
    trig_scores: np.ndarray, rule: str, calibration: np.ndarray | None,
    clean_calibration: np.ndarray | None = None,
) -> list[dict]:  # fmt: skip
    """One row per poison rate (see `rate_row`), each scoring that rate's mix of the test images."""
    rows = []
    for rate in POISON_RATES:
        cs, ts = tests.mix(rate)
        rows.append(
            rate_row(
                attack, train_data, method, rate, clean_scores[cs], trig_scores[ts], rule, calibration,
                clean_calibration, tests.fired_in(ts),
            )
        )  # fmt: skip
    return rows


def rate_row(
    attack: str, train_data: str, method: str, rate: float, clean: np.ndarray, triggered: np.ndarray,
    rule: str, calibration: np.ndarray | None, clean_calibration: np.ndarray | None = None,
    fired: np.ndarray | None = None,
) -> dict:  # fmt: skip
    """AUC, TPR/FPR at the method's threshold rule, and the TPR the ranking allows at 5% FPR
    (`tpr_at_fpr05`, threshold chosen on the test labels). With `clean_calibration` (the held-out scores
    without the triggered images among them, which only the benchmark knows), also the TPR/FPR its
    threshold gives (`tpr_clean_holdout`, `fpr_clean_holdout`): what the 1% of the user's data that is
    triggered costs the calibration. With `fired` (per triggered image: the backdoor fired on it), also
    the TPR and the AUC among those (`tpr_fired`, `auc_fired`, of `n_fired`): a triggered image the
    backdoor ignores is no backdoor activation, which is what the score is made to respond to (the
    control)."""
    scores = np.concatenate([clean, triggered])
    positive = np.r_[np.zeros(len(clean), bool), np.ones(len(triggered), bool)]
    threshold = resolve_threshold(parse_rule(rule), calibration, scores)
    tpr, fpr = rates(scores, positive, threshold)
    row = {
        "attack": attack, "poison_rate": rate, "train_data": train_data, "method": method,
        "auc": round(roc_auc(scores, positive), 4), "tpr": round(tpr, 4), "fpr": round(fpr, 4),
        "tpr_at_fpr05": round(tpr_at_fpr(scores, positive, 0.05), 4), "threshold": rule,
        "n_clean": len(clean), "n_triggered": len(triggered),
    }  # fmt: skip
    if calibration is not None:  # what the report's verdict checks first (SHIFT_LIMIT)
        row["above_calibration_median"] = round(above_median(scores, calibration) / len(scores), 4)
    if clean_calibration is not None:
        clean_threshold = resolve_threshold(parse_rule(rule), clean_calibration, scores)
        tpr, fpr = rates(scores, positive, clean_threshold)
        row |= {"tpr_clean_holdout": round(tpr, 4), "fpr_clean_holdout": round(fpr, 4)}
    if fired is not None:  # None: the backdoor fired on none of them
        hit = triggered[fired] > threshold
        row |= {"tpr_fired": None, "auc_fired": None, "n_fired": len(hit)}
        if len(hit):
            ranked = np.r_[np.ones(len(clean), bool), fired]  # every clean image, the fired triggered ones
            auc = roc_auc(scores[ranked], positive[ranked])
            row |= {"tpr_fired": round(float(hit.mean()), 4), "auc_fired": round(auc, 4)}
    return row


def by_class(clean_scores: np.ndarray, trig_scores: np.ndarray, tests: TestSets, threshold: float) -> dict:
    """Per class: `auc`, the AUC of the clean test images of that class against its triggered images
    (within one class, so that what is measured is the trigger's effect, not how hard the class is to
    rebuild); and `clean_flagged`, the share of its clean test images above the threshold (which
    classes the false positives come from)."""
    names = datasets.FASHION_CLASSES
    out = {"auc": {}, "clean_flagged": {}}
    for k in np.unique(tests.sources):
        c, t = clean_scores[tests.clean_labels == k], trig_scores[tests.sources == k]
        positive = np.r_[np.zeros(len(c), bool), np.ones(len(t), bool)]
        out["auc"][names[k]] = round(roc_auc(np.r_[c, t], positive), 4)
    for k in np.unique(tests.clean_labels):
        flagged = clean_scores[tests.clean_labels == k] > threshold
        out["clean_flagged"][names[k]] = round(float(flagged.mean()), 4)
    return out


@dataclass
class EmbeddedTests:
    """The clean and triggered test images under one encoder (the victim, or the control's)."""

    clean: Embedded
    triggered: Embedded

    @classmethod
    def of(cls, encoder: VictimEncoder, tests: TestSets) -> EmbeddedTests:
        return cls(Embedded.of(encoder, tests.clean, "clean"), Embedded.of(encoder, tests.triggered, "trig"))


def dede_rows(
    attack: str, train_data: str, encoder, fitted, images: ImageSet, tests: TestSets,
    embedded: EmbeddedTests, suffix: str = "", triggered: np.ndarray | None = None, ablation: bool = False,
) -> tuple[list[dict], dict]:  # fmt: skip
    """`dede`, `collapse`, `dede-score` and `dede-paper` rows, and with `ablation` the ABLATION's (each
    calibrated as `dede-score`); and the `dede-score` rows' `by_class` breakdown at its default
    threshold. `triggered` marks the images of `images` that carry the trigger: the `dede-score` rows
    then also say what a clean holdout would give."""
    methods = [("dede-score", DEDE, DEDE_RULE), ("dede-paper", PAPER, PAPER_RULE)]
    if ablation:
        methods += [(name, settings, DEDE_RULE) for name, settings in ABLATION.items()]
    holdout = Embedded(images.pixels[fitted.holdout], fitted.embeddings[fitted.holdout], "holdout")
    rows, classes = [], {}
    for method, settings, rule in methods:
        calibration, scale = calibrated(encoder, fitted, holdout, settings)
        c, t = (
            score(encoder, fitted.decoder, e, settings, scale).score
            for e in (embedded.clean, embedded.triggered)
        )
        clean = None
        if method == "dede-score":
            held_triggered = None if triggered is None else triggered[fitted.holdout]
            rows += collapse_rows(attack, train_data, suffix, tests, fitted, embedded, c, t, held_triggered)
            classes = by_class(c, t, tests, resolve_threshold(parse_rule(rule), calibration))
            if held_triggered is not None:
                clean = calibration[~held_triggered]
        rows += detection_rows(attack, train_data, method + suffix, tests, c, t, rule, calibration, clean)
    return rows, classes


def baseline_rows(
    attack: str, victim: VictimEncoder, data: Data, tests: TestSets, embedded: EmbeddedTests
) -> list[dict]:
    """Embedding-space detectors: L2 norm and kNN distance to clean auxiliary embeddings (the probe set)."""
    aux = embed_pixels(victim, data.probe[0])
    calib_aux, ref_aux = aux[: len(aux) // 2], aux[len(aux) // 2 :]
    clean, trig = embedded.clean.embeddings, embedded.triggered.embeddings
    rows = []
    norm = lambda e: np.linalg.norm(e, axis=1)  # noqa: E731
    knn = lambda e: knn_distance(e, ref_aux)  # noqa: E731
    for method, fn in (("embedding-norm", norm), ("knn-distance", knn)):
        rows += detection_rows(attack, "id", method, tests, fn(clean), fn(trig), DEDE_RULE, fn(calib_aux))
    return rows


def sketched(images: Embedded) -> Sketched:
    return sketch_images(images.embeddings, images.pixels)


@dataclass
class Weighing:
    """A scored set as the collapse pass weighs it: its scores, its rows' collapse and neighbours'
    evidence against itself as the reference (every set here is smaller than REFERENCE_SIZE, so the
    pass would take all of it too), and the decoder's held-out images against the same reference."""

    scores: np.ndarray
    weighed: Weighed
    held: HeldOut


def weigh(scored: Sketched, scores: np.ndarray, calibration: np.ndarray, holdout: Sketched) -> Weighing:
    """`calibration` and `holdout`: the held-out images' scores and what the pass keeps of them."""
    reference = Reference(scored, score_evidence(scores, calibration))
    return Weighing(scores, reference.weigh(scored), HeldOut.of(calibration, reference.weigh(holdout)))


def over_threshold(scores: np.ndarray, calibration: np.ndarray, rule: str) -> np.ndarray:
    """Scores in units of their threshold's distance from the calibration median: above 1 exactly when
    the rule flags them, so the larger of two such units flags what either rule flags."""
    median = float(np.median(calibration))
    gap = resolve_threshold(parse_rule(rule), calibration) - median
    return (scores - median) / max(gap, 1e-9)  # a degenerate calibration (tiny tests): threshold = median


# The rules `sanitizer score` flags by default: the score's, then the collapse pass's.
DEFAULT_RULES = (DEDE_RULE, DEFAULT_COLLAPSE_RULE)
# The same with each tail (3% and 2% of the held-out images) twice and three times as wide: stricter
# operating points for the downstream table, as `score --threshold ... --collapse ...` sets them, for
# cleaning training data, where dropping a few more clean images costs less than keeping a trigger.
STRICTER_RULES = {
    "dede_filtered_x2": ("quantile:0.94", "quantile:0.96"),
    "dede_filtered_x3": ("quantile:0.91", "quantile:0.94"),
}


def union(w: Weighing, rules: tuple[str, str] = DEFAULT_RULES) -> np.ndarray:
    """What `sanitizer score` flags at `rules` (quantile rules both), as one score (flagged above 1):
    the larger of the over_threshold units of the score's test (the score evidence plus the
    neighbours') and of the collapse pass's (the evidence), each against the held-out images' own
    (sanitizer/collapse.py)."""
    held = w.held
    evidence = np.nan_to_num(held.evidence(w.scores, w.weighed.collapse), nan=-np.inf)  # no collapse
    score_rule, collapse_rule = rules
    by_score = held.score_statistic(w.scores, w.weighed.neighbours)
    return np.maximum(
        over_threshold(by_score, held.own_score_statistic(), score_rule),
        over_threshold(evidence, held.own_evidence(), collapse_rule),
    )


def collapse_rows(
    attack: str, train_data: str, suffix: str, tests: TestSets, fitted, embedded: EmbeddedTests,
    clean: np.ndarray, triggered: np.ndarray, held_triggered: np.ndarray | None = None,
) -> list[dict]:  # fmt: skip
    """`dede`, what `sanitizer score` flags (the score's test or the collapse pass's), and `collapse`,
    the collapse statistic alone (ranked by its p-value among the held-out images', as the pass weighs
    it; its TPR and FPR at the quantile of theirs that the default rule names): each rate's scored set
    is the pass's reference, the decoder's held-out images its calibration. `held_triggered` marks the
    held-out images that carry the trigger: the `dede` rows then also say what the defaults flag
    calibrated without them."""
    sk_clean, sk_trig = sketched(embedded.clean), sketched(embedded.triggered)
    rows = []
    for rate in POISON_RATES:
        cs, ts = tests.mix(rate)
        scored, scores = sk_clean.take(cs).join(sk_trig.take(ts)), np.r_[clean[cs], triggered[ts]]
        w = weigh(scored, scores, fitted.calibration, fitted.holdout_images)
        n = len(clean[cs])
        # The collapse as the pass weighs it, a row without a sketch by how crowded its axis is, as -ln p: a
        # row with no reference row left below every other
        ranked = np.nan_to_num(-np.log(w.held.collapse_p(w.weighed.collapse)), nan=-1.0)
        both = union(w)
        dede = rate_row(
            attack, train_data, "dede" + suffix, rate, both[:n], both[n:], "value:1", None,
            fired=tests.fired_in(ts),
        )  # fmt: skip
        if held_triggered is not None:
            keep = ~held_triggered
            clean_held = weigh(scored, scores, fitted.calibration[keep], fitted.holdout_images.take(keep))
            tpr, fpr = rates(union(clean_held), np.arange(len(both)) >= n, 1.0)
            dede |= {"tpr_clean_holdout": round(tpr, 4), "fpr_clean_holdout": round(fpr, 4)}
        rows += [
            dede,
            rate_row(attack, train_data, "collapse" + suffix, rate, ranked[:n], ranked[n:],
                     DEFAULT_COLLAPSE_RULE, -np.log(w.held.collapse_p(w.held.collapse, own=True)),
                     fired=tests.fired_in(ts)),
        ]  # fmt: skip
    return rows


# The downstream table's threshold defences: our score alone at its default threshold; the same
# scores at the reference code's threshold (the median of each scored set, which flags half of it); and
# the reference code's scoring with its threshold, the operating point of the paper's downstream
# figures. `dede_filtered`, what `sanitizer score` flags by default, is added beside them, and the same
# at STRICTER_RULES.
DOWNSTREAM_DEFENCES = {
    "dede_score_filtered": (DEDE, DEDE_RULE),
    "dede_paper_threshold_filtered": (DEDE, PAPER_RULE),
    "dede_paper_filtered": (PAPER, PAPER_RULE),
}
DOWNSTREAM_NAMES = {
    "no_defence": "none",
    "dede_score_filtered": f"`dede-score` ({DEDE_RULE}, `--no-collapse`)",
    "dede_paper_threshold_filtered": "`dede-score`, paper threshold",
    "dede_paper_filtered": "`dede-paper`",
    "dede_filtered": "`dede` (the defaults: score and collapse pass)",
    **{
        name: f"`dede`, `--threshold {score} --collapse {collapse}`"
        for name, (score, collapse) in STRICTER_RULES.items()
    },
}


def kept(
    train: np.ndarray, clean: np.ndarray, triggered: np.ndarray, rule: str, calibration: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which training, clean test and triggered test images a threshold rule keeps, given their scores.
    A quantile rule reads the decoder's calibration; the paper's rule takes the median of each scored
    set: the training data, and the test data pooled as the reference code pools it."""
    parsed = parse_rule(rule)
    at_train = resolve_threshold(parsed, calibration, train)
    at_test = resolve_threshold(parsed, calibration, np.r_[clean, triggered])
    return train <= at_train, clean <= at_test, triggered <= at_test


def kept_by_union(
    sets: tuple[Embedded, Embedded, Embedded],
    dede: list[np.ndarray],
    fitted,
    rules: dict[str, tuple[str, str]],
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """What `sanitizer score` keeps of the training, clean test and triggered test images at each of
    `rules` (by name): the training data is one scored set, the test data (clean and triggered pooled,
    as `kept` pools them) another; each set's collapse is computed once for every rule."""
    train, clean, triggered = (sketched(images) for images in sets)
    weighings = [
        weigh(scored, scores, fitted.calibration, fitted.holdout_images)
        for scored, scores in ((train, dede[0]), (clean.join(triggered), np.r_[dede[1], dede[2]]))
    ]
    n = len(dede[1])
    out = {}
    for name, pair in rules.items():
        keep_train, keep_test = (union(w, pair) <= 1 for w in weighings)
        out[name] = keep_train, keep_test[:n], keep_test[n:]
    return out


def downstream(
    victim: Victim, data: Data, id_set: ImageSet, poisoned: np.ndarray, fitted, embedded: EmbeddedTests
) -> tuple[dict, np.ndarray]:
    """Probe clean accuracy and ASR without defence, and after each of DOWNSTREAM_DEFENCES filters train
    and test; and which triggered test images the undefended probe sends to the target class (the
    backdoor fired on them: `TestSets.fired`).

    The probe is the downstream user's classifier on the victim encoder, trained on their clean labelled
    data (BadEncoder's threat model): the ID set without its triggered images. Labelled triggered images
    in the probe's training set would teach it to undo the backdoor, which no defence deserves credit for.
    """
    enc = victim.implant.encoder
    labels = data.decoder[1][~poisoned]
    train = Embedded(id_set.pixels[~poisoned], fitted.embeddings[~poisoned], "id")
    sets = (train, embedded.clean, embedded.triggered)
    defences = {"no_defence": tuple(np.ones(len(images.pixels), bool) for images in sets)}
    scored: dict[ScoreSettings, list[np.ndarray]] = {}
    for name, (settings, rule) in DOWNSTREAM_DEFENCES.items():
        if settings not in scored:  # `dede-score` scores serve both of its thresholds, and `dede`
            scale = fitted.axis_scale if settings == DEDE else None  # `dede-paper` has one aggregate
            scored[settings] = [score(enc, fitted.decoder, images, settings, scale).score for images in sets]
        defences[name] = kept(*scored[settings], rule, fitted.calibration)
    defences |= kept_by_union(sets, scored[DEDE], fitted, {"dede_filtered": DEFAULT_RULES} | STRICTER_RULES)
    emb_clean, emb_trig = embedded.clean.embeddings, embedded.triggered.embeddings
    aimed = data.trigger_source[1] != victim.target  # all of them but for one-axis, whose target differs
    out, fired = {}, None
    for name, (train_keep, clean_keep, trig_keep) in defences.items():
        probe = fit_linear_probe(train.embeddings[train_keep], labels[train_keep], seed=data.seed)
        correct = probe.predict(emb_clean) == data.test[1]
        hits = probe.predict(emb_trig[trig_keep]) == victim.target  # removed ones are failed attacks
        if name == "no_defence":  # it keeps every triggered image
            fired = hits
        out[name] = {
            "clean_accuracy": round(float(correct[clean_keep].mean()), 4),
            "clean_accuracy_all": round(float(correct.mean()), 4),  # the training filter's effect alone
            "asr": round(float((hits & aimed[trig_keep]).sum() / aimed.sum()), 4),
            "train_removed": round(float(1 - train_keep.mean()), 4),
            "clean_test_removed": round(float(1 - clean_keep.mean()), 4),
        }
    return out, fired


@dataclass
class Decoders:
    """One attack's decoders, training in the pool: on its ID data, on OOD data, and the control's
    (None for a victim that did not implant)."""

    id: Future
    ood: Future | None
    control: Future | None


def ood_set(data: Data) -> ImageSet:
    return ImageSet(data.ood, [f"ood{i:06d}" for i in range(len(data.ood))], {})


def ood_training(training: TrainSettings) -> TrainSettings:
    """The OOD decoders' settings: one pass (`sanitizer train --refit 0`, for trusted data). MNIST holds
    no triggered image, so a second pass, which leaves out the images rebuilt worst, has nothing to
    remove. On session 15's victims one pass moved the OOD AUC by -0.10 to +0.10 against two, with no
    direction (bench/NOTES.md), in 60-70% of the time."""
    return replace(training, refit=0.0)


def submit_decoders(
    pool: DecoderPool,
    victim: Victim,
    data: Data,
    s: Sizes,
    training: TrainSettings,
    controls: dict,
    fits: FitCache,
) -> Decoders:
    """Queue the attack's decoders. The control is the same data through the clean encoder, with its own
    decoder; it depends only on the clean encoder and the trigger in its training data, so BadEncoder
    and DRUPE share one (`controls` holds those queued already).

    A victim that did not implant gets its ID decoder only: with no backdoor it is a control in itself
    (session 14's CTRL victim, ASR 0.014: AUC 0.528 / 0.560, its clean encoder 0.531 / 0.566), so the
    OOD and control decoders would cost two fits to measure the same thing again."""
    enc, id_set = victim.implant.encoder, id_training_set(data, victim.trigger)[0]
    fitted_id = pool.submit(fits.fit, enc, id_set, training, s.decoder_model)
    if not victim.implanted:
        return Decoders(fitted_id, None, None)
    key = (victim.clean.weights_sha256, victim.trigger)
    if key not in controls:
        controls[key] = pool.submit(fits.fit, victim.clean, id_set, training, s.decoder_model)
    ood = pool.submit(fits.fit, enc, ood_set(data), ood_training(training), s.decoder_model)
    return Decoders(fitted_id, ood, controls[key])


def run_attack(
    victim: Victim, data: Data, decoders: Decoders, ablation: bool
) -> tuple[list[dict], dict, dict]:
    """(detection rows, downstream table, `dede-score`'s `by_class` breakdown on the victim and the control),
    once the attack's decoders have trained; with `ablation`, the ABLATION's rows on the ID decoders.
    The downstream table comes first: its undefended probe says which triggered images fired."""
    attack, enc = victim.attack, victim.implant.encoder
    tests = TestSets(
        data.test[0], victim.trigger(data.trigger_source[0]), data.test[1], data.trigger_source[1]
    )
    embedded = EmbeddedTests.of(enc, tests)
    id_set, poisoned = id_training_set(data, victim.trigger)
    fitted_id = decoders.id.result()
    table, fired = downstream(victim, data, id_set, poisoned, fitted_id, embedded)
    tests = replace(tests, fired=fired)
    rows, classes = dede_rows(
        attack, "id", enc, fitted_id, id_set, tests, embedded, triggered=poisoned, ablation=ablation
    )
    classes = {"dede-score": classes, "dede-score-control": {}}
    if decoders.ood:
        rows += dede_rows(attack, "ood", enc, decoders.ood.result(), ood_set(data), tests, embedded)[0]
    if decoders.control:
        control_rows, classes["dede-score-control"] = dede_rows(
            attack, "id", victim.clean, decoders.control.result(), id_set, tests,
            EmbeddedTests.of(victim.clean, tests), suffix="-control", ablation=ablation,
        )  # fmt: skip
        rows += control_rows
    rows += baseline_rows(attack, enc, data, tests, embedded)
    return rows, table, classes


class DecoderPool:
    """`jobs` decoders training at once, in threads (torch's ops release the GIL). The torch threads
    are shared out between them when the first decoder is queued: until then the caller, building the
    first victim, has them all. On the 2-core dev VM two 1-thread fits made 1.3x the progress of one
    fit with 2 threads: the decoder's small matrices do not keep two threads busy. Leaving cancels the
    fits not yet started and gives the threads back."""

    def __init__(self, jobs: int, threads: int) -> None:
        self.jobs, self.threads = jobs, threads
        self._before = torch.get_num_threads()
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn, /, *args) -> Future:
        if self._pool is None:
            torch.set_num_threads(max(1, self.threads // self.jobs))
            self._pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="decoder")
        return self._pool.submit(fn, *args)

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._pool is not None:  # on an error or Ctrl-C, not after the fits still running (minutes)
            self._pool.shutdown(wait=exc_type is None, cancel_futures=True)
        torch.set_num_threads(self._before)


def versions() -> dict:
    import open_clip
    import timm

    return {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "open_clip": open_clip.__version__, "numpy": np.__version__, "platform": platform.platform(),
        "cpu": cpu(),
    }  # fmt: skip


def cpu() -> str:
    """The CPU's model, cores and bf16 units. A bf16 CPU run's victims and decoders depend on the CPU:
    the same code and versions built other victims of every attack at seed 0 on an AMD EPYC with
    AVX512-BF16 than on an Intel Xeon with AMX, most likely as their bf16 units round differently
    (bench/NOTES.md, session 41)."""
    info = Path("/proc/cpuinfo")  # Linux; platform.processor() says only "x86_64" there
    lines = info.read_text().splitlines() if info.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    model = names[0] if names else platform.processor() or "unknown"
    return f"{model}, {os.cpu_count()} cores, {bf16_units() or 'no bf16 units'}"


def markdown(result: dict) -> str:
    """The rows as one table per train_data, plus the attack and downstream tables."""
    cpu_text = f"; {result['versions']['cpu']}" if "cpu" in result["versions"] else ""  # since session 41
    lines = [
        "# Detection benchmark",
        "",
        f"Command: `{result['command']}`  ",
        f"Mode: {result['mode']}; seed {result['seed']}; wall time {result['wall_seconds'] / 60:.1f} min; "
        f"device {result['device']} ({result['precision']}{cpu_text}); torch {result['versions']['torch']}, "
        f"timm {result['versions']['timm']}, open_clip {result['versions']['open_clip']}  ",
        f"`dede-score`: {result['settings']['dede-score']}; "
        f"`dede-paper`: {result['settings']['dede-paper']}; `collapse`: {result['settings']['collapse']}; "
        "`dede`: the score's test with its neighbours' scores, or the collapse pass  ",
        f"Decoders (all methods): {result['sizes']['decoder']} images "
        f"({result['decoder_training']['holdout']:.3f} of them held out to calibrate), "
        f"{decoder_epochs(result)}, trimmed loss {result['decoder_training']['trim']}, "
        f"second pass without the worst-rebuilt {result['decoder_training']['refit']} of the images "
        "(OOD decoders: one pass, their data hold no trigger)  ",
        f"Complete: {result['complete']} (partial results are written after every attack)",
        "",
        "## Attacks (linear probe on the victim's embeddings; chance ASR 0.10)",
        "",
        "| attack | victim | clean acc (victim) | ASR (victim) | ASR (clean encoder) | implant s |",
        "|---|---|---|---|---|---|",
    ]
    for attack, a in result["attacks"].items():
        aim = a.get("target", result["target_class"])  # since session 42
        own_aim = f" (target {datasets.FASHION_CLASSES[aim]})" if aim != result["target_class"] else ""
        named = attack + own_aim
        lines.append(
            f"| {named} | {a['spec']} | {a['clean_accuracy']:.3f} | {a['asr']:.3f} | {a['control_asr']:.3f} "
            f"| {a['seconds']:.0f} |"
        )
    lines += targets_table(result)
    lines += ["", "## Detection (AUC / TPR / FPR at the method's threshold)", ""]
    ablation = {m for name in ABLATION for m in (name, name + "-control")}
    methods = [m for m in dict.fromkeys(r["method"] for r in result["rows"]) if m not in ablation]
    header = "| attack | rate | train | " + " | ".join(methods) + " |"
    lines += [header, "|" + "---|" * (3 + len(methods))]
    groups = dict.fromkeys((r["attack"], r["poison_rate"], r["train_data"]) for r in result["rows"])
    for attack, rate, train in groups:
        cells = []
        for m in methods:
            hit = [
                r
                for r in result["rows"]
                if (r["attack"], r["poison_rate"], r["train_data"], r["method"]) == (attack, rate, train, m)
            ]  # noqa: E501
            cells.append(f"{hit[0]['auc']:.3f} / {hit[0]['tpr']:.2f} / {hit[0]['fpr']:.2f}" if hit else "")
        lines.append(f"| {attack} | {rate:g} | {train} | " + " | ".join(cells) + " |")
    lines += tpr_at_fpr_table(result["rows"])
    lines += shift_table(result["rows"])
    lines += ablation_table(result["rows"])
    lines += source_class_table(result.get("by_class", {}))
    lines += [
        "",
        "## Downstream (linear probe; ASR counts removed triggered images as failed attacks)",
        "",
        "`dede` filters what `sanitizer score` flags by default; `dede-score` by the score alone at its",
        "default threshold; `dede-score`, paper threshold: the same scores at the median of each scored set",
        "(it flags half); `dede-paper`: the reference code's scoring and threshold, the operating point of",
        "the paper's downstream figures. `dede` with `--threshold` and `--collapse`: what `sanitizer score`",
        "flags with each tail (3% and 2% of the held-out images) twice and three times as wide.",
        "",
        "`clean acc` is on the clean test images the defence keeps; `all` on every clean test image, so",
        "that it shows what filtering the probe's training data alone costs.",
        "",
        "| attack | defence | clean acc | clean acc, all | ASR | train removed | clean test removed |",
        "|---|---|---|---|---|---|---|",
    ]
    for attack, d in result["downstream"].items():
        for key, r in d.items():
            lines.append(
                f"| {attack} | {DOWNSTREAM_NAMES[key]} | {r['clean_accuracy']:.3f} "
                f"| {r['clean_accuracy_all']:.3f} | {r['asr']:.3f} "
                f"| {r['train_removed']:.3f} | {r['clean_test_removed']:.3f} |"
            )
    return "\n".join(lines) + "\n"


QUICK_MINUTES = 30  # the target for the quick mode on 2 CPU cores


def decoder_epochs(result: dict) -> str:
    """The decoders' epochs as run: a number given, or the package's choice for the images trained on."""
    training, images = result["decoder_training"], result["sizes"]["decoder"]
    if training["epochs"] is not None:
        return f"{training['epochs']} epochs"
    trained = images - holdout_size(images, training["holdout"])
    return f"{auto_epochs(trained)} epochs (the package's automatic choice for {trained} images)"


def cached_fits(result: dict) -> str:
    """How many decoder fits the run took from --work's cache, if any: such a run did not measure the
    quick mode's time. "" for none, and for runs from before the count was recorded (session 41)."""
    fits = result.get("decoder_fits", {"from_cache": 0})
    if not fits["from_cache"]:
        return ""
    total = fits["from_cache"] + fits["trained"]
    return f"{fits['from_cache']} of {total} decoder fits taken from --work's cache"


def _target_cells(result: dict, check) -> list[str]:
    """One cell per attack: 'met' or 'missed' and the figures `check(attack)` returns as (ok, text);
    'pending' for an attack whose decoders have not finished (partial results)."""
    cells = []
    for attack, info in result["attacks"].items():
        verdict = _verdict(result, attack, check)
        if verdict == "no implant":
            verdict += f" (ASR {info['asr']:.3f})"
        elif verdict in ("met", "missed"):
            verdict += f": {check(attack)[1]}"
        cells.append(verdict)
    return cells


def _verdict(result: dict, attack: str, check) -> str:
    """One run's word for one attack and target: 'met', 'missed', 'no implant', 'pending' (its
    decoders had not finished: partial results), 'not run', or 'not measured' (an older version's
    run, without the rows or the downstream defence the target reads)."""
    info = result["attacks"].get(attack)
    if info is None:
        return "not run"
    if info["asr"] < IMPLANTED_ASR:
        return "no implant"
    if attack not in {r["attack"] for r in result["rows"]}:
        return "pending"
    try:
        met = check(attack)[0]
    except KeyError:
        return "not measured"
    return "met" if met else "missed"


def sparse_rate_note(rows: list[dict]) -> list[str]:
    """How few triggered images the lowest rate's verdicts rest on: at the quick mode's 1% a test set
    held 10 until session 35 (30 since), so one image found or missed moved a TPR by 0.1 and could flip
    a target (session 34's seeds 1 and 2 did, bench/NOTES.md). Nothing before that rate has rows."""
    rate = min(POISON_RATES)
    fewest = min((r["n_triggered"] for r in rows if r["poison_rate"] == rate), default=None)
    if fewest is None:
        return []
    return [
        f"At the {rate:g} rate a test set holds {fewest} triggered images: each one found or missed moves "
        f"its TPR by {1 / fewest:.2g}, so a verdict there can turn on one image.",
        "",
    ]


def has_auc_fired(result: dict) -> bool:
    """Whether the run's rows carry `auc_fired` (runs before session 46 do not)."""
    return any("auc_fired" in r for r in result["rows"])


def target_checks(
    result: dict, auc_fired: bool | None = None
) -> list[tuple[str, Callable[[str], tuple[bool, str]]]]:
    """The issue's targets as (name, check): check(attack) gives (met, the figures) from the rows.
    `auc_fired`: whether to list the AUC among the images the backdoor fires on (by default, where
    the run has it; a table of several runs lists it where any has it)."""
    if auc_fired is None:
        auc_fired = has_auc_fired(result)
    rows = {(r["attack"], r["poison_rate"], r["train_data"], r["method"]): r for r in result["rows"]}

    def both(attack: str, train: str, method: str, field: str) -> list[float]:
        return [rows[attack, rate, train, method][field] for rate in POISON_RATES]

    def auc_at_least(train: str, floor: float, method: str = "dede", field: str = "auc"):
        def check(attack: str) -> tuple[bool, str]:
            # an `auc_fired` of None: the backdoor fired on none of that set's images, none to rank
            aucs = both(attack, train, method, field)
            text = ("none fired" if a is None else f"{a:.3f}" for a in aucs)
            return all(a is None or a >= floor for a in aucs), " / ".join(text)

        return check

    def operating_point(train: str, method: str = "dede", tpr_field: str = "tpr"):
        def check(attack: str) -> tuple[bool, str]:
            tpr, fpr = both(attack, train, method, tpr_field), both(attack, train, method, "fpr")
            # a `tpr_fired` of None: the backdoor fired on none of that set's images, none to miss
            ok = all(t is None or t >= 0.90 for t in tpr) and max(fpr) <= 0.05
            text = ("none fired" if t is None else f"{t:.3f}" for t in tpr)
            return ok, " / ".join(f"{t} at {f:.3f}" for t, f in zip(text, fpr, strict=True))

        return check

    def control(method: str):
        def check(attack: str) -> tuple[bool, str]:
            aucs = both(attack, "id", method, "auc")
            return max(aucs) <= 0.65, " / ".join(f"{a:.3f}" for a in aucs)

        return check

    def downstream(defence: str):
        def check(attack: str) -> tuple[bool, str]:
            filtered, plain = (result["downstream"][attack][k] for k in (defence, "no_defence"))
            change = round(filtered["clean_accuracy"] - plain["clean_accuracy"], 4)
            ok = filtered["asr"] <= 0.05 and change >= -0.01
            return ok, f"ASR {filtered['asr']:.3f}, CA {change:+.4f}"

        return check

    alone = "the same for `dede-score` (the score alone, `--no-collapse`)"
    fired = [
        (
            "the same for `dede`, the AUC against the triggered images the backdoor fires on (`auc_fired`)",
            auc_at_least("id", 0.98, field="auc_fired"),
        )
    ]
    return [
        (
            "ID AUC >= 0.98 (0.5 / 0.01; score or evidence, in units of its threshold)",
            auc_at_least("id", 0.98),
        ),
        (alone, auc_at_least("id", 0.98, "dede-score")),
        *(fired if auc_fired else []),
        ("OOD AUC >= 0.95 (0.5 / 0.01)", auc_at_least("ood", 0.95)),
        (alone, auc_at_least("ood", 0.95, "dede-score")),
        ("default threshold, ID decoders: TPR >= 0.90 at FPR <= 0.05 (0.5 / 0.01)", operating_point("id")),
        (alone, operating_point("id", "dede-score")),
        (
            "the same for `dede`, the TPR among the triggered images the backdoor fires on (`tpr_fired`)",
            operating_point("id", tpr_field="tpr_fired"),
        ),
        ("the same with OOD decoders", operating_point("ood")),
        (alone, operating_point("ood", "dede-score")),
        ("clean-encoder control AUC <= 0.65 (0.5 / 0.01)", control("dede-control")),
        (alone, control("dede-score-control")),
        ("downstream ASR after filtering <= 0.05, clean accuracy within 0.01", downstream("dede_filtered")),
        (alone, downstream("dede_score_filtered")),
        (
            "the same for `dede` with twice the tails (`--threshold {} --collapse {}`)".format(
                *STRICTER_RULES["dede_filtered_x2"]
            ),
            downstream("dede_filtered_x2"),
        ),
    ]


def targets_table(result: dict) -> list[str]:
    """The issue's targets, met or missed, from this run's rows (`dede` at both poison rates)."""
    if not result["attacks"]:
        return []
    minutes = result["wall_seconds"] / 60
    lines = [
        "",
        f"## The issue's targets (`dede`, the defaults; an attack under ASR {IMPLANTED_ASR:g} failed)",
        "",
    ]
    cached = cached_fits(result)
    if result["mode"] == "quick" and cached:
        took = f"{minutes:.1f} min, {cached}"
        lines += [f"Quick mode under {QUICK_MINUTES} min: not measured by this run ({took}).", ""]
    elif result["mode"] == "quick":
        verdict = "met" if minutes < QUICK_MINUTES else "missed"
        lines += [f"Quick mode under {QUICK_MINUTES} min: {verdict} ({minutes:.1f} min).", ""]
    lines += sparse_rate_note(result["rows"])
    lines += [
        "| target | " + " | ".join(result["attacks"]) + " |",
        "|" + "---|" * (1 + len(result["attacks"])),
    ]
    for name, check in target_checks(result):
        lines.append(f"| {name} | " + " | ".join(_target_cells(result, check)) + " |")
    return lines


def spread_table(results: list[dict]) -> list[str]:
    """The targets table of runs at several seeds (`--seed`): for each target and attack, at how many
    of the seeds where the attack implanted the target is met, then each seed's verdict. One seed's
    verdicts can turn on a few images (sparse_rate_note); this says which hold across the draw."""
    attacks = list(dict.fromkeys(a for result in results for a in result["attacks"]))
    auc_fired = any(has_auc_fired(result) for result in results)
    checks = [target_checks(result, auc_fired) for result in results]
    seeds = " / ".join(str(result["seed"]) for result in results)
    lines = ["# The issue's targets across seeds", ""]
    for result in results:  # the decoders' epochs too: runs of several sessions may differ in them
        cached = cached_fits(result)
        run = f"{result['mode']}, {result['wall_seconds'] / 60:.1f} min" + (cached and f" ({cached})")
        run += f"; decoders {decoder_epochs(result)}"
        lines.append(f"- seed {result['seed']}: `{result['command']}` ({run})")
    lines += [
        "",
        f"| target (seeds {seeds}) | " + " | ".join(attacks) + " |",
        "|" + "---|" * (1 + len(attacks)),
    ]
    for i, (name, _) in enumerate(checks[0]):
        cells = []
        for attack in attacks:
            verdicts = [
                _verdict(result, attack, run_checks[i][1])
                for result, run_checks in zip(results, checks, strict=True)
            ]
            implanted = [v for v in verdicts if v in ("met", "missed")]
            count = f"met at {implanted.count('met')} of {len(implanted)}" if implanted else "never implanted"
            cells.append(f"{count}: " + " / ".join(verdicts))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


TPR_METHODS = ("dede-score", "dede-unrelaxed", "dede-paper")


def operating_point(row: dict, suffix: str = "", digits: int = 3) -> str:
    """A row's "TPR / FPR", or with a suffix its other calibration's."""
    return f"{row['tpr' + suffix]:.{digits}f} / {row['fpr' + suffix]:.3f}"


def tpr_at_fpr_table(rows: list[dict]) -> list[str]:
    """TPR at the calibrated threshold against the TPR the ranking allows at 5% FPR (whether a miss is
    the threshold's or the score's), for `dede-score`, `dede-unrelaxed` (with the ablation) and
    `dede-paper`; and the TPR / FPR of `dede-score` and of `dede` calibrated on the holdout without its
    triggered images (what the contamination costs, and what it saves)."""
    cells = {(r["attack"], r["poison_rate"], r["train_data"], r["method"]): r for r in rows}
    if not any("tpr_at_fpr05" in r for r in rows):
        return []
    methods = [m for m in TPR_METHODS if any(r["method"] == m for r in rows)]
    lines = [
        "",
        "## TPR at the calibrated threshold / at 5% FPR (threshold chosen on the test labels)",
        "",
        "The next two columns calibrate on the holdout without its triggered images, which only the "
        "benchmark can pick out: `dede-score`'s TPR / FPR, and `dede`'s against its TPR / FPR as run. "
        "The last: `dede`'s TPR among the triggered images the backdoor fires on (the undefended "
        "downstream probe sends them to the target class), of how many.",
        "",
        "| attack | rate | train | "
        + " | ".join(methods)
        + " | dede-score, clean holdout | dede, clean holdout (as run) | dede, backdoor fired |",
        "|" + "---|" * (6 + len(methods)),
    ]
    for attack, rate, train in dict.fromkeys((a, r, t) for a, r, t, _ in cells):
        found = [cells.get((attack, rate, train, m)) for m in methods]
        text = [f"{c['tpr']:.2f} / {c['tpr_at_fpr05']:.2f}" if c else "" for c in found]
        score, dede = (cells.get((attack, rate, train, m), {}) for m in ("dede-score", "dede"))
        clean = [
            operating_point(score, "_clean_holdout", 2) if "tpr_clean_holdout" in score else "",
            f"{operating_point(dede, '_clean_holdout')} ({operating_point(dede)})"
            if "tpr_clean_holdout" in dede
            else "",
        ]
        fired = f"{dede['tpr_fired']:.3f} of {dede['n_fired']}" if dede.get("tpr_fired") is not None else ""
        lines.append(f"| {attack} | {rate:g} | {train} | " + " | ".join([*text, *clean, fired]) + " |")
    return lines


def shift_table(rows: list[dict]) -> list[str]:
    """Share of each `dede-score` test set above its decoder's calibration median, the statistic behind the
    report's "no verdict" (data unlike the decoder's training data)."""
    share = {
        (r["train_data"], r["attack"], r["poison_rate"]): r["above_calibration_median"]
        for r in rows
        if r["method"] == "dede-score" and "above_calibration_median" in r
    }
    if not share:
        return []
    columns = list(dict.fromkeys((t, rate) for t, _, rate in share))
    lines = [
        "",
        "## Share of the scored set above the calibration's median (`dede-score`; the report gives no "
        f"verdict above {SHIFT_LIMIT:g})",
        "",
        "| attack | " + " | ".join(f"{t} {rate:g}" for t, rate in columns) + " |",
        "|" + "---|" * (1 + len(columns)),
    ]
    for attack in dict.fromkeys(a for _, a, _ in share):
        cells = [f"{share[t, attack, rate]:.2f}" if (t, attack, rate) in share else "" for t, rate in columns]
        lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return lines


def ablation_table(rows: list[dict]) -> list[str]:
    """AUC on the victim / on the clean-encoder control for each relaxation, patch error, aggregate
    and error pool (ID decoders), when the run scored the ablation (`--ablation`)."""
    auc_of = {(r["attack"], r["poison_rate"], r["method"]): r["auc"] for r in rows if r["train_data"] == "id"}
    if not any(method in ABLATION for _, _, method in auc_of):
        return []
    label = lambda s: f"{s.error}, {s.aggregate}, pool {s.error_pool}, relax {s.relax_steps}"  # noqa: E731
    names = {
        f"dede-score ({label(DEDE)})": "dede-score",
        **{f"{n} ({label(s)})": n for n, s in ABLATION.items()},
    }
    lines = [
        "",
        "## Relaxation, patch error, aggregate and error pooling (ID decoder): AUC on the victim / on "
        "the clean-encoder control",
        "",
        "| attack | rate | " + " | ".join(names) + " |",
        "|" + "---|" * (2 + len(names)),
    ]
    for attack, rate in dict.fromkeys((a, r) for a, r, _ in auc_of):
        cells = [
            f"{auc_of[attack, rate, m]:.3f} / {auc_of[attack, rate, m + '-control']:.3f}"
            if (attack, rate, m + "-control") in auc_of
            else ""
            for m in names.values()
        ]
        lines.append(f"| {attack} | {rate:g} | " + " | ".join(cells) + " |")
    return lines


CLASS_TABLES = {
    "auc": (
        "`dede-score` AUC per source class of the triggered images (ID decoder): victim / control",
        "Within each class: its clean test images against its triggered images.",
    ),
    "clean_flagged": (
        "Clean test images flagged per class at `dede-score`'s default threshold (ID decoder): victim / "
        "control",
        "The share of each class's clean test images above the calibrated threshold: where the false "
        "positives come from.",
    ),
}


def source_class_table(classes: dict) -> list[str]:
    """The `by_class` breakdown of every attack as Markdown: one table per measure in CLASS_TABLES."""
    lines = []
    for measure, (title, caption) in CLASS_TABLES.items():
        names = list(dict.fromkeys(c for a in classes.values() for c in a["dede-score"].get(measure, {})))
        if not names:
            continue
        lines += ["", f"## {title}", "", caption, ""]
        lines += ["| attack | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
        for attack, a in classes.items():
            victim, control = (
                a["dede-score"][measure],
                a["dede-score-control"].get(measure, {}),
            )  # {}: no implant
            cells = [f"{victim[c]:.2f}" + (f" / {control[c]:.2f}" if c in control else "") for c in names]
            lines.append(f"| {attack} | " + " | ".join(cells) + " |")
    return lines


def write_results(result: dict, json_path: Path, md_path: Path | None) -> None:
    """Each file whole or as it was: a Ctrl-C during a write used to leave a truncated JSON."""
    write_bytes_atomic(json_path, (json.dumps(result, indent=1) + "\n").encode())
    write_bytes_atomic(md_path or json_path.with_suffix(".md"), markdown(result).encode())


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, saying what the run had written by then."""


def interrupted(done: list[str], attacks: tuple[str, ...], json_path: Path) -> Interrupted:
    if not done:
        return Interrupted("interrupted before any attack's results were written")
    return Interrupted(
        f"interrupted: {json_path} holds the results of {', '.join(done)} of {', '.join(attacks)} "
        '("complete": false)'
    )


def at_least(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `least`, said in one line otherwise."""

    def whole(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {least}, not {text!r}")
        return int(text)

    return whole


positive = at_least(1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized run (under 30 min on 2 cores, in fp32)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--attacks",
        default=None,
        help=f"comma-separated subset of {','.join(ATTACKS + OPT_IN_ATTACKS)} (default: "
        f"{','.join(ATTACKS)}; with --encoder: the fine-tuning ones of those); one-axis is an adaptive "
        "attack on the collapse pass",
    )
    p.add_argument(
        "--encoder",
        default=None,
        metavar="SPEC",
        help="your clean encoder (timm:NAME, open_clip:NAME, torchscript:PATH, export:PATH) for the "
        f"attacks that fine-tune one ({', '.join(FINE_TUNED)}), instead of the ImageNet ones",
    )
    p.add_argument(
        "--encoder-weights",
        type=Path,
        default=None,
        help="its weights (safetensors or .pt); a timm: or open_clip: encoder needs them",
    )
    p.add_argument(
        PREFIX_OPTION,
        type=as_prefix,
        default=None,
        metavar="PREFIX",
        help="where in --encoder-weights the encoder is, for a file that holds it twice (encoder_q., "
        "teacher.); default: found by its tensors' names",
    )
    p.add_argument(
        "--image-size",
        type=positive,
        default=None,
        help="its input size, which the data are resized to: 16 to 224 px, tiled by the decoders' "
        "patches (default: its own; 32, the size of the other victims' data, keeps a CPU run short)",
    )
    p.add_argument(
        "--trim",
        type=float,
        default=DECODER_TRAINING.trim,
        help=f"the decoders' trimmed-loss share (default {DECODER_TRAINING.trim}; 0: the paper's loss)",
    )
    p.add_argument(
        "--refit",
        type=float,
        default=DECODER_TRAINING.refit,
        help=f"share left out of the victim's and control's decoders' second training pass (default "
        f"{DECODER_TRAINING.refit}; 0: one pass; the OOD decoders always train in one pass)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also score the ablation behind the defaults (dede-unrelaxed, dede-mse, ...) on the ID "
        "decoders of the victim and the control (about 5 more minutes in the quick mode on 2 cores)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help=f"where the JSON goes (default: {DEFAULT_JSON.relative_to(RESULTS.parent.parent)}, the "
        "benchmark's own run; with --encoder, give it)",
    )
    p.add_argument("--md", type=Path, default=None, help="Markdown table (default: beside the JSON)")
    p.add_argument(
        "--spread",
        type=Path,
        nargs="+",
        metavar="RUN_JSON",
        help="print the targets table across these runs' JSON (e.g. one per --seed) and exit; runs nothing",
    )
    p.add_argument(
        "--seed",
        type=at_least(0),
        default=DEFAULT_SEED,
        help=f"draws the data's slices, the triggered images, the victims' and decoders' training and the "
        f"probes (default {DEFAULT_SEED}, the benchmark's own run); another shows the spread between runs",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep victims and decoder fits here; a re-run takes each fit whose inputs are unchanged from "
        "decoders/ (default: a temp dir)",
    )
    p.add_argument(
        "--threads",
        type=positive,
        default=DEFAULT_THREADS,
        help="torch CPU threads, at most the machine's CPUs; use 1 on a shared, busy machine",
    )
    p.add_argument(
        "--jobs",
        type=positive,
        default=2,
        help="decoders trained at once, while the next victims are built; they share the --threads",
    )
    return p.parse_args(argv)


def check_threads(threads: int) -> None:
    """UsageError for more --threads than CPUs (or the default): 1000 on 2 cores started 2000 threads
    that crawled through the first implant, and 99999 ended in a MemoryError traceback."""
    most = max(os.cpu_count() or 1, DEFAULT_THREADS)
    if threads > most:
        raise UsageError(f"--threads {threads}: this machine has {os.cpu_count()} CPUs; give at most {most}")


def chosen_victims(args: argparse.Namespace) -> tuple[BaseEncoder | None, tuple[str, ...]]:
    """(the user's encoder or None, the attacks to run), or UsageError with what is wrong."""
    if args.encoder is None and (
        args.encoder_weights or args.image_size or args.encoder_weights_prefix is not None
    ):
        raise UsageError(
            f"--encoder-weights, {PREFIX_OPTION} and --image-size describe --encoder; give --encoder too"
        )
    if args.encoder is not None:
        try:
            kind = parse_spec(args.encoder)[0]
        except SanitizerError as e:
            raise UsageError(f"--encoder: {e}") from None
        if kind in FILE_KINDS and args.image_size is None:  # load_encoder's words name --mean/--std too
            raise UsageError(
                f"--encoder {args.encoder}: a {kind} file carries no input size; give --image-size"
            )
    if args.image_size is not None:  # before the encoder is loaded at that size
        need_side(args.image_size, f"--image-size {args.image_size}")
    if args.encoder_weights is not None:  # as `sanitizer train` says it, before anything is built
        try:
            check_weights_file(args.encoder_weights)
        except EncoderError as e:
            raise UsageError(str(e)) from None
    own = (
        BaseEncoder(args.encoder, args.encoder_weights, args.image_size, args.encoder_weights_prefix)
        if args.encoder
        else None
    )
    default = [a for a in ATTACKS if a in FINE_TUNED] if own else ATTACKS
    known = ATTACKS + OPT_IN_ATTACKS
    given = args.attacks if args.attacks is not None else ",".join(default)
    attacks = tuple(a.strip() for a in given.split(",") if a.strip())  # "badencoder, drupe" too
    if not attacks:
        raise UsageError(f"--attacks {given!r} names no attack; choose from {', '.join(known)}")
    unknown = sorted(set(attacks) - set(known))
    if unknown:
        raise UsageError(f"unknown attacks {unknown}; choose from {', '.join(known)}")
    twice = sorted(a for a in set(attacks) if attacks.count(a) > 1)
    if twice:
        raise UsageError(f"--attacks names {', '.join(twice)} more than once")
    trained_here = sorted(set(attacks) - set(FINE_TUNED))
    if own and trained_here:
        raise UsageError(
            f"{', '.join(trained_here)} poison the training of a victim built here, so --encoder does "
            f"not apply to them; --encoder works with {', '.join(FINE_TUNED)}"
        )
    if own:
        need_weights(own)
    return (with_input_size(own) if own else None), attacks


def need_weights(own: BaseEncoder) -> None:
    """UsageError for a timm/open_clip encoder without --encoder-weights: the attacks would be implanted
    into seeded random weights, not the user's encoder, and the quick mode's implant does not take in
    a random one (session 13: ASR 0.033 and 0.042 after 9.8 min), so the run measures nothing."""
    kind = parse_spec(own.spec)[0]
    if kind in MODEL_KINDS and own.weights is None:
        raise UsageError(
            f"--encoder {own.spec} has no --encoder-weights: the attacks would go into seeded random "
            "weights, not your encoder; give --encoder-weights PATH"
        )


def with_input_size(own: BaseEncoder) -> BaseEncoder:
    """`own` with the input size it is loaded at, which the data are resized to. Loading it once on the
    CPU here refuses an encoder that does not load, or whose input size the benchmark cannot run at
    (side_problem), before any work."""
    try:
        size = own.load("cpu").preprocess.image_size
    except SanitizerError as e:
        raise UsageError(f"--encoder: {e}") from None
    need_side(size, f"{own.spec} at {size} px", " (--image-size)")
    return replace(own, image_size=size)


def side_problem(size: int) -> str | None:
    """Why the benchmark cannot run on images of `size` px a side, or None. A side the decoders'
    patches do not tile used to fail in the first decoder fit, after every implant; one too large
    failed deep in the data's resize (a RuntimeError traceback), or in the encoder's first pass."""
    if size < MIN_SIDE:
        return f"the triggers need images of at least {MIN_SIDE} px a side"
    if size > MAX_SIDE:
        return (
            f"the benchmark takes at most {MAX_SIDE} px a side: beyond it its images and its decoders' "
            "attention over their patches outgrow memory"
        )
    try:
        DedeConfig.default_for(size, embed_dim=1)
    except UsageError as e:
        return f"the decoders' patches must tile the image: {e}"
    return None


def need_side(size: int, what: str, hint: str = "") -> None:
    """UsageError naming `what` when the benchmark cannot run at `size` px (side_problem)."""
    problem = side_problem(size)
    if problem:
        raise UsageError(f"{what}: {problem}{hint}")


def writable(path: Path) -> bool:
    """Whether this process can write a file at `path`, found by opening it (os.access passes a parent
    that is a file, or anything for root); a file that was not there is removed again."""
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError:
        return False
    if not existed:
        path.unlink()
    return True


def results_path(args: argparse.Namespace) -> Path:
    """--json, or the benchmark's own results file where no --encoder is given: a run on the user's
    encoder wrote over the shipped tables of the ImageNet victims (bench/results/detection.json, .md)."""
    if args.json is not None:
        return args.json
    if args.encoder is not None:
        raise UsageError(
            f"--encoder: give --json PATH for its results; the default, {DEFAULT_JSON}, holds the "
            "benchmark's own run on its ImageNet encoders"
        )
    return DEFAULT_JSON


def check_outputs(args: argparse.Namespace) -> None:
    """Where the results go (the Markdown beside the JSON by default) and where the victims are kept
    (`--work`, made here if absent), checked before minutes of work rather than after: a --work that
    was a file, or under one, ended the first implant in a FileExistsError traceback."""
    for flag, path in (("--json", args.json), ("--md", args.md or args.json.with_suffix(".md"))):
        if not path.parent.exists():  # said 'not a file this process can write', which did not say why
            raise UsageError(f"{flag} {path}: no directory {path.parent}; make it first")
        if not writable(path):
            raise UsageError(f"{flag} {path}: not a file this process can write")
    if args.work is not None and not writable_dir(args.work):
        raise UsageError(f"--work {args.work}: not a directory this process can write in")


def writable_dir(path: Path) -> bool:
    """Whether `path` is, or can be made, a directory this process can write a file in."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return path.is_dir() and writable(path / ".detection-write-check")


def decoder_training(args: argparse.Namespace, sizes: Sizes) -> TrainSettings:
    """The decoders' training settings (SanitizerError for a --trim or --refit out of range)."""
    return replace(
        DECODER_TRAINING, epochs=sizes.decoder_epochs, trim=args.trim, refit=args.refit, seed=args.seed
    )


def seeded(sizes: Sizes, seed: int) -> Sizes:
    """The sizes with the victims' implants and contrastive trainings drawn from `seed`."""
    return replace(
        sizes,
        implant=replace(sizes.implant, seed=seed),
        simclr=replace(sizes.simclr, seed=seed),
        clip=replace(sizes.clip, seed=seed),
    )


def read_run(path: Path) -> dict:
    """A detection run's JSON for --spread, or UsageError saying why it is not one."""
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--spread {path}: cannot read it: {describe(e)}") from None
    if not isinstance(result, dict) or not {"seed", "attacks", "rows", "downstream"} <= result.keys():
        raise UsageError(f"--spread {path}: not the JSON of a bench/detection.py run")
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.spread:
        print("\n".join(spread_table([read_run(path) for path in args.spread])))
        return {}
    check_threads(args.threads)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    sizes = seeded(QUICK if args.quick else FULL, args.seed)
    resolve_device(args.device)
    args.json = results_path(args)
    check_outputs(args)
    own, attacks = chosen_victims(args)
    training = decoder_training(args, sizes)
    built_here = any(a not in FINE_TUNED for a in attacks)
    # not installed: names install_data.sh
    data = load_data(sizes, own.image_size if own else DATA_SIZE, pretrain=built_here, seed=args.seed)
    header = {
        "command": " ".join(
            shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
        ),
        "mode": "quick" if args.quick else "full",
        "device": args.device,
        "precision": precision(torch.device(args.device)),
        "threads": args.threads,
        "jobs": args.jobs,
        "ablation": args.ablation,
        "seed": args.seed,
        "target_class": TARGET,
        "versions": versions(),
        "sizes": asdict(sizes),
        # the user's encoder for the fine-tuning attacks; null: the ImageNet MobileNetV2 / EfficientNet
        "encoder": own and {**asdict(own), "weights": own.weights and str(own.weights)},
        "decoder_training": training.to_dict(),
        "ood_decoder_training": ood_training(training).to_dict(),
        "settings": {
            "dede-score": {**DEDE.to_dict(), "threshold": DEDE_RULE},
            "dede-paper": {**PAPER.to_dict(), "threshold": PAPER_RULE},
            "collapse": {"threshold": DEFAULT_COLLAPSE_RULE},
        },
    }
    probe = ProbeData(*data.probe, *data.test, TARGET)

    def aimed_at(victim: Victim) -> ProbeData:
        return replace(probe, target=victim.target)

    done: list[str] = []  # the attacks whose results are written
    try:
        with tempfile.TemporaryDirectory() as tmp, DecoderPool(args.jobs, args.threads) as pool:
            work = args.work or Path(tmp)
            fits = FitCache(args.work and args.work / "decoders")
            # Each victim's decoders queue as soon as it is built and train while the next victim is
            # implanted with the pool's share of the threads: most implants keep about one core busy
            # (on the 2-core dev VM BadEncoder's took 56 s with 2 threads, 63 s with 1).
            queued, attack_info, controls = [], {}, {}
            for victim in iter_victims(data, sizes, attacks, work, args.device, own):
                attack_info[victim.attack] = {
                    "spec": victim.implant.spec,
                    **victim.implant.report.to_dict(),
                    "control_asr": round(
                        measure_attack(victim.clean, victim.trigger, aimed_at(victim)).asr, 4
                    ),
                    "seconds": round(victim.implant.seconds, 1),
                }
                queued.append((victim, submit_decoders(pool, victim, data, sizes, training, controls, fits)))
            rows, down, classes = [], {}, {}
            for victim, decoders in queued:
                attack = victim.attack
                attack_rows, down[attack], classes[attack] = run_attack(victim, data, decoders, args.ablation)
                rows += attack_rows
                result = {
                    **header,
                    "complete": attack == attacks[-1],
                    "attack_asr": {a: info["asr"] for a, info in attack_info.items()},
                    "attacks": attack_info,
                    "rows": rows,
                    "downstream": down,
                    "by_class": classes,
                    "decoder_fits": fits.counts(),
                    "wall_seconds": round(time.time() - started, 1),
                }
                # after every attack, so that a long run leaves partial results
                write_results(result, args.json, args.md)
                done.append(attack)
                log.info("%s done at %.0f s", attack, time.time() - started)
    except KeyboardInterrupt:
        raise interrupted(done, attacks, args.json) from None
    log.info("wrote %s in %.1f min", args.json, result["wall_seconds"] / 60)
    return result


def cli(argv: list[str] | None = None) -> int:
    """main() as a command. A user's mistake (a bad flag, an encoder or weights that do not load, data
    not installed) ends as the `sanitizer` command's do: one line on stderr and exit code 2."""
    try:
        main(argv)
    except SanitizerError as e:
        print(f"detection: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # an Interrupted says what was written
        print(f"detection: {str(e) or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    code = cli()
    if code == EXIT_INTERRUPTED:  # a decoder fit cannot be stopped, and exiting would wait for its thread
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
