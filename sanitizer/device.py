"""Where the models run, and in which precision: bf16 autocast where the hardware computes in bf16
(CUDA, and CPUs with AVX512-BF16 or AMX), fp32 on other CPUs."""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator

import torch

from sanitizer.errors import OutOfMemory, UsageError

# what torch's CPU allocator raises (a RuntimeError) when the host has no memory for a tensor
HOST_ALLOCATION_FAILED = "DefaultCPUAllocator: can't allocate memory"


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA device is visible")
    if name not in ("cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, not {name!r}")
    return torch.device(name)


@functools.cache
def bf16_units() -> str | None:
    """The units this CPU multiplies bf16 matrices with: "AMX", "AVX512-BF16", or None where it has
    none. Results in bf16 differ between the two (bench/NOTES.md, session 41). (torch.cpu's probes
    are private API; torch is pinned.)"""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware. Where it does, a decoder training step
    ran 1.6x faster under bf16 autocast (2-core AMD EPYC with AVX512-BF16); where it does not, oneDNN
    emulates bf16 and is slower than fp32."""
    return bf16_units() is not None


def precision(device: torch.device) -> str:
    """What autocast computes in: bf16 on CUDA and on CPUs with bf16 hardware, fp32 on other CPUs."""
    return "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where precision() says bf16; no autocast (fp32) elsewhere."""
    if precision(device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def exhausted_memory(error: BaseException, device: torch.device) -> str | None:
    """What `error` says ran out, in words ("GPU 0's memory", "host memory"); None for any other error,
    which keeps its traceback: it is a bug to report, not a batch too large."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        found = re.search(r"\bGPU (\d+)", str(error))
        return f"GPU {found[1] if found else device.index or 0}'s memory"
    if isinstance(error, MemoryError) or HOST_ALLOCATION_FAILED in str(error):
        return "host memory"
    return None


@contextlib.contextmanager
def memory_guard(device: torch.device, doing: str, advice: str) -> Iterator[None]:
    """Memory exhaustion inside as one OutOfMemory line: `ran out of WHAT DOING; ADVICE`. Raised from
    None, so that the tensors the traceback's frames hold are freed with it."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:  # torch's OutOfMemoryError is a RuntimeError
        if (what := exhausted_memory(e, device)) is None:
            raise
        raise OutOfMemory(f"ran out of {what} {doing}; {advice}") from None


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one CPU thread, then restore the count.

    With two threads every op ends at an OpenMP barrier that waits for both; when another process
    holds the other core, each op waits for the preempted thread's time slice. Measured on the
    shared 2-core dev VM (session 29): a 32 px decoder's training steps ran at 1072-1577 img/s on one
    thread and 71-91 img/s on two, a 224 px one's at 19-23 and 11-12 img/s; one implant epoch of the
    demo took 1.9 s on one thread and 84 s on two.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Up to this image size the decoder is DedeConfig's small one (8 px patches, one block), whose ops are
# too small to split: one thread is as fast as two on a quiet machine (the demo's measurement) and far
# faster on a busy one. A larger decoder's may gain from more threads on a quiet, many-core machine,
# which could not be measured here, so it keeps torch's count.
ONE_THREAD_MAX_SIZE = 64


def training_threads(device: torch.device, image_size: int) -> contextlib.AbstractContextManager:
    """One torch thread for training a small decoder on the CPU (see one_torch_thread), unless
    OMP_NUM_THREADS chooses the count; torch's own count elsewhere."""
    if device.type != "cpu" or image_size > ONE_THREAD_MAX_SIZE or "OMP_NUM_THREADS" in os.environ:
        return contextlib.nullcontext()
    return one_torch_thread()
