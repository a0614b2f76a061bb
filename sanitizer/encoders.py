"""Victim encoders behind one interface: uint8 pixels in, the raw global embedding (B, D) out.

A SPEC names how to build the encoder: `timm:NAME`, `open_clip:NAME` (its visual tower),
`torchscript:PATH` or `export:PATH` (a saved torch.export program). Weights come from safetensors or a
plain state dict loaded with weights_only=True, and an exported program is refused when torch.export.load
would unpickle any of it: nothing is ever unpickled. The encoder is frozen.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import io
import json
import logging
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sanitizer.decoder_meta import Preprocess
from sanitizer.device import autocast
from sanitizer.errors import EncoderError, UsageError, shortlist

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODEL_KINDS = ("timm", "open_clip")  # built here by name; their weights are plain tensors
FILE_KINDS = ("torchscript", "export")  # whole models read from a file
KINDS = (*MODEL_KINDS, *FILE_KINDS)
# Small open_clip architectures of the package's own (e.g. for the red-team kit's CLIP victim).
OPEN_CLIP_CONFIGS = Path(__file__).parent / "configs" / "open_clip"


@dataclass
class VictimEncoder:
    spec: str
    module: nn.Module
    preprocess: Preprocess
    embed_dim: int
    weights_sha256: str

    @property
    def device(self) -> torch.device:
        return next(iter(self.module.state_dict().values())).device

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in the encoder's normalised space."""
        x = pixels.permute(0, 3, 1, 2).float().div_(255)
        mean, std = self._stats(x.device)
        return (x - mean) / std

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.preprocess.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.std, device=device).view(1, 3, 1, 1)
        return mean, std

    def to_pixels(self, images: torch.Tensor) -> np.ndarray:
        """The inverse of normalize: (B, 3, H, W) float -> (B, H, W, 3) uint8 on the CPU."""
        mean, std = self._stats(images.device)
        x = (images.float() * std + mean).mul(255).round().clamp(0, 255)
        return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images -> (B, D) float32 raw embeddings (not L2-normalised)."""
        out = self.module(images)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim != 2:
            raise EncoderError(f"{self.spec} returned shape {tuple(out.shape)}; expected (B, D)")
        return out.float()


# -- weights ---------------------------------------------------------------------------------------
RESAVE = "save the model's state_dict() with safetensors.torch.save_file and pass that file"
# Numbers trainers keep as numpy values beside the weights (an np.float64 best accuracy, an np.int64
# epoch, a loss history): the functions that rebuild numpy scalars and arrays from their bytes, with
# only a number's dtype, and the numeric dtypes' classes, whose state is set on load. Their names are
# read from numpy, which moved numpy.core to numpy._core in 2.0: a file saved under the other major
# version names the other module, allowed as well.
NUMERIC_DTYPES = (
    "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
)  # bool, int, uint, float, complex
NUMPY_CORES = ("numpy.core.", "numpy._core.")


def _numeric_dtype(*args: object) -> np.dtype:
    """numpy.dtype for the weights-only unpickler, refusing all but a number's: an object array holds
    whatever objects were pickled into it, and a string or structured one holds no numbers."""
    dtype = np.dtype(*args)
    if dtype.char not in NUMERIC_DTYPES:
        raise pickle.UnpicklingError(f"numpy values of dtype {dtype}, not numbers")
    return dtype


def _pickled_names(function: object) -> list[tuple[object, str]]:
    """A numpy function under the names pickle gives it under numpy 1 and 2."""
    name = f"{function.__module__}.{function.__qualname__}"
    names = {name.replace(old, new) for old in NUMPY_CORES for new in NUMPY_CORES}
    return [(function, each) for each in sorted(names)]


# Plain data beside the tensors that the weights-only unpickler may build: the training arguments timm's
# train.py, DINO and torchvision's reference scripts save ('args'), an attribute bag whose values must be
# allowed in turn, and numpy numbers. Without them every such checkpoint was refused as a pickled object.
ALLOWED_GLOBALS = [
    argparse.Namespace,
    np.ndarray,
    (_numeric_dtype, f"{np.dtype.__module__}.{np.dtype.__qualname__}"),
    *{type(np.dtype(char)) for char in NUMERIC_DTYPES},
    *_pickled_names(np.zeros(0).__reduce__()[0]),  # rebuilds an array
    *_pickled_names(np.float64(0).__reduce__()[0]),  # rebuilds a scalar
]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from safetensors, or from a torch file loaded with weights_only=True (no pickle code),
    by their dotted names: a checkpoint's nested dicts ({'state_dict': ..., 'state_dict_ema': ...},
    DINO's {'student': ..., 'teacher': ...}) become prefixes, which encoder_prefix finds or the user
    chooses between; what is not a tensor (epochs, arguments, lists) is left out."""
    path = Path(path)
    check_weights_file(path)
    try:
        if path.suffix == ".safetensors" or is_safetensors(path):
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif not is_torch_file(path):
            raise EncoderError(f"cannot read weights {path}: it is neither safetensors nor a torch.save file")
        elif kind := program_archive(path):
            raise EncoderError(f"{path} is a {kind} program, not weights: give it as --encoder {kind}:PATH")
        else:
            with warnings.catch_warnings(), torch.serialization.safe_globals(ALLOWED_GLOBALS):
                warnings.simplefilter("ignore")  # torch warns of pickle protocols on the way to refusing
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise EncoderError(
            f"refused {path}: it holds more than plain tensors ({_unpickler_reason(e)}); {RESAVE}"
        ) from None
    except EncoderError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise EncoderError(f"cannot read weights {path}: {type(e).__name__}: {e}") from None
    tensors = named_tensors(state)
    if not tensors:
        raise EncoderError(
            f"{path} holds no tensors by name (it holds {_what(state)}); save the encoder's state_dict()"
        )
    return tensors


def named_tensors(state: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors in nested dicts, by dotted name; keys that are not names (an optimizer's parameter
    numbers) and values that are neither tensors nor dicts are left out."""
    if isinstance(state, torch.Tensor):
        return {prefix.removesuffix("."): state} if prefix else {}
    if not isinstance(state, dict):
        return {}
    found: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(key, str):
            found |= named_tensors(value, f"{prefix}{key}.")
    return found


def _what(state: object) -> str:
    """What a file without named tensors holds, for the refusal."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}"
    return f"only {shortlist([repr(k) for k in state], 5)}" if state else "an empty dict"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".tar")


def check_weights_file(path: Path) -> None:
    """Refuse, naming why, what cannot be a weights file: a hub's model directory (naming the weights
    files in it), something that is not a regular file, an empty file."""
    if path.is_dir():
        held = sorted(p.name for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        inside = f" (it holds {shortlist(held, 5)})" if held else ""
        raise EncoderError(f"{path} is a directory{inside}; give the weights file itself")
    if not path.exists():
        raise EncoderError(f"weights file not found: {path}")
    if not path.is_file():
        raise EncoderError(f"{path} is not a regular file; give the weights file itself")
    if path.stat().st_size == 0:
        raise EncoderError(f"{path} is empty (0 bytes); give the weights file itself")


def is_torch_file(path: Path) -> bool:
    """Whether the file starts as torch.save's do: a zip archive, or (before torch 1.6) a pickle with
    a protocol opcode; anything else is no torch file, whatever an unpickler says of its first byte."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def program_archive(path: Path) -> str | None:
    """`torchscript` or `export` where a torch zip archive holds a whole model (TorchScript's code/,
    torch.export's archive_format) rather than torch.save's tensors, which torch.load reports as a
    corrupt file or a pickling question."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(name.endswith("/archive_format") for name in names):
        return "export"
    return "torchscript" if any("/code/__torch__/" in name for name in names) else None


def is_safetensors(path: Path) -> bool:
    """Whether the file starts as safetensors do (an 8-byte header length, then its JSON), whatever its
    name: hubs and trainers also save them as .bin or .pt."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = int.from_bytes(head[:8], "little")
    return len(head) == 9 and head[8:] == b"{" and 0 < size <= path.stat().st_size - 8


def _unpickler_reason(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler met, without its advice to unpickle the file after all.
    Torch puts that advice on the first line, and for a global whose module it blocks outright
    (`os.system`, a malicious file's usual call) the reason only on a later one."""
    text = str(e).replace("\x1b[1m", "").replace("\x1b[0m", "")
    _, found, after = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (after if found else text).splitlines() if line.strip()]
    reason = next((line for line in lines if "weights_only" not in line), lines[0] if lines else text)
    reason = reason.removeprefix("Weights only load failed.").strip()
    return reason.split(" was not an allowed global")[0][:200]


PREFIX_OPTION = "--encoder-weights-prefix"


class AmbiguousWeights(EncoderError):
    """The file holds the encoder whole under several prefixes, and none was chosen."""

    def __init__(self, message: str, prefixes: list[str]) -> None:
        super().__init__(message)
        self.prefixes = prefixes


def as_prefix(text: str) -> str:
    """A prefix as the user writes it ('encoder_q' or 'encoder_q.'), as the file's keys start: '' is the
    top level."""
    return text if not text or text.endswith(".") else f"{text}."


def encoder_prefix(keys: Iterable[str], wanted: set[str], path: Path, chosen: str | None = None) -> str:
    """The one prefix under which the file holds every tensor the encoder has: '' for its own state
    dict, 'backbone.', 'encoder.', 'module.', '_orig_mod.', 'visual.' (a whole CLIP)... as trainers
    save it beside projection heads or a text tower. A file that holds it under several (MoCo's
    encoder_q and encoder_k) needs the user's choice, `chosen`, which must then hold it whole."""
    found = names_by_prefix(keys, wanted)
    whole = sorted(prefix for prefix, names in found.items() if len(names) == len(wanted))
    named = ", ".join(repr(p) for p in whole)
    if chosen is not None and chosen not in found and whole:
        raise EncoderError(
            f"{path} holds none of the encoder's tensors under {chosen!r}; it holds them under {named}"
        )
    if chosen is None and len(whole) > 1:
        raise AmbiguousWeights(
            f"{path} holds the encoder's tensors several times, under {named}; choose the one to audit "
            f"with {PREFIX_OPTION} (e.g. {PREFIX_OPTION} {whole[-1]})",
            whole,
        )
    if chosen is None:  # the one whole prefix, or the nearest miss for the refusal
        chosen = whole[0] if whole else max(found, key=lambda p: len(found[p]), default="")
    lacking = sorted(wanted - found.get(chosen, set()))
    if lacking:
        raise EncoderError(
            f"{path} does not hold this encoder: {len(lacking)} of its {len(wanted)} tensors are missing "
            f"(e.g. {', '.join(lacking[:3])}{f', under {chosen!r}' if chosen else ''}); give the --encoder "
            "the file was saved from"
        )
    return chosen


def names_by_prefix(keys: Iterable[str], wanted: set[str]) -> dict[str, set[str]]:
    """For each prefix of the file's keys, the encoder's tensor names found under it."""
    found: dict[str, set[str]] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            rest = ".".join(parts[i:])
            if rest in wanted:
                found.setdefault("".join(f"{p}." for p in parts[:i]), set()).add(rest)
    return found


FULL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # cast to the encoder's


def check_tensor(where: str, tensor: torch.Tensor, own: torch.Tensor) -> None:
    """Refuse what load_state_dict would take silently: a float weight given as integers or float8 (a
    quantised model, cast to nonsense) or as NaN/inf in the encoder's float (a diverged run); and name
    a shape, a sparse layout or a meta tensor (no values), which torch's checks fail on."""
    if tensor.layout != torch.strided:
        raise EncoderError(f"{where} is a {tensor.layout} tensor; save dense weights")
    if tensor.is_meta:  # a model built without memory (init_empty_weights, FSDP) saved before loading
        raise EncoderError(f"{where} is a meta tensor, a shape without values; save the loaded weights")
    if tensor.shape != own.shape:
        raise EncoderError(
            f"{where} is {tuple(tensor.shape)} in the file, {tuple(own.shape)} in the encoder: the file "
            f"does not fit this encoder; {misfit_hint(where)}"
        )
    if not own.is_floating_point():
        return
    if tensor.dtype not in FULL_FLOATS:
        raise EncoderError(
            f"{where} is {tensor.dtype} in the file, a float in the encoder (a quantised model?); "
            "save the float weights"
        )
    if not torch.isfinite(tensor.to(own.dtype)).all():
        raise EncoderError(f"{where} holds NaN or infinite values; save weights from before the run diverged")


POSITION_EMBEDDINGS = ("pos_embed", "positional_embedding")  # timm's ViTs, open_clip's


def misfit_hint(where: str) -> str:
    """What to give for a file a tensor of which has another shape. A ViT's position embedding fits one
    image size and a spec builds the model at its config's, so no spec names a ViT saved at another
    (timm's vit_tiny_patch16_224 trained at 32 px): a whole-model file carries its own."""
    if where.endswith(POSITION_EMBEDDINGS):
        return (
            "a ViT saved at another image size than its config's cannot be built by name; give it as "
            "torchscript:PATH or export:PATH"
        )
    return "give the --encoder the file was saved from"


def optional_names(module: nn.Module) -> set[str]:
    """Tensors a file may lack, which load_state_dict fills in itself: the BatchNorm counters
    (num_batches_tracked) that eval never reads and torchvision's older weights do not hold."""
    return {
        f"{name}{'.' if name else ''}num_batches_tracked"
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    }


def load_weights(
    module: nn.Module, path: Path, ignorable: tuple[str, ...], prefix: str | None = None
) -> None:
    """Load the encoder's tensors from under `prefix`, or wherever in the file they are (see
    encoder_prefix), strictly:
    every one (BatchNorm counters aside, see optional_names), and no key under the prefix that falls in
    one of the encoder's modules without being the encoder's (a deeper network), but under `ignorable`
    prefixes (classifier heads). The rest of the file (projection heads, a text tower) is left out,
    and the log says how many."""
    own = module.state_dict()
    state = read_state_dict(path)
    prefix = encoder_prefix(state, set(own) - optional_names(module), path, prefix)
    children = {name.split(".")[0] for name in own}  # a key under one of them belongs to the encoder
    under = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    picked = {k: v for k, v in under.items() if k in own}
    extra = sorted(
        k for k in under if k not in own and k.split(".")[0] in children and not k.startswith(ignorable)
    )
    if extra:
        raise EncoderError(
            f"{path} does not fit this encoder: it has {len(extra)} more tensors (e.g. "
            f"{', '.join(prefix + k for k in extra[:3])}); give the --encoder the file was saved from"
        )
    for name, tensor in picked.items():
        check_tensor(f"{path}: {prefix}{name}", tensor, own[name])
    module.load_state_dict(picked)
    left_out = len(state) - len(picked)
    if prefix or left_out:
        log.info(
            "encoder weights: %d tensors under %r in %s; %d others left out",
            len(picked),
            prefix,
            path,
            left_out,
        )


def weights_sha256(module: nn.Module) -> str:
    """A stable identity for the encoder: parameters and buffers, by name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def freeze(module: nn.Module) -> None:
    """Eval mode and no gradients; ScriptModules refuse requires_grad_, so go parameter by parameter."""
    with contextlib.suppress(NotImplementedError):  # torch.export programs fix their mode when exported
        module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


# -- builders: each returns the module, the preprocessing of the model's own config (or None) and the
# prefixes of the file's keys that may lie in the encoder's modules without being its (classifier heads)
def _seeded_init(build):
    """Random init is seeded so a weightless spec names the same encoder in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build()


Built = tuple[nn.Module, Preprocess | None, tuple[str, ...]]


def nearest(name: str, names: Iterable[str]) -> str:
    """'; nearest: a, b, c' for a misspelt model name, so the user need not list a library's models;
    '' when none is near. Case is ignored: `vit-b-32` is nearest to open_clip's `ViT-B-32`."""
    by_case = {n.lower(): n for n in names}
    close = [by_case[n] for n in difflib.get_close_matches(name.lower(), list(by_case), n=3)]
    return f"; nearest: {', '.join(close)}" if close else ""


def _build_timm(name: str) -> Built:
    import timm

    import sanitizer.zoo  # noqa: F401 - registers the package's own timm models

    if ":" in name or "/" in name:  # hf-hub:, local-dir: and repo ids would read a hub or a path
        raise EncoderError(
            f"timm:{name} is not a timm model name; give the name and a local --encoder-weights"
        )
    if not timm.is_model(name):  # a tag after a dot (resnet18.a1_in1k) picks only the config
        raise EncoderError(f"timm has no model {name!r}{nearest(name, timm.list_models())}")
    try:
        module = _seeded_init(lambda: timm.create_model(name, pretrained=False, num_classes=0))
    except (RuntimeError, ValueError) as e:  # an unknown tag: 'Invalid pretrained tag (x) for resnet18.'
        raise EncoderError(f"timm has no model {name!r} ({e})") from None
    classifier = module.pretrained_cfg.get("classifier", "fc")
    heads = classifier if isinstance(classifier, tuple) else (classifier,)
    cfg = timm.data.resolve_model_data_config(module)
    preprocess = Preprocess(cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]))
    return module, preprocess, tuple(f"{h}." for h in heads)


@contextlib.contextmanager
def _root_log_without(text: str) -> Iterator[None]:
    """The root logger, where open_clip logs, dropping the lines that hold `text`: its warning that a
    model built without its hub weights is 'initialized randomly' is false where --encoder-weights are
    loaded next, and where none are, the seeded-random warning of load_encoder says so."""

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _build_open_clip(name: str) -> Built:
    import open_clip

    open_clip.add_model_config(OPEN_CLIP_CONFIGS)
    if ":" in name:  # hf-hub: and local-dir: would read a hub, or a directory's config and weights
        raise EncoderError(
            f"open_clip:{name} is not an open_clip model name (it would read a hub or a directory); "
            "give the name and a local --encoder-weights"
        )
    known = open_clip.list_models()
    base, _, tag = name.partition("/")
    if tag and base in known:  # open_clip's own form is create_model(base, pretrained=tag): a download
        raise EncoderError(
            f"open_clip:{name} names the pretrained weights {tag!r}, a hub download; give "
            f"open_clip:{base} and those weights as a local --encoder-weights"
        )
    if name not in known:
        raise EncoderError(f"open_clip has no model {name!r}{nearest(name, known)}")
    hf_text = open_clip.get_model_config(name).get("text_cfg", {}).get("hf_model_name")
    if hf_text:  # built with transformers' from_pretrained: a download, even without weights
        raise EncoderError(
            f"open_clip:{name} cannot be built offline: open_clip fetches its text tower, the "
            f"Hugging Face model {hf_text!r}, from the hub"
        )
    with _root_log_without("No pretrained weights loaded"):
        model = _seeded_init(lambda: open_clip.create_model(name, pretrained=None))
    visual = model.visual
    cfg = visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return visual, Preprocess(size, tuple(cfg["mean"]), tuple(cfg["std"])), ()


def _build_torchscript(path: str) -> Built:
    try:
        # torch warns on every load that TorchScript is deprecated: the user's chosen format, not news
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location="cpu")
    except (RuntimeError, ValueError, OSError) as e:
        raise EncoderError(f"cannot load TorchScript encoder {path}: {str(e).splitlines()[0]}") from None
    return module, None, ()


def unpickled_by_export_load(path: str) -> str | None:
    """What in a .pt2 archive torch.export.load would unpickle or run as native code, found without
    loading any of it; None when nothing. It unpickles weights and constants marked `use_pickle`,
    custom and opaque objects, archives in the format before torch 2.7's, and any .pt member that
    fails to load as plain tensors (it retries those with weights_only=False); it runs AOTInductor's
    compiled libraries. A backdoored encoder is the file this tool is built to distrust."""
    from torch.export.pt2_archive import constants as pt2

    with zipfile.ZipFile(path) as archive:
        members = [(name.partition("/")[2], name) for name in archive.namelist()]  # every one, repeats too
        if pt2.ARCHIVE_FORMAT_PATH not in {relative for relative, _ in members}:
            return "an archive in the format before torch 2.7's, which loading unpickles whole (re-save it)"
        for relative, name in members:
            if relative.startswith(pt2.AOTINDUCTOR_DIR):
                return f"{name} is compiled AOTInductor code, which loading would run"
            if relative.endswith("_config.json"):
                for key, payload in json.loads(archive.read(name)).get("config", {}).items():
                    objects = (pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX)
                    if payload.get("use_pickle") or payload.get("path_name", "").startswith(objects):
                        return f"{name} marks {key} as a pickled object, which loading would unpickle"
            elif relative.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001 - whatever it holds, it is more than plain tensors
                    return f"{name} holds more than plain tensors, which loading would unpickle"
    return None


def aten_calls(module: nn.Module) -> Iterator[tuple[torch.fx.GraphModule, str, dict[str, object]]]:
    """Each ATen operator call in the graphs of `module` (a loaded torch.export program): its graph,
    the operator's name and its arguments by their schema names (defaults left out), so that what a
    call does is read by meaning rather than by position."""
    for graph_module in module.modules():
        if not isinstance(graph_module, torch.fx.GraphModule):
            continue
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
                schema = node.target._schema
                named = dict(zip((a.name for a in schema.arguments), node.args, strict=False))
                yield graph_module, schema.name, {**named, **node.kwargs}


def _build_export(path: str) -> Built:
    try:
        unsafe = unpickled_by_export_load(path)
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError, AttributeError) as e:
        raise EncoderError(f"cannot load exported encoder {path}: {e}") from None
    if unsafe:
        raise EncoderError(f"refused exported encoder {path}: {unsafe}")
    try:
        module = torch.export.load(path).module()
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds for a bad file
        raise EncoderError(f"cannot load exported encoder {path}: {str(e).splitlines()[0]}") from None
    training = training_mode_call(module)
    if training:
        raise EncoderError(
            f"refused exported encoder {path}: it was exported in training mode ({training}), so each "
            "embedding would depend on its batch; export the model after calling its .eval()"
        )
    return module, None, ()


def training_mode_call(module: nn.Module) -> str | None:
    """The first ATen call of an exported program that runs as in training (a batch_norm on the batch's
    statistics, updating its running ones; a dropout), named with that flag; None when none. A program
    fixes its mode when exported and refuses .eval(), so it cannot be frozen as loaded."""
    for _, op, args in aten_calls(module):
        flag = next((name for name in ("training", "train") if args.get(name) is True), None)
        if flag:
            return f"{op} with {flag}=True"
    return None


_BUILDERS = {
    "timm": _build_timm,
    "open_clip": _build_open_clip,
    "torchscript": _build_torchscript,
    "export": _build_export,
}


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, name = spec.partition(":")
    if not sep or kind not in _BUILDERS or not name:
        forms = ", ".join(f"{k}:{'PATH' if k in FILE_KINDS else 'NAME'}" for k in KINDS)  # as --help says
        raise UsageError(f"encoder spec {spec!r} is not one of {forms}")
    if kind in FILE_KINDS and not Path(name).is_file():
        raise EncoderError(f"encoder file not found: {name}")
    return kind, name


def canonical_spec(spec: str) -> str:
    """File-based specs with an absolute path, so a decoder directory works from any directory."""
    kind, name = parse_spec(spec)
    return f"{kind}:{Path(name).resolve()}" if kind in FILE_KINDS else spec


def load_encoder(
    spec: str,
    weights: str | Path | None = None,
    image_size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    device: str | torch.device = "cpu",
    weights_prefix: str | None = None,
) -> VictimEncoder:
    """Build, load, freeze and probe the encoder; flags override the model's own preprocessing.
    `weights_prefix` picks where in the weights file the encoder is (None: found by encoder_prefix)."""
    kind, name = parse_spec(spec)
    if weights_prefix is not None and not weights:
        raise UsageError(f"{PREFIX_OPTION} picks the encoder in a weights file: give --encoder-weights too")
    module, own, ignorable = _BUILDERS[kind](name)
    if weights:
        load_weights(module, Path(weights), ignorable, weights_prefix)
    elif kind in MODEL_KINDS:  # after the build: a misspelt name is its error alone
        log.warning("%s has no --encoder-weights: using seeded random weights", spec)
    if own is None and image_size is None:
        raise UsageError(f"{kind} encoders carry no preprocessing: give --image-size (and --mean/--std)")
    own = own or Preprocess(image_size, IMAGENET_MEAN, IMAGENET_STD)
    preprocess = Preprocess(
        own.image_size if image_size is None else image_size, mean or own.mean, std or own.std
    )
    freeze(module)
    digest = weights_sha256(module)
    module = module.to(device)
    if torch.device(device).type == "cuda" and kind in MODEL_KINDS:
        # normalize() already hands over NHWC-strided images; NHWC weights spare cuDNN a conversion.
        module = module.to(memory_format=torch.channels_last)
    encoder = VictimEncoder(spec, module, preprocess, 0, digest)
    probe = torch.zeros(1, preprocess.image_size, preprocess.image_size, 3, dtype=torch.uint8)
    try:
        encoder.embed_dim = encoder.embed(encoder.normalize(probe.to(device))).shape[1]
    except EncoderError:
        raise
    except Exception as e:  # noqa: BLE001 - a model that cannot run at this size is a config error
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EncoderError(
            f"{spec} fails on a {preprocess.image_size}px image: {msg}; {size_hint(kind, own)}"
        ) from None
    return encoder


def size_hint(kind: str, own: Preprocess) -> str:
    """What --image-size to give an encoder that fails at the one given."""
    if kind in MODEL_KINDS:
        return (
            f"its config says {own.image_size} px: leave --image-size out or give the size it was trained at"
        )
    return "give the --image-size it was saved for"


def embed_pixels(encoder: VictimEncoder, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Embeddings (N, D) float32 of uint8 images (N, H, W, 3), in batches, under inference mode."""
    out = []
    device = encoder.device
    with torch.inference_mode(), autocast(device):
        for i in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(pixels[i : i + batch_size]).to(device)
            out.append(encoder.embed(encoder.normalize(batch)).cpu())
    if not out:
        return np.zeros((0, encoder.embed_dim), np.float32)
    return torch.cat(out).numpy()
