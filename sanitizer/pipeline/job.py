"""`sanitizer score`: every input shard -> a manifest part and a stats marker, resumably.

This module is the job: its plan (what it scores, on which device, in what batches, and what run.json
records of it), resuming a RUN_DIR, the flags, and the totals. The scoring stage runs in
pipeline/run_stage.py: on GPUs, CPU tasks read and decode shards for a pool of Ray actors (one per GPU)
that runs encoder + decoder; on CPUs each actor reads its own shards too; without Ray (`workers=0`) both
stages run in this process, for benchmarks and small jobs. The driver writes each shard's outputs as it
completes (pipeline/collect.py). Once every shard is in, a threshold rule that needs the scored set is
resolved, the collapse pass flags (pipeline/collapse_pass.py), and run.json records the totals.
Re-running a job skips finished shards, and flagging when nothing the flags follow from changed
(flag_inputs); a finished job re-run changes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import torch

from sanitizer.checkpoint import read_meta
from sanitizer.data.shards import ShardRef, expand_shards, file_url_shard, listed_before
from sanitizer.decoder_meta import ScoreSettings, required_calibration
from sanitizer.device import resolve_device
from sanitizer.errors import SanitizerError, UsageError, shortlist
from sanitizer.joblock import refuse_busy
from sanitizer.manifest import SCHEMA_VERSION
from sanitizer.pipeline.cluster import cluster_resources, joined_cluster
from sanitizer.pipeline.collapse_pass import HoldoutImages, apply_flags, holdout_for
from sanitizer.pipeline.collect import ShardCollector
from sanitizer.pipeline.run_stage import consume, local_tables, ray_tables
from sanitizer.pipeline.stages import ScoreStage
from sanitizer.records import RecordError, lookup
from sanitizer.rundir import CLEAN_RECORD_FIELDS, RunDir, flagged_totals, ok_scores, shard_entry
from sanitizer.thresholds import (
    DEFAULT_COLLAPSE_RULE,
    DEFAULT_RULE,
    ThresholdRule,
    parse_rule,
    resolve_threshold,
)
from sanitizer.wording import counted

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreJob:
    decoder_dir: Path
    data: str
    out: Path
    test_mask_ratio: float | None = None  # None: as the decoder was calibrated
    num_masks: int | None = None
    aggregate: str | None = None
    axis_aggregate: str | None = None
    axis_error: str | None = None
    error_pool: int | None = None
    error: str | None = None
    relax_steps: int | None = None
    relax_radius: float | None = None
    threshold: str = DEFAULT_RULE
    collapse: str | None = DEFAULT_COLLAPSE_RULE  # a rule for the collapse pass; None: no pass
    batch_size: int | None = None  # rows per scoring call; None: up to 8 micro-batches, <= ~64 MiB
    workers: int | None = None  # scoring actors; 0 = no Ray, one process; None = one per GPU or CPU
    ray_address: str | None = None
    device: str = "auto"
    micro_batch: int | None = None  # fixed model batch shape; None: 64 on CPU; CUDA: 1024 (512 > 64 px)
    encoder_weights: str | None = None
    compile: bool = False  # torch.compile the model on CUDA (ignored on the CPU)
    threads: int | None = None  # torch CPU threads per scoring actor; None: the CPUs shared out
    read_threads: int | None = None  # workers=0 decode threads; None: 1 on CPU, up to 8 with CUDA

    def __post_init__(self) -> None:
        floors = {
            "--workers": (self.workers, 0),
            "--batch-size": (self.batch_size, 1),
            "--micro-batch": (self.micro_batch, 1),
            "threads": (self.threads, 1),
            "read_threads": (self.read_threads, 1),
        }
        for name, (value, least) in floors.items():
            if value is not None and value < least:
                raise UsageError(f"{name} must be at least {least}, not {value}")


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
    flagged_by: dict[str, int]  # flagged by the score, by the collapse pass (a sample can be both)
    threshold: float | None
    threshold_rule: str
    # on the score evidence plus the neighbours' (sanitizer.collapse), where the pass set each row's
    # score threshold from its neighbours' scores; None where every row's is `threshold`
    neighbours_threshold: float | None
    collapse_threshold: float | None  # on the evidence (sanitizer.collapse)
    collapse_rule: str | None
    seconds: float
    scored_now: int = 0  # manifest rows written by this job: not_an_image and no_image rows too

    @property
    def samples_per_second(self) -> float:
        return self.scored_now / self.seconds if self.seconds else 0.0


def score_settings(job: ScoreJob, meta: dict) -> ScoreSettings:
    """The decoder's calibration settings, with those the job gives in their place."""
    calibrated = ScoreSettings.from_dict(meta["scoring"]).to_dict()
    given = {k: getattr(job, k) for k in calibrated if getattr(job, k) is not None}
    return ScoreSettings(**{**calibrated, **given})


def initial_threshold(rule: ThresholdRule, settings: ScoreSettings, meta: dict) -> float | None:
    """The threshold known before scoring; None for rules that need the scored set."""
    if rule.needs_scores:
        return None
    if rule.kind != "quantile":
        return resolve_threshold(rule, None)
    otherwise = "mad:K, value:X, or a decoder calibrated for these settings"
    return resolve_threshold(rule, required_calibration(meta, settings, str(rule), otherwise))


def normalised_identity(identity: dict | None) -> dict | None:
    """A run identity as two jobs compare it: its shards in stem order (stems and scores do not depend
    on the order they are listed in), and its scoring settings in today's form, so that a run begun by
    an earlier version (before error_pool, error or relax_steps was saved) resumes instead of being
    refused."""
    if not isinstance(identity, dict) or not isinstance(identity.get("scoring"), dict):
        return identity  # none, or not one this version wrote: it matches no job
    shards = identity.get("shards")
    if isinstance(shards, list) and all(isinstance(s, dict) for s in shards):
        shards = sorted(shards, key=lambda s: str(s.get("stem")))
    try:
        return {
            **identity,
            "shards": shards,
            "scoring": ScoreSettings.from_dict(identity["scoring"]).to_dict(),
        }
    except (TypeError, SanitizerError):
        return identity


def versions() -> dict:
    import sanitizer

    out = {"python": platform.python_version(), "torch": torch.__version__, "pyarrow": pa.__version__}
    out["sanitizer"] = sanitizer.__version__
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


@dataclass(frozen=True)
class JobPlan:
    """What a job decides before it touches RUN_DIR: what it scores, how, where, and what run.json
    records of it (`identity`, which a re-run must match, and `config`)."""

    settings: ScoreSettings
    rule: ThresholdRule
    threshold: float | None  # known before scoring; None for rules that need the scored set
    collapse: tuple[ThresholdRule, HoldoutImages] | None  # the collapse pass's rule and what it weighs
    shards: list[ShardRef]
    device: torch.device
    workers: int
    micro_batch: int
    batch_size: int
    identity: dict
    config: dict

    def with_shards(self, shards: list[ShardRef]) -> JobPlan:
        """This plan scoring `shards`, which its identity records."""
        return replace(self, shards=shards, identity={**self.identity, "shards": shard_records(shards)})

    def record(self, state: str, **more: object) -> dict:
        """run.json's contents: identity, config and versions, the state, and `more`."""
        return {
            "identity": self.identity,
            "config": self.config,
            "versions": versions(),
            "state": state,
            **more,
        }


def shard_records(shards: list[ShardRef]) -> list[dict]:
    """The shards as run.json's identity records them."""
    return [asdict(s) for s in shards]


def plan_job(job: ScoreJob) -> JobPlan:
    """Reads the decoder and the shard list and checks every option, so a mistake stops the job before
    RUN_DIR is touched."""
    meta = read_meta(job.decoder_dir)
    settings = score_settings(job, meta)
    settings.check_patch_size(meta["model"]["patch_size"])
    rule = parse_rule(job.threshold)
    collapse_rule = parse_rule(job.collapse) if job.collapse is not None else None
    threshold = initial_threshold(rule, settings, meta)
    collapse = (
        None
        if collapse_rule is None
        else (collapse_rule, holdout_for(collapse_rule, Path(job.decoder_dir), meta, settings))
    )
    shards = expand_shards(job.data)
    device, fill = scoring_device(job)
    workers = job.workers if job.workers is not None else fill
    micro_batch, batch_size = batch_shape(job, device, meta["encoder"]["preprocess"]["image_size"])
    identity = {
        "decoder_sha256": meta["decoder_sha256"],
        "shards": shard_records(shards),
        "scoring": settings.to_dict(),
        "device_type": device.type,
        "manifest": SCHEMA_VERSION,
    }
    config = {
        "decoder_dir": str(Path(job.decoder_dir).resolve()),
        # where the weights were found if not where training recorded them: the report loads them too
        "encoder_weights": str(Path(job.encoder_weights).resolve()) if job.encoder_weights else None,
        "data": job.data,
        "threshold_rule": str(rule),
        "collapse_rule": None if collapse_rule is None else str(collapse_rule),
        "batch_size": batch_size,
        "workers": workers,
        "micro_batch": micro_batch,
        "compile": job.compile,
        "device": str(device),
        # the cluster joined, also by RAY_ADDRESS (`ray job submit`); None: a Ray of its own, or none
        "ray_address": joined_cluster(job.ray_address) if workers else None,
    }
    return JobPlan(
        settings, rule, threshold, collapse, shards, device, workers, micro_batch, batch_size,
        identity, config,
    )  # fmt: skip


def refuse_busy_dirs(job: ScoreJob) -> None:
    """A RUN_DIR another job holds (the last scheduled run still going), or a DECODER_DIR a `train`
    holds (no decoder.json yet: not "run `sanitizer train`"), is refused before the encoder loads,
    which takes seconds to minutes and memory on the GPU the running job uses. RUN_DIR's lock, taken
    later, still decides between two jobs started at once."""
    refuse_busy(Path(job.decoder_dir))
    RunDir(Path(job.out)).refuse_busy()


def run_score_job(job: ScoreJob, progress: bool = True) -> Summary:
    started = time.time()
    refuse_busy_dirs(job)
    plan = plan_job(job)
    # The encoder, its weights and the decoder load before RUN_DIR is touched, even with nothing
    # pending: a mistyped path on a finished run must leave it as it was. With Ray actors scoring,
    # on the CPU (this may be a cluster's head node, and a GPU here is theirs), and then let go.
    stage = load_stage(job, plan)
    image_size = stage.image_size
    if plan.workers:
        stage = None
    run = RunDir(Path(job.out))
    run.refuse_foreign()
    with run.lock():
        plan, previous = begin(run, plan)
        pending = [s for s in plan.shards if not run.is_done(s.stem)]
        # it stamps the inputs it will write markers for: a re-run of a finished run stats none again
        urls = {s.stem: s.url for s in pending}
        collector = ShardCollector(run, urls, plan.threshold, plan.micro_batch)
        score_shards(job, plan, stage, image_size, pending, collector, progress)
        return finish(run, plan, collector, started, previous)


# What a re-run carries of a finished run.json while it runs: what still_clean weighs the record of
# clean against, so that a re-run killed before it finishes leaves that record for the next to judge.
CARRIED = ("threshold", "collapse", "clean")


# What still_clean reads of them, beyond comparing them: the record of clean's fields
READ_OF_PREVIOUS = CLEAN_RECORD_FIELDS


def begin(run: RunDir, plan: JobPlan) -> tuple[JobPlan, dict]:
    """Clears what an interrupted run left, refuses a RUN_DIR of another job, forgets shards whose
    input changed, says which finished shards keep scores of another --micro-batch, and marks the run
    running; returns the plan as the run names its shards, and the run.json it found ({} for a new
    run)."""
    removed = run.remove_stale_temps()
    if removed:
        log.info("removed %d temporary files left by an interrupted run", removed)
    previous = run.read_run(READ_OF_PREVIOUS) or {}
    plan = plan.with_shards(as_recorded(plan.shards, lookup(previous, "identity.shards")))
    if previous and (other := identity_change(previous.get("identity"), plan.identity)):
        raise UsageError(f"{run.root} holds a run of another {other}; use a new --out")
    carried = {k: previous[k] for k in CARRIED if k in previous}
    stats = run.finished_stats(plan.shards)
    if forgotten := forget_changed(run, plan.shards, stats):  # clean/ held their old samples: no match
        carried.pop("clean", None)
    warn_micro_batch_kept([v for stem, v in stats.items() if stem not in forgotten], plan.micro_batch)
    run.write_run(plan.record("running", **carried))
    return plan, previous


def as_recorded(shards: list[ShardRef], recorded: object) -> list[ShardRef]:
    """`shards`, each that the run recorded as an earlier version listed it (`listed_before`: by a
    `file://` URL, or named after the file a link leads to) as it was recorded, url and stem: the same
    file, whose outputs and stats markers are there under that stem and name that url, so that the
    same command, or one naming the file by its path, resumes the run and leaves its records as they
    were. A damaged entry (a stem that would name a file outside RUN_DIR) is none: it matches no shard,
    and the run is refused; so are recorded stems another shard's now takes (one name, two outputs)."""
    by_file = {}
    for entry in recorded if isinstance(recorded, list) else []:
        try:
            shard = shard_entry(entry)
        except RecordError:
            continue
        if isinstance(shard.url, str):
            by_file[file_url_shard(shard.url) or shard.url] = shard
    taken = [r if (r := by_file.get(s.url)) is not None and listed_before(r, s) else s for s in shards]
    return taken if len({s.stem.casefold() for s in taken}) == len(taken) else shards


def warn_micro_batch_kept(finished: list[dict], micro_batch: int) -> None:
    """A re-run at another --micro-batch (after running out of memory) resumes: it scores the shards
    not done, and the finished ones (their stats markers) keep their scores, which can differ in their
    last bits from the new batch's. Said, so that one who meant to score them again knows to use a
    new --out."""
    recorded = (stats.get("micro_batch") for stats in finished)
    others = Counter(b for b in recorded if b is not None and b != micro_batch)
    if others:
        log.warning(
            "%s scored in model batches of %s: those scores are kept, and can differ in their last bits "
            "from scores in batches of %d; to score every shard in batches of %d, score into a new --out",
            counted(others.total(), "finished shard was", "finished shards were"),
            " and ".join(map(str, sorted(others))), micro_batch, micro_batch,
        )  # fmt: skip


# run.json's identity, part by part, as a refusal names the one that differs
IDENTITY_PARTS = {
    "decoder_sha256": "decoder",
    "shards": "input (its shards)",
    "scoring": "scoring settings",
    "manifest": "manifest version",
}


def identity_change(recorded: object, identity: dict) -> str | None:
    """What differs between a RUN_DIR's recorded identity and this job's, in words; None if nothing.
    An input that only grew is no change: a scheduled job over a scraped dataset scores the new shards
    into the same run. One that lost shards is, naming them: their outputs would stay behind."""
    before, now = normalised_identity(recorded), normalised_identity(identity)
    if not isinstance(before, dict):
        return None if before == now else "job"
    lost = shards_lost(before.get("shards"), now["shards"])
    if lost == []:
        before = {**before, "shards": now["shards"]}
    if before == now:
        return None
    parts = [name for key, name in IDENTITY_PARTS.items() if before.get(key) != now[key]]
    if lost:
        parts[parts.index(IDENTITY_PARTS["shards"])] = lost_shards_part(lost, now["shards"])
    if before.get("device_type") != now["device_type"]:
        parts.append(f"device (scored on {before.get('device_type')}, this job runs on {now['device_type']})")
    return " and ".join(parts) or "job"


def shards_lost(recorded: object, shards: list[dict]) -> list[dict] | None:
    """The recorded shards (stem and url) that `shards` lacks; None where the record is not a list of
    shards (a damaged run.json matches no input)."""
    if not isinstance(recorded, list) or not all(isinstance(s, dict) for s in recorded):
        return None
    now = {(s["stem"], s["url"]) for s in shards}
    return [s for s in recorded if (s.get("stem"), s.get("url")) not in now]


def lost_shards_part(lost: list[dict], shards: list[dict]) -> str:
    """The refusal's words for shards the run lists and the job lacks: those gone from --data by url,
    or, where every url is still there, a stem that changed: a new input of the same file name gave
    it a hash, or the run was scored by a version that named stems otherwise (`_a` is `a` now)."""
    stems = {s["url"]: s["stem"] for s in shards}
    gone = [str(s.get("url")) for s in lost if s.get("url") not in stems]
    if not gone:
        url, was = lost[0].get("url"), lost[0].get("stem")
        return (
            f"input (the stem of {url} is {stems[url]}, the run's is {was}: another input shares its "
            f"file name, or the run was scored by a version that named stems otherwise)"
        )
    return f"input ({len(gone)} of its shards not in --data: {shortlist(gone)})"


def forget_changed(run: RunDir, shards: list[ShardRef], stats: dict[str, dict]) -> list[str]:
    """Done shards (their stats markers, `stats`) whose input changed since they were scored (one
    scored while it was still downloading, one replaced), forgotten so that they are scored again;
    their stems."""
    changed = run.changed_inputs(shards, stats)
    for shard in changed:
        log.warning("%s changed since it was scored: scoring it again", shard.url)
        run.unmark(shard.stem)
    return [s.stem for s in changed]


def load_stage(job: ScoreJob, plan: JobPlan) -> ScoreStage:
    """The scoring stage as the workers will load it: encoder, weights and decoder, checked."""
    if plan.workers == 0:
        return ScoreStage(**stage_options(job, plan), threads=job.threads)
    return ScoreStage(**{**stage_options(job, plan), "device": "cpu", "compile": False})


def stage_options(job: ScoreJob, plan: JobPlan) -> dict:
    return {
        "decoder_dir": str(job.decoder_dir),
        "settings": plan.settings.to_dict(),
        "device": plan.device.type,
        "micro_batch": plan.micro_batch,
        "encoder_weights": job.encoder_weights,
        "compile": job.compile,
    }


def score_shards(
    job: ScoreJob,
    plan: JobPlan,
    stage: ScoreStage | None,
    image_size: int,
    pending: list[ShardRef],
    collector: ShardCollector,
    progress: bool,
) -> None:
    """Scores the pending shards here with `stage` (workers == 0), or on Ray actors (stage None: they
    load their own); the collector writes each."""
    if not pending:
        return
    if stage is not None:
        readers = job.read_threads or (min(8, os.cpu_count() or 1) if plan.device.type == "cuda" else 1)
        tables = local_tables(pending, stage, image_size, plan.batch_size, readers)
    else:
        options = stage_options(job, plan)
        tables = ray_tables(
            pending, options, image_size, job, plan.batch_size, plan.workers, plan.device.type
        )
    # closed on any exit: an error must not leave the decode threads polling, their shards open
    with contextlib.closing(tables):
        consume(tables, collector, len(pending), progress)


def finish(run: RunDir, plan: JobPlan, collector: ShardCollector, started: float, previous: dict) -> Summary:
    """The flags (thresholds that needed the scored set, the collapse pass), unless nothing they follow
    from changed since the last run finished them; the totals, and the final run.json (which keeps
    `previous`'s record of clean while the flags it split by still hold)."""
    done = run.done(plan.shards)
    if unchanged_flags(run, plan, done, previous):
        log.info("%s: unchanged since the last run, skipped", "collapse pass" if plan.collapse else "flags")
        warned = previous[FLAG_WARNINGS]
        for warning in warned:  # the flags still rest on what they warned of
            log.warning("%s", warning)
        now, reflagged, digest = {k: previous[k] for k in FLAGGED}, 0, previous[FLAG_INPUTS]
    else:
        with warnings_logged() as warned:
            now, reflagged = flag(run, plan, done)
        digest = flag_inputs(run, plan, done, now)
    thresholds = {"threshold": now["threshold"]["value"], "threshold_rule": str(plan.rule)}
    thresholds |= {"neighbours_threshold": now["threshold"].get("neighbours")}
    thresholds |= {"collapse_threshold": now["collapse"]["value"], "collapse_rule": now["collapse"]["rule"]}
    summary = summarize(run, plan.shards, done, collector, time.time() - started, thresholds)
    run.write_run(
        plan.record(
            "complete" if not summary.failed_shards else "incomplete",
            **now,
            totals={
                "samples": summary.samples,
                "ok": summary.ok,
                "flagged": summary.flagged,
                "flagged_by": summary.flagged_by,
                "status_counts": summary.status_counts,
                "shards": summary.shards,
                "shards_done": summary.shards_done,
            },
            failed_shards=[{"stem": k, "error": v} for k, v in sorted(summary.failed_shards.items())],
            **{FLAG_INPUTS: digest, FLAG_WARNINGS: warned},
            **still_clean(run, previous, now, len(done), len(collector.done), reflagged),
        )
    )
    return summary


def flag(run: RunDir, plan: JobPlan, done: list[str]) -> tuple[dict, int]:
    """Flag the finished shards: a threshold that needs the scored set, then the collapse pass.
    Returns run.json's records of both thresholds, and how many manifests changed."""
    threshold = plan.threshold
    if plan.rule.needs_scores:
        scores = ok_scores(run, done)
        if len(scores):
            threshold = resolve_threshold(plan.rule, None, scores)
        else:  # the job still finishes: its failed shards and totals are recorded
            log.warning("rule %s needs scored samples and this run has none: it flags nothing", plan.rule)
    collapse, reflagged = apply_flags(run, done, threshold, plan.rule, plan.collapse)
    now = {
        "threshold": {"rule": str(plan.rule), "value": threshold, "neighbours": collapse.score_value},
        "collapse": {
            "rule": plan.config["collapse_rule"],
            "value": collapse.value,
            "above_holdout_median": collapse.above_holdout_median,
        },
    }
    return now, reflagged


# run.json's records of the thresholds the flags were set at, its digest of all they follow from
# (flag_inputs), and the warnings flagging logged (flag_warnings), which a re-run that skips it logs
# again; written once flagging finished. Neither of the last two is CARRIED: a re-run killed before it
# finishes leaves none, and the next flags again.
FLAGGED = ("threshold", "collapse")


FLAG_INPUTS = "flag_inputs"


FLAG_WARNINGS = "flag_warnings"


def unchanged_flags(run: RunDir, plan: JobPlan, done: list[str], previous: dict) -> bool:
    """Whether the run.json found, `previous`, holds the digest of what the flags follow from now, and
    the warnings flagging logged then (a run.json written before they were recorded flags again: what
    its pass warned of is known only by running it)."""
    recorded, warned = previous.get(FLAG_INPUTS), previous.get(FLAG_WARNINGS)
    if recorded is None or not isinstance(warned, list) or not all(isinstance(w, str) for w in warned):
        return False
    return recorded == flag_inputs(run, plan, done, {k: previous.get(k) for k in FLAGGED})


class _Warnings(logging.Handler):
    """The text of each warning the package logs on the thread that made this handler."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.said.append(record.getMessage())


@contextlib.contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """The warnings the package logs on this thread meanwhile, as their lines say them: run.json
    records flagging's, so that a re-run that skips it says them again in the same words."""
    handler, package = _Warnings(), logging.getLogger("sanitizer")
    package.addHandler(handler)
    try:
        yield handler.said
    finally:
        package.removeHandler(handler)


def flag_inputs(run: RunDir, plan: JobPlan, done: list[str], records: dict) -> str:
    """A digest of everything the flags follow from: the versions, the decoder and scoring settings,
    both rules, the decoder's held-out images, the finished shards' manifests, and the thresholds they
    came to (`records`). A re-run that finds the digest its last finished run recorded skips flagging:
    the collapse pass alone took a minute or two on a re-run of 1,500 shards that changed no flag."""
    state = {
        "versions": versions(),
        "identity": {k: v for k, v in plan.identity.items() if k != "shards"},
        "rules": [plan.config["threshold_rule"], plan.config["collapse_rule"]],
        "manifests": run.manifests_digest(sorted(done)),
        "records": records,
    }
    found = hashlib.sha256(json.dumps(state, sort_keys=True).encode())
    if plan.collapse is not None:
        found.update(plan.collapse[1].digest())
    return found.hexdigest()


def still_clean(run: RunDir, previous: dict, now: dict, done: int, scored: int, reflagged: int) -> dict:
    """The previous run.json's record of clean, while clean/ and quarantine/ still match the flags: no
    shard scored since (here, or by a re-run that was interrupted: the record counts the shards it
    split, and a shard scored again for a changed input drops it in `begin`), no manifest re-flagged,
    and the same thresholds (`now`'s) as the record was made at. Else it is dropped, with a warning to
    clean again."""
    clean = previous.get("clean")
    if not clean:
        return {}
    changed = {k for k in ("threshold", "collapse") if previous.get(k) != now[k]}
    if not scored and not reflagged and clean.get("shards") == done and not changed:
        return {"clean": clean}
    if scored:
        why = f"{counted(scored, 'shard was', 'shards were')} scored since it was cleaned"
    elif clean.get("shards") != done:
        why = f"the run has {counted(done, 'finished shard')} and clean split {clean.get('shards')}"
    elif reflagged:
        why = f"this run re-flagged {counted(reflagged, 'shard')}"
    else:
        why = f"its {' and '.join(sorted(changed))} changed since"
    log.warning(
        "clean/ and quarantine/ no longer match the flags: %s; run `sanitizer clean %s` again", why, run.root
    )
    return {}


def batch_shape(job: ScoreJob, device, image_size: int) -> tuple[int, int]:
    """(micro_batch, batch_size): the model's fixed batch, and rows per scoring call. By default a call
    is whole micro-batches (no padding wasted), at most 8 and ~64 MiB of pixels (Ray's object store
    holds them); --batch-size sets it instead."""
    if job.micro_batch:
        micro = job.micro_batch
    elif device.type == "cuda":
        micro = 1024 if image_size <= 64 else 512
    else:
        micro = 64
    per_micro = micro * image_size * image_size * 3
    return micro, job.batch_size or micro * max(1, min(8, (64 << 20) // per_micro))


def scoring_device(job: ScoreJob) -> tuple[torch.device, int]:
    """Where the scoring runs, and how many scoring actors fill it (the default --workers). This
    machine's device, but for a job that joins a Ray cluster (--ray-address, or RAY_ADDRESS as `ray job
    submit` sets it): its driver runs on the head node, which often has no GPU, so `auto` and `cuda`
    mean the cluster's GPUs, and `cpu`, or a cluster without GPUs, fills the cluster's CPUs with one
    single-CPU actor each (not as many as the head has CPUs: a head is often small)."""
    address = joined_cluster(job.ray_address)
    if job.workers == 0 or address is None:
        device = resolve_device(job.device)
        return device, local_workers(device)
    resources = cluster_resources(address)
    if job.device != "cpu" and resources.get("GPU", 0) >= 1:
        return torch.device("cuda"), int(resources["GPU"])
    if job.device == "cuda":
        raise UsageError(f"--device cuda was asked for, but the Ray cluster at {address} has no GPUs")
    return torch.device("cpu"), max(1, int(resources.get("CPU", 1)))


def local_workers(device: torch.device) -> int:
    """Actors that fill this machine: one per GPU; on the CPU one single-threaded actor per CPU, up
    to 8 (then threads).

    Measured on 2 CPUs (bench/results/throughput-log.md): two 1-thread actors score 1.4-1.7x faster
    than one 2-thread actor, at ~650 MB more memory.
    """
    return torch.cuda.device_count() if device.type == "cuda" else min(8, os.cpu_count() or 1)


def summarize(
    run: RunDir,
    shards: list[ShardRef],
    done: list[str],
    collector: ShardCollector,
    seconds: float,
    thresholds: dict,
) -> Summary:
    """Totals over the finished shards' (`done`) stats; `thresholds` gives the Summary's threshold
    fields."""
    statuses: Counter = Counter()
    for stem in done:
        statuses.update(run.read_stats(stem)["status_counts"])
    finished = set(done)  # up to MAX_SHARDS of them: a list would make this quadratic
    failed = {s.stem: collector.failed.get(s.stem, "not finished") for s in shards if s.stem not in finished}
    return Summary(
        run_dir=run.root,
        shards=len(shards),
        shards_done=len(done),
        failed_shards=failed,
        samples=sum(statuses.values()),
        ok=statuses.get("ok", 0),
        status_counts=dict(sorted(statuses.items())),
        **flagged_totals(run, done),
        **thresholds,
        seconds=seconds,
        scored_now=collector.samples,
    )
