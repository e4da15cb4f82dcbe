"""Evaluate the shipped models on a fresh synthetic cohort against the oracle and the model's targets.

    python -m modelling.evaluate --seed 1001 --n 2000 --json --report reports/eval-1001

Scores, on the same patients: the oracle (the generator's true probability), the fusion model, the
image-only and vitals-only baselines, and the fusion model with the image withheld and with the vitals
withheld. Prints AUROC, AUPRC, Brier and ECE for each (JSON with ``--json``) and, with ``--report``,
writes ``report.md`` plus ``roc.png``, ``reliability.png`` and ``ablation.png`` into that folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from modelling.calibrate import binary_metrics, reliability_curve, sigmoid
from modelling.config import BINARY_CONCEPTS, IMAGE_CONCEPTS, VITAL_CONCEPTS
from modelling.model import FusionModel, calibrated_logit, load
from modelling.train.data import cohort_inputs, make_cohort, withhold
from modelling.train.features import fused_logits, image_embeddings, predict_proba, same_image_branch, vital_values
from modelling.train.memory import reuse_freed_memory
from modelling.train.settings import DEFAULT_OUT

log = logging.getLogger(__name__)

#: The targets the shipped model is held to (MODEL_CARD.md, "Targets"), as AUROC differences and ECE:
ORACLE_GAP_MAX = 0.02  # the fusion model within this of the oracle (the generator's true probability)
FUSION_MARGIN_MIN = 0.03  # fusion above each single-modality baseline by at least this: fusing must pay
ECE_MAX = 0.02  # calibrated: what a clinician reads as 30 % happens about 30 % of the time
WITHHELD_GAP_MAX = 0.02  # one modality withheld, the fusion model scores as that baseline does


def fused_probabilities(
    model: FusionModel, inputs: dict[str, np.ndarray], image_concepts: np.ndarray | None
) -> np.ndarray:
    """Calibrated probabilities (N,) from image concepts computed beforehand; equals ``predict_proba``."""
    return sigmoid(calibrated_logit(model.cfg, fused_logits(model, inputs, image_concepts)))


def _image_concepts(model: FusionModel, inputs: dict[str, np.ndarray]) -> np.ndarray | None:
    return image_embeddings(model, inputs) if model.image_branch is not None else None


def score_cohort(cohort: Any, models: dict[str, FusionModel]) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(probabilities per scorer name for every patient in ``cohort``, the fusion model's image concepts).

    The CNN runs once per distinct image branch: the staged fusion model's is the image baseline's, and a
    withheld image is the same all-zero volume for everyone."""
    inputs = cohort_inputs(cohort)
    scores: dict[str, np.ndarray] = {"oracle": np.asarray(cohort.true_probability, dtype=np.float64)}
    for name in ("image_only_probability", "vitals_only_probability"):
        if hasattr(cohort, name):
            scores[f"oracle_{name.removesuffix('_probability')}"] = np.asarray(getattr(cohort, name), dtype=np.float64)
    fusion, image = models["fusion"], models["image"]
    concepts = _image_concepts(fusion, inputs)
    image_concepts = concepts if same_image_branch(fusion, image) else _image_concepts(image, inputs)
    no_image = withhold(inputs, "image")
    blank = _image_concepts(fusion, {k: v[:1] for k, v in no_image.items()})
    blank_concepts = None if blank is None else np.repeat(blank, len(cohort.outcome), axis=0)
    scores["fusion"] = fused_probabilities(fusion, inputs, concepts)
    scores["image_model"] = fused_probabilities(image, inputs, image_concepts)
    scores["vitals_model"] = predict_proba(models["vitals"], inputs)
    scores["fusion_image_withheld"] = fused_probabilities(fusion, no_image, blank_concepts)
    scores["fusion_vitals_withheld"] = fused_probabilities(fusion, withhold(inputs, "vitals"), concepts)
    return scores, concepts


def concept_agreement(
    model: FusionModel, cohort: Any, image_concepts: np.ndarray | None = None, batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """How well the fusion model's branches recognise the risk factors the generator planted.

    Per concept: AUROC against the truth for yes/no concepts (territorial infarct, vessel sign, AF),
    Pearson r for graded ones. Only for cohorts that carry the factors (``synth`` arrays).
    ``image_concepts``: the image branch's raw concepts when already computed (``score_cohort``).
    """
    from sklearn.metrics import roc_auc_score

    if not hasattr(cohort, "image_factors") or not hasattr(cohort, "vital_factors"):
        return {}
    assert model.image_branch is not None and model.vitals_branch is not None
    inputs = cohort_inputs(cohort)
    if image_concepts is None:
        image_concepts = image_embeddings(model, inputs)
    # AF as a probability, the graded ones as they are: AUROC and Pearson r read them as the raw outputs would
    outs = {"image_concepts": [image_concepts], "vital_concepts": [vital_values(model, inputs, batch_size)]}
    present = inputs["image_present"][:, 0] > 0
    observed = inputs["vitals_mask"].sum(axis=(1, 2)) > 0
    result: dict[str, dict[str, float]] = {}
    for key, names, truth, rows in (
        ("image_concepts", IMAGE_CONCEPTS, cohort.image_factors, present),
        ("vital_concepts", VITAL_CONCEPTS, cohort.vital_factors, observed),
    ):
        pred = np.concatenate(outs[key])[rows]
        true = np.asarray(truth)[rows]
        for k, name in enumerate(names):
            if name in BINARY_CONCEPTS:
                ok = 0 < true[:, k].sum() < len(true)
                result[name] = {"auroc": round(float(roc_auc_score(true[:, k], pred[:, k])), 4) if ok else float("nan")}
            else:
                result[name] = {"pearson_r": round(float(np.corrcoef(pred[:, k], true[:, k])[0, 1]), 4)}
    return result


def check_targets(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """Each target with the measured value, the limit and whether it is met."""
    auc = {k: v["auroc"] for k, v in metrics.items()}
    checks = {
        "fusion_vs_oracle_auroc_gap": (auc["oracle"] - auc["fusion"], ORACLE_GAP_MAX, "<="),
        "fusion_minus_image_model_auroc": (auc["fusion"] - auc["image_model"], FUSION_MARGIN_MIN, ">="),
        "fusion_minus_vitals_model_auroc": (auc["fusion"] - auc["vitals_model"], FUSION_MARGIN_MIN, ">="),
        "fusion_ece": (metrics["fusion"]["ece"], ECE_MAX, "<="),
        "image_withheld_vs_vitals_model_gap": (
            abs(auc["fusion_image_withheld"] - auc["vitals_model"]),
            WITHHELD_GAP_MAX,
            "<=",
        ),
        "vitals_withheld_vs_image_model_gap": (
            abs(auc["fusion_vitals_withheld"] - auc["image_model"]),
            WITHHELD_GAP_MAX,
            "<=",
        ),
    }
    return {
        name: {
            "value": round(value, 4),
            "limit": limit,
            "op": op,
            "met": value <= limit if op == "<=" else value >= limit,
        }
        for name, (value, limit, op) in checks.items()
    }


def run(seed: int, n: int, report_dir: Path | None = None, weights_dir: Path = DEFAULT_OUT) -> dict[str, Any]:
    """Evaluate on a fresh cohort; returns {metrics, targets, ...}; writes the report when ``report_dir``."""
    models = {variant: load(weights_dir / variant) for variant in ("fusion", "image", "vitals")}
    train_seed = models["fusion"].cfg.info.get("seed")
    if train_seed == seed:
        log.warning("evaluation seed %d is the training seed: these patients were used in training", seed)
    cohort = make_cohort(n, seed)
    y = np.asarray(cohort.outcome, dtype=np.float64)
    scores, concepts = score_cohort(cohort, models)
    metrics = {name: {k: round(v, 4) for k, v in binary_metrics(p, y).items()} for name, p in scores.items()}
    result: dict[str, Any] = {
        "seed": seed,
        "n": int(len(y)),
        "prevalence": round(float(y.mean()), 4),
        "training_seed": train_seed,
        "synth_version": _synth_version(),
        "training_synth_version": models["fusion"].cfg.info.get("synth_version"),
        "model_version": models["fusion"].cfg.info.get("model_version"),
        "temperature": round(models["fusion"].cfg.temperature, 4),
        "calibration_bias": round(models["fusion"].cfg.calibration_bias, 4),
        "metrics": metrics,
        "targets": check_targets(metrics),
        "concepts": concept_agreement(models["fusion"], cohort, concepts),
    }
    if report_dir is not None:
        write_report(result, scores, y, report_dir)
    return result


def _synth_version() -> str:
    from synth import SYNTH_VERSION

    return str(SYNTH_VERSION)


def write_report(result: dict[str, Any], scores: dict[str, np.ndarray], y: np.ndarray, report_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    report_dir.mkdir(parents=True, exist_ok=True)
    main_curves = ("oracle", "fusion", "image_model", "vitals_model", "fusion_image_withheld", "fusion_vitals_withheld")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name in main_curves:
        fpr, tpr, _ = roc_curve(y, scores[name])
        ax.plot(
            fpr,
            tpr,
            label=f"{name} ({result['metrics'][name]['auroc']:.3f})",
            linestyle="--" if "withheld" in name else "-",
        )
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, seed {result['seed']}, n={result['n']}"
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(report_dir / "roc.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name in ("oracle", "fusion", "image_model", "vitals_model"):
        mean_p, rate, _ = reliability_curve(scores[name], y)
        ax.plot(mean_p, rate, marker="o", label=f"{name} (ECE {result['metrics'][name]['ece']:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set(xlabel="mean predicted probability", ylabel="observed rate", title="Reliability (10 equal-width bins)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report_dir / "reliability.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    values = [result["metrics"][name]["auroc"] for name in main_curves]
    ax.bar(range(len(main_curves)), values, color=["grey", "C0", "C1", "C2", "C3", "C4"])
    ax.set_xticks(range(len(main_curves)), [c.replace("_", "\n") for c in main_curves], fontsize=7)
    ax.set_ylim(0.5, 1.0)
    ax.set(ylabel="AUROC", title="Ablation: which modality carries the score")
    for i, v in enumerate(values):
        ax.text(i, v + 0.005, f"{v:.3f}", ha="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(report_dir / "ablation.png", dpi=110)
    plt.close(fig)

    (report_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    (report_dir / "report.md").write_text(render_markdown(result))
    log.info("report written to %s", report_dir)
    return report_dir


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"# StrokeWatch fusion model: evaluation on synthetic cohort seed {result['seed']}",
        "",
        f"n = {result['n']}, prevalence {result['prevalence']:.3f}, training seed {result['training_seed']}, "
        f"calibration: temperature {result['temperature']}, bias {result.get('calibration_bias', 0.0)}.",
        "",
        "| scorer | AUROC | AUPRC | Brier | ECE |",
        "|---|---|---|---|---|",
    ]
    for name, m in result["metrics"].items():
        lines.append(f"| {name} | {m['auroc']:.4f} | {m['auprc']:.4f} | {m['brier']:.4f} | {m['ece']:.4f} |")
    lines += ["", "## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for name, t in result["targets"].items():
        lines.append(f"| {name} | {t['value']:.4f} | {t['op']} {t['limit']} | {'yes' if t['met'] else 'NO'} |")
    if result.get("concepts"):
        lines += [
            "",
            "## Risk factors recognised by the fusion model's branches",
            "",
            "| concept | agreement |",
            "|---|---|",
        ]
        for name, c in result["concepts"].items():
            lines += [f"| {name} | " + ", ".join(f"{k} {v:.3f}" for k, v in c.items()) + " |"]
    lines += [
        "",
        "The oracle is the generator's true probability; its ECE is the sampling noise floor of ECE at this n.",
        "",
        "![ROC](roc.png)",
        "![Reliability](reliability.png)",
        "![Ablation](ablation.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="cohort seed; use one not used in training")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--report", type=Path, default=None, help="folder for report.md and the PNG figures")
    parser.add_argument("--weights", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reuse_freed_memory()
    result = run(args.seed, args.n, args.report, args.weights)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, m in result["metrics"].items():
            print(f"{name:28s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items()))
        for name, t in result["targets"].items():
            print(f"{name:40s} {t['value']:.4f} {t['op']} {t['limit']}  {'met' if t['met'] else 'NOT MET'}")


if __name__ == "__main__":
    main()
