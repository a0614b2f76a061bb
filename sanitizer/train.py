"""Train a DeDe decoder for a frozen victim encoder, then calibrate it on held-out images.

The encoder is frozen and the reference method uses no augmentation, so each image's embedding is
computed once and reused every epoch: the encoder's cost is paid once, not once per epoch. A slice
of the images, chosen by key hash (so independent of shard order), is held out of training and
scored at the test mask ratio: the calibration that `quantile:Q` thresholds read.

Departures from the reference code, for speed on small budgets: AdamW with a short linear warm-up and
a cosine decay (the reference uses constant-rate Adam for 200 epochs), and epochs chosen from the
data size when not given.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sanitizer import checkpoint
from sanitizer.data.decode import decode_image
from sanitizer.data.shards import expand_shards
from sanitizer.data.tario import ShardError, iter_samples
from sanitizer.device import autocast
from sanitizer.encoders import VictimEncoder, embed_pixels
from sanitizer.errors import UsageError
from sanitizer.model import DedeConfig, DedeDecoder
from sanitizer.scoring import Scorer, ScoreSettings, key_seeds

log = logging.getLogger(__name__)

MIN_IMAGES = 20
SAMPLE_VISITS = 200_000  # epochs="auto" trains for about this many image visits (3 to 200 epochs)
# Share of the training steps before the loss is trimmed. At first every image is rebuilt badly and its
# error mostly says how much of the frame its content fills, so trimming then would drop large clean
# objects rather than images whose embedding does not describe them.
TRIM_AFTER = 0.2


@dataclass(frozen=True)
class TrainSettings:
    epochs: int | None = None  # None: chosen from the data size
    # Batch 128 at lr 4e-3 (the reference code: 256 at 1e-3). The decoder is limited by its number of
    # steps: on bench/detection.py (20 epochs of 6000 images) batch 256 at 4e-3 lost 0.01-0.04 AUC on
    # DRUPE and blend, and 1e-3 left every decoder under-trained (training loss 0.39 against 0.31 on
    # DRUPE; DRUPE's AUC 0.951 against 0.970, blend's 0.942 against 0.970).
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 1e-6
    mask_ratio: float = 0.9
    max_samples: int = 50_000
    # Share held out for calibration (at most 2000 images). The report's verdict allows for how well
    # that many scores pin the false-positive rate down, so more held-out images give it more power.
    holdout: float = 0.05
    # Share of each batch, the worst-rebuilt images, left out of the loss after TRIM_AFTER of the steps.
    # The training data may hold triggered images; a decoder that learns to rebuild them from their
    # hijacked embeddings stops flagging them. On bench/detection.py with 1% of the decoder's images
    # triggered, 0.05 recovered the AUC of a decoder trained on clean images only at lr 1e-3. A better
    # trained decoder (lr 4e-3) learns more of them: the CLIP patch fell from 0.960 to 0.855 at trim
    # 0.05 and rose to 0.990 at 0.15 (0.25: no better). 0: the paper's loss.
    trim: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.holdout < 1:
            raise UsageError(f"--holdout must be in (0, 1), not {self.holdout}")
        if not 0 <= self.trim < 0.5:
            raise UsageError(f"--trim must be in [0, 0.5), not {self.trim}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageSet:
    pixels: np.ndarray  # (N, H, W, 3) uint8
    keys: list[str]
    statuses: Counter  # decode outcome of every sample read, "ok" included


def load_images(data: str, size: int, max_samples: int) -> ImageSet:
    """Decodable images from shards, up to max_samples; every other sample is counted, not fatal."""
    pixels, keys, statuses = [], [], Counter()
    for shard in expand_shards(data):
        try:
            for sample in iter_samples(shard.url):
                decoded = decode_image(sample, size)
                statuses[decoded.status] += 1
                if decoded.status == "ok":
                    pixels.append(decoded.pixels)
                    keys.append(sample.key)
                if len(keys) >= max_samples:
                    break
        except ShardError as e:
            statuses["unreadable_shard"] += 1
            log.warning("skipping %s", e)
        if len(keys) >= max_samples:
            break
    if len(keys) < MIN_IMAGES:
        found = ", ".join(f"{k}={v}" for k, v in sorted(statuses.items())) or "no samples"
        raise UsageError(f"{data} has {len(keys)} decodable images ({found}); training needs {MIN_IMAGES}")
    return ImageSet(np.stack(pixels), keys, statuses)


def split_holdout(keys: list[str], share: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, holdout indices): the holdout is the keys with the smallest hashes."""
    order = np.argsort(key_seeds(keys), kind="stable")
    n_holdout = min(2000, max(1, round(share * len(keys))))
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def auto_epochs(n_train: int) -> int:
    return int(min(200, max(3, math.ceil(SAMPLE_VISITS / n_train))))


def lr_at(step: int, total: int, base: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to a tenth of the base rate."""
    warmup = max(1, total // 20)
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def on_device(array: np.ndarray, device: torch.device, share: float = 0.25) -> np.ndarray | torch.Tensor:
    """On CUDA, the array as a device tensor when it fits in `share` of the free memory (training data
    then crosses the bus once, not every epoch); otherwise, and on the CPU, the array unchanged."""
    if device.type != "cuda" or array.nbytes > share * torch.cuda.mem_get_info(device)[0]:
        return array
    return torch.from_numpy(array).to(device)


def _rows(data: np.ndarray | torch.Tensor, idx: np.ndarray, device: torch.device) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data[torch.from_numpy(idx).to(data.device)]
    return torch.from_numpy(data[idx]).to(device, non_blocking=True)


def train_epoch(
    decoder: DedeDecoder,
    optimizer: torch.optim.Optimizer,
    encoder: VictimEncoder,
    pixels: np.ndarray | torch.Tensor,
    embeddings: np.ndarray | torch.Tensor,
    settings: TrainSettings,
    epoch: int,
    total_steps: int,
    bar: tqdm,
) -> float:
    """One pass in a seeded order; returns the mean loss over hidden patches (of the images kept).

    The losses stay on the device until the epoch ends (the progress bar reads one every 25 steps),
    so the host never waits for the device mid-epoch.
    """
    device = encoder.device
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + epoch)
    order = torch.randperm(len(pixels), generator=gen).numpy()
    steps = math.ceil(len(pixels) / settings.batch_size)
    losses = []
    trim_from = round(TRIM_AFTER * total_steps)
    decoder.train()
    for i in range(steps):
        idx = np.sort(order[i * settings.batch_size : (i + 1) * settings.batch_size])
        step = epoch * steps + i
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, settings.lr)
        images = encoder.normalize(_rows(pixels, idx, device))
        noise = torch.rand(len(idx), decoder.config.num_patches, generator=gen).to(device)
        trim = settings.trim if step >= trim_from else 0.0
        with autocast(device):
            loss, _, _ = decoder(images, _rows(embeddings, idx, device), settings.mask_ratio, noise, trim)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        bar.update(len(idx))
        if not bar.disable and (i % 25 == 0 or i == steps - 1):
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1].item():.4f}")
    return float(np.mean(torch.stack(losses).cpu().numpy().astype(np.float64)))


@dataclass
class FitResult:
    decoder: DedeDecoder
    calibration: np.ndarray  # scores of the held-out images at the test settings
    epochs: int
    losses: list[float]  # mean training loss of each epoch
    n_train: int
    seconds: float


def fit_decoder(
    encoder: VictimEncoder,
    images: ImageSet,
    settings: TrainSettings = TrainSettings(),
    score_settings: ScoreSettings = ScoreSettings(),
    model_overrides: dict | None = None,
    resume_dir: Path | None = None,
    progress: bool = True,
) -> FitResult:
    """Train on in-memory images, checkpointing each epoch to resume_dir if given, then calibrate."""
    torch.manual_seed(settings.seed)
    config = DedeConfig.default_for(
        encoder.preprocess.image_size, encoder.embed_dim, **(model_overrides or {})
    )
    train_idx, holdout_idx = split_holdout(images.keys, settings.holdout)
    epochs = settings.epochs or auto_epochs(len(train_idx))
    started = time.time()
    pixels = images.pixels[train_idx]
    embeddings = on_device(embed_pixels(encoder, pixels), encoder.device)
    pixels_in = on_device(pixels, encoder.device)

    decoder = DedeDecoder(config).to(encoder.device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    plan = {
        "settings": settings.to_dict(),
        "epochs": epochs,
        "model": config.to_dict(),
        "n_train": len(pixels),
    }
    state = checkpoint.load_training_state(resume_dir, decoder, optimizer) if resume_dir else None
    if state is not None and state["plan"] != plan:
        raise UsageError(
            f"{resume_dir} holds an unfinished training run with other settings; use another --out"
        )
    start_epoch = state["epoch"] if state else 0
    losses = state["losses"] if state else []
    total_steps = epochs * math.ceil(len(pixels) / settings.batch_size)
    bar = tqdm(
        total=epochs * len(pixels),
        initial=start_epoch * len(pixels),
        unit="img",
        desc="train",
        disable=not progress,
        dynamic_ncols=True,
    )
    for epoch in range(start_epoch, epochs):
        losses.append(
            train_epoch(decoder, optimizer, encoder, pixels_in, embeddings, settings, epoch, total_steps, bar)
        )
        if resume_dir:
            progress_state = {"plan": plan, "epoch": epoch + 1, "losses": losses}
            checkpoint.save_training_state(resume_dir, decoder, optimizer, progress_state)
    bar.close()

    holdout_keys = [images.keys[i] for i in holdout_idx]
    calibration = Scorer(encoder, decoder, score_settings).score(
        images.pixels[holdout_idx], key_seeds(holdout_keys)
    )
    return FitResult(decoder, calibration.score, epochs, losses, len(pixels), time.time() - started)


def train_decoder(
    encoder: VictimEncoder,
    data: str,
    out_dir: Path,
    settings: TrainSettings = TrainSettings(),
    score_settings: ScoreSettings = ScoreSettings(),
    model_overrides: dict | None = None,
    encoder_weights: str | None = None,
    progress: bool = True,
) -> dict:
    """Train (or resume) on shards and calibrate; writes DECODER_DIR and returns its decoder.json."""
    out_dir = Path(out_dir)
    if (out_dir / checkpoint.META).is_file():
        raise UsageError(f"{out_dir} already holds a trained decoder; choose another --out")
    config = DedeConfig.default_for(
        encoder.preprocess.image_size, encoder.embed_dim, **(model_overrides or {})
    )
    score_settings.check_patch_size(config.patch_size)
    images = load_images(data, encoder.preprocess.image_size, settings.max_samples)
    fit = fit_decoder(encoder, images, settings, score_settings, model_overrides, out_dir, progress)
    meta = {
        "encoder": {
            "spec": encoder.spec,
            "weights_file": encoder_weights,
            "weights_sha256": encoder.weights_sha256,
            "embed_dim": encoder.embed_dim,
            "preprocess": encoder.preprocess.to_dict(),
        },
        "training": {
            **settings.to_dict(),
            "epochs": fit.epochs,
            "data": data,
            "n_train": fit.n_train,
            "decode_statuses": dict(sorted(images.statuses.items())),
            "epoch_losses": [round(x, 6) for x in fit.losses],
            "seconds": round(fit.seconds, 1),
        },
        "scoring": score_settings.to_dict(),
        "calibration": {"n": int(len(fit.calibration)), "scores": [float(x) for x in fit.calibration]},
    }
    meta = checkpoint.save_decoder(out_dir, fit.decoder.cpu(), meta)
    checkpoint.clear_training_state(out_dir)
    return meta
