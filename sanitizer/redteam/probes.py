"""Probes on frozen embeddings: clean accuracy and attack success rate (ASR) of a backdoor.

ASR is the share of triggered test images whose true class is not the target that a probe trained on
clean labelled embeddings assigns to the target: an implanter reports it so that a failed attack is
never mistaken for a detected one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class LinearProbe:
    """Softmax regression on standardised embeddings."""

    weight: torch.Tensor  # (classes, D), as nn.Linear keeps it
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(embeddings).float() - self.mean) / self.std
        return F.linear(x, self.weight, self.bias).argmax(1).numpy()


def fit_linear_probe(
    embeddings: np.ndarray, labels: np.ndarray, steps: int = 300, weight_decay: float = 1e-3, seed: int = 0
) -> LinearProbe:
    """Full-batch Adam on cross-entropy: deterministic. The weight is (classes, D), so its gradient is
    g^T x, which BLAS computes far faster than x^T g for a handful of classes: 300 steps on 6930 x 1280
    embeddings took 8 s on one core of the dev VM, against 29 s with a (D, classes) weight."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(embeddings).float()
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = (x - mean) / std
    y = torch.from_numpy(labels).long()
    classes = int(y.max()) + 1
    weight = (torch.randn(classes, x.shape[1], generator=gen) * 0.01).requires_grad_(True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.01, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(x, weight, bias), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


@dataclass
class AttackReport:
    clean_accuracy: float  # probe accuracy on clean test images
    asr: float  # share of triggered non-target test images classified as the target
    chance: float  # 1 / number of classes: an ASR near this is a failed attack
    target: int  # the class the ASR is measured for

    def to_dict(self) -> dict:
        return {
            "clean_accuracy": round(self.clean_accuracy, 4),
            "asr": round(self.asr, 4),
            "chance": round(self.chance, 4),
            "target": self.target,
        }


def need_untargeted(labels: np.ndarray, target: int) -> None:
    """Test labels that are all of the target class leave no triggered image to measure the ASR on:
    it would read 0, a failed attack."""
    if not (np.asarray(labels) != target).any():
        raise ValueError(
            f"no triggered test image outside the target class {target}: the ASR cannot be measured"
        )


def attack_report(
    probe: LinearProbe,
    clean_embeddings: np.ndarray,
    clean_labels: np.ndarray,
    triggered_embeddings: np.ndarray,
    triggered_labels: np.ndarray,
    target: int,
) -> AttackReport:
    """Clean accuracy and ASR (triggered images of the target class itself are left out). Chance is one
    over the probe's classes, which the test labels need not all hold."""
    need_untargeted(triggered_labels, target)
    keep = triggered_labels != target
    asr = float((probe.predict(triggered_embeddings[keep]) == target).mean())
    accuracy = float((probe.predict(clean_embeddings) == clean_labels).mean())
    return AttackReport(accuracy, asr, 1.0 / probe.weight.shape[0], int(target))
