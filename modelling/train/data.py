"""The training data: synthetic cohorts (cached on disk), the rows added to them, the split, withheld modalities."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from inference import contract as C
from inference.preprocess import empty_image

log = logging.getLogger(__name__)

Modality = Literal["image", "vitals"]
Arrays = dict[str, np.ndarray]


def cohort_inputs(cohort: Any) -> Arrays:
    """The contract inputs of a cohort object (``synth.CohortArrays`` or anything alike)."""
    return {spec.name: np.asarray(getattr(cohort, spec.name), dtype=np.float32) for spec in C.INPUTS}


def cohort_cache_dir() -> Path:
    """Where generated cohorts are kept (``$STROKEWATCH_CACHE/cohorts``, else ``~/.cache/strokewatch/cohorts``)."""
    root = os.environ.get("STROKEWATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "strokewatch"
    )
    return Path(root) / "cohorts"


def _cached(name: str, build: Any, cls: Any, cache: bool) -> Any:
    path = cohort_cache_dir() / name
    if cache and path.is_file():
        log.info("loading cached cohort %s", path)
        with np.load(path, allow_pickle=False) as data:
            # fields added to the class after the file was cached (with a default) are filled in by the class
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data.files})
    started = time.monotonic()
    arrays = build()
    log.info("generated in %.0fs", time.monotonic() - started)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays.__dict__)
        tmp.replace(path)
    return arrays


def make_cohort(
    n: int, seed: int, *, start: int = 0, site: str | None = None, workers: int = 2, cache: bool = True
) -> Any:
    """``synth.make_arrays(n, seed, start=start, site=site)``, kept on disk so training and evaluation do not redo it.

    Generation is deterministic in (n, seed, site), so a cached copy is the same cohort; rendering the volumes
    makes regenerating it the slowest step of a training run. ``site``: a synthetic centre (``synth.sites``;
    an unknown name raises), None for the default cohort. The arrays carry ``age_years``, ``male`` and ``site``
    per patient for subgroups.
    """
    from synth import SYNTH_VERSION, CohortArrays, make_arrays
    from synth.sites import get_site

    get_site(site)  # refuse an unknown site before any work
    # The generator's version is part of the key: a cohort cached by an older generator is another cohort.
    log.info(
        "synthetic cohort n=%d seed=%d%s%s",
        n,
        seed,
        f" site {site}" if site else "",
        f" from patient {start}" if start else "",
    )
    return _cached(
        f"cohort-v{SYNTH_VERSION}-n{n}-seed{seed}"
        + (f"-site-{site}" if site else "")
        + (f"-start{start}" if start else "")
        + ".npz",
        lambda: make_arrays(n, seed, start=start, workers=workers, site=site),
        CohortArrays,
        cache,
    )


def make_vitals_cohort(
    n: int, seed: int, start: int, *, site: str | None = None, workers: int = 2, cache: bool = True
) -> Any:
    """``synth.arrays.make_vitals_arrays``: patients ``start..start+n-1`` of cohort ``seed`` (at ``site``), vitals."""
    from synth import SYNTH_VERSION
    from synth.arrays import VitalsArrays, make_vitals_arrays
    from synth.sites import get_site

    get_site(site)
    log.info("vitals-only records n=%d seed=%d%s from patient %d", n, seed, f" site {site}" if site else "", start)
    return _cached(
        f"vitals-v{SYNTH_VERSION}-n{n}-seed{seed}" + (f"-site-{site}" if site else "") + f"-start{start}.npz",
        lambda: make_vitals_arrays(n, seed, start=start, workers=workers, site=site),
        VitalsArrays,
        cache,
    )


def with_vitals_records(
    inputs: Arrays, outcome: np.ndarray, aux: Mapping[str, np.ndarray], extra: Any
) -> tuple[Arrays, np.ndarray, dict[str, np.ndarray]]:
    """The cohort followed by vitals-only records, for a model without an image branch.

    Such a model never reads the volume, so ``image`` is one read-only empty volume broadcast over all rows
    (ten thousand real copies would be gigabytes); rows are copied only when a batch is taken.
    """
    n_all = len(outcome) + len(extra)
    out: Arrays = {}
    for name in C.INPUT_NAMES:
        if name == "image":  # a read-only zero view: rows are copied only when a batch is taken
            out[name] = np.broadcast_to(empty_image()[None], (n_all, *inputs[name].shape[1:]))
        elif name == "image_present":
            out[name] = np.concatenate([inputs[name], np.zeros((len(extra), 1), np.float32)])
        else:
            out[name] = np.concatenate([inputs[name], np.asarray(getattr(extra, name), np.float32)])
    y = np.concatenate([outcome, np.asarray(extra.outcome, dtype=outcome.dtype)])
    new_aux = (
        {"vital_factors": np.concatenate([aux["vital_factors"], extra.vital_factors])} if "vital_factors" in aux else {}
    )
    return out, y, new_aux


def with_head_records(
    inputs: Arrays, outcome: np.ndarray, aux: Mapping[str, np.ndarray], head: Any
) -> tuple[Arrays, np.ndarray, dict[str, np.ndarray]]:
    """The cohort followed by the head cohort (``TrainSettings.head_extra``): inputs, outcomes and the auxiliary
    targets both have (the head cohort's lesion maps are not needed: the CNN never trains on it)."""
    head_inputs = cohort_inputs(head)
    out = {name: np.concatenate([inputs[name], head_inputs[name]]) for name in C.INPUT_NAMES}
    y = np.concatenate([outcome, np.asarray(head.outcome, dtype=outcome.dtype)])
    new_aux = {
        k: np.concatenate([aux[k], np.asarray(getattr(head, k))])
        for k in ("image_factors", "vital_factors")
        if k in aux and getattr(head, k, None) is not None
    }
    return out, y, new_aux


def withhold(inputs: Mapping[str, np.ndarray], modality: Modality, rows: np.ndarray | None = None) -> Arrays:
    """A copy of ``inputs`` with one modality removed for ``rows`` (all rows when None), as the engine sends it."""
    out = {k: v.copy() for k, v in inputs.items()}
    sel = slice(None) if rows is None else rows
    if modality == "image":
        if "image" in out:  # staged training batches carry no volumes
            out["image"][sel] = 0.0
        out["image_present"][sel] = 0.0
    else:
        out["vitals"][sel] = 0.0
        out["vitals_mask"][sel] = 0.0
        out["vitals_delta"][sel] = 1.0
    return out


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


#: Training targets beside the outcome, as ``synth.CohortArrays`` names them (any may be absent).
AUX_KEYS = ("finding_label", "image_factors", "vital_factors")
