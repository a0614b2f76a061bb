"""The `sanitizer` command: train a decoder, score shards, clean them, report, verify, demo.

A user's mistake (bad flag, missing file, wrong encoder) ends with one line on stderr and exit code 2;
a run that finished but could not process everything (a shard that is not a tar), or one stopped by
no mistake of the user's (a failed read, a full disk, memory that ran out), exits with 1; a directory
another job holds, with 75 (try again later); Ctrl-C with 130, SIGTERM with 143 (finished shards
kept), a reader that closed the output (`| head`) with 141. See error_code, main and run_command.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sanitizer.errors import (
    Busy,
    OutOfMemory,
    ReadFailed,
    SanitizerError,
    Terminated,
    WorkerDied,
    shortlist,
    visible,
)
from sanitizer.wording import counted

if TYPE_CHECKING:  # these load torch: --help stays instant
    import torch

    from sanitizer.encoders import VictimEncoder
    from sanitizer.pipeline.job import Summary

# Kept here rather than imported from sanitizer.scoring, which loads torch: --help stays instant.
AGGREGATE_HELP = "how hidden patches' errors pool into a score: mean (the paper's MSE), median or q25"
AXIS_AGGREGATE_HELP = (
    "the same for an embedding on one axis (no sketch), rebuilt as its whole axis is; the calibration "
    "puts it on --aggregate's scale"
)
POOL_HELP = "pixels per side averaged before errors are measured; 1 = per pixel, as the paper"
ERROR_HELP = "each patch's error: ssim (1 - SSIM, relative to the patch's contrast) or mse (the paper's)"
AXIS_ERROR_HELP = "the same for an embedding on one axis, whose rebuild is its axis's one image"
RELAX_STEPS_HELP = "signed-gradient steps on the embedding token before the error is measured; 0 = the paper"
RELAX_RADIUS_HELP = "how far (L-inf, decoder latent units) those steps may move the token in all"
# (flag, type, metavar, help, train's default): what `train` calibrates with and `score` may override
SCORE_SETTINGS = (
    ("--test-mask-ratio", float, "R", "mask ratio of scores", 0.99),
    ("--num-masks", int, "K", "masks averaged per score", 4),
    ("--aggregate", str, "q25|median|mean", AGGREGATE_HELP, "q25"),
    ("--axis-aggregate", str, "mean|median|q25", AXIS_AGGREGATE_HELP, "mean"),
    ("--error-pool", int, "S", POOL_HELP, 2),
    ("--error", str, "ssim|mse", ERROR_HELP, "ssim"),
    ("--axis-error", str, "mse|ssim", AXIS_ERROR_HELP, "mse"),
    ("--relax-steps", int, "N", RELAX_STEPS_HELP, 3),
    ("--relax-radius", float, "R", RELAX_RADIUS_HELP, 0.03),
)

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2
EXIT_BUSY = 75  # sysexits' EX_TEMPFAIL: another job holds the directory; a scheduler skips this tick
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a writer that SIGPIPE ended
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + 2, 128 + 15  # Ctrl-C; SIGTERM, as schedulers stop a job
# `sanitizer --help`'s last lines, for whoever wires the command into a scheduler
EXIT_CODES_HELP = f"""exit codes:
  {EXIT_OK}    done
  {EXIT_INCOMPLETE}    finished but incomplete (a shard left out, a verify violation), or stopped by
       a failed read or write, running out of memory, or a scoring actor that kept dying
  {EXIT_USAGE}    a usage or input error: one `sanitizer: error:` line
  {EXIT_BUSY}   busy: another job holds the RUN_DIR or DECODER_DIR; try again later
  {EXIT_INTERRUPTED}  interrupted (SIGINT); run it again to resume
  {EXIT_BROKEN_PIPE}  the reader of its output went away
  {EXIT_TERMINATED}  terminated (SIGTERM); run it again to resume"""


def say(text: str, err: bool = False) -> None:
    """Print a result or an error: paths, keys and errors in it come from the dataset, so they are
    shown `visible` (an escape sequence in a shard's name must not clear the terminal)."""
    print(visible(text, keep="\n"), file=sys.stderr if err else sys.stdout)


class _VisibleFormatter(logging.Formatter):
    """Log lines as `say` prints: one line each, whatever a warning quotes."""

    def format(self, record: logging.LogRecord) -> str:
        return visible(super().format(record))


def _ours_or_a_warning(record: logging.LogRecord) -> bool:
    """Below WARNING, the package's own lines only: a library's notes (open_clip's seven INFO lines on
    every model it builds) read as the command's own `sanitizer:` lines. `-v` shows them."""
    return record.levelno >= logging.WARNING or record.name.partition(".")[0] == "sanitizer"


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def user_path(text: str) -> Path:
    """A path argument as a shell would expand it: `~` also from a quoted argument or a job config."""
    return Path(text).expanduser()


def _triple(name: str) -> dict:
    return {"nargs": 3, "type": float, "metavar": ("R", "G", "B"), "help": f"per-channel {name} (0..1 scale)"}


def add_score_settings(p: argparse.ArgumentParser, calibrated: bool) -> None:
    """The scoring settings: `train` calibrates with their defaults, `score` reuses the decoder's."""
    for flag, kind, metavar, text, default in SCORE_SETTINGS:
        said = "default: the decoder's calibration setting" if calibrated else f"default {default}"
        p.add_argument(
            flag, type=kind, metavar=metavar, default=None if calibrated else default, help=f"{text} ({said})"
        )


def score_setting_args(args: argparse.Namespace) -> dict:
    """The scoring settings' values as parsed, by their ScoreSettings names (None where `score` was not
    given one: the decoder's calibration setting stands)."""
    names = (flag.removeprefix("--").replace("-", "_") for flag, *_ in SCORE_SETTINGS)
    return {name: getattr(args, name) for name in names}


def add_data_and_out(p: argparse.ArgumentParser, out: str, what: str) -> None:
    p.add_argument(
        "--data", required=True, metavar="SHARDS", help="shards: brace pattern, glob, directory or comma list"
    )
    p.add_argument("--out", required=True, type=user_path, metavar=out, help=what)


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        metavar="auto|cpu|cuda",
        help="where the models run; auto: cuda when one is visible, else cpu (default auto)",
    )


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a DeDe decoder for a victim encoder")
    p.add_argument(
        "--encoder",
        required=True,
        metavar="SPEC",
        help="timm:NAME, open_clip:NAME, torchscript:PATH or export:PATH",
    )
    p.add_argument(
        "--encoder-weights",
        type=user_path,
        metavar="PATH",
        help="safetensors or state-dict file (loaded with weights_only=True)",
    )
    p.add_argument(
        "--encoder-weights-prefix",
        metavar="PREFIX",
        help="where in --encoder-weights the encoder to audit is, for a file that holds it twice "
        "(encoder_q., teacher.); default: found by its tensors' names",
    )
    p.add_argument("--image-size", type=int, metavar="N", help="input size; default: the model's own config")
    p.add_argument("--mean", **_triple("mean"))
    p.add_argument("--std", **_triple("std"))
    add_data_and_out(p, "DECODER_DIR", "DECODER_DIR to write")
    p.add_argument("--patch-size", type=int, metavar="P", help="default: 8 up to 64 px, 16 above")
    p.add_argument("--width", type=int, metavar="W", help="transformer width of the decoder")
    p.add_argument("--depth", type=int, metavar="D", help="blocks over visible patches")
    p.add_argument("--decoder-depth", type=int, metavar="D", help="blocks over all patches")
    p.add_argument("--heads", type=int, metavar="H", help="attention heads")
    p.add_argument(
        "--mask-ratio", type=float, default=0.9, metavar="R", help="training mask ratio (default 0.9)"
    )
    add_score_settings(p, calibrated=False)
    p.add_argument(
        "--epochs", type=int, metavar="E", help="default: from the data size (about 200k image visits)"
    )
    p.add_argument("--batch-size", type=int, default=128, metavar="B", help="images per step (default 128)")
    p.add_argument("--lr", type=float, default=4e-3, metavar="LR", help="peak learning rate (default 0.004)")
    p.add_argument(
        "--max-samples",
        type=int,
        default=50_000,
        metavar="N",
        help="images read for training + calibration (default 50000)",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.05,
        metavar="SHARE",
        help="share of the images held out to calibrate the threshold and the report's verdict "
        "(default 0.05, at most 2000 images)",
    )
    p.add_argument(
        "--trim",
        type=float,
        default=0.15,
        metavar="SHARE",
        help="share of each batch, the worst-rebuilt images, left out of the loss after the first "
        "fifth of training, so that triggered images in the data are not learned (default 0.15; "
        "0: every image, as the paper)",
    )
    p.add_argument(
        "--refit",
        type=float,
        default=0.1,
        metavar="SHARE",
        help="share of the training images, those a first decoder rebuilds worst, left out when a "
        "second decoder is trained from scratch, so that triggered images are never learned "
        "(default 0.1; 0: one pass)",
    )
    add_device(p)
    p.add_argument("--seed", type=int, default=0, metavar="S", help="(default 0)")
    p.set_defaults(func=run_train)


TRAIN_MEMORY_ADVICE = (
    "give a lower --batch-size, --image-size or --max-samples, or a smaller decoder (--width, --depth, "
    "--decoder-depth)"
)


LOAD_MEMORY_ADVICE = "give the --image-size the encoder was trained at, or a device with more memory"


def run_train(args: argparse.Namespace) -> int:
    from sanitizer.decoder_meta import ScoreSettings
    from sanitizer.device import memory_guard, resolve_device, training_threads
    from sanitizer.joblock import refuse_busy
    from sanitizer.train import TrainSettings, refuse_unusable_out, train_decoder

    refuse_busy(args.out)  # before the encoder loads (minutes, GPU memory the running train uses)
    refuse_unusable_out(args.out)  # as pointless to load it for
    score_settings = ScoreSettings(**score_setting_args(args))
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        mask_ratio=args.mask_ratio,
        max_samples=args.max_samples,
        holdout=args.holdout,
        trim=args.trim,
        refit=args.refit,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    encoder, weights, prefix = load_audited_encoder(args, device)
    overrides = {
        "patch_size": args.patch_size,
        "width": args.width,
        "depth": args.depth,
        "decoder_depth": args.decoder_depth,
        "heads": args.heads,
    }
    size = encoder.preprocess.image_size
    doing = f"training at --batch-size {args.batch_size} on {size} px images"
    with memory_guard(device, doing, TRAIN_MEMORY_ADVICE), training_threads(device, size):
        meta = train_decoder(
            encoder, args.data, args.out, settings, score_settings, overrides, weights, weights_prefix=prefix
        )
    return say_trained(meta, args.out)


def load_audited_encoder(
    args: argparse.Namespace, device: torch.device
) -> tuple[VictimEncoder, str | None, str | None]:
    """The encoder `train` audits, as its flags give it, with the absolute path of its weights file and
    the prefix chosen in it (None: found by the tensors' names), which decoder.json records. Running
    out of memory as it loads (it embeds a probe image: a mistyped --image-size) is one line."""
    from sanitizer.device import memory_guard
    from sanitizer.encoders import as_prefix, canonical_spec, load_encoder

    weights = str(Path(args.encoder_weights).resolve()) if args.encoder_weights else None
    prefix = None if args.encoder_weights_prefix is None else as_prefix(args.encoder_weights_prefix)
    at_size = f" at --image-size {args.image_size}" if args.image_size else ""
    with memory_guard(device, f"loading the encoder{at_size}", LOAD_MEMORY_ADVICE):
        encoder = load_encoder(
            canonical_spec(args.encoder),
            weights,
            args.image_size,
            args.mean and tuple(args.mean),
            args.std and tuple(args.std),
            device,
            prefix,
        )
    return encoder, weights, prefix


def say_trained(meta: dict, out: Path) -> int:
    """`train`'s report of a finished decoder, and its exit code: 1 where shards were left out for
    failing to read (trained without them, as score goes on: finished, but incomplete)."""
    t = meta["training"]
    say(
        f"trained {counted(t['epochs'], 'epoch')} on {counted(t['n_train'], 'image')} in {t['seconds']} s"
        + (f" ({t['left_out']} left out by the first pass)" if t["left_out"] else "")
        + ", "
        f"final loss {t['epoch_losses'][-1]:.4f}; "
        f"calibrated on {counted(meta['calibration']['n'], 'held-out image')}\n"
        f"decoder: {out}"
    )
    for failed in t["failed_shards"]:
        say(f"left out {failed['url']}: {failed['error']}")
    nonfinite = t["nonfinite_embeddings"]
    if nonfinite["n"]:  # trained without them, as images that do not decode: finished
        names = shortlist([repr(k) for k in nonfinite["keys"]])
        say(
            f"left out {counted(nonfinite['n'], 'image')} whose embedding by the encoder is not finite: "
            + names
        )
    return EXIT_INCOMPLETE if t["failed_shards"] else EXIT_OK


def add_score(sub: argparse._SubParsersAction) -> None:
    from sanitizer.thresholds import DEFAULT_COLLAPSE_RULE, DEFAULT_RULE  # numpy: loaded once main runs

    p = sub.add_parser("score", help="score shards into a Parquet manifest (Ray job, resumable)")
    p.add_argument(
        "--decoder",
        required=True,
        type=user_path,
        metavar="DECODER_DIR",
        help="DECODER_DIR written by `sanitizer train`",
    )
    add_data_and_out(p, "RUN_DIR", "RUN_DIR for manifest, stats and run.json")
    add_score_settings(p, calibrated=True)
    p.add_argument(
        "--threshold",
        default=DEFAULT_RULE,
        metavar="RULE",
        help=f"quantile:Q, mad:K, value:X or paper (default {DEFAULT_RULE})",
    )
    collapse = p.add_mutually_exclusive_group()  # one says how to flag, the other not to: never both
    collapse.add_argument(
        "--collapse",
        nargs="?",
        const=DEFAULT_COLLAPSE_RULE,
        metavar="RULE",
        help="the collapse pass: also flag samples whose embedding nearly coincides with many other "
        "images' (a backdoor's trigger cluster; near-duplicates of one image do not count), weighing "
        "that with the score: a rule on the evidence -ln p_score - ln p_collapse, p-values against the "
        f"decoder's held-out images: quantile:Q, mad:K or value:X (default {DEFAULT_COLLAPSE_RULE})",
    )
    collapse.add_argument("--no-collapse", action="store_true", help="flag by score alone")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help="rows per scoring call (default: whole micro-batches, <= 64 MiB)",
    )
    p.add_argument(
        "--micro-batch",
        type=int,
        metavar="M",
        help="the model's fixed batch (default: 64 on the CPU; on a GPU 1024 up to 64 px, 512 above)",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=(
            "scoring actors (default: one per GPU; on CPU one per core, up to 8, or per CPU of a cluster "
            "joined); 0 = no Ray"
        ),
    )
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    p.add_argument(
        "--encoder-weights",
        type=user_path,
        metavar="PATH",
        help="where the encoder weights are now, if moved since training",
    )
    add_device(p)
    p.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    from sanitizer.pipeline.job import ScoreJob, run_score_job
    from sanitizer.report import encoder_verdict

    job = ScoreJob(
        decoder_dir=args.decoder,
        data=args.data,
        out=args.out,
        **score_setting_args(args),
        threshold=args.threshold,
        collapse=collapse_rule(args),
        batch_size=args.batch_size,
        workers=args.workers,
        ray_address=args.ray_address,
        device=args.device,
        micro_batch=args.micro_batch,
        encoder_weights=str(args.encoder_weights) if args.encoder_weights else None,
    )
    summary = run_score_job(job)
    say(format_summary(summary))
    say(f"verdict: {encoder_verdict(summary.run_dir)['text']}")  # the report says why, with figures
    return EXIT_INCOMPLETE if summary.failed_shards else EXIT_OK


def collapse_rule(args: argparse.Namespace) -> str | None:
    """The collapse pass's rule, None for --no-collapse. Two dests, not one: argparse tells a bare
    --collapse from its absence only by a value other than the default, which it needs to refuse
    --collapse with --no-collapse."""
    from sanitizer.thresholds import DEFAULT_COLLAPSE_RULE

    if args.no_collapse:
        return None
    return DEFAULT_COLLAPSE_RULE if args.collapse is None else args.collapse


def format_summary(s: Summary) -> str:
    """`score`'s report of a finished job: counts, flags and thresholds, throughput, where the outputs are."""
    share = 100 * s.flagged / s.ok if s.ok else 0.0
    failures = ", ".join(f"{k}={v}" for k, v in s.status_counts.items() if k != "ok") or "none"
    threshold = "none (no ok samples)" if s.threshold is None else f"{s.threshold:.6g}"
    lines = [
        f"shards: {s.shards_done}/{s.shards} done"
        + (f", {len(s.failed_shards)} failed" if s.failed_shards else ""),
        f"samples: {s.samples}  ok: {s.ok}  failures: {failures}",
        f"flagged: {s.flagged} ({share:.2f}% of ok) at threshold {threshold} [{s.threshold_rule}]",
    ]
    if s.collapse_rule is not None:
        collapse = (
            f"{s.collapse_threshold:.6g}"
            if s.collapse_threshold is not None
            else "none (no ok samples)"
            if not s.ok
            else "none (the pass could not run, see above)"
        )
        lines.append(
            f"  by score: {s.flagged_by['score']}  by collapse: {s.flagged_by['collapse']} "
            f"(collapse evidence threshold {collapse} [{s.collapse_rule}])"
        )
    if s.neighbours_threshold is not None:
        lines.append(
            f"  each ok row's score threshold set by its neighbours' scores (score evidence threshold "
            f"{s.neighbours_threshold:.6g} [{s.threshold_rule}]: -ln p_score + the neighbours' mean)"
        )
    lines += [
        f"throughput: {counted(s.scored_now, 'sample')} in {s.seconds:.1f} s "
        f"({s.samples_per_second:.0f} samples/s)",
    ]
    lines += [f"FAILED shard {stem}: {error}" for stem, error in sorted(s.failed_shards.items())]
    manifest = s.run_dir / "manifest" if s.shards_done else "none (no shard was scored)"
    lines += [f"manifest: {manifest}", f"run: {s.run_dir / 'run.json'}"]
    return "\n".join(lines)


def add_run_dir(p: argparse.ArgumentParser) -> None:
    """The one argument of clean, report and verify."""
    p.add_argument(
        "run_dir", type=user_path, metavar="RUN_DIR", help="a RUN_DIR that `sanitizer score` wrote"
    )


def add_clean(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("clean", help="write clean/ and quarantine/ shards from a scored run")
    add_run_dir(p)
    p.add_argument(
        "--threshold",
        metavar="VALUE_OR_RULE",
        help="re-flag first: a number, quantile:Q, mad:K, value:X or paper (default: run.json's)",
    )
    p.set_defaults(func=run_clean)


def run_clean(args: argparse.Namespace) -> int:
    from sanitizer.clean import clean_run

    s = clean_run(args.run_dir, args.threshold)
    if s.shards:
        say(
            f"kept {counted(s.kept, 'sample')} in {args.run_dir / 'clean'}, quarantined {s.quarantined} in "
            f"{args.run_dir / 'quarantine'} ({counted(s.shards, 'shard')}: {s.split} split, "
            f"{s.shards - s.split} already clean; {s.threshold_text()})"
        )
    else:  # clean/ and quarantine/ hold tars of scored shards only: name no directory it did not make
        say("no shard was scored: nothing to clean")
    for line in s.skipped_lines():
        say(line)
    return EXIT_INCOMPLETE if s.skipped_shards else EXIT_OK


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report/index.html: what was flagged and why")
    add_run_dir(p)
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from sanitizer.report import write_report

    say(f"report: {write_report(args.run_dir)}")
    return EXIT_OK


def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check a finished run against its inputs (rows, bytes, counts)")
    add_run_dir(p)
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from sanitizer.verify import verify

    verdict = verify(args.run_dir)
    for line in verdict.violations + verdict.unscored_lines():
        say(line)
    say(verdict.summary(args.run_dir))
    return EXIT_INCOMPLETE if verdict.violations or verdict.unscored else EXIT_OK


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end to end on a built-in dataset with a backdoor implanted on the spot")
    p.add_argument(
        "--out",
        type=user_path,
        default=Path("demo-out"),
        metavar="DIR",
        help="where to write everything (default demo-out)",
    )
    p.add_argument("--quick", action="store_true", help="a reduced run (used by the tests)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from sanitizer.demo import run_demo as demo

    return demo(args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    from sanitizer import __version__

    parser = argparse.ArgumentParser(
        prog="sanitizer",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sanitizer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_score, add_clean, add_report, add_verify, add_demo):
        add(sub)
    return parser


def error_code(e: SanitizerError) -> int:
    """What a scheduler needs to tell apart: a read that failed, memory that ran out or a scoring actor
    killed again and again (1: no mistake in the input, running it again may succeed), a directory
    another job holds (75: it is still running, skip this tick), and the user's mistake (2: it will fail
    the same way until fixed)."""
    if isinstance(e, (ReadFailed, OutOfMemory, WorkerDied)):
        return EXIT_INCOMPLETE
    return EXIT_BUSY if isinstance(e, Busy) else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """The command, as the `sanitizer` script runs it. A signal is one line and its exit code from this
    function's first line on, parsing included: before it there are only the interpreter's start and this
    module's imports, which load nothing heavy (numpy, importlib.metadata) for that to stay short."""
    devnull_where_closed()
    with signals_handled(_terminate, signal.SIGTERM):  # raised as Terminated, as Ctrl-C raises its own
        try:
            return parse_and_run(argv)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
            return stopped_by_signal(e)
        except BrokenPipeError:  # `sanitizer verify RUN | head`, or `2>&1 | head` as an error is said
            return reader_went_away()


STANDARD_STREAMS = (("stdin", "r"), ("stdout", "w"), ("stderr", "w"))  # by file descriptor, 0 to 2


def devnull_where_closed() -> None:
    """A standard stream closed when the command started (`2>&-`, `>&-`, `<&-`) opened on /dev/null, as
    POSIX lets a utility do: Python leaves it None, and `score 2>&-` ended at its first progress bar
    (sys.stderr.isatty) in a traceback it had nowhere to print, exit 1, silently. Its descriptor is filled
    too, or the next file opened would take it, and what a library or a child process writes to stderr
    would land in that file."""
    for fd, (name, mode) in enumerate(STANDARD_STREAMS):
        if getattr(sys, name) is not None:
            continue
        try:
            os.fstat(fd)
        except OSError:  # still closed
            devnull = os.open(os.devnull, os.O_RDONLY if mode == "r" else os.O_WRONLY)
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115 (kept while the process runs)


def parse_and_run(argv: list[str] | None) -> int:
    """The command line parsed, checked and run, with the command's log lines on stderr."""
    from sanitizer.data.shards import is_text

    args = build_parser().parse_args(argv)
    untext = [a for a in (sys.argv[1:] if argv is None else argv) if not is_text(a)]
    if untext:  # a path that cannot be recorded in run.json or decoder.json, found before any work
        say(f"sanitizer: error: argument {untext[0]!r} is not UTF-8; rename the path", err=True)
        return EXIT_USAGE
    with logging_to_stderr(logging.DEBUG if args.verbose else logging.INFO):
        return run_command(args)


@contextlib.contextmanager
def logging_to_stderr(level: int) -> Iterator[None]:
    """The command's log lines, on the stderr of this call (tests and callers swap it), for this call
    only: the root logger's handlers and level are put back after it, so that a caller's own logging
    is neither closed nor taken over, and no handler stays bound to a stream that may since be closed
    (a test's capture), where every later log line printed `--- Logging error ---` and a stack."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_VisibleFormatter("sanitizer: %(message)s"))
    if level > logging.DEBUG:
        handler.addFilter(_ours_or_a_warning)
    root = logging.getLogger()
    handlers, previous = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(level)
    try:
        yield
    finally:
        root.handlers = handlers
        root.setLevel(previous)
        handler.close()  # the stream stays open: it is the caller's


def run_command(args: argparse.Namespace) -> int:
    """The command, its errors said in one line each with the exit code a scheduler tells apart."""
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader has what it wanted: not an I/O error to say (main ends it)
        raise
    except SanitizerError as e:
        say(f"sanitizer: error: {visible(str(e))}", err=True)
        return error_code(e)
    except OSError as e:  # a full disk, a vanished directory: one line naming the path, no traceback
        where = f": {e.filename}" if e.filename else ""
        say(f"sanitizer: error: {visible(f'{e.strerror or e}{where}')}", err=True)
        return EXIT_INCOMPLETE


def stopped_by_signal(e: KeyboardInterrupt) -> int:
    """The exit code of a command a signal stopped, after one line naming the signal and what to do:
    a bare `interrupted` left a user (or a scheduler's log) to guess whether the work was lost."""
    said, code = (
        ("terminated (SIGTERM)", EXIT_TERMINATED)
        if isinstance(e, Terminated)
        else ("interrupted (SIGINT)", EXIT_INTERRUPTED)
    )
    with deaf_to_stops():
        if (cluster := sys.modules.get("sanitizer.pipeline.cluster")) is not None:  # loaded: it may run Ray
            cluster.stop_own_ray()  # first: Ray prints its last notes as it disconnects
        say(f"sanitizer: {said}; run it again to resume", err=True)
    return code


def deaf_to_stops() -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM ignored within: a second Ctrl-C as a stopped job winds down. Ray's shutdown
    resets SIGTERM to the default, so a second SIGTERM there ends the job at once, unsaid (status 143 to
    a shell), as SIGKILL does, a local Ray's processes with it."""
    return signals_handled(signal.SIG_IGN, signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_handled(handler: signal.Handlers | Callable, *signums: int) -> Iterator[None]:
    """`handler` for these signals within, where signals are handled (the main thread: elsewhere, as a
    test's or a caller's thread runs main, nothing changes), their previous handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = [signal.signal(signum, handler) for signum in signums]
    try:
        yield
    finally:
        for signum, was in zip(signums, previous, strict=True):
            signal.signal(signum, was)


def reader_went_away() -> int:
    """The exit code of a command whose reader closed its output (`| head`; `2>&1 | head` as an error is
    said, which ended in exit 1), silently: stdout goes to /dev/null, so that flushing it at exit raises
    nothing more."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
