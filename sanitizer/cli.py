"""The `sanitizer` command: train a decoder, score shards, clean them, report, verify, demo.

A user's mistake (bad flag, missing file, wrong encoder) ends with one line on stderr and exit code 2;
a run that finished but could not process everything (a shard that is not a tar) exits with 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sanitizer.errors import SanitizerError

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


def _triple(name: str) -> dict:
    return {"nargs": 3, "type": float, "metavar": ("R", "G", "B"), "help": f"per-channel {name} (0..1 scale)"}


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a DeDe decoder for a victim encoder")
    p.add_argument(
        "--encoder", required=True, help="timm:NAME, open_clip:NAME, torchscript:PATH or export:PATH"
    )
    p.add_argument("--encoder-weights", help="safetensors or state-dict file (loaded with weights_only=True)")
    p.add_argument("--image-size", type=int, help="input size; default: the model's own config")
    p.add_argument("--mean", **_triple("mean"))
    p.add_argument("--std", **_triple("std"))
    p.add_argument("--data", required=True, help="shards: brace pattern, glob, directory or comma list")
    p.add_argument("--out", required=True, type=Path, help="DECODER_DIR to write")
    p.add_argument("--patch-size", type=int, help="default: 4 up to 64 px, 16 above")
    p.add_argument("--width", type=int, help="transformer width of the decoder")
    p.add_argument("--depth", type=int, help="blocks over visible patches")
    p.add_argument("--decoder-depth", type=int, help="blocks over all patches")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--mask-ratio", type=float, default=0.9, help="training mask ratio (default 0.9)")
    p.add_argument("--test-mask-ratio", type=float, default=0.99, help="mask ratio of scores (default 0.99)")
    p.add_argument("--num-masks", type=int, default=4, help="masks averaged per score (default 4)")
    p.add_argument("--aggregate", default="mean", choices=("mean", "median"), help="per-patch error pooling")
    p.add_argument("--epochs", type=int, help="default: from the data size (about 200k image visits)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-samples", type=int, default=50_000, help="images read for training + calibration")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from sanitizer.device import resolve_device
    from sanitizer.encoders import load_encoder
    from sanitizer.scoring import ScoreSettings
    from sanitizer.train import TrainSettings, train_decoder

    score_settings = ScoreSettings(args.test_mask_ratio, args.num_masks, args.aggregate)
    settings = TrainSettings(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        mask_ratio=args.mask_ratio,
        max_samples=args.max_samples,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    encoder = load_encoder(
        args.encoder,
        args.encoder_weights,
        args.image_size,
        args.mean and tuple(args.mean),
        args.std and tuple(args.std),
        device,
    )
    overrides = {
        "patch_size": args.patch_size,
        "width": args.width,
        "depth": args.depth,
        "decoder_depth": args.decoder_depth,
        "heads": args.heads,
    }
    meta = train_decoder(
        encoder, args.data, args.out, settings, score_settings, overrides, args.encoder_weights
    )
    t = meta["training"]
    print(
        f"trained {t['epochs']} epochs on {t['n_train']} images in {t['seconds']} s, "
        f"final loss {t['epoch_losses'][-1]:.4f}; calibrated on {meta['calibration']['n']} held-out images\n"
        f"decoder: {args.out}"
    )
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sanitizer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train,):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="sanitizer: %(message)s",
        stream=sys.stderr,
        force=True,  # bind to the current stderr on every call (tests swap it)
    )
    try:
        return args.func(args)
    except SanitizerError as e:
        print(f"sanitizer: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sanitizer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
