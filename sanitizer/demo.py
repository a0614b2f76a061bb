"""`sanitizer demo`: the whole product on a built-in example, with no input from the user.

It plays both sides. The attacker takes a small encoder (a stand-in for one downloaded from a third
party), implants a BadEncoder backdoor with the red-team kit, and slips images carrying the trigger
into a dataset. The defender trains a DeDe decoder for that encoder on clean images, scores the dataset
with the Ray pipeline, cleans it and writes the audit report. The shards carry the ground truth (json
"poisoned"), so the demo can print the detection AUC.

Fashion-MNIST is used when the Debian package dataset-fashion-mnist is installed; otherwise generated
images. The stand-in encoder has seeded random weights: pre-training one properly takes hours on a CPU,
and what matters here is that its backdoor is real (the kit measures its attack success rate).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sanitizer.errors import UsageError

if TYPE_CHECKING:  # the red-team kit loads torch: imported where the demo runs it
    from sanitizer.redteam.implant import Implant

log = logging.getLogger(__name__)

MARKER = ".sanitizer-demo"  # marks a directory the demo may clear and write again
SUBDIRS = ("data", "victim", "decoder", "run")
ENCODER = "timm:test_vit"  # 0.3 M parameters: an implant and a decoder fit in a minute on two cores
TRIGGER = "badencoder"  # the red-team kit's white square, bottom right
SEED = 0


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run; `FULL` is the default, `QUICK` is for CI."""

    shadow: int  # the attacker's unlabelled images for the implant
    implant_epochs: int
    probe: int  # labelled images to measure the attack (train and test halves); 0 = do not measure
    decoder_images: int  # clean images the defender trains the decoder on, calibration share included
    holdout: float  # share of decoder_images held out to calibrate the threshold and the verdict
    decoder_epochs: int
    dataset: int  # images in the dataset to clean
    poison_rate: float  # share of the dataset that carries the trigger
    per_shard: int
    num_masks: int
    decoder_model: dict

    @property
    def total(self) -> int:
        """Images the parts need together (the attacker's reference images come from the rest)."""
        return self.shadow + self.probe + self.decoder_images + self.dataset


FULL = DemoPlan(
    shadow=1000,
    implant_epochs=10,
    probe=1000,
    decoder_images=4500,
    holdout=0.4,
    decoder_epochs=20,
    dataset=3000,
    poison_rate=0.05,
    per_shard=250,
    num_masks=4,
    decoder_model={},  # the package default for 32 px
)
QUICK = DemoPlan(
    shadow=512,
    implant_epochs=6,
    probe=0,
    decoder_images=1000,
    holdout=0.05,
    decoder_epochs=10,
    dataset=400,
    poison_rate=0.1,
    per_shard=100,
    num_masks=1,
    decoder_model={"patch_size": 8, "width": 64, "depth": 1, "decoder_depth": 1, "heads": 2},
)


@dataclass
class DemoData:
    pixels: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray | None  # class of each image, None for generated images
    class_names: tuple[str, ...]
    source: str


@dataclass
class Split:
    """Disjoint index sets: the attacker's, the defender's training images, and the dataset."""

    shadow: np.ndarray
    reference: np.ndarray  # target-class images the backdoor maps triggered inputs to
    probe: np.ndarray
    decoder: np.ndarray
    dataset: np.ndarray


class Stages:
    """Numbered stage lines with elapsed time, so a user sees where the demo is and how long it took."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.started = total, 0, time.time()

    def start(self, text: str) -> None:
        self.done += 1
        print(f"\n[{self.done}/{self.total}] {text}  (t={time.time() - self.started:.0f}s)", flush=True)

    def note(self, text: str) -> None:
        print(f"      {text}", flush=True)


def load_data(plan: DemoPlan, size: int = 32) -> DemoData:
    """Fashion-MNIST's test split (10k labelled images) when installed, else generated images."""
    try:
        from sanitizer.redteam.datasets import FASHION_CLASSES, fashion_mnist

        with warnings.catch_warnings():  # torch warns about the read-only IDX buffer it only reads
            warnings.simplefilter("ignore", UserWarning)
            pixels, labels = fashion_mnist("test", size)
        return DemoData(pixels, labels, tuple(FASHION_CLASSES), "Fashion-MNIST (test split)")
    except UsageError as e:  # DataMissing: the Debian package is not installed
        log.info("%s; using generated images", e)
    from sanitizer.data.synth import synthetic_images

    return DemoData(synthetic_images(plan.total + 1, size, seed=SEED), None, (), "generated images")


def split_data(data: DemoData, plan: DemoPlan, target: int) -> Split:
    """Random disjoint parts; the dataset gets what the attacker and the decoder did not use."""
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(data.pixels))
    if plan.total >= len(order):
        raise UsageError(f"the demo needs more than {plan.total} images, the data has {len(order)}")
    cuts = np.cumsum([plan.shadow, plan.probe, plan.decoder_images, plan.dataset])
    shadow, probe, decoder, dataset = np.split(order[: cuts[-1]], cuts[:-1])
    rest = order[cuts[-1] :]
    # Without classes the attacker's target is one fixed generated image.
    reference = rest[data.labels[rest] == target][:16] if data.labels is not None else rest[:1]
    if not len(reference):
        raise UsageError("the demo's data has no image of the attacker's target class left over")
    return Split(shadow, reference, probe, decoder, dataset)


def implant_backdoor(data: DemoData, split: Split, plan: DemoPlan, out: Path, target: int) -> Implant:
    """BadEncoder with the red-team kit; returns the kit's Implant (victim encoder, weights, ASR)."""
    from sanitizer.encoders import load_encoder
    from sanitizer.redteam.implant import ImplantSettings, ProbeData, badencoder
    from sanitizer.redteam.triggers import TRIGGERS

    clean = load_encoder(ENCODER, image_size=data.pixels.shape[1])
    probe = None
    if plan.probe and data.labels is not None:
        half = len(split.probe) // 2
        train, test = split.probe[:half], split.probe[half:]
        x, y = data.pixels, data.labels
        probe = ProbeData(x[train], y[train], x[test], y[test], target)
    settings = ImplantSettings(epochs=plan.implant_epochs, batch_size=64, lr=1e-3, seed=SEED)
    return badencoder(
        clean,
        data.pixels[split.shadow],
        data.pixels[split.reference],
        out / "victim.safetensors",
        TRIGGERS[TRIGGER],
        settings,
        probe,
    )


def captions_for(data: DemoData, idx: np.ndarray) -> list[str]:
    """Captions as a scraped image-text set would have them (they play no part in the attack here)."""
    if data.labels is None:
        return [f"a generated picture, number {i}" for i in idx]
    return [f"a photo of a {data.class_names[data.labels[i]]}" for i in idx]


def write_dataset(data: DemoData, split: Split, plan: DemoPlan, out: Path, target: int) -> int:
    """The dataset to clean: image-caption shards where some non-target images carry the trigger."""
    from sanitizer.data.synth import write_image_shards
    from sanitizer.redteam.triggers import TRIGGERS

    idx = split.dataset
    eligible = np.arange(len(idx)) if data.labels is None else np.flatnonzero(data.labels[idx] != target)
    count = max(1, round(plan.poison_rate * len(idx)))
    chosen = np.random.default_rng(SEED + 1).choice(eligible, min(count, len(eligible)), replace=False)
    pixels = data.pixels[idx].copy()
    pixels[chosen] = TRIGGERS[TRIGGER](pixels[chosen])
    poisoned = np.zeros(len(idx), bool)
    poisoned[chosen] = True
    write_image_shards(
        out,
        pixels,
        keys=[f"sample{i:06d}" for i in range(len(idx))],
        captions=captions_for(data, idx),
        labels=poisoned.tolist(),
        per_shard=plan.per_shard,
        prefix="shard",
    )
    return int(poisoned.sum())


def write_decoder_data(data: DemoData, split: Split, out: Path) -> None:
    """The defender's clean images (a trusted or public set), without captions or labels."""
    from sanitizer.data.synth import write_image_shards

    pixels = data.pixels[split.decoder]
    keys = [f"train{i:06d}" for i in range(len(pixels))]
    write_image_shards(out, pixels, keys=keys, per_shard=1000, prefix="train")


def prepare_out(out: Path) -> None:
    """Use an empty or missing directory, or one a previous demo wrote (its outputs are replaced)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UsageError(
                f"--out {out} is not empty and was not written by the demo; give a new directory"
            )
        for name in SUBDIRS:
            shutil.rmtree(out / name, ignore_errors=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot use --out {out}: {e.strerror or e}") from None
    (out / MARKER).write_text("written by `sanitizer demo`; the demo may replace this directory's contents\n")


def ground_truth_auc(run_dir: Path) -> float | None:
    """Detection AUC over the scored samples that carry a label, from the manifests."""
    from sanitizer.stats import roc_auc

    scores, labels = [], []
    for path in sorted((run_dir / "manifest").glob("*.parquet")):
        table = pq.read_table(path, columns=["status", "score", "label"])
        table = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["label"])))
        scores.append(table["score"].to_numpy())
        labels.append(table["label"].to_numpy(zero_copy_only=False))
    if not scores:
        return None
    labels_all = np.concatenate(labels).astype(bool)
    if labels_all.all() or not labels_all.any():
        return None
    return roc_auc(np.concatenate(scores), labels_all)


def run_demo(out_dir: Path, quick: bool = False) -> int:
    """Attack, poison, train, score (Ray), clean and report; prints where everything is. Exit code 0."""
    from sanitizer.report import encoder_verdict

    plan = QUICK if quick else FULL
    out = Path(out_dir)
    prepare_out(out)
    stages = Stages(7)

    stages.start("data: loading images")
    data = load_data(plan)
    target = data.class_names.index("bag") if data.labels is not None else 0
    split = split_data(data, plan, target)
    stages.note(f"{data.source}: {len(data.pixels)} images, 32 px")

    implant = attack(stages, data, split, plan, out, target)
    run_dir, report = defend(stages, implant, len(split.decoder), plan, out)
    auc = ground_truth_auc(run_dir)
    verdict = encoder_verdict(run_dir)
    print_summary(out, run_dir, report, auc, verdict, time.time() - stages.started)
    return 0


def data_dirs(out: Path) -> tuple[Path, Path]:
    """Where the attacker writes the poisoned dataset and the defender's clean images are."""
    return out / "data" / "dataset", out / "data" / "decoder-train"


def attack(stages: Stages, data: DemoData, split: Split, plan: DemoPlan, out: Path, target: int) -> Implant:
    """The attacker's stages: a backdoor implanted into the encoder, the dataset poisoned (and the
    defender's clean images written beside it, under out/data); returns the kit's Implant."""
    from sanitizer.device import one_torch_thread

    what = f"the class '{data.class_names[target]}'" if data.labels is not None else "one fixed image"
    stages.start(f"attacker: implanting a BadEncoder backdoor into {ENCODER} (red-team kit)")
    stages.note("seeded random weights stand in for an encoder downloaded from a third party")
    stages.note(f"trigger: a white 10x10 square; triggered images should embed like {what}")
    with one_torch_thread():
        implant = implant_backdoor(data, split, plan, out / "victim", target)
    stages.note(f"victim encoder weights: {implant.weights}")
    if implant.report is not None:
        r = implant.report
        stages.note(
            f"attack success rate {r.asr:.1%} (chance {r.chance:.0%}), clean accuracy {r.clean_accuracy:.1%}"
        )

    stages.start("attacker: poisoning the dataset")
    dataset_dir, decoder_data = data_dirs(out)
    n_poisoned = write_dataset(data, split, plan, dataset_dir, target)
    write_decoder_data(data, split, decoder_data)
    stages.note(f"{len(split.dataset)} image-caption samples, {n_poisoned} with the trigger: {dataset_dir}")
    return implant


def defend(stages: Stages, implant: Implant, n_clean: int, plan: DemoPlan, out: Path) -> tuple[Path, Path]:
    """The defender's stages: a decoder trained on the `n_clean` clean images, the dataset scored,
    cleaned and reported; returns the run directory and the report page."""
    from sanitizer.clean import clean_run
    from sanitizer.decoder_meta import ScoreSettings
    from sanitizer.device import one_torch_thread
    from sanitizer.pipeline.job import ScoreJob, run_score_job
    from sanitizer.report import write_report
    from sanitizer.train import TrainSettings, train_decoder

    dataset_dir, decoder_data = data_dirs(out)
    stages.start(f"defender: training the DeDe decoder on {n_clean} clean images")
    decoder_dir = out / "decoder"
    with one_torch_thread():
        meta = train_decoder(
            implant.encoder,
            str(decoder_data),
            decoder_dir,
            # 1800 held-out images, not the default 5%: the verdict allows for how well the
            # calibration pins the false-positive rate down (150 images: +-1.6%; 1800: +-0.4%).
            # One pass (refit=0): this defender's images are clean, and a second pass would only
            # leave out the hardest clean ones (with it: AUC 0.941 and p = 0.06, session 9).
            TrainSettings(epochs=plan.decoder_epochs, seed=SEED, holdout=plan.holdout, refit=0),
            ScoreSettings(num_masks=plan.num_masks),
            plan.decoder_model,
            str(implant.weights.resolve()),
        )
    training = meta["training"]
    stages.note(
        f"{training['epochs']} epochs on {training['n_train']} images in {training['seconds']} s, "
        f"{meta['calibration']['n']} held out to calibrate the threshold: {decoder_dir}"
    )

    stages.start("defender: scoring the dataset with the Ray pipeline")
    run_dir = out / "run"
    summary = run_score_job(
        ScoreJob(decoder_dir=decoder_dir, data=str(dataset_dir), out=run_dir, workers=None)
    )
    by = summary.flagged_by
    stages.note(
        f"{summary.ok} samples scored, {summary.flagged} flagged: {by['score']} by score (threshold "
        f"{summary.threshold:.4g}), {by['collapse']} by the collapse pass"
    )

    stages.start("defender: cleaning")
    cleaned = clean_run(run_dir)
    stages.note(f"kept {cleaned.kept}, quarantined {cleaned.quarantined}")

    stages.start("defender: writing the audit report")
    return run_dir, write_report(run_dir)


def print_summary(
    out: Path, run_dir: Path, report: Path, auc: float | None, verdict: dict, seconds: float
) -> None:
    auc_text = f"{auc:.3f}" if auc is not None else "n/a (no ground truth)"
    lines = [
        "",
        f"demo finished in {seconds:.0f} s",
        f"detection AUC (ground truth in the shards): {auc_text}",
        f"verdict: {verdict['text']}",
        f"manifest:       {run_dir / 'manifest'}",
        f"clean shards:   {run_dir / 'clean'}",
        f"quarantine:     {run_dir / 'quarantine'}",
        f"report:         {report}",
        f"everything:     {out}",
    ]
    print("\n".join(lines), flush=True)
    sys.stdout.flush()
