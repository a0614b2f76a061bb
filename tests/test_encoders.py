import argparse
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sanitizer.data.hostile import PWNED_FILE, pickle_payload
from sanitizer.encoders import ALLOWED_GLOBALS, embed_pixels, load_encoder, parse_spec, read_state_dict
from sanitizer.errors import EncoderError, UsageError


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean(dim=(2, 3)))


def test_timm_kind_uses_model_config_and_flags(tiny_encoder):
    assert tiny_encoder.embed_dim == 96
    assert tiny_encoder.preprocess.image_size == 32  # flag overrides the model's 160
    own = load_encoder("timm:test_resnet")
    assert own.preprocess.image_size == 160
    assert own.preprocess.mean == (0.5, 0.5, 0.5)  # test_resnet's own pretrained_cfg
    assert own.weights_sha256 == tiny_encoder.weights_sha256  # seeded init: same weights everywhere


def scaled(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Other weights than the seeded ones, so that loading them is seen."""
    return {k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}


def assert_one_encoder(a_file: Path, b_file: Path, seeded) -> None:
    """Both files load as the same encoder, and not as the seeded one."""
    a = load_encoder("timm:test_resnet", a_file, image_size=32)
    b = load_encoder("timm:test_resnet", b_file, image_size=32)
    assert a.weights_sha256 == b.weights_sha256 != seeded.weights_sha256
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a.embed(x), b.embed(x))


def test_weights_from_safetensors_and_state_dict_give_one_hash(tmp_path, tiny_encoder):
    other = scaled(tiny_encoder.module.state_dict())
    save_file(other, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in other.items()}}, tmp_path / "w.pt")
    assert_one_encoder(tmp_path / "w.safetensors", tmp_path / "w.pt", tiny_encoder)
    (tmp_path / "w.safetensors").rename(tmp_path / "pytorch_model.bin")  # safetensors by another name
    assert_one_encoder(tmp_path / "pytorch_model.bin", tmp_path / "w.pt", tiny_encoder)


def test_classifier_head_in_checkpoint_is_ignored(tmp_path, tiny_encoder):
    state = dict(tiny_encoder.module.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(10, 96), torch.zeros(10)
    save_file(state, str(tmp_path / "with_head.safetensors"))
    enc = load_encoder("timm:test_resnet", tmp_path / "with_head.safetensors", image_size=32)
    assert enc.weights_sha256 == tiny_encoder.weights_sha256


@pytest.mark.parametrize("prefix", ["backbone.", "encoder.", "module.", "_orig_mod.", "model.backbone."])
def test_a_trainers_prefix_and_projection_head_are_found_and_left_out(tmp_path, tiny_encoder, prefix):
    own = scaled(tiny_encoder.module.state_dict())
    save_file(own, str(tmp_path / "plain.safetensors"))
    saved = {f"{prefix}{k}": v for k, v in own.items()}
    saved |= {"projector.0.weight": torch.zeros(128, 96), "projector.2.weight": torch.zeros(32, 128)}
    saved[f"{prefix}fc.weight"] = torch.zeros(10, 96)  # a classifier head inside the backbone
    save_file(saved, str(tmp_path / "simclr.safetensors"))
    assert_one_encoder(tmp_path / "plain.safetensors", tmp_path / "simclr.safetensors", tiny_encoder)


def test_a_lightning_checkpoint_in_half_precision_loads(tmp_path, tiny_encoder):
    own = scaled(tiny_encoder.module.state_dict())
    half = {f"model.backbone.{k}": v.half() if v.is_floating_point() else v for k, v in own.items()}
    torch.save({"state_dict": half, "epoch": 3, "global_step": 100}, tmp_path / "last.ckpt")
    enc = load_encoder("timm:test_resnet", tmp_path / "last.ckpt", image_size=32)
    loaded = enc.module.state_dict()
    assert all(loaded[k].dtype == v.dtype for k, v in own.items())  # cast back to the model's float32
    assert all(torch.equal(loaded[k], v.half().to(v.dtype)) for k, v in own.items())


def refusal(tmp_path: Path, state: dict[str, torch.Tensor], spec: str = "timm:test_resnet") -> str:
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(EncoderError) as caught:
        load_encoder(spec, tmp_path / "w.safetensors", image_size=32)
    return str(caught.value).replace(str(tmp_path / "w.safetensors"), "FILE")


def test_weights_that_do_not_fit_are_refused_naming_what(tmp_path, tiny_encoder):
    own = tiny_encoder.module.state_dict()
    twice = {f"encoder_q.{k}": v for k, v in own.items()} | {
        f"encoder_k.{k}": v.clone() for k, v in own.items()
    }
    assert refusal(tmp_path, twice) == (
        "FILE holds the encoder's tensors several times, under 'encoder_k.', 'encoder_q.'; "
        "choose the one to audit with --encoder-weights-prefix (e.g. --encoder-weights-prefix encoder_q.)"
    )
    other_stem = {k: torch.zeros(64, 3, 7, 7) if k == "conv1.0.weight" else v for k, v in own.items()}
    assert refusal(tmp_path, {f"backbone.{k}": v for k, v in other_stem.items()}) == (
        "FILE: backbone.conv1.0.weight is (64, 3, 7, 7) in the file, "
        f"{tuple(own['conv1.0.weight'].shape)} in the encoder: the file does not fit this encoder; "
        "give the --encoder the file was saved from"
    )
    quantised = own | {"conv1.0.weight": own["conv1.0.weight"].to(torch.int8)}
    assert refusal(tmp_path, quantised) == (
        "FILE: conv1.0.weight is torch.int8 in the file, a float in the encoder (a quantised model?); "
        "save the float weights"
    )
    diverged = own | {"bn1.bias": torch.full_like(own["bn1.bias"], float("nan"))}
    assert refusal(tmp_path, diverged) == (
        "FILE: bn1.bias holds NaN or infinite values; save weights from before the run diverged"
    )
    deeper = own | {"layer1.9.conv1.weight": torch.zeros(1)}
    assert refusal(tmp_path, deeper) == (
        "FILE does not fit this encoder: it has 1 more tensors (e.g. layer1.9.conv1.weight); "
        "give the --encoder the file was saved from"
    )
    lacking = {k: v for k, v in own.items() if k != "bn1.bias"}
    needed = [k for k in own if not k.endswith("num_batches_tracked")]  # a file may lack those
    assert refusal(tmp_path, lacking) == (
        f"FILE does not hold this encoder: 1 of its {len(needed)} tensors are missing (e.g. bn1.bias); "
        "give the --encoder the file was saved from"
    )


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ("encoder_q.", "encoder_k."),
        ("module.encoder_q.", "module.encoder_k."),
        ("student.", "teacher."),
        ("", "ema."),
    ],
)
def test_a_file_that_holds_the_encoder_twice_loads_the_one_chosen(tmp_path, tiny_encoder, query, key):
    """MoCo's query and key encoders (also under DDP's module.), BYOL's online and target, DINO's
    student and teacher saved flat: they were refused with no way to choose but to re-save the file."""
    own = tiny_encoder.module.state_dict()
    chosen = {query: scaled(own), key: {k: v * 0.5 if v.is_floating_point() else v for k, v in own.items()}}
    both = {f"{prefix}{k}": v.clone() for prefix, state in chosen.items() for k, v in state.items()}
    save_file(both, str(tmp_path / "both.safetensors"))
    for prefix, state in chosen.items():
        save_file(state, str(tmp_path / "one.safetensors"))
        alone = load_encoder("timm:test_resnet", tmp_path / "one.safetensors", image_size=32)
        picked = load_encoder(
            "timm:test_resnet", tmp_path / "both.safetensors", image_size=32, weights_prefix=prefix
        )
        assert picked.weights_sha256 == alone.weights_sha256 != tiny_encoder.weights_sha256
    with pytest.raises(EncoderError) as caught:
        load_encoder("timm:test_resnet", tmp_path / "both.safetensors", image_size=32, weights_prefix="nope.")
    assert str(caught.value) == (
        f"{tmp_path / 'both.safetensors'} holds none of the encoder's tensors under 'nope.'; it holds them "
        f"under {', '.join(repr(p) for p in sorted(chosen))}"
    )


def test_a_chosen_prefix_must_hold_the_whole_encoder(tmp_path, tiny_encoder):
    own = tiny_encoder.module.state_dict()
    both = {f"encoder_q.{k}": v for k, v in own.items()} | {
        f"encoder_k.{k}": v.clone() for k, v in own.items() if k != "bn1.bias"
    }
    save_file(both, str(tmp_path / "w.safetensors"))
    with pytest.raises(EncoderError) as caught:
        load_encoder(
            "timm:test_resnet", tmp_path / "w.safetensors", image_size=32, weights_prefix="encoder_k."
        )
    needed = [k for k in own if not k.endswith("num_batches_tracked")]
    assert str(caught.value) == (
        f"{tmp_path / 'w.safetensors'} does not hold this encoder: 1 of its {len(needed)} tensors are "
        "missing (e.g. bn1.bias, under 'encoder_k.'); give the --encoder the file was saved from"
    )
    with pytest.raises(UsageError) as caught:
        load_encoder("timm:test_resnet", image_size=32, weights_prefix="encoder_k.")
    assert str(caught.value) == (
        "--encoder-weights-prefix picks the encoder in a weights file: give --encoder-weights too"
    )


def test_a_file_without_batchnorm_counters_loads(tmp_path, tiny_encoder):
    """torchvision's older ImageNet weights (and files saved before PyTorch 0.4.1) hold no BatchNorm
    num_batches_tracked, which eval never reads and load_state_dict fills in: they were refused as
    '15 of its 90 tensors are missing (e.g. bn1.num_batches_tracked, ...)'."""
    own = scaled(tiny_encoder.module.state_dict())
    save_file(own, str(tmp_path / "full.safetensors"))
    legacy = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    assert len(legacy) < len(own)
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    assert_one_encoder(tmp_path / "full.safetensors", tmp_path / "legacy.safetensors", tiny_encoder)
    lacking = {k: v for k, v in legacy.items() if k != "bn1.bias"}  # a real tensor is still required
    assert refusal(tmp_path, lacking).startswith("FILE does not hold this encoder: 1 of its ")


def test_tensors_torch_cannot_check_are_refused_in_one_line(tmp_path, tiny_encoder):
    """A float8 weight (a quantised model, as int8 is) and a sparse one gave a NotImplementedError
    traceback from the NaN check; a key that is not a name, an AttributeError; a meta tensor (a model
    built without memory, saved before loading) a RuntimeError; and a float64 weight too large for
    the encoder's float32 loaded as inf (infinite there)."""
    own = tiny_encoder.module.state_dict()
    float8 = own | {"bn1.bias": own["bn1.bias"].to(torch.float8_e4m3fn)}
    assert refusal(tmp_path, float8) == (
        "FILE: bn1.bias is torch.float8_e4m3fn in the file, a float in the encoder (a quantised model?); "
        "save the float weights"
    )
    huge = own | {"bn1.bias": own["bn1.bias"].double() + 1e300}
    assert refusal(tmp_path, huge) == (
        "FILE: bn1.bias holds NaN or infinite values; save weights from before the run diverged"
    )
    torch.save(own | {"bn1.bias": own["bn1.bias"].to_sparse()}, tmp_path / "sparse.pt")
    with pytest.raises(EncoderError) as caught:
        load_encoder("timm:test_resnet", tmp_path / "sparse.pt", image_size=32)
    assert str(caught.value) == (
        f"{tmp_path / 'sparse.pt'}: bn1.bias is a torch.sparse_coo tensor; save dense weights"
    )
    torch.save(own | {"bn1.bias": own["bn1.bias"].to("meta")}, tmp_path / "meta.pt")  # RuntimeError
    with pytest.raises(EncoderError) as caught:
        load_encoder("timm:test_resnet", tmp_path / "meta.pt", image_size=32)
    assert str(caught.value) == (
        f"{tmp_path / 'meta.pt'}: bn1.bias is a meta tensor, a shape without values; save the loaded weights"
    )
    torch.save({0: torch.zeros(1), **own}, tmp_path / "keys.pt")  # a key that is no name is left out
    assert load_encoder("timm:test_resnet", tmp_path / "keys.pt", image_size=32).weights_sha256 == (
        tiny_encoder.weights_sha256
    )
    for held, what in ((torch.zeros(3), "a Tensor"), ({}, "an empty dict"), ({"epoch": 3}, "only 'epoch'")):
        torch.save(held, tmp_path / "none.pt")
        with pytest.raises(EncoderError) as caught:
            load_encoder("timm:test_resnet", tmp_path / "none.pt", image_size=32)
        assert str(caught.value) == (
            f"{tmp_path / 'none.pt'} holds no tensors by name (it holds {what}); "
            "save the encoder's state_dict()"
        )


@pytest.mark.parametrize(
    ("saved", "names"),
    [
        ({"student": "a", "teacher": "b", "epoch": 5}, ("student.", "teacher.")),  # DINO
        (
            {
                "state_dict": "a",
                "state_dict_ema": "b",
                "epoch": 3,
                "optimizer": {"state": {0: {"m": "a"}}},
                "args": argparse.Namespace(model="test_resnet", lr=0.1, sizes=[1, 2], amp=None),
            },
            ("state_dict.", "state_dict_ema."),  # timm's train.py
        ),
        ({"model": "a", "model_ema": "b"}, ("model.", "model_ema.")),
    ],
)
def test_a_checkpoint_of_two_networks_is_refused_naming_them_and_either_loads(
    tmp_path, tiny_encoder, saved, names
):
    """A checkpoint with the encoder in two nested dicts: a whole DINO checkpoint was refused as 'not a
    state dict of tensors' with no way to choose, and timm's (its model and its EMA) loaded the model
    whatever the user wanted (and was refused whole for its training arguments, an argparse.Namespace).
    Each nested dict's keys now lie under its name as a prefix."""
    own = tiny_encoder.module.state_dict()
    states = {"a": scaled(own), "b": {k: v * 0.5 if v.is_floating_point() else v for k, v in own.items()}}

    def filled(value):
        return states[value] if isinstance(value, str) else {k: filled(v) for k, v in value.items()}

    torch.save(
        {k: filled(v) if isinstance(v, (str, dict)) else v for k, v in saved.items()}, tmp_path / "c.pth"
    )
    with pytest.raises(EncoderError) as caught:
        load_encoder("timm:test_resnet", tmp_path / "c.pth", image_size=32)
    assert str(caught.value) == (
        f"{tmp_path / 'c.pth'} holds the encoder's tensors several times, under {names[0]!r}, {names[1]!r}; "
        f"choose the one to audit with --encoder-weights-prefix (e.g. --encoder-weights-prefix {names[1]})"
    )
    for prefix, state in zip(names, states.values(), strict=True):
        save_file(state, str(tmp_path / "one.safetensors"))
        alone = load_encoder("timm:test_resnet", tmp_path / "one.safetensors", image_size=32)
        picked = load_encoder("timm:test_resnet", tmp_path / "c.pth", image_size=32, weights_prefix=prefix)
        assert picked.weights_sha256 == alone.weights_sha256


def test_a_pickled_model_is_refused_with_what_it_holds_and_no_warning(tmp_path, tiny_encoder, recwarn):
    torch.save(tiny_encoder.module, tmp_path / "model.pt")  # the whole module, as torch.save(model) does
    with pytest.raises(EncoderError) as caught:
        load_encoder("timm:test_resnet", tmp_path / "model.pt", image_size=32)
    assert str(caught.value) == (
        f"refused {tmp_path / 'model.pt'}: it holds more than plain tensors "
        "(Unsupported global: GLOBAL timm.models.resnet.ResNet); "
        "save the model's state_dict() with safetensors.torch.save_file and pass that file"
    )
    args = argparse.Namespace(output=Path("/runs/x"))  # allowed, but not what it holds
    torch.save({"state_dict": tiny_encoder.module.state_dict(), "args": args}, tmp_path / "args.pth")
    with pytest.raises(
        EncoderError, match=r"tensors \(Unsupported global: GLOBAL pathlib\.PosixPath\); save"
    ):
        load_encoder("timm:test_resnet", tmp_path / "args.pth", image_size=32)
    (tmp_path / "old.pth").write_bytes(pickle.dumps({"x": torch.zeros(1)}, protocol=4))
    with pytest.raises(
        EncoderError, match=r"it holds more than plain tensors \(Unsupported operand 149\); save"
    ):
        load_encoder("timm:test_resnet", tmp_path / "old.pth", image_size=32)
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


class _SystemCall:
    """Pickles as a call of os.system, a module torch's weights-only unpickler blocks outright."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {PWNED_FILE}",))


def test_a_pickle_that_calls_a_blocked_module_is_refused_with_what_it_calls(tmp_path, monkeypatch):
    """Torch's message for such a file opens with its advice to load it with weights_only=False; the
    error named that advice, not what the file would have run."""
    monkeypatch.chdir(tmp_path)
    torch.save({"weight": torch.zeros(1), "x": _SystemCall()}, tmp_path / "evil.bin")
    with pytest.raises(EncoderError) as caught:
        load_encoder("timm:test_resnet", tmp_path / "evil.bin", image_size=32)
    assert str(caught.value) == (
        f"refused {tmp_path / 'evil.bin'}: it holds more than plain tensors (Trying to load unsupported "
        f"GLOBAL {os.system.__module__}.system whose module {os.system.__module__} is blocked.); "
        "save the model's state_dict() with safetensors.torch.save_file and pass that file"
    )
    assert not (tmp_path / PWNED_FILE).exists()


# What trainers keep beside the weights as numpy values: scalars of each kind of number and a loss history.
NUMPY_NUMBERS = {
    "best_acc": np.float64(0.93),
    "epoch": np.int64(199),
    "lr": np.float32(1e-3),
    "step": np.uint16(7),
    "ema": np.bool_(True),
    "phase": np.complex64(1j),
    "losses": np.array([[0.5, 0.25], [0.125, 0.0625]], dtype=np.float16),
}


def numpy_1_spelling(path: Path) -> None:
    """Rewrites a torch file as numpy 1 saved it: its functions under numpy.core, not numpy._core."""
    with zipfile.ZipFile(path) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for info, data in entries:
            archive.writestr(
                info,
                data.replace(b"numpy._core.", b"numpy.core.") if info.filename.endswith("data.pkl") else data,
            )


def test_numpy_numbers_beside_the_weights_load_as_the_weights_alone(tmp_path, tiny_encoder):
    """A checkpoint with an np.float64 best accuracy or an np.int64 epoch beside its weights was refused
    ('Unsupported global: GLOBAL numpy._core.multiarray.scalar'); numbers of any numeric dtype and numeric
    arrays now load, under numpy 1's names as under numpy 2's, and the tensors are the weights' alone."""
    own, saved = tiny_encoder.module.state_dict(), tmp_path / "numpy.pth"
    torch.save({"state_dict": own}, tmp_path / "alone.pth")
    torch.save({"state_dict": own, **NUMPY_NUMBERS}, saved)
    alone = read_state_dict(tmp_path / "alone.pth")
    with torch.serialization.safe_globals(ALLOWED_GLOBALS):
        held = torch.load(saved, weights_only=True)
    for key, value in NUMPY_NUMBERS.items():  # rebuilt as saved: the same numbers of the same dtype
        assert (type(held[key]), held[key].dtype) == (type(value), value.dtype)
        assert np.array_equal(held[key], value)
    under_numpy_2 = read_state_dict(saved)
    numpy_1_spelling(saved)
    assert b"cnumpy.core.multiarray\nscalar\n" in zipfile.ZipFile(saved).read("numpy/data.pkl")
    for tensors in (under_numpy_2, read_state_dict(saved)):
        assert tensors.keys() == alone.keys()
        assert all(torch.equal(tensors[key], alone[key]) for key in alone)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (np.array([{"a": 1}, None], dtype=object), "object"),
        (np.array([_SystemCall()], dtype=object), "object"),
        (np.array(["adam"]), "<U4"),
        (np.zeros(2, dtype=[("loss", "f4")]), "|V4"),  # its fields come later, in its state
        (np.str_("adam"), "<U4"),
    ],
)
def test_numpy_values_that_are_not_numbers_are_refused(tmp_path, monkeypatch, tiny_encoder, value, dtype):
    """An object array holds whatever objects were pickled into it (each goes through the weights-only
    unpickler too, which blocks os.system); it is refused, as a string or structured array or scalar is,
    when its dtype is built, before anything it holds."""
    monkeypatch.chdir(tmp_path)
    torch.save({"state_dict": tiny_encoder.module.state_dict(), "extra": value}, tmp_path / "objects.pth")
    with pytest.raises(EncoderError) as caught:
        read_state_dict(tmp_path / "objects.pth")
    assert str(caught.value) == (
        f"refused {tmp_path / 'objects.pth'}: it holds more than plain tensors (numpy values of dtype "
        f"{dtype}, not numbers); save the model's state_dict() with safetensors.torch.save_file and pass "
        "that file"
    )
    assert not (tmp_path / PWNED_FILE).exists()


def test_open_clip_visual_tower_from_full_or_visual_state_dict(tmp_path):
    enc = load_encoder("open_clip:sanitizer-tiny-vit")
    assert (enc.embed_dim, enc.preprocess.image_size) == (64, 32)
    full = {f"visual.{k}": v * 2 if v.is_floating_point() else v for k, v in enc.module.state_dict().items()}
    full["text_projection"] = torch.zeros(64, 64)
    save_file(full, str(tmp_path / "clip.safetensors"))
    visual_only = {k.removeprefix("visual."): v for k, v in full.items() if k.startswith("visual.")}
    save_file(visual_only, str(tmp_path / "visual.safetensors"))
    save_file({f"model.{k}": v.half() for k, v in full.items()}, str(tmp_path / "wrapped.safetensors"))
    a = load_encoder("open_clip:sanitizer-tiny-vit", tmp_path / "clip.safetensors")
    b = load_encoder("open_clip:sanitizer-tiny-vit", tmp_path / "visual.safetensors")
    assert a.weights_sha256 == b.weights_sha256 != enc.weights_sha256
    c = load_encoder("open_clip:sanitizer-tiny-vit", tmp_path / "wrapped.safetensors").module.state_dict()
    assert all(torch.equal(c[k], v.half().float()) for k, v in a.module.state_dict().items())


def test_torchscript_and_export_kinds(tmp_path):
    torch.manual_seed(0)
    net = TinyCNN().eval()
    torch.jit.script(net).save(str(tmp_path / "enc.ts"))
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "enc.pt2")
    x = torch.randn(3, 3, 16, 16)
    expected = net(x)
    for spec in (f"torchscript:{tmp_path / 'enc.ts'}", f"export:{tmp_path / 'enc.pt2'}"):
        enc = load_encoder(spec, image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        assert enc.embed_dim == 5
        assert enc.preprocess.mean == (0.5, 0.5, 0.5)
        assert torch.allclose(enc.embed(x), expected, atol=1e-5)
        assert enc.weights_sha256 == load_encoder(spec, image_size=16).weights_sha256


def test_torchscript_and_export_encoders_load_without_warnings(tmp_path):
    """torch.jit.load warned that TorchScript is deprecated, two lines of Python warning with torch's
    path on every train and score (and on each Ray actor) with a torchscript: encoder."""
    net = TinyCNN().eval()
    torch.jit.script(net).save(str(tmp_path / "enc.ts"))
    program = torch.export.export(
        net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: torch.export.Dim("b")},)
    )
    torch.export.save(program, tmp_path / "enc.pt2")
    for spec in (f"torchscript:{tmp_path / 'enc.ts'}", f"export:{tmp_path / 'enc.pt2'}"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_encoder(spec, image_size=16)
        assert [str(w.message) for w in caught] == [], spec


def tampered(archive: Path, out: Path, change) -> Path:
    """A copy of a .pt2 archive with each member's bytes passed through change(relative name, bytes);
    None drops the member."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = change(info.filename.partition("/")[2], src.read(info.filename))
            if data is not None:
                dst.writestr(info, data)
    return out


def pickled_weights(name: str, data: bytes) -> bytes:
    """The first weight marked `use_pickle`, its bytes a pickle that writes a file when loaded."""
    if name.endswith("weights_config.json"):
        return data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
    return pickle_payload() if name == "data/weights/weight_0" else data


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (  # torch retries a .pt member that is not plain tensors with weights_only=False
            lambda name, data: pickle_payload() if name.endswith("sample_inputs/model.pt") else data,
            "data/sample_inputs/model.pt holds more than plain tensors, which loading would unpickle",
        ),
        (
            pickled_weights,
            "weights_config.json marks conv.weight as a pickled object, which loading would unpickle",
        ),
        (
            lambda name, data: None if name == "archive_format" else data,
            "an archive in the format before torch 2.7's, which loading unpickles whole",
        ),
    ],
)
def test_an_exported_encoder_that_loading_would_unpickle_is_refused_unread(
    tmp_path, monkeypatch, change, reason
):
    monkeypatch.chdir(tmp_path)
    net = TinyCNN().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "enc.pt2")
    path = tampered(tmp_path / "enc.pt2", tmp_path / "t.pt2", change)
    with pytest.raises(EncoderError) as caught:
        load_encoder(f"export:{path}", image_size=16)
    assert str(caught.value).startswith(f"refused exported encoder {path}: ") and reason in str(caught.value)
    assert not (tmp_path / PWNED_FILE).exists()


def test_file_kinds_need_an_image_size(tmp_path):
    torch.jit.script(TinyCNN()).save(str(tmp_path / "enc.ts"))
    with pytest.raises(UsageError, match="--image-size"):
        load_encoder(f"torchscript:{tmp_path / 'enc.ts'}")


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ("resnet18", UsageError, "not one of timm:NAME"),
        ("hub:resnet18", UsageError, "not one of"),
        ("timm:no_such_model_xyz", EncoderError, "timm has no model 'no_such_model_xyz'"),
        ("open_clip:no-such-clip", EncoderError, "open_clip has no model"),
        ("open_clip:hf-hub:org/repo", EncoderError, "is not an open_clip model name"),
        ("export:/nonexistent/enc.pt2", EncoderError, "encoder file not found"),
    ],
)
def test_specs_that_do_not_resolve(spec, error, message):
    with pytest.raises(error, match=message):
        parse_spec(spec) if ":" not in spec or spec.startswith("hub") else load_encoder(spec, image_size=32)


OFFLINE_REFUSALS = {
    "timm:resnet181": "timm has no model 'resnet181'; nearest: resnet18, resnet18d, resnet101",
    "timm:hf-hub:timm/resnet18.a1_in1k": "timm:hf-hub:timm/resnet18.a1_in1k is not a timm model name; "
    "give the name and a local --encoder-weights",
    "timm:hf_hub:timm/resnet18": "timm:hf_hub:timm/resnet18 is not a timm model name; give the name and "
    "a local --encoder-weights",
    "open_clip:hf-hub:laion/CLIP-ViT-B-32": "open_clip:hf-hub:laion/CLIP-ViT-B-32 is not an open_clip model "
    "name (it would read a hub or a directory); give the name and a local --encoder-weights",
    "open_clip:local-dir:/tmp": "open_clip:local-dir:/tmp is not an open_clip model name (it would read a "
    "hub or a directory); give the name and a local --encoder-weights",
    "open_clip:ViT-B-32/openai": "open_clip:ViT-B-32/openai names the pretrained weights 'openai', a hub "
    "download; give open_clip:ViT-B-32 and those weights as a local --encoder-weights",
    "open_clip:ViT-B-23": "open_clip has no model 'ViT-B-23'; nearest: ViT-B-32, ViT-S-32, ViT-M-32",
    "open_clip:vit-b-32": "open_clip has no model 'vit-b-32'; nearest: ViT-B-32, ViT-S-32, ViT-M-32",
    "open_clip:roberta-ViT-B-32": "open_clip:roberta-ViT-B-32 cannot be built offline: open_clip fetches "
    "its text tower, the Hugging Face model 'roberta-base', from the hub",
}


@pytest.mark.parametrize(("spec", "message"), OFFLINE_REFUSALS.items())
def test_specs_that_name_a_hub_or_a_typo_are_refused_offline_naming_why(spec, message, no_network):
    """A CLIP with a Hugging Face text tower (roberta-ViT-B-32) was a RuntimeError traceback, 'Please
    `pip install transformers`', and where transformers is installed a download of roberta-base (open_clip
    loads a text tower's hub weights unless told not to); a pretrained tag was 'open_clip has no model
    'ViT-B-32/openai'', a typo 'timm has no model 'resnet181' (Unknown model (resnet181))', and
    open_clip:local-dir:DIR 'would load from a hub'."""
    with pytest.raises(EncoderError) as e:
        load_encoder(spec)
    assert str(e.value) == message
    assert no_network == []


@pytest.mark.parametrize(
    "spec",
    [
        "timm:convnext_atto",
        "timm:convnext_atto.d2_in1k",
        "timm:resnet18_cifar",
        "open_clip:sanitizer-tiny-vit",
    ],
)
def test_weightless_and_weighted_encoders_build_without_the_network(spec, tmp_path, no_network, caplog):
    """timm's convnext_atto names hub weights in its default config, as a tag does: neither is fetched.
    The weights come from the file given, or are seeded random with a warning."""
    with caplog.at_level(logging.WARNING, logger="sanitizer.encoders"):
        encoder = load_encoder(spec, image_size=32)
    assert caplog.messages == [f"{spec} has no --encoder-weights: using seeded random weights"]
    save_file(scaled(encoder.module.state_dict()), str(tmp_path / "w.safetensors"))
    loaded = load_encoder(spec, tmp_path / "w.safetensors", image_size=32)
    assert loaded.weights_sha256 != encoder.weights_sha256
    assert no_network == []


class Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_bad_weights_are_refused_with_a_reason(tmp_path, tiny_encoder):
    with pytest.raises(EncoderError, match="weights file not found"):
        load_encoder("timm:test_resnet", tmp_path / "missing.safetensors", image_size=32)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(EncoderError, match="cannot read weights"):
        load_encoder("timm:test_resnet", tmp_path / "garbage.safetensors", image_size=32)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"conv1.weight": Payload()}, f)
    with pytest.raises(EncoderError, match="refused"):
        load_encoder("timm:test_resnet", tmp_path / "evil.pt", image_size=32)
    save_file({"conv1.weight": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(EncoderError, match="does not hold this encoder"):
        load_encoder("timm:test_resnet", tmp_path / "wrong.safetensors", image_size=32)


def test_a_model_that_does_not_exist_is_its_error_alone(caplog):
    """The 'using seeded random weights' warning came first, a second line for a misspelt name."""
    with (
        caplog.at_level(logging.WARNING),
        pytest.raises(EncoderError, match="timm has no model 'no_such_net'"),
    ):
        load_encoder("timm:no_such_net", image_size=32)
    assert caplog.records == []
    with caplog.at_level(logging.WARNING):
        load_encoder("timm:test_resnet", image_size=32)
    assert [r.getMessage() for r in caplog.records] == [
        "timm:test_resnet has no --encoder-weights: using seeded random weights"
    ]


@pytest.mark.parametrize(
    ("spec", "build"), [("timm:resnet18_cifar", "resnet18"), ("timm:resnet50_cifar", "resnet50")]
)
def test_a_torchvision_simclr_resnet_with_the_cifar_stem_embeds_as_saved(tmp_path, spec, build):
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, build)()
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    width = net.fc.in_features
    net.fc = nn.Sequential(nn.Linear(width, 128), nn.ReLU(), nn.Linear(128, 64))  # SimCLR's projection
    for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(), bn.running_var.uniform_(0.5, 2.0)
    save_file({f"backbone.{k}": v for k, v in net.state_dict().items()}, str(tmp_path / "simclr.safetensors"))
    enc = load_encoder(spec, tmp_path / "simclr.safetensors")
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    assert (enc.embed_dim, enc.preprocess.image_size) == (width, 32)
    assert torch.allclose(enc.embed(x), net.eval()(x), atol=1e-5)


def test_an_encoder_that_fails_at_the_image_size_says_which_to_give(tmp_path):
    with pytest.raises(EncoderError) as caught:
        load_encoder("open_clip:sanitizer-tiny-vit", image_size=48)
    assert str(caught.value).startswith("open_clip:sanitizer-tiny-vit fails on a 48px image: ")
    assert str(caught.value).endswith(
        "; its config says 32 px: leave --image-size out or give the size it was trained at"
    )
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        TinyCNN().eval(), (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, tmp_path / "enc.pt2")
    with pytest.raises(EncoderError) as caught:
        load_encoder(f"export:{tmp_path / 'enc.pt2'}", image_size=32)
    assert str(caught.value).endswith("; give the --image-size it was saved for")


def test_a_decoder_that_records_no_prefix_scores_with_the_copy_it_was_trained_for(tmp_path, tiny_encoder):
    """A decoder trained before nested dicts were told apart loaded a timm checkpoint's state_dict and
    recorded no prefix; the file now holds the encoder twice, and score takes the copy whose tensors
    have the decoder's hash, or refuses in one line when neither has it."""
    from sanitizer.checkpoint import load_trained_encoder
    from sanitizer.errors import CheckpointError

    own = tiny_encoder.module.state_dict()
    model, ema = scaled(own), {k: v * 0.5 if v.is_floating_point() else v for k, v in own.items()}
    torch.save({"state_dict": model, "state_dict_ema": ema, "epoch": 3}, tmp_path / "timm.pth.tar")
    for state in (model, ema):
        save_file(state, str(tmp_path / "one.safetensors"))
        trained = load_encoder("timm:test_resnet", tmp_path / "one.safetensors", image_size=32)
        meta = {"encoder": {"spec": "timm:test_resnet", "weights_sha256": trained.weights_sha256}}
        meta["encoder"]["preprocess"] = trained.preprocess.to_dict()
        loaded = load_trained_encoder(meta, str(tmp_path / "timm.pth.tar"), "cpu")
        assert loaded.weights_sha256 == trained.weights_sha256
    meta["encoder"]["weights_sha256"] = tiny_encoder.weights_sha256
    with pytest.raises(CheckpointError) as caught:
        load_trained_encoder(meta, str(tmp_path / "timm.pth.tar"), "cpu")
    assert str(caught.value) == (
        f"{tmp_path / 'timm.pth.tar'} holds the encoder several times ('state_dict.', 'state_dict_ema.'), "
        f"none with the weights the decoder was trained for ({tiny_encoder.weights_sha256[:12]}...); give "
        "--encoder-weights the file it was trained with, or train a decoder for these weights"
    )


def test_what_cannot_be_a_weights_file_is_named(tmp_path, tiny_encoder, capsys):
    """A hub's model directory was 'weights file not found: DIR'; an empty .pt 'cannot read weights
    FILE: EOFError: ' (an empty reason); a file of other bytes named .pt 'refused FILE: it holds more
    than plain tensors (Unsupported operand 120)', as if it were a pickle."""
    from sanitizer.cli import main

    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(scaled(tiny_encoder.module.state_dict()), str(hub / "model.safetensors"))
    (hub / "config.json").write_text("{}")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_bytes(b"xyz: not weights\n")
    os.mkfifo(tmp_path / "fifo.pt")
    (tmp_path / "link.safetensors").symlink_to(hub / "model.safetensors")
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "nowhere.pt")
    expected = {
        "hub": f"{hub} is a directory (it holds model.safetensors); give the weights file itself",
        "empty.pt": f"{tmp_path / 'empty.pt'} is empty (0 bytes); give the weights file itself",
        "notes.pt": f"cannot read weights {tmp_path / 'notes.pt'}: "
        "it is neither safetensors nor a torch.save file",
        "fifo.pt": f"{tmp_path / 'fifo.pt'} is not a regular file; give the weights file itself",
        "dangling.pt": f"weights file not found: {tmp_path / 'dangling.pt'}",
    }
    for name, message in expected.items():
        with pytest.raises(EncoderError) as caught:
            load_encoder("timm:test_resnet", tmp_path / name, image_size=32)
        assert str(caught.value) == message
    linked = load_encoder("timm:test_resnet", tmp_path / "link.safetensors", image_size=32)
    assert (
        linked.weights_sha256
        == load_encoder("timm:test_resnet", hub / "model.safetensors", image_size=32).weights_sha256
    )
    argv = ["train", "--encoder", "timm:test_resnet", "--encoder-weights", str(hub), "--image-size", "32"]
    assert main([*argv, "--data", str(tmp_path), "--out", str(tmp_path / "dec")]) == 2
    assert capsys.readouterr().err == f"sanitizer: error: {expected['hub']}\n"


def test_a_whole_model_given_as_weights_names_the_spec_that_loads_it(tmp_path):
    """A TorchScript or torch.export file passed as --encoder-weights was torch.load's 'Cannot use
    weights_only=True with TorchScript archives' or 'internal miniz error ... corrupted' paragraph."""
    conv = torch.nn.Conv2d(3, 4, 3)
    torch.jit.save(torch.jit.script(conv), tmp_path / "m.pt")
    torch.export.save(torch.export.export(conv, (torch.randn(1, 3, 8, 8),)), tmp_path / "m.pt2")
    for name, kind in (("m.pt", "torchscript"), ("m.pt2", "export")):
        with pytest.raises(EncoderError) as e:
            read_state_dict(tmp_path / name)
        assert (
            str(e.value)
            == f"{tmp_path / name} is a {kind} program, not weights: give it as --encoder {kind}:PATH"
        )


class NormedCNN(nn.Module):
    """TinyCNN with a BatchNorm and a Dropout: layers that behave differently in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.bn(self.conv(x)).relu().mean(dim=(2, 3))))


@pytest.mark.parametrize(
    ("train", "called"),
    [
        ({"bn"}, "aten::batch_norm with training=True"),
        ({"drop"}, "aten::dropout with train=True"),
        ({"bn", "drop"}, "aten::batch_norm with training=True"),
        (set(), None),
    ],
)
def test_an_encoder_exported_in_training_mode_is_refused(tmp_path, train, called):
    """A program exported from a module in training mode kept it (it refuses .eval()): its BatchNorm
    normalised each batch by its own statistics and updated the running ones, so an image's embedding
    depended on the images batched with it; its dropout was random. Such a file is refused."""
    net = NormedCNN().eval()
    for name in train:
        getattr(net, name).train()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(net, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "enc.pt2")
    spec = f"export:{tmp_path / 'enc.pt2'}"
    if called is None:
        pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
        encoder = load_encoder(spec, image_size=16)
        assert np.allclose(embed_pixels(encoder, pixels)[:1], embed_pixels(encoder, pixels[:1]), atol=1e-5)
        return
    with pytest.raises(EncoderError) as caught:
        load_encoder(spec, image_size=16)
    assert str(caught.value) == (
        f"refused exported encoder {tmp_path / 'enc.pt2'}: it was exported in training mode ({called}), so "
        "each embedding would depend on its batch; export the model after calling its .eval()"
    )
