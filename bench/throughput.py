"""Throughput of scoring and training against the model-only ceiling, on generated shards.

    .venv/bin/python bench/throughput.py --profile cl32 --device cpu
    .venv/bin/python bench/throughput.py --profile clip224 --device cuda --samples 20000
    .venv/bin/python bench/throughput.py --profile clip224 --device cuda --model-only --relax-steps 0

Measures in one run: (a) the model-only ceiling: encoder + decoder forward at the scoring micro-batch
on uint8 tensors already on the device; (b) end to end: shards on disk -> manifests on disk through
`run_score_job`, for each --workers value (0 = one process, no Ray; N = N Ray actors), with a local Ray
already running. "img/s" is the steady rate: rows of the shards that finished after the first
`workers` shards, over the time between (what a long job sees once actors are up and models loaded);
"job img/s" is the whole job, start-up included; (c) decoder training images/s (one epoch of
`train_epoch`, embeddings precomputed as `fit_decoder` does); (d) peak memory: the process tree (this
process, Ray's daemons and workers) sampled every 0.2 s as summed PSS, so shared object-store pages
count once, and peak device memory. "img/CPU-s" is images per CPU-second used by the process tree,
and "others' CPU" the share of the machine other processes used meanwhile: on a shared machine,
compare wall-clock rates only between runs with little of it. Prints a table, then one JSON line
(model_only_img_s, pipeline_img_s, ratio, train_img_s, peak_rss_mb, ...), where pipeline_img_s is the
steady rate with the device's default worker count (one per CPU or GPU), and scaling_2_vs_1 compares
2 actors with 1 at equal resources per actor (on the CPU one thread each: an extra workers=1 run);
on the CPU, model_only_scaling_2_vs_1 is the same comparison for the model loop alone (2 single-threaded
processes against 1): the most that the cores themselves allow.

Profiles: cl32 = ResNet-18 with a CIFAR stem (timm:resnet18_cifar) at 32 px, PNG shards;
clip224 = open_clip ViT-B-16 visual tower at 224 px, JPEG image-text shards made at 256 px (so decode
includes the resize and crop). Weights are seeded random and the decoder is random-init: speed does
not depend on their values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from sanitizer.checkpoint import save_decoder, save_holdout
from sanitizer.collapse import NO_AXIS, SKETCH_DIM, THUMBNAIL_SIDE, Sketched
from sanitizer.data.synth import synthetic_images, write_image_shards
from sanitizer.decoder_meta import AxisScale, DedeConfig, ScoreSettings, axis_scale_for
from sanitizer.device import resolve_device
from sanitizer.encoders import load_encoder
from sanitizer.model import DedeDecoder
from sanitizer.pipeline.job import ScoreJob, local_workers, run_score_job
from sanitizer.scoring import Scorer
from sanitizer.train import Rows, TrainSettings, on_device, train_epoch

try:
    from sanitizer.pipeline.cluster import ensure_ray
except ImportError:  # a version before pipeline/job.py was split (to measure it with this script)
    from sanitizer.pipeline.job import ensure_ray

PROFILES = {
    "cl32": {"spec": "timm:resnet18_cifar", "size": 32, "source_size": 32, "fmt": "png", "captions": False},
    "clip224": {
        "spec": "open_clip:ViT-B-16",
        "size": 224,
        "source_size": 256,
        "fmt": "jpeg",
        "captions": True,
    },
}
# (samples scored, samples per shard, training samples) when not given: the CPU is ~1000x slower.
DEFAULT_SIZES = {
    ("cl32", "cpu"): (2048, 128, 1024),
    ("cl32", "cuda"): (262_144, 8192, 65_536),
    ("clip224", "cpu"): (64, 16, 32),
    ("clip224", "cuda"): (32_768, 1024, 16_384),
}


# -- measuring ---------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(root: int) -> list[int]:
    tree, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(tree.get(pid, []))
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _busy_ticks() -> int:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4]  # all but idle and iowait


class Sampler:
    """Peak summed PSS of this process tree, peak device memory, and CPU used by other processes."""

    def __init__(self, device: torch.device, interval: float = 0.2) -> None:
        self.device, self.interval = device, interval
        self.peak_kb = 0
        self.peak_device = 0
        self.ours: dict[int, int] = {}  # last CPU ticks seen per pid (ours, incl. exited ones)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._base_device = self._device_used()

    def _device_used(self) -> int:
        if self.device.type != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def sample(self) -> None:
        pids = _descendants(os.getpid())
        self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in pids))
        for p in pids:
            self.ours[p] = max(self.ours.get(p, 0), _cpu_ticks(p))
        self.peak_device = max(self.peak_device, self._device_used() - self._base_device)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def phase(device: torch.device, results: dict):
    """Times a block; records peak PSS of the tree, peak device memory and other processes' CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    busy0, started = _busy_ticks(), time.perf_counter()
    with Sampler(device) as sampler:
        sampler.sample()
        ours0 = sum(sampler.ours.values())
        yield results
        if device.type == "cuda":
            torch.cuda.synchronize()
        sampler.sample()
    seconds = time.perf_counter() - started
    hz = os.sysconf("SC_CLK_TCK")
    ours = (sum(sampler.ours.values()) - ours0) / hz
    others = max(0.0, (_busy_ticks() - busy0) / hz - ours)
    device_peak = sampler.peak_device
    if device.type == "cuda":
        device_peak = max(device_peak, torch.cuda.max_memory_allocated())
    results.update(
        seconds=seconds,
        peak_mb=sampler.peak_kb / 1024,
        device_mb=device_peak / 2**20,
        cpu_s=ours,
        others_cpu=others / (seconds * os.cpu_count()),
    )


# -- setup -------------------------------------------------------------------------------------------
HELD_OUT = 100  # the random decoder's calibration scores and held-out images


def make_decoder(encoder, out: Path, settings: ScoreSettings) -> Path:
    """A random-init decoder directory with the meta the scoring job reads, and random held-out images
    for its collapse pass, which the job runs by default (its cost does not depend on their values)."""
    decoder = DedeDecoder(DedeConfig.default_for(encoder.preprocess.image_size, encoder.embed_dim))
    scores = np.linspace(0.5, 1.5, HELD_OUT)
    calibration = {"n": HELD_OUT, "scores": [float(x) for x in scores]}
    if settings.needs_axis_scale:  # the identity, applied as a trained one would be
        calibration["axis_scale"] = AxisScale.fit(scores, scores).to_dict()
    meta = {
        "encoder": {
            "spec": encoder.spec,
            "weights_file": None,
            "weights_sha256": encoder.weights_sha256,
            "embed_dim": encoder.embed_dim,
            "preprocess": encoder.preprocess.to_dict(),
        },
        "training": {"note": "random init, for bench/throughput.py"},
        "scoring": settings.to_dict(),
        "calibration": calibration,
    }
    save_decoder(out, decoder, meta)
    rng = np.random.default_rng(0)
    sketches = rng.normal(size=(HELD_OUT, SKETCH_DIM))
    sketches /= np.linalg.norm(sketches, axis=1, keepdims=True)
    thumbnails = rng.integers(0, 256, (HELD_OUT, THUMBNAIL_SIDE**2), np.uint8)
    save_holdout(out, Sketched(sketches.astype(np.float32), thumbnails, np.full(HELD_OUT, NO_AXIS, np.int32)))
    return out


def make_shards(profile: dict, n: int, per_shard: int, out: Path) -> None:
    pixels = synthetic_images(min(n, 512), profile["source_size"], seed=1)
    pixels = pixels[np.arange(n) % len(pixels)]  # repeats are fine: nothing is cached by content
    captions = [f"a synthetic photo number {i}" for i in range(n)] if profile["captions"] else None
    write_image_shards(out, pixels, captions=captions, per_shard=per_shard, fmt=profile["fmt"])


# -- the three measurements --------------------------------------------------------------------------
def _forward(scorer: Scorer, pixels: torch.Tensor, seeds: torch.Tensor):
    """Scorer.forward; spelled out for versions before it existed (to measure them with this script)."""
    if hasattr(scorer, "forward"):
        return scorer.forward(pixels, seeds)
    from sanitizer.device import autocast

    x = scorer.encoder.normalize(pixels)
    with autocast(scorer.device):
        embedding = scorer.encoder.embed(x)
        return scorer.errors_given_embedding(x, embedding, seeds), embedding.norm(dim=1)


def model_only(scorer: Scorer, size: int, device: torch.device, seconds: float) -> dict:
    """Images/s of Scorer.forward on device-resident uint8 batches of the scoring micro-batch."""
    m = scorer.micro_batch
    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(synthetic_images(m, size, seed=2)).to(device)
    seeds = torch.from_numpy(rng.integers(-(2**62), 2**62, m)).to(device)
    out = {}
    with torch.no_grad(), phase(device, out):  # not inference_mode: relax_token needs autograd
        for _ in range(2 if device.type == "cuda" else 1):  # warm-up: allocator, kernel selection
            _forward(scorer, pixels, seeds)
        if device.type == "cuda":
            torch.cuda.synchronize()
        iters, started = 0, time.perf_counter()
        while iters < 2 or time.perf_counter() - started < seconds:
            _forward(scorer, pixels, seeds)
            iters += 1
            if device.type == "cuda" and iters % 8 == 0:
                torch.cuda.synchronize()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
    out["img_s"] = iters * m / elapsed
    out["images"] = (iters + (2 if device.type == "cuda" else 1)) * m  # with warm-up, as the CPU seconds
    return out


def _model_only_child(decoder_dir: str, micro: int, seconds: float, barrier) -> tuple[int, float]:
    """One single-threaded process of model_only_processes: load, warm up, wait for the others, run."""
    from sanitizer.checkpoint import load_decoder

    torch.set_num_threads(1)
    decoder, meta = load_decoder(Path(decoder_dir))
    pre = meta["encoder"]["preprocess"]
    encoder = load_encoder(
        meta["encoder"]["spec"], None, pre["image_size"], tuple(pre["mean"]), tuple(pre["std"])
    )
    settings = ScoreSettings.from_dict(meta["scoring"])
    scorer = Scorer(encoder, decoder, settings, axis_scale_for(meta, settings), micro)
    pixels = torch.from_numpy(synthetic_images(micro, pre["image_size"], seed=2))
    seeds = torch.arange(micro, dtype=torch.int64)
    with torch.no_grad():
        _forward(scorer, pixels, seeds)
        barrier.wait()
        iters, started = 0, time.perf_counter()
        while iters < 2 or time.perf_counter() - started < seconds:
            _forward(scorer, pixels, seeds)
            iters += 1
    return iters * micro, time.perf_counter() - started


def procs_row(processes: int) -> str:
    return f"model only {processes} procs"


def model_only_processes(decoder_dir: Path, micro: int, processes: int, seconds: float) -> dict:
    """CPU: the model loop in `processes` single-threaded processes at once (summed images/s). On a
    few cores this beats one process with as many threads, so it is the CPU ceiling to compare with."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    out = {}
    with ctx.Manager() as manager, phase(torch.device("cpu"), out):
        barrier = manager.Barrier(processes)
        with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
            args = [(str(decoder_dir), micro, seconds, barrier)] * processes
            results = list(pool.map(_model_only_child, *zip(*args, strict=True)))
    out["img_s"] = sum(images / elapsed for images, elapsed in results)
    out["images"] = sum(images for images, _ in results)
    return out


@contextmanager
def first_seen(folder: Path, interval: float = 0.05):
    """When each file in `folder` first appeared while the block ran, polled (name -> time.time()).
    A shard's stats marker is written when it is scored, then again by the collapse pass at the
    job's end wherever the pass changes its counts, so its mtime says when the pass ran."""
    seen: dict[str, float] = {}
    stop = threading.Event()

    def poll() -> None:
        while True:
            now = time.time()
            for name in os.listdir(folder) if folder.is_dir() else ():
                seen.setdefault(name, now)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def pipeline(
    decoder_dir: Path, data: Path, out: Path, workers: int, device: str, n: int, micro: int | None, **extra
) -> dict:
    """The whole job's rate, and its steady rate: shards scored after the first `workers` ones over
    the time they took (what a long job sees once actors are up and models loaded; the collapse pass
    at the end is in the job's rate only)."""
    result = {}
    started = time.time()
    with phase(resolve_device(device), result), first_seen(out / "stats") as seen:
        summary = run_score_job(
            ScoreJob(decoder_dir, str(data), out, workers=workers, device=device, micro_batch=micro, **extra),
            progress=False,
        )
    if summary.samples != n or summary.failed_shards:
        raise SystemExit(f"pipeline workers={workers}: {summary.samples}/{n} rows, {summary.failed_shards}")
    finished = sorted(
        (seen.get(p.name, p.stat().st_mtime), json.loads(p.read_text())["count"])
        for p in (out / "stats").glob("*_stats.json")
    )
    result["job_img_s"] = n / result["seconds"]
    result["first_shard_s"] = finished[0][0] - started
    # Shards finished with (or within 0.5 s of) the first `workers` ones were in the same batches.
    t0 = finished[min(max(1, workers), len(finished)) - 1][0] + 0.5
    later = [(t, c) for t, c in finished if t > t0]
    span = later[-1][0] - t0 + 0.5 if later else 0.0
    if span > 0.25 * result["seconds"]:
        result["img_s"] = sum(c for _, c in later) / span
    else:  # too few shards, or results that all came at the end: only the whole job can tell
        result["img_s"] = result["job_img_s"]
    return result


def training(encoder, n: int, settings: TrainSettings) -> dict:
    from tqdm import tqdm

    from sanitizer.encoders import embed_pixels

    size, device = encoder.preprocess.image_size, encoder.device
    pixels = synthetic_images(min(n, 512), size, seed=3)[np.arange(n) % min(n, 512)]
    started = time.perf_counter()
    embeddings = embed_pixels(encoder, pixels)
    embed_s = time.perf_counter() - started
    decoder = DedeDecoder(DedeConfig.default_for(size, encoder.embed_dim)).to(device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = math.ceil(n / settings.batch_size)
    bar = tqdm(disable=True)
    # As fit holds them: rows of one array each, on a GPU moved there once.
    pixels, embeddings = (on_device(Rows(a, np.arange(n)), device) for a in (pixels, embeddings))
    warm = np.arange(min(n, settings.batch_size * 2))
    train_epoch(
        decoder, optimizer, encoder, pixels.subset(warm), embeddings.subset(warm), settings, 0, steps, bar
    )
    out = {}
    with phase(device, out):
        train_epoch(decoder, optimizer, encoder, pixels, embeddings, settings, 1, 2 * steps, bar)
    out["img_s"] = n / out["seconds"]
    out["embed_img_s"] = n / embed_s
    return out


# -- main --------------------------------------------------------------------------------------------
def default_micro_batch(decoder_dir: Path, root: Path, device: torch.device, size: int) -> int:
    """The scoring job's default micro-batch (also for versions before batch_shape existed)."""
    try:
        from sanitizer.pipeline.job import batch_shape
    except ImportError:
        return 1024 if device.type == "cuda" else 64
    return batch_shape(ScoreJob(decoder_dir, "", root), device, size)[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="cl32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--samples", type=int, help="samples in the generated shards")
    p.add_argument("--per-shard", type=int, help="samples per shard")
    p.add_argument("--train-samples", type=int, help="images in the timed training epoch")
    p.add_argument(
        "--workers",
        help="comma list of worker counts to run end to end (default: 0,1,2 on "
        "the CPU; 0 and the GPU count on CUDA)",
    )
    p.add_argument("--model-seconds", type=float, default=10.0, help="how long to time the model-only loop")
    p.add_argument("--micro-batch", type=int, help="scoring micro-batch (default: the job's default)")
    p.add_argument("--compile", action="store_true", help="torch.compile the scoring model (CUDA only)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument(
        "--model-only",
        action="store_true",
        help="time the model loop alone: no shards, pipeline or training (runs without Ray installed)",
    )
    p.add_argument(
        "--relax-steps", type=int, help="scoring's latent relaxation steps (default: the package's)"
    )
    p.add_argument("--work-dir", type=Path, help="keep shards and runs here (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the JSON line to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = PROFILES[args.profile]
    device = resolve_device(args.device)
    n, per_shard, n_train = DEFAULT_SIZES[(args.profile, device.type)]
    n, per_shard, n_train = args.samples or n, args.per_shard or per_shard, args.train_samples or n_train
    defaults = local_workers(device)
    if args.model_only:
        workers = []
    elif args.workers:
        workers = [int(w) for w in args.workers.split(",")]
    else:  # one process, then Ray with 1 and 2 actors (CPU) or 1 and all GPUs
        workers = sorted({0, 1, 2 if device.type == "cpu" else defaults})
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="sanitizer-throughput-"))
    root.mkdir(parents=True, exist_ok=True)

    encoder = load_encoder(profile["spec"], image_size=profile["size"], device=device)
    relax = {} if args.relax_steps is None else {"relax_steps": args.relax_steps}
    settings = ScoreSettings(**relax)
    decoder_dir = make_decoder(encoder, root / "decoder", settings)
    data = root / "shards"
    if workers and not data.is_dir():
        make_shards(profile, n, per_shard, data)

    from sanitizer.checkpoint import load_decoder

    decoder, meta = load_decoder(decoder_dir, device)
    micro = args.micro_batch or default_micro_batch(decoder_dir, root, device, profile["size"])
    compile_kw = {"compile": True} if args.compile else {}  # only versions that have the option
    scorer = Scorer(encoder, decoder, settings, axis_scale_for(meta, settings), micro, **compile_kw)
    rows = {"model only": model_only(scorer, profile["size"], device, args.model_seconds)}
    if device.type == "cpu" and (os.cpu_count() or 1) > 1:
        # One single-threaded process per CPU is the CPU ceiling; 1 and 2 of them give the scaling
        # that the hardware itself allows, to read scaling_2_vs_1 against.
        for procs in sorted({1, 2, os.cpu_count()}):
            rows[procs_row(procs)] = model_only_processes(decoder_dir, micro, procs, args.model_seconds)

    if any(workers):
        ensure_ray(None)  # a running cluster, as in production: its start is not the job's cost
    ceiling_of = {}  # pipeline row -> the model-only row measured just before it
    for i, w in enumerate(workers):
        ceiling = "model only"
        if i:  # a shared machine's load drifts: measure the ceiling again next to each pipeline run
            ceiling = f"model only (w={w})"
            rows[ceiling] = model_only(scorer, profile["size"], device, args.model_seconds / 2)
        out = root / f"run-w{w}-{time.time_ns()}"
        rows[f"pipeline workers={w}"] = pipeline(
            decoder_dir, data, out, w, device.type, n, args.micro_batch, **compile_kw
        )
        ceiling_of[f"pipeline workers={w}"] = rows[ceiling]["img_s"]
    scaling_base = "pipeline workers=1"
    has_threads = "threads" in {f.name for f in dataclasses.fields(ScoreJob)}  # older versions: 1 thread
    if device.type == "cpu" and {1, 2} <= set(workers) and has_threads:  # equal per-actor resources
        scaling_base = "pipeline workers=1 threads=1"
        out = root / f"run-w1t1-{time.time_ns()}"
        rows[scaling_base] = pipeline(
            decoder_dir, data, out, 1, device.type, n, args.micro_batch, threads=1, **compile_kw
        )
    del scorer, decoder
    train = not (args.skip_train or args.model_only)
    if train:
        rows["train (decoder)"] = training(encoder, n_train, TrainSettings())

    parallel = rows.get(procs_row(os.cpu_count()))
    if parallel is not None:  # the CPU ceiling is the better of the two ways to run the model
        ceiling_of = {k: max(v, parallel["img_s"]) for k, v in ceiling_of.items()}
    print(f"# {args.profile} on {device.type}: {describe_machine(device)}; {n} samples, {per_shard}/shard")
    header = (
        "phase",
        "img/s",
        "job img/s",
        "seconds",
        "img/CPU-s",
        "peak PSS MB",
        "device MB",
        "others' CPU",
        "ratio",
    )
    print(f"{header[0]:<30}" + "".join(f"{h:>12}" for h in header[1:]))
    for name, r in rows.items():
        job_rate = r.get("job_img_s", r["img_s"])
        n_images = r.get("images", job_rate * r["seconds"])
        print(
            f"{name:<30}{r['img_s']:>12.1f}{job_rate:>12.1f}{r['seconds']:>12.1f}"
            f"{n_images / max(r['cpu_s'], 1e-9):>12.1f}{r['peak_mb']:>12.0f}{r['device_mb']:>12.0f}"
            f"{r['others_cpu']:>12.0%}"
            + (f"{r['img_s'] / ceiling_of[name]:>12.2f}" if name in ceiling_of else "")
        )
    default_name = f"pipeline workers={defaults}"
    if default_name not in rows:
        default_name = next((k for k in rows if k.startswith("pipeline")), None)
    default_row = rows.get(default_name)
    ceiling = ceiling_of.get(default_name, rows["model only"]["img_s"])
    by_workers = {w: rows[f"pipeline workers={w}"]["img_s"] for w in workers}
    result = {
        "profile": args.profile,
        "device": device.type,
        "machine": describe_machine(device),
        "samples": n,
        "micro_batch": micro,
        "relax_steps": settings.relax_steps,
        "model_only_img_s": round(ceiling, 1),  # next to the pipeline_img_s run (CPU: or N processes)
        "model_only_all_img_s": [round(r["img_s"], 1) for k, r in rows.items() if k.startswith("model")],
        "pipeline_img_s": round(default_row["img_s"], 1) if default_row else None,
        "ratio": round(default_row["img_s"] / ceiling, 3) if default_row else None,
        "pipeline_by_workers_img_s": {str(w): round(v, 1) for w, v in by_workers.items()},
        "pipeline_job_img_s": {k: round(r["job_img_s"], 1) for k, r in rows.items() if "job_img_s" in r},
        "first_shard_s": {k: round(r["first_shard_s"], 1) for k, r in rows.items() if "first_shard_s" in r},
        "scaling_2_vs_1": (
            round(by_workers[2] / rows[scaling_base]["img_s"], 3) if {1, 2} <= by_workers.keys() else None
        ),
        "model_only_scaling_2_vs_1": (
            round(rows[procs_row(2)]["img_s"] / rows[procs_row(1)]["img_s"], 3)
            if procs_row(2) in rows
            else None
        ),
        "train_img_s": round(rows["train (decoder)"]["img_s"], 1) if train else None,
        "embed_img_s": round(rows["train (decoder)"]["embed_img_s"], 1) if train else None,
        "peak_rss_mb": round(max(r["peak_mb"] for r in rows.values())),
        "driver_max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_device_mb": round(max(r["device_mb"] for r in rows.values())),
        "others_cpu_max": round(max(r["others_cpu"] for r in rows.values()), 3),
    }
    if args.work_dir is None:
        shutil.rmtree(root, ignore_errors=True)
    line = json.dumps(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")
    print(line)
    return 0


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPUs"
    return f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"


if __name__ == "__main__":
    sys.exit(main())
