"""Running the scoring stage (pipeline/stages.py) over a job's pending shards, and what its failures
say. In this process, threads decode shards for one ScoreStage (local_tables); on Ray, Ray Data feeds
a pool of scoring actors (ray_tables), an error a worker raised, or an actor killed for memory, turned
into one SanitizerError line (actor_error). Either way the scored tables come back to the driver, which
hands each to the collector (consume). Apart from the job (pipeline/job.py), which decides what to score
and how, so that a reader of either need not read past the other; the Ray it runs on, started or
joined, is pipeline/cluster.py's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from sanitizer.data.shards import ShardRef
from sanitizer.errors import OutOfMemory, SanitizerError, UsageError, WorkerDied
from sanitizer.pipeline.cluster import OWN_RAY, check_cluster, joined_cluster, ray_for_job
from sanitizer.pipeline.collect import ShardCollector
from sanitizer.pipeline.stages import (
    ReadScoreStage,
    ScoreStage,
    memory_advice,
    read_shard,
    read_shards,
    rebatch,
    stage_files,
)
from sanitizer.progress import progress_bar

if TYPE_CHECKING:  # imported where Ray is used: `score --workers 0` and `--help` never load it
    import ray.data

    from sanitizer.pipeline.job import ScoreJob  # for annotations only: the job imports this module


def local_tables(
    pending: list[ShardRef], stage: ScoreStage, image_size: int, batch_size: int, readers: int
) -> Generator[pa.Table, None, None]:
    """One process: `readers` threads decode shards (PIL and hashlib release the GIL) while this
    thread scores batches of `batch_size` rows."""
    for table in rebatch(decoded_tables(pending, image_size, readers), batch_size):
        yield stage(table)


_DONE = object()


def decoded_tables(pending: list[ShardRef], image_size: int, readers: int) -> Iterator[pa.Table]:
    """read_shard's tables for every pending shard, from `readers` threads, through a bounded queue.

    Tables of different shards may interleave; the collector sorts each shard out by its end row.
    """
    shards = iter(pending)
    lock = threading.Lock()
    out: queue.Queue = queue.Queue(maxsize=4 * readers)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            while True:
                with lock:
                    shard = next(shards, None)
                if shard is None:
                    break
                for table in read_shard(shard.url, shard.stem, image_size):
                    if not put(table):
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put(e)
        put(_DONE)

    threads = [threading.Thread(target=read, daemon=True, name=f"read-{i}") for i in range(readers)]
    for t in threads:
        t.start()
    try:
        running = len(threads)
        while running:
            item = out.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for t in threads:
            t.join()


def ray_tables(
    pending: list[ShardRef],
    stage_kwargs: dict,
    image_size: int,
    job: ScoreJob,
    batch_size: int,
    workers: int,
    device_type: str,
) -> Generator[pa.Table, None, None]:
    """Ray Data: shards -> decoded tables -> a pool of scoring actors (gpu_scoring, cpu_scoring); the
    results come back here, and an error a worker raised as one line (actor_error)."""
    import ray
    from ray.data import DataContext

    ray_for_job(job.ray_address)
    if address := joined_cluster(job.ray_address):
        check_cluster(address, stage_files(stage_kwargs["decoder_dir"], stage_kwargs["encoder_weights"]))
    quiet_ray_data()
    spend_restart_warning()
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # score draws its own bar, per shard
    ds = ray.data.from_items(
        [{"url": s.url, "stem": s.stem} for s in pending], override_num_blocks=len(pending)
    )
    if device_type == "cuda":
        ds = gpu_scoring(ds, stage_kwargs, image_size, job.threads, batch_size, workers)
    else:
        ds = cpu_scoring(ds, stage_kwargs, job.threads, batch_size, workers)
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.RayError as e:
        if (error := actor_error(e, batch_size, stage_kwargs["micro_batch"])) is None:
            raise
        raise error from None
    OWN_RAY.clear()  # scored: Ray stays up for the process's next job, as before (its exit stops it)


# How often Ray restarts a scoring actor that died (SIGKILLed: most often by the kernel's OOM killer)
# and retries the tasks it held. Ray Data's default is forever: a batch that kills its actor each
# time held the job at 0% with no error until an outside timeout. Spent, the job stops (actor_error).
ACTOR_RESTARTS = {"max_restarts": 4, "max_task_retries": 4}


def gpu_scoring(
    ds: ray.data.Dataset,
    stage_kwargs: dict,
    image_size: int,
    threads: int | None,
    batch_size: int,
    workers: int,
) -> ray.data.Dataset:
    """Read tasks decode the shards on the CPUs, unfused from the actors; `workers` actors, a GPU and a
    CPU each, score batches of `batch_size` decoded rows."""
    ds = ds.map_batches(
        read_shards,
        batch_size=1,
        batch_format="pyarrow",
        fn_kwargs={"image_size": image_size},
        num_cpus=1,
    )
    return actor_pool(
        ds,
        ScoreStage,
        workers,
        in_flight=4,
        batch_size=batch_size,
        fn_constructor_kwargs={**stage_kwargs, "threads": threads},
        num_cpus=1,
        num_gpus=1,
    )


def cpu_scoring(
    ds: ray.data.Dataset, stage_kwargs: dict, threads: int | None, batch_size: int, workers: int
) -> ray.data.Dataset:
    """`workers` actors, each with an equal share of the cluster's CPUs as torch threads (actor_threads,
    unless `threads` is given), read their own shards and score them, a shard a call (ReadScoreStage)."""
    import ray

    node_cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node["Alive"]]
    threads = threads or actor_threads(workers, node_cpus)
    return actor_pool(
        ds,
        ReadScoreStage,
        workers,
        in_flight=2,
        batch_size=1,
        fn_constructor_kwargs={**stage_kwargs, "threads": threads, "batch_size": batch_size},
        num_cpus=threads,
    )


def actor_threads(workers: int, node_cpus: list[float]) -> int:
    """Torch threads (and CPUs asked) per CPU scoring actor: the cluster's CPUs shared out among
    `workers`, but no more than one node holds, as an actor lives on one node: one that asks for more
    is never placed, and Ray Data waits for it forever."""
    shared = int(sum(node_cpus)) // workers
    return max(1, min(shared, int(max(node_cpus, default=1))))


def actor_pool(
    ds: ray.data.Dataset, stage: type, workers: int, in_flight: int, **options: object
) -> ray.data.Dataset:
    """`ds` through a pool of `workers` actors of `stage`, `in_flight` calls queued on each, restarted
    no more than ACTOR_RESTARTS allows. Ray 2.60 has no named parameter for that budget: it goes in
    ray_remote_args, which it warns are deprecated (to be removed in 2.64), a warning silenced here."""
    from ray.data import ActorPoolStrategy

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            stage,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=in_flight),
            **options,
            **ACTOR_RESTARTS,
        )


def quiet_ray_data() -> None:
    """Ray Data's INFO lines off the console, and the stack it logs of an error it raises, which
    reaches the caller anyway (a user's error in a worker, worker_user_error, must stay one line).
    Set once ray.data is imported: its import sets its logger to DEBUG."""
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
    # "An exception was raised from a task of operator ...", with the worker's traceback, which the
    # exception raised here carries too: an OutOfMemory in an actor must stay one line
    logging.getLogger("ray.data._internal.execution.streaming_executor_state").setLevel(logging.CRITICAL)


# What Ray 2.60's core worker logs to stderr, once per process, as it creates the first actor that
# has restarts and an argument passed by ObjectRef (ray-project/ray#53727).
RESTART_WARNING = "has constructor arguments in the object store and max_restarts > 0"


@functools.cache
def spend_restart_warning() -> None:
    """Ray Data passes every pool actor its map function and DataContext by ObjectRef (ray#57733,
    whatever fn_constructor_kwargs holds), so with ACTOR_RESTARTS the first scoring actor made Ray log a
    C++ error line (RESTART_WARNING) on every run. It warns that a restart fails if those objects were
    lost: the operator holds both refs while the pool runs, in the driver's object store, so they go
    only with the driver. Ray says it once per process: spent here on a throwaway actor of our own,
    only that actor's line dropped from stderr."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class SpendRestartWarning:
        def __init__(self, arg: None) -> None:
            pass

    ours = f"class name: '[^']*SpendRestartWarning' and ID: '[0-9a-f]+' {re.escape(RESTART_WARNING)}"
    with stderr_without(ours):
        actor = SpendRestartWarning.remote(ray.put(None))
    ray.kill(actor, no_restart=True)


@contextlib.contextmanager
def stderr_without(pattern: str) -> Iterator[None]:
    """Hold what this process writes to file descriptor 2 (a C++ library's log lines too) in a
    temporary file, then pass it on without the lines that match `pattern`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().splitlines(keepends=True)
            with open(2, "wb", closefd=False) as stderr:
                stderr.writelines(line for line in lines if not re.search(pattern.encode(), line))


def actor_error(error: Exception, batch_size: int, micro_batch: int) -> SanitizerError | None:
    """The one-line error a Ray error stands for. A SanitizerError a worker raised (worker_user_error):
    out of memory as it was (the batch, not the cluster's files), anything else as an actor that could
    not work with the files it was given. An actor Ray's memory monitor killed, and one whose process
    died (not in its constructor) once more than ACTOR_RESTARTS allows: what killed it, and what to
    lower (memory_advice, for the rows of `batch_size` a call scores in model batches of
    `micro_batch`). None for any other error."""
    if (found := worker_user_error(error)) is not None:
        kind, why = found
        if kind == OutOfMemory.__name__:
            return OutOfMemory(why)
        return UsageError(
            f"a scoring actor stopped: {why} (on a Ray cluster, every node needs DECODER_DIR and the "
            "encoder weights at the paths given)"
        )
    if (usage := memory_monitor_kill(error)) is not None:
        return OutOfMemory(
            f"Ray's memory monitor killed a worker of this job as the host ran low on memory{usage}; "
            f"{memory_advice(batch_size, micro_batch)}"
        )
    if actor_died(error):
        restarts = ACTOR_RESTARTS["max_restarts"]
        return WorkerDied(
            f"a scoring actor died {restarts + 1} times (Ray restarted it {restarts} times, retrying its "
            "shards): its process was killed, most often by the kernel's OOM killer as the host ran out "
            f"of memory (`dmesg` says), or crashed; {memory_advice(batch_size, micro_batch)}"
        )
    return None


def memory_monitor_kill(error: Exception) -> str | None:
    """Where `error` is Ray's OutOfMemoryError (its memory monitor kills a worker once the node's memory
    use passes RAY_memory_usage_threshold, 95%, before the kernel's OOM killer would), the node and its
    use as Ray gives them (` (1.97GB used / 23.54GB limit on node IP)`, or '' where not found); else None.
    Ray's text runs to pages: the processes it weighed, its object store, and the same advice."""
    import ray

    if not isinstance(error, ray.exceptions.OutOfMemoryError):
        return None
    found = re.search(
        r"Memory on the node \(IP: ([^,]+), ID: \w+\) was ([^()\n]+ used / [^()\n]+ limit)", str(error)
    )
    return f" ({found[2]} on node {found[1]})" if found else ""


def actor_died(error: Exception) -> bool:
    """Whether `error` is Ray's word for a scoring actor whose process died after it started (SIGKILL,
    a crash), not one whose constructor raised (that is the worker's own error)."""
    import ray

    return isinstance(error, ray.exceptions.ActorDiedError) and not error.actor_init_failed


def worker_user_error(error: Exception) -> tuple[str, str] | None:
    """The class name and message of a SanitizerError that a Ray worker raised (a decoder or weights
    file its node cannot read, OutOfMemory), found in the error's text: an actor that dies in its
    constructor comes back as an ActorDiedError that keeps the worker's traceback as text only. None
    if there is none."""
    found = re.findall(r"^sanitizer\.errors\.(\w+): (.+)$", str(error), re.MULTILINE)
    return found[-1] if found else None


def consume(tables: Iterator[pa.Table], collector: ShardCollector, shards: int, progress: bool) -> None:
    started = time.time()
    # closed on any exit, so an error message is not followed (or overdrawn) by a stale bar
    with collector.marking(), progress_bar(progress, total=shards, unit="shard", desc="score") as bar:
        for table in tables:
            before = len(collector.done) + len(collector.failed)
            collector.add(table)
            bar.update(len(collector.done) + len(collector.failed) - before)
            rate = collector.samples / max(1e-9, time.time() - started)
            bar.set_postfix(  # shown at the bar's next redraw, which it times
                samples=collector.samples,
                samples_s=f"{rate:.0f}",
                failed=len(collector.failed),
                refresh=False,
            )
