"""The logistic fusion head's logit as exact per-input terms (``LogisticHead.terms``), and the ``logit_terms`` output.

Each input's term is weight x (concept - reference) summed over the features read from that input (an image x vital
product shared by its Shapley value); the terms sum to the logit. The shipped model.onnx serves them from the scoring
pass; a model with an MLP head serves none and the engine explains it by occlusion.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from inference import contract as C
from inference.runtime import DEFAULT_MODEL_PATH, ModelInputs, OnnxRuntimeModel
from integration.services import explain
from modelling.config import CONCEPT_INPUTS, IMAGE_CONCEPTS, VITAL_CONCEPTS, FusionConfig
from modelling.export import DEFAULT_WEIGHTS_DIR, export_model
from modelling.model import PRESENCE_PATTERNS, CalibratedModel, ExplainedModel, FusionModel, LogisticHead, load
from tests.unit.test_export_parity import patients

GROUPS = C.LOGIT_TERMS[1:]
KD, KI, KV = C.N_DEMOGRAPHICS, len(IMAGE_CONCEPTS), len(VITAL_CONCEPTS)


@pytest.fixture(scope="module")
def shipped() -> FusionModel:
    torch.set_num_threads(2)
    return load(DEFAULT_WEIGHTS_DIR)


def concepts(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Head inputs for ``batch`` patients cycling through the four presence patterns."""
    gen = torch.Generator().manual_seed(seed)
    demographics = torch.randn(batch, KD, generator=gen)  # (B, 2)
    image_values = torch.rand(batch, KI, generator=gen) * 3  # (B, K_img)
    vital_values = torch.randn(batch, KV, generator=gen)  # (B, K_vit): some below the mean, so relu matters
    image_present = torch.tensor([[1.0], [1.0], [0.0], [0.0]]).repeat(batch // 4 + 1, 1)[:batch]  # (B, 1)
    observed = torch.tensor([[1.0], [0.0], [1.0], [0.0]]).repeat(batch // 4 + 1, 1)[:batch]  # (B, 1)
    return demographics, image_values, image_present, vital_values, observed


def features_by_hand(pattern: str, demo: torch.Tensor, img: torch.Tensor, vit: torch.Tensor) -> list[tuple[float, str]]:
    """(value, input) of each single-input feature of ``pattern``'s block, in the head's order."""
    out = [(float(d), "demographics") for d in demo]
    if pattern in ("both", "image"):
        out += [(float(v), CONCEPT_INPUTS[c]) for v, c in zip(img, IMAGE_CONCEPTS, strict=True)]
    if pattern in ("both", "vitals"):
        out += [(float(v), CONCEPT_INPUTS[c]) for v, c in zip(vit, VITAL_CONCEPTS, strict=True)]
        out += [(max(float(v), 0.0), CONCEPT_INPUTS[c]) for v, c in zip(vit, VITAL_CONCEPTS, strict=True)]
    return out


def test_each_term_is_weight_times_delta_summed_over_its_inputs_features(shipped: FusionModel) -> None:
    head = copy.deepcopy(shipped.logistic)
    assert isinstance(head, LogisticHead)
    start_of, at = {}, 0  # where each pattern's block starts among the features
    for pattern in PRESENCE_PATTERNS:
        start_of[pattern], at = at, at + head.widths[pattern]
    products = slice(KD + KI + 2 * KV, head.widths["both"])
    with torch.no_grad():
        head.linear.weight[0, len(PRESENCE_PATTERNS) :][products] = 0.0  # the products: next test
    demo, img, present, vit, observed = concepts(8, seed=1)
    with torch.no_grad():
        terms = head.terms(demo, img, present, vit, observed)  # (B, 1 + G)
    weight = head.linear.weight[0].detach()
    intercepts, w = weight[: len(PRESENCE_PATTERNS)], weight[len(PRESENCE_PATTERNS) :]
    for b in range(8):
        pattern = {(1, 1): "both", (1, 0): "image", (0, 1): "vitals", (0, 0): "none"}[
            (int(present[b, 0]), int(observed[b, 0]))
        ]
        expected = dict.fromkeys(GROUPS, 0.0)
        for j, (value, group) in enumerate(features_by_hand(pattern, demo[b], img[b], vit[b])):
            at = start_of[pattern] + j
            expected[group] += float(w[at] * (value - head.mean[at]) / head.scale[at])  # weight x delta
        assert float(terms[b, 0]) == pytest.approx(float(intercepts[PRESENCE_PATTERNS.index(pattern)]), abs=1e-5)
        assert terms[b, 1:].tolist() == pytest.approx([expected[g] for g in GROUPS], abs=1e-5)


def test_an_image_x_vital_product_is_shared_by_its_shapley_value(shipped: FusionModel) -> None:
    head = copy.deepcopy(shipped.logistic)
    assert isinstance(head, LogisticHead)
    i, v = IMAGE_CONCEPTS.index("territorial"), VITAL_CONCEPTS.index("lability_z")
    at = KD + KI + 2 * KV + i * KV + v  # the product's feature in the "both" block
    with torch.no_grad():
        head.linear.weight[0, len(PRESENCE_PATTERNS) :] = 0.0
        head.linear.weight[0, len(PRESENCE_PATTERNS) + at] = 0.8
    demo, img, present, vit, observed = concepts(4, seed=2)
    with torch.no_grad():
        terms = head.terms(demo, img, present, vit, observed)[0]  # patient 0 has both modalities
        logit = head(demo, img, present, vit, observed)[0, 0]
    coef = 0.8 / float(head.scale[at])
    a, b = float(img[0, i]), max(float(vit[0, v]), 0.0)
    a0, b0 = float(head.mean[KD + i]), float(head.mean[KD + KI + KV + v])
    by_name = dict(zip(C.LOGIT_TERMS, terms.tolist(), strict=True))
    assert by_name["image"] == pytest.approx(0.5 * coef * (a - a0) * (b + b0), abs=1e-5)
    assert by_name["sbp"] == pytest.approx(0.5 * coef * (b - b0) * (a + a0), abs=1e-5)  # lability is read from SBP
    intercept = float(head.linear.weight[0, 0].detach())
    assert by_name["reference"] == pytest.approx(intercept + coef * (a0 * b0 - float(head.mean[at])), abs=1e-5)
    assert sum(by_name.values()) == pytest.approx(float(logit), abs=1e-5)


def test_calibrated_terms_sum_to_the_served_logit(shipped: FusionModel) -> None:
    feeds = patients(6, seed=3)  # with a patient without image and one without vitals
    inputs = [torch.from_numpy(feeds[n]) for n in C.INPUT_NAMES]
    with torch.no_grad():
        prob, logit, terms, lesion = ExplainedModel(shipped)(*inputs)
        plain_prob, plain_logit = CalibratedModel(shipped)(*inputs)
    assert torch.equal(logit, plain_logit) and torch.equal(prob, plain_prob)  # explaining does not change the score
    assert terms.shape == (6, len(C.LOGIT_TERMS))
    torch.testing.assert_close(terms.sum(dim=1, keepdim=True), logit, atol=1e-5, rtol=0)
    assert float(terms[0, 1]) == 0.0  # no image: the image contributes nothing
    assert terms[1, 2 : 2 + C.N_FEATURES].abs().max() == 0.0  # no vitals: nor does any vital sign
    assert lesion.shape == (6, len(C.LESION_KINDS), *C.LESION_MAP_SHAPE)
    assert float(lesion.min()) >= 0.0 and float(lesion.max()) <= 1.0  # probabilities


def test_the_shipped_onnx_serves_the_torch_terms(shipped: FusionModel) -> None:
    session = ort.InferenceSession(str(DEFAULT_MODEL_PATH), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == [*C.OUTPUT_NAMES, *C.OPTIONAL_OUTPUT_NAMES]
    feeds = patients(5, seed=4)
    _, logit, terms, lesion = session.run(None, feeds)
    with torch.no_grad():
        _, _, expected, expected_lesion = ExplainedModel(shipped)(*(torch.from_numpy(feeds[n]) for n in C.INPUT_NAMES))
    np.testing.assert_allclose(terms, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(lesion, expected_lesion.numpy(), atol=1e-4)  # the lesion maps the heat-map shows
    runtime = OnnxRuntimeModel(DEFAULT_MODEL_PATH)
    batch = [ModelInputs(**{n: feeds[n][i] for n in C.INPUT_NAMES}) for i in range(5)]
    for pred, row in zip(runtime.predict(batch), terms, strict=True):
        assert pred.logit_terms == pytest.approx(row.tolist(), abs=1e-6)
        assert sum(pred.logit_terms) == pytest.approx(pred.logit, abs=1e-4)


def test_a_model_with_an_mlp_head_serves_no_terms_and_is_explained_by_occlusion(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FusionModel(FusionConfig(head_kind="mlp")).eval()
    with pytest.raises(ValueError, match="logistic"):
        model.forward_with_terms(*(torch.from_numpy(a) for a in patients(1, seed=0).values()))
    runtime = OnnxRuntimeModel(export_model(model, tmp_path / "model.onnx", trained=False))
    assert runtime.output_names == C.OUTPUT_NAMES
    feeds = patients(2, seed=5)
    batch = [ModelInputs(**{n: feeds[n][i] for n in C.INPUT_NAMES}) for i in range(2)]
    scored = runtime.predict(batch)
    assert all(p.logit_terms is None for p in scored)

    calls: list[int] = []

    class Counting:
        model_version, trained, runtime_name = runtime.model_version, False, "counting"

        def predict(self, items: list[ModelInputs]) -> object:
            calls.append(len(items))
            return runtime.predict(items)

    scored_pairs = [(x, bool(x.image_present[0] > 0)) for x in batch]
    explain.drivers(Counting(), scored_pairs, scored)  # type: ignore[arg-type]
    assert calls == [sum(len(explain.withheld_variants(*p)) for p in scored_pairs)]
