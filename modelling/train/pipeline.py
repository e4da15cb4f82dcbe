"""A whole training run: every variant in order on one cohort, saved, then calibrated on held-out patients."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference import contract as C
from modelling.config import VARIANTS, Variant
from modelling.model import FusionModel, load, save
from modelling.train.calibration import calibrate_saved
from modelling.train.data import (
    AUX_KEYS,
    cohort_inputs,
    make_cohort,
    make_vitals_cohort,
    split_indices,
    with_head_records,
    with_vitals_records,
)
from modelling.train.features import concepts_of_pooled, image_pooled
from modelling.train.heads import refit_concept_head
from modelling.train.loop import fit
from modelling.train.settings import DEFAULT_OUT, TrainSettings

log = logging.getLogger(__name__)


#: The fusion model is trained last, from the two baselines (see ``modelling.train.loop.fit``).
VARIANTS_BASELINES_FIRST: tuple[Variant, ...] = ("image", "vitals", "fusion")


def run(
    seed: int = 0,
    n: int = 2000,
    out_dir: Path = DEFAULT_OUT,
    variants: tuple[Variant, ...] = VARIANTS,
    settings: TrainSettings | None = None,
    cohort: Any = None,
    head: Any = None,
) -> Path:
    """Train ``variants`` on one cohort (generated from ``seed`` unless given) into ``out_dir/<variant>/``.

    ``head``: the head cohort (``TrainSettings.head_extra`` patients of ``seed`` after the calibration cohort
    unless given); staged heads learn from it too, the CNN never sees it."""
    settings = settings or TrainSettings()
    torch.set_num_threads(settings.threads)
    cohort = cohort if cohort is not None else make_cohort(n, seed)
    inputs = cohort_inputs(cohort)
    outcome = np.asarray(cohort.outcome, dtype=np.float64)
    heads_learn_more = settings.staged and any(v in ("image", "fusion") for v in variants)
    if head is None and heads_learn_more and settings.head_extra > 0:
        # after the training cohort, the vitals-only records and the calibration cohort: never used elsewhere
        start = len(outcome) + settings.vitals_extra + settings.calibration_extra
        head = make_cohort(settings.head_extra, seed, start=start)
    n_head = len(head.outcome) if head is not None and heads_learn_more else 0
    from synth import SYNTH_VERSION

    info = {
        "model_version": C.MODEL_VERSION,
        "synth_version": SYNTH_VERSION,
        "seed": seed,
        "n": int(len(outcome)),
        "cohort": f"synth.make_arrays(n={len(outcome)}, seed={seed})",
        "prevalence": round(float(outcome.mean()), 4),
    }
    trained: dict[str, FusionModel] = {}
    shared: dict[str, np.ndarray] = {}
    aux = {k: getattr(cohort, k) for k in AUX_KEYS if getattr(cohort, k, None) is not None}
    # the staged heads' patients: the cohort, followed by the head cohort when there is one
    h_inputs, h_outcome, h_aux = with_head_records(inputs, outcome, aux, head) if n_head else (inputs, outcome, aux)
    h_info = {**info, "head_records_added": n_head} if n_head else info
    for variant in sorted(variants, key=VARIANTS_BASELINES_FIRST.index):
        baselines = None
        if variant == "fusion" and settings.staged:
            baselines = {v: trained[v] if v in trained else load(out_dir / v) for v in ("image", "vitals")}
        if variant == "vitals" and settings.vitals_extra > 0 and "vital_factors" in aux:
            # patients after the cohort's own, from the same seed: never in its validation split
            extra = make_vitals_cohort(settings.vitals_extra, seed, start=len(outcome))
            v_inputs, v_outcome, v_aux = with_vitals_records(inputs, outcome, aux, extra)
            v_info = {**info, "vitals_records_added": len(extra)}
            model = fit(v_inputs, v_outcome, variant, seed, settings, v_info, v_aux, extra_train=len(extra))
        elif variant == "fusion":  # staged, the head learns from the head cohort as well (n_head is 0 otherwise)
            model = fit(h_inputs, h_outcome, variant, seed, settings, h_info, h_aux, baselines, n_head, shared)
        else:
            model = fit(inputs, outcome, variant, seed, settings, info, aux, baselines, shared=shared)
            if variant == "image" and settings.staged:
                # the heads trained beside the CNN read maps and concepts that kept moving, on patients the CNN
                # had learnt: refit both, in turn, on the frozen branch (the concept head on its pooled features,
                # then the risk head), on the training split and the head cohort, which the CNN never saw
                refit_info: dict[str, object] = {}
                if "image_factors" in h_aux:
                    pooled = image_pooled(model, inputs, shared.get("spot_readouts"))  # (N, n_pooled)
                    if n_head:
                        head_rows = {k: v[len(outcome) :] for k, v in h_inputs.items()}  # views, no copy
                        pooled = np.concatenate([pooled, image_pooled(model, head_rows)])
                    train_idx, val_idx = split_indices(len(outcome), settings.val_fraction, seed)
                    split = (np.concatenate([train_idx, len(outcome) + np.arange(n_head)]), val_idx)
                    refit_info["concept_head_refit"] = refit_concept_head(
                        model, pooled, h_aux["image_factors"], h_inputs["image_present"], split, settings
                    )
                    shared["image_concepts"] = concepts_of_pooled(model, pooled)  # (N + n_head, K_img)
                info_refit = {**h_info, **refit_info}
                model = fit(
                    h_inputs, h_outcome, variant, seed, settings, info_refit, h_aux, {"image": model}, n_head, shared
                )
        save(model, out_dir / variant)
        trained[variant] = model
        log.info("saved %s", out_dir / variant)
    if settings.calibration_extra > 0:
        calibrate_saved(trained, cohort, seed, settings, out_dir)
    return out_dir
