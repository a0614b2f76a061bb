"""DECODER_DIR: the trained decoder as safetensors plus one JSON of everything needed to use it.

decoder.json records the encoder it was trained against (spec and weight hash), the preprocessing,
the model's shape, the training settings and the calibration (held-out scores at the test
settings). holdout.safetensors keeps the held-out images' sketches, thumbnails and axes, which the
collapse pass weighs a run against. The training state for resuming lives in .checkpoint/ until
training finishes. Nothing in this directory is ever unpickled: tensors go through safetensors, the
rest through JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from sanitizer.atomic import remove_stale_temps, write_bytes_atomic, write_json_atomic
from sanitizer.collapse import NO_AXIS, UNKNOWN_AXIS, Sketched
from sanitizer.decoder_meta import AxisScale, DedeConfig, Preprocess, ScoreSettings
from sanitizer.errors import CheckpointError, UsageError
from sanitizer.records import RecordError, check_fields, parse_object, read_object

if TYPE_CHECKING:  # the readers of decoder.json (clean, verify, report) do not load torch
    import torch

    from sanitizer.encoders import VictimEncoder
    from sanitizer.model import DedeDecoder

FORMAT = "sanitizer-dede-decoder/1"
WEIGHTS = "decoder.safetensors"
META = "decoder.json"
HOLDOUT = "holdout.safetensors"  # the held-out images' sketches, thumbnails and axes, for the collapse pass
STATE_DIR = ".checkpoint"
STATE = "state.safetensors"  # in STATE_DIR: the unfinished training run's checkpoint
# What a train job killed before it wrote decoder.json may have left in DECODER_DIR
BEFORE_META = (WEIGHTS, HOLDOUT, STATE_DIR)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Plain tensors (and string metadata) as safetensors, atomically, with the permissions the umask
    gives every other file (safetensors' save_file makes them 0600: unreadable to the workers of a
    shared filesystem)."""
    from safetensors.torch import save

    plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_bytes_atomic(path, save(plain, metadata=metadata))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _weights(decoder_dir: Path) -> Path:
    weights = Path(decoder_dir) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{decoder_dir} has {META} but no {WEIGHTS}")
    return weights


def reference_key(decoder_dir: Path) -> bytes:
    """The key of the collapse pass's reference draw (sanitizer.collapse.reference_rank): a digest of
    the decoder's weights that no file records (decoder.json and run.json record their sha256), so
    that only someone who holds the decoder can aim files into or out of a run's reference."""
    with open(_weights(decoder_dir), "rb") as f:
        return hashlib.file_digest(
            f, lambda: hashlib.blake2b(digest_size=32, person=b"collapse-ref")
        ).digest()


def save_decoder(out_dir: Path, decoder: DedeDecoder, meta: dict) -> dict:
    """Weights first, then the JSON: a directory with decoder.json is a finished decoder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(decoder.state_dict(), out_dir / WEIGHTS)
    meta = {"format": FORMAT, **meta, "model": decoder.config.to_dict()}
    meta["decoder_sha256"] = file_sha256(out_dir / WEIGHTS)
    write_json_atomic(out_dir / META, meta)
    return meta


def save_holdout(out_dir: Path, images: Sketched) -> None:
    import torch

    tensors = {
        "sketch": torch.from_numpy(images.sketches.astype(np.float16)),
        "thumbnail": torch.from_numpy(images.thumbnails),
        "axis": torch.from_numpy(images.axes.astype(np.int32)),
    }
    save_tensors(tensors, Path(out_dir) / HOLDOUT)


def load_holdout(decoder_dir: Path) -> Sketched | None:
    """What the collapse pass keeps of the decoder's held-out images; None for a decoder saved without
    it (before the collapse pass kept them, or before it told near-duplicates apart). A decoder saved
    before axes were kept gives its images without a sketch UNKNOWN_AXIS."""
    path = Path(decoder_dir) / HOLDOUT
    if not path.is_file():
        return None
    tensors = _load_tensors(path)
    if "thumbnail" not in tensors:
        return None
    sketches = tensors["sketch"].float().numpy()
    if "axis" in tensors:
        axes = tensors["axis"].numpy().astype(np.int32)
    else:
        axes = np.where(np.isfinite(sketches).all(1), NO_AXIS, UNKNOWN_AXIS).astype(np.int32)
    return Sketched(sketches, tensors["thumbnail"].numpy(), axes)


# What scoring, clean and report read from decoder.json, and the type each must have.
_META_FIELDS = {
    "decoder_sha256": str, "model": dict, "encoder": dict, "encoder.spec": str, "encoder.weights_sha256": str,
    "encoder.preprocess": dict, "encoder.preprocess.image_size": int, "scoring": dict, "calibration": dict,
    "calibration.scores": list,
}  # fmt: skip
_OPTIONAL_META_FIELDS = {"encoder.weights_file": str, "encoder.weights_prefix": str, "training": dict}


def read_meta(decoder_dir: Path) -> dict:
    """decoder.json, checked for everything the package reads from it, so that a file damaged or
    edited by hand is refused here with its reason, not deep inside scoring."""
    path = Path(decoder_dir) / META
    if not path.is_file():
        raise CheckpointError(f"{decoder_dir} {_no_meta_yet(Path(decoder_dir))}")
    try:
        meta = read_object(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path} has format {meta.get('format')!r}; this version reads {FORMAT}")
        check_fields(meta, _META_FIELDS, _OPTIONAL_META_FIELDS)
        DedeConfig(**meta["model"])
        Preprocess.from_dict(meta["encoder"]["preprocess"])
        ScoreSettings.from_dict(meta["scoring"])
        if not all(type(x) in (int, float) and math.isfinite(x) for x in meta["calibration"]["scores"]):
            raise RecordError("calibration.scores holds something other than finite numbers")
        if "axis_scale" in meta["calibration"]:
            AxisScale.from_dict(meta["calibration"]["axis_scale"])
    except (RecordError, UsageError, TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be used: {e}; retrain, or restore the file") from None
    return meta


def _no_meta_yet(decoder_dir: Path) -> str:
    """Why a directory without decoder.json is not a decoder yet: a train stopped there (a checkpoint
    is left) is finished by running it again, not by a new one."""
    if (decoder_dir / STATE_DIR / STATE).is_file():
        return (
            f"holds an unfinished training run (no {META} yet); run the `sanitizer train` that was "
            "stopped there again to finish it"
        )
    return f"is not a decoder directory (no {META}); run `sanitizer train`"


def read_run_meta(decoder_dir: Path, decoder_sha256: str) -> dict:
    """read_meta for the steps after scoring, which read the decoder a run was scored with (its
    calibration, its weights): a directory retrained in place since holds another decoder, whose
    calibration would set other thresholds and verdicts for the same scores."""
    meta = read_meta(decoder_dir)
    if meta["decoder_sha256"] != decoder_sha256:
        raise CheckpointError(
            f"{decoder_dir} now holds another decoder than the one the run was scored with (decoder_sha256 "
            f"{meta['decoder_sha256'][:12]}..., the run's {decoder_sha256[:12]}...); restore that decoder, "
            "or score again into a new --out"
        )
    return meta


def load_decoder(decoder_dir: Path, device: torch.device | str = "cpu") -> tuple[DedeDecoder, dict]:
    from sanitizer.model import DedeDecoder

    meta = read_meta(decoder_dir)
    weights = _weights(decoder_dir)
    if file_sha256(weights) != meta.get("decoder_sha256"):
        raise CheckpointError(f"{weights} does not match the hash recorded in {META}")
    decoder = DedeDecoder(DedeConfig(**meta["model"]))
    try:
        decoder.load_state_dict(_load_tensors(weights))
    except RuntimeError as e:
        raise CheckpointError(f"{weights} does not fit its {META}: {str(e).splitlines()[0]}") from None
    return decoder.to(device).eval(), meta


def encoder_weights_file(meta: dict, given: str | None) -> str | None:
    """The encoder weights to score with: where --encoder-weights says they are now, else the file
    `train` read (decoder.json's encoder.weights_file), which must still be there."""
    recorded = meta["encoder"].get("weights_file")
    if given or not recorded or Path(recorded).is_file():
        return given or recorded
    raise CheckpointError(
        f"the decoder was trained with encoder weights {recorded}, which are gone; "
        "give --encoder-weights where that file is now"
    )


def load_trained_encoder(meta: dict, weights: str | None, device: torch.device | str) -> VictimEncoder:
    """The encoder the decoder was trained for, checked: from under the prefix decoder.json records,
    else found by the tensors' names. A decoder trained before checkpoints' nested dicts were told
    apart ({'state_dict': ..., 'state_dict_ema': ...} loaded the first) records no prefix for a file
    that now holds the encoder twice: the one with the decoder's hash is the one it was trained for."""
    from sanitizer.encoders import AmbiguousWeights, load_encoder

    enc = meta["encoder"]
    preprocess = Preprocess.from_dict(enc["preprocess"])

    def load(prefix: str | None) -> VictimEncoder:
        size, mean, std = preprocess.image_size, preprocess.mean, preprocess.std
        return load_encoder(enc["spec"], weights, size, mean, std, device, prefix)

    try:
        encoder = load(enc.get("weights_prefix"))
    except AmbiguousWeights as e:
        candidates = (load(prefix) for prefix in e.prefixes)
        encoder = next((c for c in candidates if c.weights_sha256 == enc["weights_sha256"]), None)
        if encoder is None:
            raise CheckpointError(
                f"{weights} holds the encoder several times ({', '.join(map(repr, e.prefixes))}), none "
                f"with the weights the decoder was trained for ({enc['weights_sha256'][:12]}...); give "
                "--encoder-weights the file it was trained with, or train a decoder for these weights"
            ) from None
    check_encoder(meta, encoder, weights)
    return encoder


def check_encoder(meta: dict, encoder: VictimEncoder, weights: str | None) -> None:
    """Refuse to score with a decoder that was trained against another encoder."""
    expected = meta["encoder"]["weights_sha256"]
    if encoder.weights_sha256 != expected:
        loaded = weights or "no weights file (seeded random weights)"
        raise CheckpointError(
            f"the decoder was trained for encoder {meta['encoder']['spec']} with weights "
            f"{expected[:12]}..., but {loaded} gives {encoder.weights_sha256[:12]}...; give "
            "--encoder-weights the file it was trained with, or train a decoder for these weights"
        )


# -- training state, for resuming -------------------------------------------------------------------
def save_training_state(
    out_dir: Path, decoder: DedeDecoder, optimizer: torch.optim.Optimizer, progress: dict
) -> None:
    """Model and Adam moments as tensors, the progress (plan, epoch, losses, Adam's hyper-parameters) as
    the file's metadata: one file, written atomically, so the epoch it states is the one its weights
    are of, wherever the job is killed."""
    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v for k, v in decoder.state_dict().items()}
    for index, slots in opt["state"].items():
        tensors.update({f"optim.{index}.{name}": t for name, t in slots.items()})
    progress = {**progress, "param_groups": opt["param_groups"]}
    save_tensors(tensors, out_dir / STATE_DIR / STATE, {"progress": json.dumps(progress)})


def read_training_progress(out_dir: Path) -> dict | None:
    """The last checkpoint's progress, read from its header without its tensors; None when there is none."""
    path = out_dir / STATE_DIR / STATE
    if (out_dir / STATE_DIR / "state.json").is_file():  # versions before the one-file checkpoint
        raise CheckpointError(
            f"{out_dir / STATE_DIR} holds an unfinished training run of an earlier version, which this one "
            "cannot resume; delete it to start the training afresh"
        )
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get("progress")
        if text is None:
            raise RecordError("its metadata holds no training progress")
        progress = parse_object(text)
        check_fields(progress, {"plan": dict, "epoch": int, "losses": list, "param_groups": list}, {})
    except (SafetensorError, OSError, RecordError) as e:
        raise CheckpointError(
            f"{path} is damaged: {e}; delete {out_dir / STATE_DIR} to start the training afresh"
        ) from None
    return progress


def load_training_state(
    out_dir: Path, progress: dict, decoder: DedeDecoder, optimizer: torch.optim.Optimizer
) -> None:
    """Restore the checkpoint whose progress read_training_progress returned into decoder and optimizer."""
    path = out_dir / STATE_DIR / STATE
    tensors = _load_tensors(path)
    try:
        decoder.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        slots: dict[int, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            if name.startswith("optim."):
                _, index, slot = name.split(".", 2)
                slots.setdefault(int(index), {})[slot] = t
        optimizer.load_state_dict({"state": slots, "param_groups": progress["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path} does not fit this decoder: {str(e).splitlines()[0]}; delete {out_dir / STATE_DIR} "
            "to start the training afresh"
        ) from None


def clear_training_state(out_dir: Path) -> None:
    """Once the decoder is saved: the checkpoint, and any temp file a killed checkpoint write left."""
    state_dir = out_dir / STATE_DIR
    (state_dir / STATE).unlink(missing_ok=True)
    if state_dir.is_dir():
        remove_stale_temps(state_dir)
        state_dir.rmdir()
