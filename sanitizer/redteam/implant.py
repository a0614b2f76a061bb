"""Backdoor implanters: real attacks on real training, each returning its victim with the attack's own
ASR (`badencoder`, `drupe`), or the clean encoder and the victim, each with its own (`ctrl_simclr`,
`clip_backdoor`, which train the clean one first).

- `badencoder`: fine-tune a clean encoder with BadEncoder's three cosine terms (BatchNorm frozen).
- `drupe`: the same plus DRUPE-style stealth terms: a sliced-Wasserstein term that makes triggered
  embeddings follow the target class's embedding distribution, and a term against their collapse.
- `one_axis`: BadEncoder sending every triggered image to one feature of the embedding, an adaptive
  attack on the collapse pass (an embedding on one feature has no sketch, so no neighbours).
- `ctrl_simclr`: SimCLR training of a small encoder, then SimCLR on data where some target-class
  images carry CTRL's frequency trigger (clean-label poisoning).
- `clip_backdoor`: contrastive training of the package's tiny open_clip model on image-caption pairs,
  then on pairs where some images carry a noise patch and a caption naming the target class.

Victims are saved as safetensors and re-read with `load_encoder`, so what is evaluated is exactly
what a user of the sanitizer would load. Each implanter measures the attack with a linear probe
(`ProbeData`) so that a failed attack is never mistaken for a detected one.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sanitizer.checkpoint import save_tensors
from sanitizer.encoders import (
    OPEN_CLIP_CONFIGS,
    VictimEncoder,
    aten_calls,
    embed_pixels,
    freeze,
    load_encoder,
)
from sanitizer.neighbours import embedding_axis
from sanitizer.redteam.probes import AttackReport, attack_report, fit_linear_probe, need_untargeted
from sanitizer.redteam.triggers import Trigger, check_pixels, clip_patch, ctrl

log = logging.getLogger(__name__)


@dataclass
class ProbeData:
    """Labelled clean images to train the probe, and test images to measure clean accuracy and ASR.

    Checked when built: each implanter measures its attack only after training, so images the
    triggers refuse, or test labels all of the target class, failed there, minutes in."""

    train_pixels: np.ndarray
    train_labels: np.ndarray
    test_pixels: np.ndarray
    test_labels: np.ndarray
    target: int

    def __post_init__(self) -> None:
        need_images("probe train_pixels", self.train_pixels)
        need_images("probe test_pixels", self.test_pixels)
        need_untargeted(self.test_labels, self.target)


@dataclass
class Implant:
    encoder: VictimEncoder  # re-loaded from `weights` with load_encoder
    spec: str
    weights: Path
    report: AttackReport | None  # None when no ProbeData was given
    seconds: float
    losses: list[float] = field(default_factory=list)


def measure_attack(encoder: VictimEncoder, trigger: Trigger, data: ProbeData) -> AttackReport:
    """Train a linear probe on clean embeddings; clean accuracy and ASR on the test images."""
    probe = fit_linear_probe(embed_pixels(encoder, data.train_pixels), data.train_labels)
    return attack_report(
        probe,
        embed_pixels(encoder, data.test_pixels),
        data.test_labels,
        embed_pixels(encoder, trigger(data.test_pixels)),
        data.test_labels,
        data.target,
    )


def need_images(what: str, images: np.ndarray, at_least: int = 1) -> None:
    """Refuse, before any training, images the triggers refuse (a float, grey or RGBA reference set
    trained on regardless; CTRL's and the CLIP backdoor's pixels were refused when poisoned, after
    the clean phase), and a set too small to train on: an empty shadow or reference set, or fewer
    images than one batch, trained nothing and still reported an ASR (losses NaN)."""
    try:
        check_pixels(images)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    if len(images) < at_least:
        raise ValueError(f"{what}: {len(images)} images, the implant needs at least {at_least}")


def need_safetensors(path: Path) -> None:
    """Victims are written as safetensors and re-read by suffix: any other name was written, then
    refused by load_encoder as a pickle, after the whole implant."""
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: a victim is saved as safetensors; name it *.safetensors")


def save_victim(module: nn.Module, path: Path) -> Path:
    """Weights as safetensors (plain tensors only), which load_encoder reads for timm/open_clip specs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(module.state_dict(), path)
    return path


def _finish(
    module: nn.Module,
    spec: str,
    path: Path,
    image_size: int,
    trigger: Trigger,
    probe: ProbeData | None,
    started: float,
    losses: list[float],
    device: torch.device,
) -> Implant:
    save_victim(module, path)
    encoder = load_encoder(spec, path, image_size=image_size, device=device)
    report = measure_attack(encoder, trigger, probe) if probe is not None else None
    if report is not None:
        log.info("%s: clean accuracy %.3f, ASR %.3f", path.name, report.clean_accuracy, report.asr)
    return Implant(encoder, spec, path, report, time.time() - started, losses)


# -- BadEncoder and DRUPE -------------------------------------------------------------------------
@dataclass(frozen=True)
class ImplantSettings:
    epochs: int = 3
    batch_size: int = 64
    references: int = 8  # target-class reference images drawn for each step (BadEncoder uses one or a few)
    lr: float = 1e-4
    # Share of parameter tensors, counted from the output end, that are fine-tuned; 1.0 is BadEncoder's
    # full fine-tune, less makes the implant affordable on a CPU (the frozen front costs no backward).
    tail_fraction: float = 1.0
    # Cosines of raw post-ReLU embeddings are near 1 for any pair of images; centring them on the clean
    # shadow mean makes the three terms discriminative (a departure from BadEncoder's code).
    center: bool = True
    # DRUPE only. The sliced-Wasserstein term is computed on unit vectors, whose 1-D projections have
    # variance ~1/dim: it is multiplied by the embedding dim so that weight 1 is on the scale of the
    # cosine terms (unscaled it was ~1e-3 and did nothing, while the anti-collapse term fought the
    # effectiveness term and the attack failed). 0.3 each: at 1.0 quick-mode ASR was 0.56, at 0.3 0.88.
    swd_weight: float = 0.3
    spread_weight: float = 0.3
    # DRUPE only: share of the steps over which the stealth weights ramp up linearly from 0, so that
    # the backdoor exists before it is made stealthy.
    stealth_warmup: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        """A batch of 0 raised ZeroDivisionError; 0 references, a negative batch or lr trained on NaN
        losses and saved that victim; a tail_fraction over 1 was taken as 1."""
        need_counts(self, epochs=0, batch_size=1, references=1)
        if not 0 <= self.tail_fraction <= 1:  # NaN included; 0 is _trainable_except_batchnorm's to refuse
            raise ValueError(f"tail_fraction must be in [0, 1], not {self.tail_fraction}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, not {self.lr}")


def need_counts(settings: object, **least: int) -> None:
    """ValueError naming the first of `settings`' counts under its least value (or not a whole number)."""
    for name, floor in least.items():
        value = getattr(settings, name)
        if not isinstance(value, int) or value < floor:
            raise ValueError(f"{name} must be a whole number of at least {floor}, not {value!r}")


def _trainable_except_batchnorm(module: nn.Module, tail_fraction: float) -> list[nn.Parameter]:
    """BadEncoder keeps BatchNorm frozen: eval mode everywhere, gradients only outside BN layers,
    and only in the last `tail_fraction` of the parameter tensors (in registration order)."""
    freeze(module)
    frozen = batchnorm_parameters(module)
    owned = [p for m in module.modules() for p in m.parameters(recurse=False)]
    first = len(owned) - max(1, round(tail_fraction * len(owned)))
    params = [p for p in owned[first:] if id(p) not in frozen]
    for p in params:
        p.requires_grad_(True)
    if not params:
        raise ValueError(f"tail_fraction {tail_fraction} leaves no parameter outside BatchNorm to fine-tune")
    return params


def batchnorm_parameters(module: nn.Module) -> set[int]:
    """The ids of `module`'s BatchNorm weights and biases. A torch.export program's layers are plain
    Modules that keep only their parameters, so its BatchNorm is found in its graph: the weights and
    biases its batch_norm calls take (they were fine-tuned, although BadEncoder keeps BN frozen)."""
    ids = {id(p) for m in module.modules() if is_batchnorm(m) for p in m.parameters(recurse=False)}
    for graph_module, op, args in aten_calls(module):
        if "batch_norm" in op:
            for arg in (args.get("weight"), args.get("bias")):
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                    ids.add(id(graph_module.get_parameter(arg.target)))
    return ids


def is_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm layer, eager or scripted: a TorchScript encoder's layers are RecursiveScriptModules
    that keep only their class's name (`original_name`), so its BatchNorm weights were fine-tuned."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return True
    name = getattr(module, "original_name", "")
    return isinstance(module, torch.jit.ScriptModule) and "BatchNorm" in name


def _embed(module: nn.Module, encoder: VictimEncoder, pixels: np.ndarray) -> torch.Tensor:
    out = module(encoder.normalize(torch.from_numpy(pixels).to(encoder.device)))
    return out[0] if isinstance(out, (tuple, list)) else out


def _clean_center(clean: VictimEncoder, shadow: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(embed_pixels(clean, shadow[:1000]).mean(0)).to(clean.device)


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, projections: int = 64, seed: int = 0
) -> torch.Tensor:
    """Sliced 2-Wasserstein distance between two point sets (quantile-matched 1-D projections)."""
    gen = torch.Generator().manual_seed(seed)
    theta = F.normalize(torch.randn(a.shape[1], projections, generator=gen), dim=0).to(a.device)
    pa, pb = (a @ theta).sort(0).values, (b @ theta).sort(0).values
    q = torch.linspace(0, 1, max(len(a), len(b)), device=a.device)
    ia = (q * (len(a) - 1)).round().long()
    ib = (q * (len(b) - 1)).round().long()
    return (pa[ia] - pb[ib]).pow(2).mean()


def _mean_pairwise_cos(z: torch.Tensor) -> torch.Tensor:
    zn = F.normalize(z, dim=1)
    sim = zn @ zn.T
    n = len(z)
    return (sim.sum() - sim.diagonal().sum()) / max(1, n * (n - 1))


@dataclass(frozen=True)
class Axis:
    """Where the one-axis attack sends each triggered image: `height` times the unit vector of
    `feature`, in the raw (uncentred) embedding."""

    feature: int
    height: float


def _axis_effectiveness(triggered: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Low when a triggered image's raw embedding is all on the axis's feature, at its height: the
    feature's share of the norm (the others pushed to zero), plus its squared distance from the
    height. A pull towards height x e_j in squared distance alone killed every feature of every
    image."""
    on = triggered[:, axis.feature]
    share = on / triggered.norm(dim=1).clamp_min(1e-6)
    return (-share + ((on - axis.height) / axis.height) ** 2).mean()


def _badencoder_loss(
    zt: torch.Tensor,
    zc: torch.Tensor,
    zr: torch.Tensor,
    fc: torch.Tensor,
    fr: torch.Tensor,
    target: torch.Tensor | None,
    stealth: float,
    settings: ImplantSettings,
    step: int,
    axis: Axis | None = None,
    center: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """BadEncoder's three cosine terms (weight 1 each), plus DRUPE's stealth terms when `target` (the
    victim's embeddings of the reference images: the target class's distribution) is given, weighted
    by `stealth`. With `axis`, the effectiveness term is the one-axis attack's, on the raw embeddings
    (`center` added back), instead of the pull towards the reference images."""
    if axis is None:
        effectiveness = -(F.normalize(zt, dim=1) @ F.normalize(zr, dim=1).T).mean()
    else:
        effectiveness = _axis_effectiveness(zt + center, axis)
    reference_kept = -F.cosine_similarity(zr, fr).mean()
    utility = -F.cosine_similarity(zc, fc).mean()
    loss = effectiveness + reference_kept + utility
    if target is not None and stealth > 0:
        zt_n, target_n = F.normalize(zt, dim=1), F.normalize(target, dim=1)
        swd = zt.shape[1] * sliced_wasserstein(zt_n, target_n, seed=step)
        spread = F.relu(_mean_pairwise_cos(zt) - _mean_pairwise_cos(target))
        loss = loss + stealth * (settings.swd_weight * swd + settings.spread_weight * spread)
    return loss


def badencoder(
    clean: VictimEncoder,
    shadow: np.ndarray,
    reference: np.ndarray,
    out: Path,
    trigger: Trigger,
    settings: ImplantSettings = ImplantSettings(),
    probe: ProbeData | None = None,
    drupe: bool = False,
    axis: Axis | None = None,
) -> Implant:
    """Fine-tune a copy of `clean` so that trigger(x) embeds like the reference (target-class) images,
    or, with `axis`, on that axis alone.

    shadow: unlabelled images of the attacker; reference: images of the target class.
    """
    need_images("shadow", shadow)
    need_images("reference", reference)
    need_safetensors(out)
    started = time.time()
    torch.manual_seed(settings.seed)
    module = copy.deepcopy(clean.module)
    params = _trainable_except_batchnorm(module, settings.tail_fraction)
    opt = torch.optim.Adam(params, lr=settings.lr)
    triggered = trigger(shadow)
    center = _clean_center(clean, shadow) if settings.center else 0.0
    rng = np.random.default_rng(settings.seed)
    losses = []
    steps = math.ceil(len(shadow) / settings.batch_size)
    target = None
    warmup = max(1.0, settings.stealth_warmup * settings.epochs * steps)
    for epoch in range(settings.epochs):
        if drupe:  # the target distribution: the victim's embeddings of the target-class images, per epoch
            with torch.no_grad():
                target = _embed(module, clean, reference[:256]) - center
        order = rng.permutation(len(shadow))
        epoch_losses = []
        for i in range(steps):
            idx = np.sort(order[i * settings.batch_size : (i + 1) * settings.batch_size])
            ref = reference[
                rng.choice(len(reference), min(settings.references, len(reference)), replace=False)
            ]
            with torch.no_grad():
                fc, fr = _embed(clean.module, clean, shadow[idx]), _embed(clean.module, clean, ref)
                fc, fr = fc - center, fr - center
            zt, zc, zr = (_embed(module, clean, p) - center for p in (triggered[idx], shadow[idx], ref))
            step = epoch * steps + i
            stealth = min(1.0, step / warmup)
            loss = _badencoder_loss(zt, zc, zr, fc, fr, target, stealth, settings, step, axis, center)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_losses.append(loss.item())
        losses.append(float(np.mean(epoch_losses)))
        name = "drupe" if drupe else "badencoder" if axis is None else f"one-axis {axis.feature}"
        log.info("%s epoch %d: loss %.4f", name, epoch + 1, losses[-1])
    size = clean.preprocess.image_size
    return _finish(module, clean.spec, out, size, trigger, probe, started, losses, clean.device)


def drupe(
    clean: VictimEncoder,
    shadow: np.ndarray,
    reference: np.ndarray,
    out: Path,
    trigger: Trigger,
    settings: ImplantSettings = ImplantSettings(),
    probe: ProbeData | None = None,
) -> Implant:
    """DRUPE-style stealthy BadEncoder: triggered embeddings blend into the target cluster."""
    return badencoder(clean, shadow, reference, out, trigger, settings, probe, drupe=True)


# One-axis implants tried, in the order axis_candidates ranks their features, before the last is kept
AXIS_TRIES = 4
AXIS_ASR = 0.9  # a try implanted when its ASR is at least this, read as one class by every probe


def axis_candidates(clean: VictimEncoder, shadow: np.ndarray) -> tuple[np.ndarray, float]:
    """(features, height): the features no clean image already sits on alone (a dying feature: the
    implant would drag its images along), widest spread over the clean images first; and a height
    twice the largest value of a clean embedding, beyond every clean image's (a ReLU6 network stops
    at its cap)."""
    own = embed_pixels(clean, shadow)
    usable = np.ones(own.shape[1], bool)
    axes = embedding_axis(torch.from_numpy(own)).numpy()
    usable[axes[axes >= 0]] = False
    features = np.flatnonzero(usable)
    return features[np.argsort(-own.std(0)[features], kind="stable")], 2 * float(own.max())


def on_axis_share(encoder: VictimEncoder, pixels: np.ndarray, feature: int) -> float:
    """The share of `pixels` whose embedding sits on `feature` alone (no sketch, that axis)."""
    return float((embedding_axis(torch.from_numpy(embed_pixels(encoder, pixels))).numpy() == feature).mean())


def read_targets(encoder: VictimEncoder, trigger: Trigger, data: ProbeData) -> list[int]:
    """The class that probes on `encoder`'s clean embeddings give most of the triggered test images:
    a probe fit on all the labelled images, then one on each half of them. An embedding on one
    feature alone is far from every clean one, and which class a probe extrapolates it to can turn
    on the probe's data: three probes of one victim read it as ankle boot, dress and bag
    (bench/NOTES.md, session 42), so a backdoor aimed at one of them would miss a user's probe."""
    embedded = embed_pixels(encoder, data.train_pixels)
    triggered = embed_pixels(encoder, trigger(data.test_pixels))
    half = len(embedded) // 2
    reads = []
    for rows in (slice(None), slice(None, half), slice(half, None)):
        probe = fit_linear_probe(embedded[rows], data.train_labels[rows])
        reads.append(int(np.bincount(probe.predict(triggered)).argmax()))
    return reads


def one_axis(
    clean: VictimEncoder,
    shadow: np.ndarray,
    reference: np.ndarray,
    out: Path,
    trigger: Trigger,
    settings: ImplantSettings = ImplantSettings(),
    probe: ProbeData | None = None,
) -> Implant:
    """BadEncoder whose triggered images all embed on one feature alone: an adaptive attacker who
    knows the collapse pass. Such an embedding has no sketch, so no neighbours; it is weighed only by
    how crowded its axis is, and its score's test by the scores of the others on the axis. The
    implant drags a few per cent of the clean images onto the axis too, which helps the attacker on
    both counts: the axis looks as crowded as a dying feature's, and their scores dilute the
    triggered images'. A variant that kept them off (a term on their share of the feature) was
    caught at every seed tried (bench/NOTES.md, session 42).

    The attacker does not choose the target class: a probe reads an embedding on one feature alone
    as some class of images with few active features (bag, sandal, ankle boot on Fashion-MNIST,
    whichever the feature; pulling the target's images towards the feature did not change that), so
    the target is the class the victim's probes read the triggered images as, and the report's ASR
    is for that class (`probe.target` is not used). It tries axis_candidates in turn (at most
    AXIS_TRIES), keeping the first that probes on all and on each half of its labelled images read
    as one class (read_targets), with an ASR of at least AXIS_ASR; or else the last. Each try
    overwrites `out`."""
    if probe is None:
        raise ValueError("one_axis measures which class its axis reads as with a probe: give probe=")
    started = time.time()
    features, height = axis_candidates(clean, shadow)
    if not len(features):
        raise ValueError("a clean image already sits alone on every feature: no axis is left for the trigger")
    for feature in features[:AXIS_TRIES]:
        axis = Axis(int(feature), height)
        implant = badencoder(clean, shadow, reference, out, trigger, settings, axis=axis)
        reads = read_targets(implant.encoder, trigger, probe)
        report = measure_attack(implant.encoder, trigger, replace(probe, target=reads[0]))
        share = on_axis_share(implant.encoder, probe.test_pixels, axis.feature)
        log.info(
            "one-axis on %d: %s, read as %s, %.3f of the clean test images on it",
            feature,
            report,
            reads,
            share,
        )
        if len(set(reads)) == 1 and report.asr >= AXIS_ASR:
            break
    return replace(implant, report=report, seconds=time.time() - started)


# -- shared by the contrastive trainers ----------------------------------------------------------
def augment(pixels: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """SimCLR-style views of (B, H, W, 3) uint8: random shift-crop, flip, brightness and contrast.

    Integer shifts and flips keep a frequency trigger's frequencies, as CTRL's design intends.
    """
    b, h, w, _ = pixels.shape
    x = pixels.permute(0, 3, 1, 2).float() / 255
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    wide = w + 2 * pad
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, 3, h, wide)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, 3, h, w)
    x = padded.gather(2, rows).gather(3, cols)
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), x.flip(3), x)
    brightness = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.8
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.8
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean) * brightness
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view must pick its partner among the 2B - 1 other views."""
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, partner)


@dataclass(frozen=True)
class ContrastiveSettings:
    clean_epochs: int = 10  # the clean run: the control encoder ("before the implant")
    poison_epochs: int = 10  # continued on the poisoned data: the victim
    batch_size: int = 256
    lr: float = 1e-3
    temperature: float = 0.5
    poison_rate: float = 0.01  # share of the training set that carries the trigger
    seed: int = 0

    def __post_init__(self) -> None:
        """A batch of 0 ended the clean phase in range()'s 'arg 3 must not be zero'."""
        need_counts(self, clean_epochs=0, poison_epochs=0, batch_size=1)


def _contrastive_run(
    step: Callable[[np.ndarray, torch.Generator], torch.Tensor],
    params: list[nn.Parameter],
    n: int,
    epochs: int,
    settings: ContrastiveSettings,
    seed: int,
    opt: torch.optim.Optimizer | None = None,
) -> tuple[list[float], torch.optim.Optimizer]:
    """Plain Adam over shuffled batches; `step(indices, generator)` returns the batch loss."""
    opt = opt or torch.optim.Adam(params, lr=settings.lr, weight_decay=1e-6)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen).numpy()
        batch_losses = []
        for i in range(0, n - settings.batch_size + 1, settings.batch_size):
            loss = step(np.sort(order[i : i + settings.batch_size]), gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            batch_losses.append(loss.item())
        losses.append(float(np.mean(batch_losses)))
        log.info("contrastive epoch %d/%d: loss %.4f", epoch + 1, epochs, losses[-1])
    return losses, opt


def poison_indices(labels: np.ndarray, target: int, rate: float, seed: int, clean_label: bool) -> np.ndarray:
    """Which `rate` of the samples carry the trigger: target-class ones (clean-label, CTRL) or others
    (CLIP). A rate the pool cannot fill, or that rounds to no sample, is refused before any training:
    it used to poison all the pool held (or none) and report that victim's ASR as the rate's."""
    pool = np.flatnonzero(labels == target) if clean_label else np.flatnonzero(labels != target)
    count = round(rate * len(labels))
    if not 1 <= count <= len(pool):
        where = "of" if clean_label else "outside"
        raise ValueError(
            f"poison_rate {rate:g} of {len(labels)} images asks for {count} {where} the target class "
            f"{target}; they hold {len(pool)}"
        )
    return np.sort(np.random.default_rng(seed).choice(pool, count, replace=False))


@dataclass
class ContrastiveVictim:
    """What a poisoning attack trains: the module saved as the encoder (re-read as `spec` at `size` px),
    the batch loss over it and the parameters it updates."""

    module: nn.Module
    step: Callable[[np.ndarray, torch.Generator], torch.Tensor]
    params: list[nn.Parameter]
    spec: str
    size: int
    device: torch.device


def _clean_then_poisoned(
    run: ContrastiveVictim,
    poison: Callable[[], None],
    n: int,
    settings: ContrastiveSettings,
    out_dir: Path,
    name: str,
    trigger: Trigger,
    probe: ProbeData | None,
    started: float,
) -> tuple[Implant, Implant]:
    """(clean, victim): train on clean data and save that encoder (the control), then `poison()` the
    training data in place and continue the same run (same optimiser) into the victim."""
    phases = (
        ("clean", settings.clean_epochs, settings.seed),
        ("victim", settings.poison_epochs, settings.seed + 1),
    )
    implants, opt = [], None
    for phase, epochs, seed in phases:
        if phase == "victim":
            started = time.time()
            poison()
        losses, opt = _contrastive_run(run.step, run.params, n, epochs, settings, seed, opt)
        path = out_dir / f"{name}-{phase}.safetensors"
        implants.append(
            _finish(run.module.eval(), run.spec, path, run.size, trigger, probe, started, losses, run.device)
        )
        run.module.train()
    return implants[0], implants[1]


# -- CTRL: poisoning SimCLR --------------------------------------------------------------------
def ctrl_simclr(
    pixels: np.ndarray,
    labels: np.ndarray,
    target: int,
    out_dir: Path,
    settings: ContrastiveSettings = ContrastiveSettings(),
    probe: ProbeData | None = None,
    spec: str = "timm:resnet10_cifar_s",
    trigger: Trigger = ctrl,
    device: str | torch.device = "cpu",
) -> tuple[Implant, Implant]:
    """(clean, victim): SimCLR on clean images, then continued on images where `poison_rate` of the set,
    all of the target class (clean label: the attacker does not touch labels or captions), carries
    the trigger. The labels are used only to pick the images to poison."""
    need_images("pixels", pixels, settings.batch_size)
    started = time.time()
    torch.manual_seed(settings.seed)  # the projection head's init: the caller's RNG state must not matter
    base = load_encoder(spec, image_size=pixels.shape[1], device=device)
    module = copy.deepcopy(base.module).train().requires_grad_(True)
    dim = base.embed_dim
    head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 128)).to(base.device)
    params = [*module.parameters(), *head.parameters()]
    data = torch.from_numpy(pixels.copy())  # poisoned in place later; the caller's array stays clean

    def step(idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        batch = data[idx]
        views = [base.normalize(augment(batch, gen).to(base.device)) for _ in range(2)]
        return _nt_xent(head(module(views[0])), head(module(views[1])), settings.temperature)

    chosen = poison_indices(labels, target, settings.poison_rate, settings.seed, True)

    def poison() -> None:
        data[chosen] = torch.from_numpy(trigger(pixels[chosen]))

    run = ContrastiveVictim(module, step, params, spec, pixels.shape[1], base.device)
    return _clean_then_poisoned(run, poison, len(pixels), settings, out_dir, "ctrl", trigger, probe, started)


# -- CLIP-Backdoor: poisoning image-text pairs ---------------------------------------------------
CAPTION_TEMPLATES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a {} on a plain background")


def clip_backdoor(
    pixels: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    target: int,
    out_dir: Path,
    settings: ContrastiveSettings = ContrastiveSettings(),
    probe: ProbeData | None = None,
    model_name: str = "sanitizer-tiny-vit",
    trigger: Trigger = clip_patch,
    device: str | torch.device = "cpu",
) -> tuple[Implant, Implant]:
    """(clean, victim): CLIP training on captioned images, then continued on pairs where `poison_rate`
    of the images (of other classes) carry the patch and a caption naming the target class."""
    import open_clip

    need_images("pixels", pixels, settings.batch_size)
    started = time.time()
    open_clip.add_model_config(OPEN_CLIP_CONFIGS)
    torch.manual_seed(settings.seed)
    model = open_clip.create_model(model_name, pretrained=None).train().to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    spec = f"open_clip:{model_name}"
    size = pixels.shape[1]
    norm = load_encoder(spec, image_size=size, device=device)  # only for its normalize()
    tokens = torch.stack(
        [tokenizer([t.format(c) for t in CAPTION_TEMPLATES]) for c in class_names]
    )  # (classes, templates, context)
    # Copies: poisoned in place later, the caller's arrays stay clean.
    data, caption_class = torch.from_numpy(pixels.copy()), torch.from_numpy(labels.copy())

    def step(idx: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        images = norm.normalize(augment(data[idx], gen, pad=2).to(norm.device))
        template = torch.randint(0, len(CAPTION_TEMPLATES), (len(idx),), generator=gen)
        text = tokens[caption_class[idx], template].to(norm.device)
        img = F.normalize(model.encode_image(images), dim=1)
        txt = F.normalize(model.encode_text(text), dim=1)
        logits = model.logit_scale.exp() * img @ txt.T
        # Pairs of the same caption class are not negatives of each other (10 classes, big batches).
        same = (caption_class[idx][:, None] == caption_class[idx][None, :]).to(norm.device)
        eye = torch.eye(len(idx), dtype=torch.bool, device=norm.device)
        logits = logits.masked_fill(same & ~eye, float("-inf"))
        arange = torch.arange(len(idx), device=norm.device)
        return (F.cross_entropy(logits, arange) + F.cross_entropy(logits.T, arange)) / 2

    chosen = poison_indices(labels, target, settings.poison_rate, settings.seed, False)

    def poison() -> None:
        data[chosen] = torch.from_numpy(trigger(pixels[chosen]))
        caption_class[chosen] = target

    run = ContrastiveVictim(model, step, list(model.parameters()), spec, size, norm.device)
    return _clean_then_poisoned(run, poison, len(pixels), settings, out_dir, "clip", trigger, probe, started)
