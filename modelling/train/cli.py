"""The training command, ``python -m modelling.train`` (``strokewatch model train``): options -> one run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from modelling.config import VARIANTS
from modelling.model import load
from modelling.train.calibration import calibrate_saved
from modelling.train.data import make_cohort
from modelling.train.memory import reuse_freed_memory
from modelling.train.pipeline import run
from modelling.train.settings import DEFAULT_OUT, TrainSettings

log = logging.getLogger(__name__)

USAGE = """Train the fusion model and its single-modality baselines on the synthetic cohort.

One command reproduces the shipped weights (the cohort, the split, the initialisation, the batch order
all follow from --seed):

    python -m modelling.train --seed 0 --n 2000 --variant all --threads 2 --out modelling/weights

Per variant, <out>/<variant>/ receives weights.pt and config.json (the FusionConfig, including the
calibration and a training summary). A GPU is used when present. The recipe: modelling/train/__init__.py
and MODEL_CARD.md.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modelling.train", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=2000, help="cohort size (train + validation)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--variant", choices=[*VARIANTS, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs, help="vitals and staged fusion")
    parser.add_argument("--cnn-epochs", type=int, default=TrainSettings.cnn_epochs, help="variants training the CNN")
    parser.add_argument("--patience", type=int, default=TrainSettings.patience)
    parser.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--threads", type=int, default=TrainSettings.threads)
    parser.add_argument("--end-to-end", action="store_true", help="train the fusion model from scratch, not staged")
    parser.add_argument(
        "--vitals-extra", type=int, default=TrainSettings.vitals_extra, help="vitals-only records for the vitals branch"
    )
    parser.add_argument(
        "--spot-steps", type=int, default=TrainSettings.spot_steps, help="patch batches for the spot detector"
    )
    parser.add_argument(
        "--spot-negatives",
        type=float,
        nargs=2,
        default=TrainSettings.spot_negatives,
        metavar=("LACUNE", "VESSEL"),
        help="shares of hard-negative patches for the spot detector (off in the shipped model)",
    )
    parser.add_argument(
        "--calibration-extra",
        type=int,
        default=TrainSettings.calibration_extra,
        help="held-out patients added to the validation split for calibration",
    )
    parser.add_argument(
        "--head-extra",
        type=int,
        default=TrainSettings.head_extra,
        help="patients the CNN never sees from which the staged heads also learn (0: the training split only)",
    )
    parser.add_argument(
        "--calibrate-only", action="store_true", help="refit the calibration of the models already in --out"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not reuse_freed_memory():
        log.info("not glibc: large tensors are mapped and unmapped per step (slower training)")
    settings = TrainSettings(
        epochs=args.epochs,
        cnn_epochs=args.cnn_epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        staged=not args.end_to_end,
        vitals_extra=args.vitals_extra,
        spot_steps=args.spot_steps,
        spot_negatives=(args.spot_negatives[0], args.spot_negatives[1]),
        calibration_extra=args.calibration_extra,
        head_extra=args.head_extra,
    )
    variants = VARIANTS if args.variant == "all" else (args.variant,)
    if args.calibrate_only:
        torch.set_num_threads(settings.threads)
        models = {v: load(args.out / v) for v in variants}
        calibrate_saved(models, make_cohort(args.n, args.seed), args.seed, settings, args.out)
        return
    run(args.seed, args.n, args.out, variants, settings)

