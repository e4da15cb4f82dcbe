"""Export a trained fusion model to ONNX for ONNX Runtime and Triton.

The exported graph takes the contract's inputs with a symbolic batch axis and returns
``probability`` and ``logit``, both with the calibration (temperature, bias) baked in, and for a logistic head
also the contract's optional outputs: ``logit_terms`` (the logit as the reference patient's plus each input's exact
contribution, from the same forward pass; ``LogisticHead.terms``) and ``lesion_map`` (the image branch's lesion
probabilities, which the engine's heat-map shows). Provenance
(model version, trained flag, calibration, seed, metrics) goes into ONNX ``metadata_props``,
which ``inference.runtime.OnnxRuntimeModel`` reads.

    python -m modelling.export --weights modelling/weights/fusion
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import onnx
import torch

from inference import contract as C
from inference.runtime import DEFAULT_MODEL_PATH, META_INFO, META_TRAINED, META_VERSION
from modelling.config import FusionConfig
from modelling.model import CalibratedModel, ExplainedModel, FusionModel, load

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "fusion"
BATCH_DIM = "batch"
OPSET = 18


def example_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Contract-shaped tensors; batch 2 so no exporter can specialise the batch axis to 1."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(batch, *spec.dims, generator=gen) for spec in C.INPUTS]
    by_name = dict(zip(C.INPUT_NAMES, tensors, strict=True))
    by_name["image_present"] = torch.ones(batch, 1)
    by_name["vitals_mask"] = (by_name["vitals_mask"] > 0).float()
    return tuple(by_name[name] for name in C.INPUT_NAMES)


def export_model(model: FusionModel, out_path: Path, *, trained: bool) -> Path:
    """Write ``model`` (eval mode, calibrated) to ``out_path`` and stamp the metadata."""
    if model.cfg.variant != "fusion":
        raise ValueError(f"only the fusion variant is served (the contract needs both inputs); got {model.cfg.variant}")
    explained = model.logistic is not None  # only a logistic head's logit is a sum of per-input terms
    wrapped = (ExplainedModel if explained else CalibratedModel)(model.eval()).eval()
    output_names = [*C.OUTPUT_NAMES, *(C.OPTIONAL_OUTPUT_NAMES if explained else ())]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic_shapes = tuple({0: batch} for _ in C.INPUT_NAMES)
    with torch.no_grad():
        torch.onnx.export(
            wrapped,
            example_inputs(),
            str(out_path),
            input_names=list(C.INPUT_NAMES),
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            optimize=True,
        )
    proto = onnx.load(str(out_path))
    _name_batch_axis(proto)
    check_graph_signature(proto)
    info = {
        "temperature": model.cfg.temperature,
        "calibration_bias": model.cfg.calibration_bias,
        "variant": model.cfg.variant,
        **model.cfg.info,
    }
    meta = {META_VERSION: C.MODEL_VERSION, META_TRAINED: "true" if trained else "false", META_INFO: json.dumps(info)}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "strokewatch.modelling.export"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out_path))
    log.info("exported %s (%.1f kB, trained=%s)", out_path, out_path.stat().st_size / 1024, trained)
    return out_path


def _name_batch_axis(proto: onnx.ModelProto) -> None:
    """Give every graph input/output's first axis the same symbolic name, whatever the exporter chose."""
    for value in (*proto.graph.input, *proto.graph.output):
        dim0 = value.type.tensor_type.shape.dim[0]
        dim0.ClearField("dim_value")
        dim0.dim_param = BATCH_DIM


def check_graph_signature(proto: onnx.ModelProto) -> None:
    """Fail unless graph inputs/outputs are exactly the contract's (its outputs, then any of its optional outputs in
    contract order: a model exported before ``lesion_map`` existed has ``logit_terms`` alone), with a symbolic batch
    axis."""
    values = {v.name: v for v in (*proto.graph.input, *proto.graph.output)}
    got = [v.name for v in proto.graph.input] + [v.name for v in proto.graph.output]
    expected = [*C.INPUT_NAMES, *C.OUTPUT_NAMES]
    optional = [name for name in C.OPTIONAL_OUTPUT_NAMES if name in values]
    if got == [*expected, *optional]:
        expected = got
    if got != expected:
        raise ValueError(f"ONNX tensors {got}, contract {expected} (+ optionally {list(C.OPTIONAL_OUTPUT_NAMES)})")
    for spec in (*C.INPUTS, *C.OUTPUTS, *(s for s in C.OPTIONAL_OUTPUTS if s.name in values)):
        dims = values[spec.name].type.tensor_type.shape.dim
        if not dims[0].dim_param or dims[0].HasField("dim_value"):
            raise ValueError(f"{spec.name}: batch axis is not symbolic")
        fixed = tuple(d.dim_value for d in dims[1:])
        if fixed != spec.dims:
            raise ValueError(f"{spec.name}: ONNX dims {fixed}, contract {spec.dims}")


def untrained_model(seed: int = 0) -> FusionModel:
    torch.manual_seed(seed)
    return FusionModel(FusionConfig(info={"note": "untrained placeholder", "seed": seed})).eval()


def run(weights_dir: Path | None = DEFAULT_WEIGHTS_DIR, out_path: Path = DEFAULT_MODEL_PATH) -> Path:
    """Export the weights in ``weights_dir`` (or an untrained placeholder when None) to ``out_path``."""
    if weights_dir is None:
        return export_model(untrained_model(), out_path, trained=False)
    return export_model(load(weights_dir), out_path, trained=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--weights", type=Path, default=DEFAULT_WEIGHTS_DIR, help="directory with config.json + weights.pt"
    )
    parser.add_argument("--untrained", action="store_true", help="export a randomly initialised placeholder")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(None if args.untrained else args.weights, args.out)


if __name__ == "__main__":
    main()
