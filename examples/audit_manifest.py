"""Audit a scored run with pandas: what was flagged, where, with which captions, and what-if thresholds.

    .venv/bin/python examples/audit_manifest.py demo-out/run
    .venv/bin/python examples/audit_manifest.py demo-out/run --top 3 --reclean quantile:0.99

The manifest is plain Parquet (one file per shard, schema in schemas/manifest-v4.json), so any tool
reads it; here pandas reads only the columns it needs. `--reclean RULE` re-flags with a new threshold
and rewrites clean/ and quarantine/ without scoring anything again (the same as `sanitizer clean
RUN_DIR --threshold RULE`). Shards that failed or have not finished, which have no rows, are listed
from run.json, and the exit code is then 1, as `sanitizer score` and `clean` end there; a run whose
every shard failed has no manifest, and that list is all it prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from sanitizer.clean import clean_run
from sanitizer.cli import reader_went_away
from sanitizer.errors import SanitizerError
from sanitizer.report import encoder_verdict
from sanitizer.rundir import open_run

COLUMNS = [
    "key", "shard", "index", "status", "error", "score", "flagged", "flag_reason", "threshold", "caption",
    "label",
]  # fmt: skip
FAILED = "{failed} of {shards} failed (run.json failed_shards)"  # the head of the list of shards not scored


def load_manifest(run_dir: Path) -> pd.DataFrame | None:
    """Every shard's manifest as one DataFrame (only the columns used here); None when no shard was
    scored, which `no_manifest` explains."""
    parts = sorted((run_dir / "manifest").glob("*.parquet"))
    if not parts:
        return None
    return pd.concat([pd.read_parquet(p, columns=COLUMNS) for p in parts], ignore_index=True)


def unscored(run_dir: Path, head: str) -> list[str]:
    """The shards the manifest lacks, from run.json: `head` (filled with the counts), each failed
    shard and why, and whether others have not finished; [] where every shard was scored."""
    run, info, shards = open_run(run_dir)  # a SanitizerError where there is no run at all
    failed, done = info.get("failed_shards") or [], len(run.done(shards))
    if not failed and done == len(shards):
        return []
    lines = [head.format(failed=len(failed), shards=len(shards))]
    lines += [f"  {f['stem']}: {f['error']}" for f in failed[:20]]
    if done + len(failed) < len(shards):
        lines.append("the others have not finished: run `sanitizer score` again")
    return lines


def no_manifest(run_dir: Path) -> str:
    """Why a run has no manifest: a run whose every shard failed holds run.json alone (docs/cli.md,
    "Output names and the report's text"); then the failed shards are what there is to look at."""
    return "\n".join(unscored(run_dir, "no shard was scored: " + FAILED))


def top_flagged_per_shard(df: pd.DataFrame, n: int) -> pd.DataFrame:
    flagged = df[df["flagged"]].sort_values("score", ascending=False)
    top = flagged.groupby("shard").head(n).sort_values(["shard", "score"], ascending=[True, False])
    return top[["shard", "index", "key", "score", "caption"]]


def flag_rate_per_shard(df: pd.DataFrame) -> pd.DataFrame:
    ok = df[df["status"] == "ok"]
    rates = ok.groupby("shard").agg(ok=("key", "size"), flagged=("flagged", "sum"))
    rates["rate"] = rates["flagged"] / rates["ok"]
    return rates.sort_values("rate", ascending=False)


def what_if(df: pd.DataFrame, quantiles: tuple[float, ...] = (0.9, 0.95, 0.97, 0.99, 0.995)) -> pd.DataFrame:
    """How many samples each score threshold would flag by itself (score > threshold; the collapse pass
    flags beside it), with TPR/FPR when labelled. `current` is the run's own: one value, or each row's
    where the collapse pass set them from the neighbours' scores (its value is then NaN)."""
    ok = df[df["status"] == "ok"]
    scores = ok["score"].to_numpy(np.float64)
    candidates = {f"scored q{q:g}": float(np.quantile(scores, q)) for q in quantiles}
    flags = {name: scores > value for name, value in candidates.items()}
    if ok["threshold"].notna().any():
        current = ok["threshold"].to_numpy(np.float64)
        values = np.unique(current[~np.isnan(current)])
        candidates["current"] = float(values[0]) if len(values) == 1 else np.nan
        flags["current"] = scores > current
    labelled = ok["label"].notna().to_numpy()
    truth = ok["label"].fillna(False).to_numpy(bool)
    rows = []
    for name, value in sorted(candidates.items(), key=lambda kv: (np.isnan(kv[1]), kv[1])):
        flagged = flags[name]
        row = {"threshold": name, "value": value, "flagged": int(flagged.sum()), "share": flagged.mean()}
        if labelled.any() and truth[labelled].any() and (~truth[labelled]).any():
            row["tpr"] = flagged[labelled & truth].mean()
            row["fpr"] = flagged[labelled & ~truth].mean()
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="RUN_DIR written by `sanitizer score`")
    parser.add_argument("--top", type=int, default=5, help="flagged samples listed per shard")
    parser.add_argument(
        "--reclean", metavar="RULE", help="re-threshold (quantile:Q, mad:K, value:X) and re-clean"
    )
    args = parser.parse_args(argv)
    pd.set_option("display.width", 160)
    pd.set_option("display.max_colwidth", 60)
    try:  # no run there, a damaged run.json, a bad --reclean rule: one line, as `sanitizer` says it
        return audit(args)
    except SanitizerError as e:
        print(f"audit_manifest: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `audit_manifest.py RUN | head`: as `sanitizer` ends there
        return reader_went_away()


def audit(args: argparse.Namespace) -> int:
    """Print what the run flagged; re-clean it with --reclean. 1 where a shard was not scored."""
    df = load_manifest(args.run_dir)
    if df is None:
        print(no_manifest(args.run_dir))
        return 1
    print(f"{len(df)} samples; status counts:\n{df['status'].value_counts().to_string()}\n")
    missing = unscored(args.run_dir, FAILED + ", and have no rows:")
    if missing:  # their samples are in no row above, nor in clean/ or quarantine/
        print("\n".join(missing) + "\n")
    print(f"flagged: {int(df['flagged'].sum())} ({df['flagged'].mean():.2%} of all rows); by reason:")
    print(df["flag_reason"].value_counts().to_string(), "\n")
    print(f"verdict: {encoder_verdict(args.run_dir)['text']}\n")
    print("flag rate per shard (highest first):")
    print(flag_rate_per_shard(df).head(10).to_string(), "\n")
    print(f"top {args.top} flagged samples per shard:")
    print(top_flagged_per_shard(df, args.top).to_string(index=False), "\n")
    captions = df.loc[df["flagged"] & df["caption"].notna(), "caption"]
    if len(captions):
        print("most common captions among flagged samples (a CLIP backdoor names its target class):")
        print(captions.value_counts().head(10).to_string(), "\n")
    failures = df[df["status"] != "ok"]
    if len(failures):
        print("samples that could not be scored:")
        print(failures[["shard", "index", "key", "status", "error"]].head(20).to_string(index=False), "\n")
    if (df["status"] == "ok").any():  # a run whose every sample failed has no scores to re-threshold
        print("what other score thresholds would flag (the score's test alone):")
        print(what_if(df).to_string(index=False, float_format=lambda v: f"{v:.4g}"), "\n")

    if args.reclean:
        summary = clean_run(args.run_dir, args.reclean)
        print(
            f"re-cleaned at {args.reclean} (threshold {summary.threshold:.6g}): kept {summary.kept}, "
            f"quarantined {summary.quarantined}; run `sanitizer report {args.run_dir}` to refresh the page"
        )
        for line in summary.skipped_lines():  # as `sanitizer clean` says it, and with its exit code
            print(line)
        return 1 if summary.skipped_shards or missing else 0
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
