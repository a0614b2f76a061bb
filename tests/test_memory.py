"""Memory exhaustion while scoring or training: the batch was too large for the GPU or the host, not a
bug and not the input's fault. One line saying what ran out, at which batch, and what to do; exit 1;
finished shards kept. Any other error keeps its traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import sanitizer.train as train_module
from sanitizer.cli import main
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.decoder_meta import ScoreSettings
from sanitizer.encoders import load_encoder
from sanitizer.pipeline.stages import memory_advice
from sanitizer.scoring import Scorer
from sanitizer.train import TrainSettings, train_decoder

from .conftest import TINY_ENCODER, TINY_MODEL, TINY_SIZE

GPU_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 3 has a total capacity of 15.70 GiB of which "
    "1.10 GiB is free."
)
KEPT = "finished shards are kept, so the re-run resumes"


def score_argv(decoder: Path, data: Path, out: Path, *more: str) -> list[str]:
    return ["score", "--decoder", str(decoder), "--data", str(data), "--out", str(out), *more]


def fail_from_call(monkeypatch, error: BaseException, first: int) -> None:
    """Scorer.score raises `error` from its `first` call on, as a batch too large for what is free."""
    score, calls = Scorer.score, []

    def fails(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= first:
            raise error
        return score(self, *args, **kwargs)

    monkeypatch.setattr(Scorer, "score", fails)


def test_a_gpu_out_of_memory_while_scoring_is_one_line_that_names_the_gpu_and_the_batch(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch, capsys
):
    fail_from_call(monkeypatch, torch.cuda.OutOfMemoryError(GPU_OOM), first=1)
    argv = score_argv(
        tiny_decoder_dir, tiny_shards, tmp_path / "run", "--workers", "0", "--batch-size", "100"
    )
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sanitizer: error: ran out of GPU 3's memory scoring 100 rows in model batches of 64; give a "
        f"lower --batch-size (64 or less); {KEPT}"
    )


def test_host_memory_exhaustion_within_one_model_batch_keeps_the_finished_shards(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch, capsys
):
    run = tmp_path / "run"
    fail_from_call(monkeypatch, MemoryError(), first=2)
    argv = score_argv(tiny_decoder_dir, tiny_shards, run, "--workers", "0", "--batch-size", "41")
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sanitizer: error: ran out of host memory scoring 41 rows in model batches of 64; --batch-size "
        "cannot lower the model's batch of 64: give a lower --micro-batch (32, say), free that memory "
        f"of other processes, or use a device with more; {KEPT}"
    )
    # the first call held the whole first shard (40 samples and its end row): the re-run scores the rest
    assert sorted(p.name for p in (run / "stats").iterdir()) == ["shard-000000_stats.json"]
    monkeypatch.undo()
    assert main([*argv, "--micro-batch", "32"]) == 0  # as it says
    assert "throughput: 80 samples in" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["config"]["micro_batch"] == 32


def test_a_model_batch_of_one_that_runs_out_of_memory_is_not_told_to_lower_it():
    assert memory_advice(1, 1) == (
        "--batch-size cannot lower the model's batch of 1: free that memory of other processes, or use "
        f"a device with more; {KEPT}"
    )


def test_another_error_while_scoring_keeps_its_traceback(
    tmp_path, tiny_decoder_dir, tiny_shards, monkeypatch
):
    """Only memory exhaustion is the user's to act on; anything else is a bug to report."""
    fail_from_call(monkeypatch, RuntimeError("shape mismatch"), first=2)
    argv = score_argv(tiny_decoder_dir, tiny_shards, tmp_path / "run", "--workers", "0", "--batch-size", "41")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(argv)


class HugeOnWhite(torch.nn.Module):
    """An encoder that asks for a petabyte on an all-white image: a real allocation failure of torch's
    CPU allocator, in whichever process scores it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.flatten(1).amin(1) > 0.99).any()):  # used, so that TorchScript keeps it
            x = x + torch.empty(1 << 50, dtype=torch.uint8)[0]
        return self.conv(x).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def huge_on_white(tmp_path_factory, tiny_shards) -> tuple[Path, Path]:
    """A decoder for HugeOnWhite trained on the fixture's images (none white), and a shard of 3 images,
    the last one white."""
    root = tmp_path_factory.mktemp("memory")
    torch.manual_seed(0)
    torch.jit.script(HugeOnWhite()).save(str(root / "encoder.ts"))
    spec = f"torchscript:{root / 'encoder.ts'}"
    encoder = load_encoder(spec, image_size=TINY_SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    settings, scoring = TrainSettings(epochs=1, batch_size=32), ScoreSettings(num_masks=2)
    train_decoder(encoder, str(tiny_shards), root / "decoder", settings, scoring, TINY_MODEL, progress=False)
    pixels = synthetic_images(3, TINY_SIZE, seed=5)
    pixels[2] = 255
    write_image_shards(root / "data", pixels, per_shard=3)
    return root / "decoder", root / "data"


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_real_host_allocation_failure_is_one_line_also_from_a_ray_actor(
    tmp_path, huge_on_white, workers, request, capsys
):
    if workers != "0":
        request.getfixturevalue("ray_session")
    decoder, data = huge_on_white
    argv = score_argv(decoder, data, tmp_path / "run", "--workers", workers, "--device", "cpu")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "sanitizer: error: ran out of host memory scoring 4 rows in model batches of 64; --batch-size "
        "cannot lower the model's batch of 64: give a lower --micro-batch (32, say), free that memory "
        f"of other processes, or use a device with more; {KEPT}"
    )
    assert "Traceback" not in err, err


def test_out_of_memory_while_training_is_one_line(tmp_path, tiny_shards, monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(GPU_OOM)

    monkeypatch.setattr(train_module, "train_epoch", oom)
    argv = ["train", "--encoder", TINY_ENCODER, "--image-size", "32", "--data", str(tiny_shards)]
    assert main([*argv, "--out", str(tmp_path / "dec"), "--batch-size", "4096", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "sanitizer: error: ran out of GPU 3's memory training at --batch-size 4096 on 32 px images; give "
        "a lower --batch-size, --image-size or --max-samples, or a smaller decoder (--width, --depth, "
        "--decoder-depth)"
    )
    # as it says: a lower --batch-size trains into the same --out
    monkeypatch.undo()
    tiny = ["--patch-size", "8", "--width", "32", "--depth", "1", "--decoder-depth", "1", "--heads", "2"]
    assert main([*argv, "--out", str(tmp_path / "dec"), "--epochs", "1", *tiny, "--device", "cpu"]) == 0


def test_only_memory_errors_count_as_memory_exhaustion() -> None:
    from sanitizer.device import exhausted_memory

    cpu = torch.device("cpu")
    host = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: ...")
    assert exhausted_memory(host, cpu) == "host memory"
    assert exhausted_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."), torch.device("cuda", 1)) == (
        "GPU 1's memory"
    )
    assert exhausted_memory(RuntimeError("CUDA error: an illegal memory access"), cpu) is None
    assert exhausted_memory(np.linalg.LinAlgError("singular"), cpu) is None
