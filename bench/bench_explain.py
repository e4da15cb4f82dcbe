"""Benchmark: naming a score's drivers by occlusion vs exactly from the scoring pass's logit terms, same process.

    .venv/bin/python bench/bench_explain.py [--n 200 --seed 4242 --runs 5 --iters 5 --threads 2]

Both through the engine's own code (``integration.services.explain.drivers``) and the shipped model in the embedded
runtime (ONNX Runtime, CPU): occlusion is one more batched call with each of the patient's inputs withheld; exact
reads the ``logit_terms`` the scoring call already returned. Per batch of 1 and 8 patients of the synthetic cohort
(the scoring pass itself is common to both and not counted), prints the median over ``--runs`` rounds of the
per-round median, the ratio, and the scoring pass with and without the ``logit_terms`` output.

Then, on ``--n`` patients, how far the two agree: the same note text, the same top driver, the same named inputs,
and the rank correlation of the per-input effects (probability points); how far each agrees with the generating
model's own per-input terms (the synthetic cohort's truth); and why they part (the concepts the head reads when one
vital sign is withheld, a state the model never saw in training). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import contract as C  # noqa: E402
from inference.runtime import DEFAULT_MODEL_PATH, ModelInputs, OnnxRuntimeModel, Prediction  # noqa: E402
from integration.domain.drivers import group_label, top_drivers  # noqa: E402
from integration.services import explain  # noqa: E402
from integration.services.explain import Scored  # noqa: E402


def cohort(n: int, seed: int, image_dropout: float, vitals_dropout: float) -> tuple[list[Scored], Any]:
    """The engine's view of ``n`` synthetic patients (inputs, image used), and the cohort's arrays (the truth)."""
    from synth import make_arrays

    arrays = make_arrays(n, seed, image_dropout=image_dropout, vitals_dropout=vitals_dropout)
    out = []
    for i in range(n):
        inputs = ModelInputs(**{name: np.asarray(getattr(arrays, name)[i], dtype=np.float32) for name in C.INPUT_NAMES})
        out.append((inputs, bool(inputs.image_present[0] > 0)))
    return out, arrays


def median_ms(fns: Sequence[Callable[[], object]], runs: int, iters: int) -> list[tuple[float, list[float]]]:
    """Per function, (median of the per-round medians, the rounds); the functions take turns round by round, so
    a load that comes and goes on the machine falls on all of them alike."""
    for fn in fns:
        for _ in range(3):  # warm-up: allocator, thread pool
            fn()
    rounds: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, rounds, strict=True):
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1000)
            out.append(statistics.median(times))
    return [(statistics.median(r), r) for r in rounds]


def without_terms(predictions: Sequence[Prediction]) -> list[Prediction]:
    """The same predictions as a model that serves no logit terms would give: explained by occlusion."""
    return [replace(p, logit_terms=None) for p in predictions]


def timing(model: OnnxRuntimeModel, patients: list[Scored], args: argparse.Namespace) -> None:
    print(f"threads: {args.threads}; {args.runs} rounds x {args.iters} calls; median of per-round medians (ms)")
    for size in (1, 8):
        time_batch(model, patients[:size], args)


def time_batch(model: OnnxRuntimeModel, batch: list[Scored], args: argparse.Namespace) -> None:
    served = model.output_names
    inputs = [b[0] for b in batch]
    predictions = model.predict(inputs)
    assert all(p.logit_terms is not None for p in predictions), "the model serves no logit_terms"
    occluded = without_terms(predictions)
    (occ_ms, occ_rounds), (exact_ms, exact_rounds) = median_ms(
        [lambda: explain.drivers(model, batch, occluded), lambda: explain.drivers(model, batch, predictions)],
        args.runs,
        args.iters,
    )
    rows = sum(len(explain.withheld_variants(*b)) for b in batch)

    def scoring(names: tuple[str, ...]) -> None:
        model.output_names = names
        model.predict(inputs)

    (plain_ms, _), (terms_ms, _) = median_ms(
        [lambda: scoring(C.OUTPUT_NAMES), lambda: scoring(served)], args.runs, args.iters
    )
    model.output_names = served
    print(
        f"batch {len(batch)}: explain by occlusion {occ_ms:8.2f} ms ({rows} withheld rows, one call)  "
        f"exact {exact_ms:6.3f} ms  ratio {occ_ms / exact_ms:,.0f}x"
    )
    print(f"         occlusion rounds {[round(r, 1) for r in occ_rounds]}")
    print(f"         exact rounds     {[round(r, 3) for r in exact_rounds]}")
    print(
        f"         scoring pass (not in the above): {plain_ms:.2f} ms without logit_terms, {terms_ms:.2f} ms with them"
    )


def agreement(model: OnnxRuntimeModel, patients: list[Scored], arrays: Any) -> None:
    from scipy.stats import spearmanr

    predictions: list[Prediction] = []
    for start in range(0, len(patients), C.MAX_BATCH):
        predictions += model.predict([b[0] for b in patients[start : start + C.MAX_BATCH]])
    exact = explain.withheld_probabilities(model, patients, predictions)
    occluded = explain.withheld_probabilities(model, patients, without_terms(predictions))
    truth = true_terms(arrays)
    same_text = same_top = same_named = 0
    rhos: list[float] = []
    top_pairs: Counter[tuple[str, str]] = Counter()
    by_group: dict[str, list[tuple[float, float]]] = {}
    versus_truth: dict[str, list[tuple[bool, float]]] = {"exact": [], "occlusion": []}
    for i, (pred, ex, oc) in enumerate(zip(predictions, exact, occluded, strict=True)):
        assert ex is not None and oc is not None
        text_ex, text_oc = top_drivers(pred.probability, ex), top_drivers(pred.probability, oc)
        same_text += text_ex == text_oc
        named_ex, named_oc = named(pred.probability, ex), named(pred.probability, oc)
        same_named += set(named_ex) == set(named_oc)
        first_ex, first_oc = (named_ex or ["-"])[0], (named_oc or ["-"])[0]
        same_top += first_ex == first_oc
        if first_ex != first_oc:
            top_pairs[(first_ex, first_oc)] += 1
        groups = list(ex)
        d_ex = [pred.probability - ex[g] for g in groups]
        d_oc = [pred.probability - oc[g] for g in groups]
        for g, a, b in zip(groups, d_ex, d_oc, strict=True):
            by_group.setdefault(g, []).append((a, b))
        if len(groups) >= 3 and len(set(d_ex)) > 1 and len(set(d_oc)) > 1:
            rhos.append(float(spearmanr(d_ex, d_oc).statistic))
        if patients[i][1] and len(groups) == 1 + C.N_FEATURES - (0 if "bmi" in groups else 1):
            # the generating model's own drivers, for a patient with every input: which method finds them?
            # the strongest input among all the patient's; the ranks among the inputs the truth reads (no ties at 0)
            t = [truth[g][i] for g in groups]
            true_top = groups[int(np.argmax(t))]
            read = [k for k, g in enumerate(groups) if g in TRUTH_INPUTS]
            for method, d in (("exact", d_ex), ("occlusion", d_oc)):
                rho = float(spearmanr([d[k] for k in read], [t[k] for k in read]).statistic)
                versus_truth[method].append((groups[int(np.argmax(d))] == true_top, rho))
    n = len(patients)
    patterns = Counter(
        ("image" if used else "no image") + (" + vitals" if x.vitals_mask.any() else "") for x, used in patients
    )
    print(f"\nagreement, exact vs occlusion, on {n} patients of the synthetic cohort ({dict(patterns)}):")
    print(f"  same note text (drivers, order, points):      {same_text}/{n} ({100 * same_text / n:.0f}%)")
    print(f"  same top driver (first phrase's input):       {same_top}/{n} ({100 * same_top / n:.0f}%)")
    print(f"  same inputs named (raising, >= 1 point):      {same_named}/{n} ({100 * same_named / n:.0f}%)")
    print(
        f"  Spearman rank correlation of per-input effects: median {statistics.median(rhos):.2f}, "
        f"mean {statistics.fmean(rhos):.2f} (over {len(rhos)} patients with >= 3 inputs)"
    )
    if top_pairs:
        pairs = ", ".join(f"{a} -> {b}: {k}" for (a, b), k in top_pairs.most_common(6))
        print(f"  where the top driver differs (exact -> occlusion): {pairs}")
    print("  per input, effect in probability points (exact | occlusion): mean, mean |difference|, correlation")
    for g, pairs_ in by_group.items():
        a, b = (np.asarray(x) * 100 for x in zip(*pairs_, strict=True))
        corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
        print(
            f"    {group_label(g):38s} n={len(a):4d}  {a.mean():+6.2f} | {b.mean():+6.2f}   "
            f"{np.abs(a - b).mean():5.2f}   r={corr:+.2f}"
        )
    m = len(versus_truth["exact"])
    print(f"against the generating model's own per-input terms (synth.outcome; {m} patients with every input):")
    for method, rows in versus_truth.items():
        hits = sum(hit for hit, _ in rows)
        print(
            f"  {method:9s}: strongest input the same as the truth's {hits}/{m} ({100 * hits / max(m, 1):.0f}%), "
            f"Spearman with the truth's terms over {', '.join(TRUTH_INPUTS)}: "
            f"median {statistics.median(r for _, r in rows):.2f}, mean {statistics.fmean(r for _, r in rows):.2f}"
        )


#: The inputs the generating model reads a risk factor from (the others have no effect on the truth).
TRUTH_INPUTS = ("image", "sbp", "hr", "glucose")


def true_terms(arrays: Any) -> dict[str, np.ndarray]:
    """The generating model's logit (``synth.outcome.risk_logit``) as the same kind of terms as the head's: each
    factor's coefficient x (value - cohort mean), credited to the input it is read from, and the territorial x
    lability product shared by its Shapley value. Inputs no factor is read from get 0."""
    from synth.outcome import COEF

    img, vit = np.asarray(arrays.image_factors, np.float64), np.asarray(arrays.vital_factors, np.float64)
    lacunes, wmd, terr, vessel = img.T
    sbp, lab, trend, af, glucose = vit.T
    centred = {
        name: x - x.mean()
        for name, x in (
            ("lacunes", lacunes),
            ("wmd_grade", wmd),
            ("territorial", terr),
            ("hyperdense_vessel", vessel),
            ("sbp_z", sbp),
            ("lability_z", lab),
            ("trend", trend),
            ("af", af),
            ("glucose_z", glucose),
        )
    }
    excess = np.maximum(lab, 0.0)
    c = COEF["territorial_x_lability"]
    out = {g: np.zeros(len(lab)) for g in C.LOGIT_TERMS[1:]}
    out["image"] = sum(COEF[k] * centred[k] for k in ("lacunes", "wmd_grade", "territorial", "hyperdense_vessel"))
    out["image"] += 0.5 * c * (terr - terr.mean()) * (excess + excess.mean())
    out["sbp"] = sum(COEF[k] * centred[k] for k in ("sbp_z", "lability_z", "trend"))
    out["sbp"] += 0.5 * c * (excess - excess.mean()) * (terr + terr.mean())
    out["hr"] = COEF["af"] * centred["af"]
    out["glucose"] = COEF["glucose_z"] * centred["glucose_z"]
    return out


def concept_shift(patients: list[Scored]) -> None:
    """Why occlusion and the exact terms part on SBP: what withholding one vital sign does to the concepts the head
    reads (the vitals branch, torch), against the head's reference (the training mean of the "both" pattern)."""
    import torch

    from modelling.config import VITAL_CONCEPTS
    from modelling.export import DEFAULT_WEIGHTS_DIR
    from modelling.model import concept_values, load

    model = load(DEFAULT_WEIGHTS_DIR)
    assert model.vitals_branch is not None and model.logistic is not None
    with_vitals = [x for x, _ in patients if x.vitals_mask.any()]
    arrays = {n: np.stack([getattr(x, n) for x in with_vitals]) for n in ("vitals", "vitals_mask", "vitals_delta")}

    def means(values: np.ndarray, mask: np.ndarray, delta: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            raw = model.vitals_branch(*(torch.from_numpy(a) for a in (values, mask, delta)))  # type: ignore[misc]
            return concept_values(raw, VITAL_CONCEPTS).numpy().mean(axis=0)  # type: ignore[no-any-return]

    at = C.N_DEMOGRAPHICS + 4  # the "both" block: demographics, image concepts, then the vital concepts
    reference = model.logistic.mean[at : at + len(VITAL_CONCEPTS)].numpy()
    print(f"\nvital concepts the head reads, mean over {len(with_vitals)} patients (vitals branch, torch):")
    print("  " + " " * 26 + "".join(f"{c:>13s}" for c in VITAL_CONCEPTS))
    print("  head's reference (mean)   " + "".join(f"{v:13.2f}" for v in reference))
    print("  the patients as they are  " + "".join(f"{v:13.2f}" for v in means(*arrays.values())))
    for key in ("sbp", "hr", "glucose", "dbp"):
        f = C.FEATURE_INDEX[key]
        values, mask, delta = (a.copy() for a in arrays.values())
        values[:, :, f], mask[:, :, f], delta[:, :, f] = 0.0, 0.0, 1.0
        print(f"  {key + ' withheld':26s}" + "".join(f"{v:13.2f}" for v in means(values, mask, delta)))


def named(probability: float, withheld: dict[str, float]) -> list[str]:
    """The inputs ``top_drivers`` names as raising the score, strongest first."""
    return [g for g in sorted(withheld, key=lambda g: withheld[g]) if probability - withheld[g] >= 0.01][:3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--n", type=int, default=200, help="patients for the agreement figures")
    parser.add_argument("--seed", type=int, default=4242, help="synthetic cohort seed (not a training seed)")
    parser.add_argument("--image-dropout", type=float, default=0.15, help="share of patients without an image")
    parser.add_argument("--vitals-dropout", type=float, default=0.1, help="share of patients without vitals")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--no-concepts", dest="concepts", action="store_false", help="skip the concept shift (needs torch)"
    )
    args = parser.parse_args()

    model = OnnxRuntimeModel(args.model, intra_op_threads=args.threads)
    print(f"model: {args.model} (version {model.model_version}, trained={model.trained}, serves {model.output_names})")
    patients, arrays = cohort(args.n, args.seed, args.image_dropout, args.vitals_dropout)
    timed = [p for p in patients if p[1] and p[0].vitals_mask.any()]  # the common case: an image and vitals
    timing(model, timed, args)
    agreement(model, patients, arrays)
    if args.concepts:
        concept_shift(patients)


if __name__ == "__main__":
    main()
