"""The test-time score: how badly the decoder rebuilds an image when almost every patch is hidden.

Departures from the reference code: the score is averaged over several masks (less noise than the
reference's single mask); each mask is derived from the sample's key, so the same sample gets the same
score whatever the batch, worker or shard order; and the embedding token is relaxed a little before
the rebuild is measured (see `relax_token`).
Batches are cut into fixed-shape, zero-padded micro-batches so that kernel choice cannot depend on
how many samples happened to arrive together.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from sanitizer.collapse import NO_AXIS, SKETCH_DIM
from sanitizer.decoder_meta import QUANTILES, AxisScale, ScoreSettings
from sanitizer.device import autocast
from sanitizer.encoders import VictimEncoder
from sanitizer.model import DedeDecoder, num_visible
from sanitizer.neighbours import embedding_axis, embedding_sketch

# SSIM's stabilisers in the encoder's normalised pixel space (one unit is about 0.23 of the 0-1 range
# for ImageNet statistics). C2 sits above SSIM's usual (0.03 * range)^2 so that a faint pattern on a
# flat background (the blend trigger) is not a structural mismatch: measured on bench/detection.py,
# 0.03 raised the blend control's AUC by 0.05 against 0.1, and 0.3 lowered the victims' AUC.
SSIM_C1, SSIM_C2 = 0.01, 0.1
_MASK32 = 0xFFFFFFFF


def nonfinite_reason(score: float, norm: float) -> str:
    """The error of a `nonfinite_score` row: whether the encoder's embedding was already not finite."""
    if not np.isfinite(norm):
        return f"score is {score}: the encoder's embedding of this image is not finite (norm {norm})"
    return f"score is {score}, though the encoder's embedding is finite (norm {norm:.6g})"


def key_seeds(keys: Iterable[str]) -> np.ndarray:
    """A 64-bit seed per sample key (blake2b), stable across processes and machines."""
    return np.array(
        [
            int.from_bytes(
                hashlib.blake2b(k.encode("utf-8", "surrogateescape"), digest_size=8).digest(),
                "little",
                signed=True,
            )
            for k in keys
        ],
        dtype=np.int64,
    )


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int64 tensors holding 32-bit values: a fast, vectorised hash."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def mask_noise(seeds: torch.Tensor, num_patches: int, mask_index: int) -> torch.Tensor:
    """(B, L) sort keys for random_masking, a pure function of (seed, mask index, patch index)."""
    lo = (seeds & _MASK32).unsqueeze(1)
    hi = ((seeds >> 32) & _MASK32).unsqueeze(1)
    patch = torch.arange(num_patches, device=seeds.device).unsqueeze(0)
    counter = _fmix32((patch + mask_index * num_patches + 0x9E3779B9) & _MASK32)
    return _fmix32(lo ^ _fmix32(hi ^ counter))


def patch_dissimilarity(
    decoder: DedeDecoder, imgs: torch.Tensor, pred: torch.Tensor, pool: int
) -> torch.Tensor:
    """1 - SSIM of each patch against its rebuild, (B, L): per channel over the patch's (pooled)
    pixels, then averaged over channels. 0 for a perfect rebuild, up to 2 for an inverted one."""
    x = decoder.patch_blocks(imgs.float(), pool)
    y = decoder.patch_blocks(decoder.unpatchify(pred.float()), pool)
    mx, my = x.mean(-1), y.mean(-1)
    vx, vy = x.var(-1, unbiased=False), y.var(-1, unbiased=False)
    cov = ((x - mx.unsqueeze(-1)) * (y - my.unsqueeze(-1))).mean(-1)
    ssim = (2 * mx * my + SSIM_C1) * (2 * cov + SSIM_C2) / ((mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2))
    return 1 - ssim.mean(-1)


def patch_error(
    decoder: DedeDecoder, imgs: torch.Tensor, pred: torch.Tensor, error: str, pool: int
) -> torch.Tensor:
    """(B, L) error of each patch: 1 - SSIM or the squared error (ERRORS), on `pool`-pixel blocks."""
    if error == "ssim":
        return patch_dissimilarity(decoder, imgs, pred, pool)
    return decoder.patch_errors(imgs, pred, pool)


def aggregate_errors(errors: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L) per-patch errors and masks -> (B,) one error per sample, over hidden patches."""
    if how == "mean":
        return (errors * mask).sum(1) / mask.sum(1).clamp(min=1)
    # Visible patches as NaN, which nanquantile leaves out: no count read back from the device, so
    # the host never waits for it here (the same values, bit for bit, as selecting the hidden ones).
    return errors.float().masked_fill(~mask.bool(), float("nan")).nanquantile(QUANTILES[how], dim=1)


def row_errors(
    decoder: DedeDecoder,
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    settings: ScoreSettings,
    on_axis: torch.Tensor,
) -> torch.Tensor:
    """(B,) one error per sample: the settings' error and aggregate over the hidden patches, or their
    axis_error and axis_aggregate where the embedding sits on one axis (`on_axis`, (B,) bool), whose
    rebuild is one image for the whole axis. Both are computed for every row, so that no count is
    read back from the device."""
    s = settings
    patches = patch_error(decoder, imgs, pred, s.error, s.error_pool)
    error = aggregate_errors(patches, mask, s.aggregate)
    if not s.needs_axis_scale:
        return error
    if s.axis_error != s.error:  # else the same patch errors, aggregated otherwise
        patches = patch_error(decoder, imgs, pred, s.axis_error, s.error_pool)
    return torch.where(on_axis, aggregate_errors(patches, mask, s.axis_aggregate), error)


def relax_token(
    decoder: DedeDecoder,
    images: torch.Tensor,
    latent: torch.Tensor,
    mask: torch.Tensor,
    ids_restore: torch.Tensor,
    settings: ScoreSettings,
    on_axis: torch.Tensor,
) -> torch.Tensor:
    """`latent` with its embedding token (position 0) moved `relax_steps` signed-gradient steps
    towards a better rebuild, each radius/steps in every coordinate.

    Why: part of a clean image's error is nuisance that a small nudge of its embedding removes (the
    embedding is close to one that describes the image), while a backdoored embedding points at the
    attacker's target, too far away for a small nudge to help. Every sample gets the same absolute
    budget: a budget relative to the embedding's size would let larger embeddings move further. Each
    row's gradient depends on that row alone, so scores stay independent of the batch. On
    bench/detection.py (3 steps) the TPR at 5% FPR rose by 0.00-0.04 on the implanted attacks at
    radius 0.03 and by 0.01-0.06 at 0.12, the controls' AUC fell or rose by 0.013 at most; on the demo's
    randomly initialised victim the AUC fell, by 0.010 at 0.03 and 0.051 at 0.12.
    """
    step = settings.relax_radius / settings.relax_steps
    token, rest = latent[:, :1].float(), latent[:, 1:].detach()
    with torch.enable_grad():
        for _ in range(settings.relax_steps):
            token = token.detach().requires_grad_(True)
            pred = decoder.forward_decoder(torch.cat([token.to(rest.dtype), rest], dim=1), ids_restore)
            error = row_errors(decoder, images, pred, mask, settings, on_axis)
            (grad,) = torch.autograd.grad(error.sum(), token)
            token = token - step * grad.sign()
    return torch.cat([token.detach().to(rest.dtype), rest], dim=1)


@dataclass
class Scores:
    per_mask: np.ndarray  # (N, K) float32: the error under each of the K masks
    embedding_norm: np.ndarray  # (N,) float32: L2 norm of the raw victim embedding
    sketch: np.ndarray  # (N, SKETCH_DIM) float16: the embedding's sketch, for the collapse pass
    axis: np.ndarray  # (N,) int32: the feature an embedding without a sketch sits on, for the same

    @property
    def score(self) -> np.ndarray:
        """(N,) float32: the mean over masks."""
        return self.per_mask.mean(1)

    @property
    def score_std(self) -> np.ndarray:
        """(N,) float32: the spread over masks."""
        return self.per_mask.std(1)

    def with_axis_rows(self, by_axis: Scores, scale: AxisScale) -> Scores:
        """These scores, with each row on an axis taking its errors from `by_axis` (the same rows
        scored by the axis aggregate) put on this aggregate's scale."""
        on_axis = (self.axis != NO_AXIS)[:, None]
        return replace(self, per_mask=np.where(on_axis, scale(by_axis.per_mask), self.per_mask))


def calibrate(
    score_held_out: Callable[[ScoreSettings], Scores], settings: ScoreSettings
) -> tuple[Scores, AxisScale | None]:
    """The held-out images' scores at `settings` (`score_held_out` scores them with the settings it
    is given), and the AxisScale the settings need: None where every row is measured alike. Else each
    way (the aggregate and error, the axis aggregate and axis error) scores every held-out image alone,
    the scale matches the two by rank, and the rows on an axis take their axis errors on that scale,
    as Scorer(..., scale) gives them."""
    if not settings.needs_axis_scale:
        return score_held_out(settings), None
    by_aggregate = score_held_out(settings.alone(settings.aggregate, settings.error))
    by_axis = score_held_out(settings.alone(settings.axis_aggregate, settings.axis_error))
    scale = AxisScale.fit(by_axis.per_mask, by_aggregate.per_mask)
    return by_aggregate.with_axis_rows(by_axis, scale), scale


class Scorer:
    """Encoder + decoder on one device; scores uint8 images given their key seeds. Settings with an
    axis aggregate of its own need the decoder's AxisScale (decoder_meta.axis_scale_for)."""

    def __init__(
        self,
        encoder: VictimEncoder,
        decoder: DedeDecoder,
        settings: ScoreSettings,
        axis_scale: AxisScale | None = None,
        micro_batch: int = 256,
        compile: bool = False,
    ) -> None:
        self.encoder = encoder
        self.decoder = decoder.eval().requires_grad_(False)
        self.settings = settings
        settings.check_patch_size(decoder.config.patch_size)
        if (axis_scale is not None) != settings.needs_axis_scale:
            raise ValueError(f"an AxisScale goes with an axis aggregate of its own: {settings}, {axis_scale}")
        self.axis_scale = axis_scale
        self.micro_batch = micro_batch
        self.device = encoder.device
        self._staging: dict[str, torch.Tensor] = {}  # reused host buffers: one thread per Scorer
        if compile and self.device.type == "cuda":  # one fixed shape, so one compiled graph
            self.forward = torch.compile(self.forward, dynamic=False)

    def score(self, pixels: np.ndarray, seeds: np.ndarray, embeddings: np.ndarray | None = None) -> Scores:
        """Scores of (N, H, W, 3) uint8 images; rows are independent of each other. `embeddings`, the
        images' victim embeddings when the caller has them already, spares the encoder pass.

        The batch goes to the device in one copy (from a reused pinned buffer on CUDA), every
        micro-batch is queued without waiting for the one before, and the results come back in one
        copy at the end: no per-micro-batch synchronisation, no per-sample Python.
        """
        n, m = len(pixels), self.micro_batch
        if n == 0:
            empty = np.zeros(0, np.float32)
            return Scores(empty[:, None], empty, np.zeros((0, SKETCH_DIM), np.float16), np.zeros(0, np.int32))
        rows = -(-n // m) * m  # whole micro-batches; the padding rows are zeros, dropped afterwards
        with torch.no_grad():  # not inference_mode: relax_token needs autograd
            x = self._on_device("pixels", pixels, rows)
            s = self._on_device("seeds", np.asarray(seeds, np.int64), rows)
            e = None if embeddings is None else self._on_device("embeddings", embeddings, rows)
            parts = [
                self.forward(x[i : i + m], s[i : i + m], None if e is None else e[i : i + m])
                for i in range(0, rows, m)
            ]
            scores = Scores(*(torch.cat(t)[:n].cpu().numpy() for t in zip(*parts, strict=True)))
        return scores if self.axis_scale is None else scores.with_axis_rows(scores, self.axis_scale)

    def _on_device(self, name: str, array: np.ndarray, rows: int) -> torch.Tensor:
        """`array` zero-padded to `rows` rows, on the device.

        Staged in a buffer kept across calls (pinned on CUDA, so the copy to the device is
        asynchronous); the buffer is free again once the call's results have come back.
        """
        cuda = self.device.type == "cuda"
        if not cuda and len(array) == rows and array.flags.writeable and array.flags.c_contiguous:
            return torch.from_numpy(array)
        shape = (rows, *array.shape[1:])
        size = math.prod(shape)
        buffer = self._staging.get(name)
        if buffer is None or buffer.numel() < size or buffer.numpy().dtype != array.dtype:
            buffer = torch.from_numpy(np.zeros(size, array.dtype))
            self._staging[name] = buffer = buffer.pin_memory() if cuda else buffer
        host = buffer[:size].view(shape)
        staged = host.numpy()
        staged[: len(array)] = array
        staged[len(array) :] = 0
        return host.to(self.device, non_blocking=True)

    def forward(
        self, pixels: torch.Tensor, seeds: torch.Tensor, embedding: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, W, 3) uint8 and (B,) seeds on the device, and the (B, D) embeddings if known ->
        (B, K) errors, (B,) embedding norms, (B, SKETCH_DIM) float16 sketches and (B,) axes there."""
        x = self.encoder.normalize(pixels)
        with autocast(self.device):
            if embedding is None:
                embedding = self.encoder.embed(x)
            per_mask = self.errors_given_embedding(x, embedding, seeds)
        embedding = embedding.float()
        return (
            per_mask.float(),
            embedding.norm(dim=1),
            embedding_sketch(embedding).half(),
            embedding_axis(embedding),
        )

    def errors_given_embedding(
        self, images: torch.Tensor, embedding: torch.Tensor, seeds: torch.Tensor
    ) -> torch.Tensor:
        """(B, K) aggregated reconstruction error for each of the K key-seeded masks (K=1 if none visible)."""
        s, dec = self.settings, self.decoder
        # With no visible patch every mask is the same: the image is rebuilt from the embedding alone.
        distinct = s.num_masks if num_visible(dec.config.num_patches, s.test_mask_ratio) else 1
        on_axis = embedding_axis(embedding) != NO_AXIS
        out = []
        for k in range(distinct):
            pred, mask = self.rebuild(images, embedding, seeds, k, on_axis)
            out.append(row_errors(dec, images, pred, mask, s, on_axis))
        return torch.stack(out, dim=1)

    def rebuild(
        self,
        images: torch.Tensor,
        embedding: torch.Tensor,
        seeds: torch.Tensor,
        mask_index: int,
        on_axis: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, p*p*3) rebuild under the key-seeded mask `mask_index`, relaxed as the settings say
        (`on_axis`: which embeddings sit on one axis, row_errors), and the (B, L) mask."""
        s, dec = self.settings, self.decoder
        noise = mask_noise(seeds, dec.config.num_patches, mask_index)
        latent, mask, ids_restore = dec.forward_encoder(images, embedding, s.test_mask_ratio, noise)
        if s.relax_steps:
            latent = relax_token(dec, images, latent, mask, ids_restore, s, on_axis)
        return dec.forward_decoder(latent, ids_restore), mask

    @torch.no_grad()
    def reconstruct(self, pixels: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First-mask rebuilds (as scored) as uint8 images, and the (N, L) masks: for the audit report."""
        x = self.encoder.normalize(torch.from_numpy(pixels).to(self.device))
        with autocast(self.device):
            embedding = self.encoder.embed(x)
            on_axis = embedding_axis(embedding) != NO_AXIS
            pred, mask = self.rebuild(x, embedding, torch.from_numpy(seeds).to(self.device), 0, on_axis)
        return self.encoder.to_pixels(self.decoder.unpatchify(pred.float())), mask.cpu().numpy()
