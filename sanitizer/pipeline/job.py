"""`sanitizer score`: every input shard -> a manifest part and a stats marker, resumably.

Ray only orchestrates: CPU tasks read and decode shards, a pool of actors (one per GPU, or CPU
actors) runs encoder + decoder, and the driver writes each shard's outputs as it completes. The
same two stages also run in one process without Ray (`workers=0`), for benchmarks and small jobs.
Re-running a job skips finished shards; a finished job re-run changes nothing.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from sanitizer.checkpoint import read_meta
from sanitizer.data.shards import ShardRef, expand_shards
from sanitizer.device import resolve_device
from sanitizer.errors import UsageError
from sanitizer.pipeline.collect import ShardCollector, apply_threshold, ok_scores
from sanitizer.pipeline.stages import ScoreStage, read_shard
from sanitizer.rundir import RunDir
from sanitizer.scoring import ScoreSettings
from sanitizer.thresholds import DEFAULT_RULE, ThresholdRule, parse_rule, resolve_threshold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreJob:
    decoder_dir: Path
    data: str
    out: Path
    test_mask_ratio: float | None = None  # None: as the decoder was calibrated
    num_masks: int | None = None
    aggregate: str | None = None
    threshold: str = DEFAULT_RULE
    batch_size: int = 512  # rows per actor call
    workers: int | None = None  # scoring actors; 0 = no Ray, one process; None = one per GPU, else 1
    ray_address: str | None = None
    device: str = "auto"
    micro_batch: int | None = None  # fixed model batch shape; None: 64 on CPU, 1024 on CUDA
    encoder_weights: str | None = None


@dataclass
class Summary:
    run_dir: Path
    shards: int
    shards_done: int
    failed_shards: dict[str, str]
    samples: int
    ok: int
    status_counts: dict[str, int]
    flagged: int
    threshold: float | None
    threshold_rule: str
    seconds: float
    scored_now: int = 0

    @property
    def images_per_second(self) -> float:
        return self.scored_now / self.seconds if self.seconds else 0.0


def score_settings(job: ScoreJob, meta: dict) -> ScoreSettings:
    calibrated = meta["scoring"]
    return ScoreSettings(
        job.test_mask_ratio if job.test_mask_ratio is not None else calibrated["test_mask_ratio"],
        job.num_masks if job.num_masks is not None else calibrated["num_masks"],
        job.aggregate if job.aggregate is not None else calibrated["aggregate"],
    )


def initial_threshold(rule: ThresholdRule, settings: ScoreSettings, meta: dict) -> float | None:
    """The threshold known before scoring; None for rules that need the scored set."""
    if rule.needs_scores:
        return None
    if rule.kind == "quantile" and settings.to_dict() != meta["scoring"]:
        raise UsageError(
            f"{rule} reads the calibration, which was made with {meta['scoring']}; scoring with "
            f"{settings.to_dict()} needs mad:K, value:X, or a decoder calibrated for these settings"
        )
    return resolve_threshold(rule, np.asarray(meta["calibration"]["scores"], np.float32))


def versions() -> dict:
    import pyarrow
    import torch

    import sanitizer

    out = {"python": platform.python_version(), "torch": torch.__version__, "pyarrow": pyarrow.__version__}
    out["sanitizer"] = getattr(sanitizer, "__version__", "dev")
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def run_score_job(job: ScoreJob, progress: bool = True) -> Summary:
    started = time.time()
    meta = read_meta(job.decoder_dir)
    settings = score_settings(job, meta)
    rule = parse_rule(job.threshold)
    threshold = initial_threshold(rule, settings, meta)
    shards = expand_shards(job.data)
    device = resolve_device(job.device)
    workers = job.workers if job.workers is not None else default_workers(device)
    micro_batch = job.micro_batch or (1024 if device.type == "cuda" else 64)
    run = RunDir(Path(job.out))
    identity = {
        "decoder_sha256": meta["decoder_sha256"],
        "shards": [asdict(s) for s in shards],
        "scoring": settings.to_dict(),
        "device_type": device.type,
    }
    with run.lock():
        removed = run.remove_stale_temps()
        if removed:
            log.info("removed %d temporary files left by an interrupted run", removed)
        previous = run.read_run()
        if previous is not None and previous.get("identity") != identity:
            raise UsageError(
                f"{run.root} holds a run with another decoder, input or scoring settings; use a new --out"
            )
        config = {
            "decoder_dir": str(Path(job.decoder_dir).resolve()),
            "data": job.data,
            "threshold_rule": str(rule),
            "batch_size": job.batch_size,
            "workers": workers,
            "micro_batch": micro_batch,
            "device": str(device),
            "ray_address": job.ray_address,
        }
        run.write_run({"identity": identity, "config": config, "versions": versions(), "state": "running"})
        pending = [s for s in shards if not run.is_done(s.stem)]
        collector = ShardCollector(run, {s.stem: s.url for s in shards}, threshold)
        stage_kwargs = {
            "decoder_dir": str(job.decoder_dir),
            "settings": settings.to_dict(),
            "device": job.device,
            "micro_batch": micro_batch,
            "encoder_weights": job.encoder_weights,
        }
        stage = ScoreStage(**stage_kwargs)  # validates encoder, weights and decoder on the driver
        image_size = stage.image_size
        if pending:
            tables = (
                local_tables(pending, stage, image_size)
                if workers == 0
                else ray_tables(pending, stage_kwargs, image_size, job, workers, device.type == "cuda")
            )
            del stage  # the Ray actors load their own copies
            consume(tables, collector, len(pending), progress)
        done = [s.stem for s in shards if run.is_done(s.stem)]
        if rule.needs_scores:
            threshold = resolve_threshold(rule, None, ok_scores(run, done))
        if threshold is not None:
            apply_threshold(run, done, threshold)
        summary = summarize(run, shards, collector, rule, threshold, time.time() - started)
        run.write_run(
            {
                "identity": identity,
                "config": config,
                "versions": versions(),
                "state": "complete" if not summary.failed_shards else "incomplete",
                "threshold": {"rule": str(rule), "value": threshold},
                "totals": {
                    "samples": summary.samples,
                    "ok": summary.ok,
                    "flagged": summary.flagged,
                    "status_counts": summary.status_counts,
                    "shards": summary.shards,
                    "shards_done": summary.shards_done,
                },
                "failed_shards": [{"stem": k, "error": v} for k, v in sorted(summary.failed_shards.items())],
            }
        )
    return summary


def default_workers(device) -> int:
    if device.type == "cuda":
        import torch

        return torch.cuda.device_count()
    return 1


def local_tables(pending: list[ShardRef], stage: ScoreStage, image_size: int) -> Iterator[pa.Table]:
    """One process: read, decode and score shard after shard."""
    for shard in pending:
        for table in read_shard(shard.url, shard.stem, image_size):
            yield stage(table)


def _read_shards(batch: pa.Table, image_size: int) -> Iterator[pa.Table]:
    """Ray CPU task: a batch of shard descriptors -> decoded tables."""
    for url, stem in zip(batch.column("url").to_pylist(), batch.column("stem").to_pylist(), strict=True):
        yield from read_shard(url, stem, image_size)


def ray_tables(
    pending: list[ShardRef], stage_kwargs: dict, image_size: int, job: ScoreJob, workers: int, gpu: bool
) -> Iterator[pa.Table]:
    """Ray Data: read tasks on CPUs stream into an actor pool that scores; results come back here."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    ensure_ray(job.ray_address)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(
        [{"url": s.url, "stem": s.stem} for s in pending], override_num_blocks=len(pending)
    )
    ds = ds.map_batches(
        _read_shards, batch_size=1, batch_format="pyarrow", fn_kwargs={"image_size": image_size}, num_cpus=1
    )
    ds = ds.map_batches(
        ScoreStage,
        batch_size=job.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=4),
        fn_constructor_kwargs=stage_kwargs,
        num_gpus=1 if gpu else 0,
        num_cpus=0 if gpu else 1,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Join a cluster when given an address; otherwise start a quiet local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    kwargs = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit`
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=512 * 1024**2, **kwargs)


def consume(tables: Iterator[pa.Table], collector: ShardCollector, shards: int, progress: bool) -> None:
    bar = tqdm(total=shards, unit="shard", desc="score", disable=not progress, dynamic_ncols=True)
    started = time.time()
    for table in tables:
        before = len(collector.done) + len(collector.failed)
        collector.add(table)
        bar.update(len(collector.done) + len(collector.failed) - before)
        rate = collector.samples / max(1e-9, time.time() - started)
        bar.set_postfix(samples=collector.samples, img_s=f"{rate:.0f}", failed=len(collector.failed))
    bar.close()


def summarize(
    run: RunDir,
    shards: list[ShardRef],
    collector: ShardCollector,
    rule: ThresholdRule,
    threshold: float | None,
    seconds: float,
) -> Summary:
    statuses: Counter = Counter()
    flagged = done = 0
    for shard in shards:
        if run.is_done(shard.stem):
            stats = run.read_stats(shard.stem)
            statuses.update(stats["status_counts"])
            flagged += stats["flagged"]
            done += 1
    failed = {s.stem: collector.failed.get(s.stem, "not finished") for s in shards if not run.is_done(s.stem)}
    return Summary(
        run_dir=run.root,
        shards=len(shards),
        shards_done=done,
        failed_shards=failed,
        samples=sum(statuses.values()),
        ok=statuses.get("ok", 0),
        status_counts=dict(sorted(statuses.items())),
        flagged=flagged,
        threshold=threshold,
        threshold_rule=str(rule),
        seconds=seconds,
        scored_now=collector.samples,
    )
