"""One site's data, as its client reads it: the model inputs the engine builds, plus the frozen CNN's concepts.

A site's patients are a synthetic centre's cohort (``synth.sites``): ``make_cohort(n, seed, site=NAME)``, whose
tensors are built by the engine's own preprocessing (``inference.preprocess.volume_tensor`` on the rendered
series, ``vitals_tensors`` on the canonical EHR samples, ``demographics_tensor``): the same tensors a StrokeWatch
install holds per patient. The client computes each patient's image concepts once with the shipped (frozen)
image branch and keeps only those, the presence flag, the vitals tensors, the demographics and the outcome; it
never reads another site's patients (each site is its own cohort file, its own cache file).

Training patients are a site's patients ``0..n-1``; its test patients start at ``TEST_START``, so they are never
trained on whatever ``n`` is.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from inference import contract as C
from modelling.config import IMAGE_CONCEPTS
from modelling.federated.net import FUSE_INPUTS
from modelling.model import FusionModel
from modelling.train.data import cohort_cache_dir, cohort_inputs, make_cohort
from modelling.train.features import image_embeddings

log = logging.getLogger(__name__)

#: The first test patient's index in a site's cohort (training uses 0..n-1).
TEST_START = 100_000
#: What a site's arrays hold (each (N, ...) along axis 0). ``image_factors``: the synthetic truth of the image
#: findings (in the concepts' order), which no client trains on: the simulation's ceiling for a better CNN.
KEYS: tuple[str, ...] = ("image_concepts", *FUSE_INPUTS, "outcome", "age_years", "male", "image_factors")

#: What training reads of them.
TRAINED_KEYS: tuple[str, ...] = ("image_concepts", *FUSE_INPUTS, "outcome")

SiteArrays = dict[str, np.ndarray]


def site_names() -> tuple[str, ...]:
    """The synthetic centres a simulation can use (``synth.sites.SITE_NAMES``)."""
    from synth.sites import SITE_NAMES

    return tuple(SITE_NAMES)


def cnn_digest(base: FusionModel) -> str:
    """A short digest of the frozen image branch's weights: cached concepts are valid for that branch only."""
    assert base.image_branch is not None
    h = hashlib.sha256()
    for key, value in sorted(base.image_branch.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def site_digest(site: str) -> str:
    """A short digest of what generates a site's patients (``synth.sites.Site`` less its name, description and
    size): cached arrays of a site whose parameters changed are another site's."""
    import dataclasses

    from synth.sites import get_site

    centre = get_site(site)
    assert centre is not None
    fields = {k: v for k, v in dataclasses.asdict(centre).items() if k not in ("name", "description", "relative_size")}
    return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:8]


def _from_cohort(cohort: Any, base: FusionModel) -> SiteArrays:
    inputs = cohort_inputs(cohort)
    concepts = image_embeddings(base, inputs)  # (N, K_img) raw, from the frozen shipped branch
    demo = inputs["demographics"]
    age = getattr(cohort, "age_years", None)
    male = getattr(cohort, "male", None)
    out: SiteArrays = {"image_concepts": concepts.astype(np.float32)}
    out.update({k: inputs[k] for k in FUSE_INPUTS})
    out["outcome"] = np.asarray(cohort.outcome, dtype=np.float32)
    out["age_years"] = np.asarray(age if age is not None else demo[:, 0] * C.AGE_STD + C.AGE_MEAN, np.float32)
    out["male"] = np.asarray(male if male is not None else demo[:, 1] > 0.5, dtype=bool)
    out["image_factors"] = np.asarray(cohort.image_factors, dtype=np.float32)
    return out


def load_export(path: Path, base: FusionModel) -> SiteArrays:
    """A site's own patients from the engine's store: the file ``strokewatch training-set export`` writes (the
    contract's input tensors as the engine built them for scoring, the outcomes the site supplied, age and sex), with
    the frozen CNN's concepts computed here. ValueError naming what is wrong with the file."""
    expected = {spec.name: spec.dims for spec in C.INPUTS}
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in (*C.INPUT_NAMES, "outcome", "age_years", "male") if k not in data.files]
        if missing:
            raise ValueError(f"{path}: not a training-set file of `strokewatch training-set export` "
                             f"(missing {', '.join(missing)})")
        inputs = {name: np.asarray(data[name], dtype=np.float32) for name in C.INPUT_NAMES}
        n = len(data["outcome"])
        for name, shape in expected.items():
            if inputs[name].shape != (n, *shape):
                raise ValueError(f"{path}: {name} has shape {inputs[name].shape}, the contract's is (N, {shape})")
        outcome = np.asarray(data["outcome"], dtype=np.float32)
        if not np.isin(outcome, (0.0, 1.0)).all():
            raise ValueError(f"{path}: outcomes must be 0 or 1")
        out: SiteArrays = {"image_concepts": image_embeddings(base, inputs).astype(np.float32)}
        out.update({k: inputs[k] for k in FUSE_INPUTS})
        out["outcome"] = outcome
        out["age_years"] = np.asarray(data["age_years"], dtype=np.float32)
        out["male"] = np.asarray(data["male"], dtype=bool)
    # the findings' truth is unknown at a real site (only the simulation's ceiling reads it)
    out["image_factors"] = np.full((n, len(IMAGE_CONCEPTS)), np.nan, dtype=np.float32)
    return out


def load_site(
    site: str, n: int, seed: int, base: FusionModel, *, start: int = 0, cache: bool = True, workers: int = 1
) -> SiteArrays:
    """Patients ``start..start+n-1`` of ``site``'s cohort ``seed``, as the client trains on them (cached on disk,
    keyed by the cohort and the frozen CNN's digest)."""
    from synth import SYNTH_VERSION

    prefix = f"federated-v{SYNTH_VERSION}-{site}-{site_digest(site)}-n"
    suffix = f"-seed{seed}-start{start}-cnn{cnn_digest(base)}.npz"
    path = cohort_cache_dir() / f"{prefix}{n}{suffix}"
    if cache:
        # patients are generated one by one from (seed, index): the first n of a longer cached run are these n
        cached = sorted(
            (int(f.name[len(prefix) : -len(suffix)]), f)
            for f in cohort_cache_dir().glob(f"{prefix}*{suffix}")
            if f.name[len(prefix) : -len(suffix)].isdigit()
        )
        longer = [f for size, f in cached if size >= n]
        if longer:
            with np.load(longer[0], allow_pickle=False) as data:
                return {k: data[k][:n] for k in KEYS}
    log.info("site %s: %d patients from %d (seed %d): cohort and image concepts", site, n, start, seed)
    arrays = _from_cohort(make_cohort(n, seed, start=start, site=site, workers=workers, cache=False), base)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        tmp.replace(path)
    return arrays


def digest(arrays: SiteArrays) -> str:
    """A digest of a site's training arrays: what a client reports, so the server's log says which data trained
    each update without seeing it."""
    h = hashlib.sha256()
    for key in TRAINED_KEYS:
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()[:16]


def pool(parts: list[SiteArrays]) -> SiteArrays:
    """Several sites' arrays concatenated (central training on pooled data, or the overall test set)."""
    return {k: np.concatenate([p[k] for p in parts]) for k in KEYS}


def save_arrays(arrays: SiteArrays, path: Path) -> None:
    np.savez(path, **arrays)  # type: ignore[arg-type]
