"""Stock-recipe OpenVINO baselines for benchmarks/run_matrix.py: the tools' default settings, measured by the same
harness in the same run as vitexport's own OpenVINO rows.

    from openvino_baselines import stock_nncf_int8, stock_int4_sym_g32
    api.build(opts, extra_builders=[stock_nncf_int8, stock_int4_sym_g32])

Each builder is ``(reference, calibration, tmp: Path) -> Artifact`` (like stock_static / stock_dynamic in run_matrix).
They work on the OpenVINO model from the reference ONNX, never on the torch model.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from vitexport.artifacts import Artifact, write_manifest
from vitexport.backends.openvino import with_ir_size


def _save(model, reference, out: Path, name: str, recipe: dict) -> Artifact:
    import openvino as ov

    out.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(out / "model.xml"), compress_to_fp16=False)
    art = write_manifest(out, backend="openvino", precision=name, main="model.xml", recipe=recipe, extra_tools=("openvino", "nncf"), **reference.manifest_fields())
    return with_ir_size(art)  # an IR's size is its .xml and its .bin, as for vitexport's own rows


def stock_nncf_int8(reference, calibration, tmp: Path) -> Artifact:
    """nncf.quantize with model_type=TRANSFORMER and every other setting at its default (subset_size 300 >= all images)."""
    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)
    data = [x[i : i + 1] for x in calibration.batches() for i in range(len(x))]
    with contextlib.redirect_stdout(io.StringIO()):
        q = nncf.quantize(ov.convert_model(str(reference.path)), nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER)
    summary = f"stock: nncf.quantize, model_type=TRANSFORMER, default settings (MIXED preset, SmoothQuant, fast bias correction), {len(data)} calibration images"
    return _save(q, reference, tmp / "openvino-int8-stock-nncf", "int8-stock-nncf", {"summary": summary, "calibration_images": len(data)})


def stock_int4_sym_g32(reference, calibration, tmp: Path) -> Artifact:
    """nncf.compress_weights INT4_SYM, group size 32, no data (NNCF keeps first/last layers int8 by default)."""
    import nncf
    import openvino as ov

    logging.getLogger("nncf").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        q = nncf.compress_weights(ov.convert_model(str(reference.path)), mode=nncf.CompressWeightsMode.INT4_SYM, group_size=32)
    summary = "stock: nncf.compress_weights INT4_SYM, group size 32, data-free (embedding and head int8 by NNCF's default)"
    return _save(q, reference, tmp / "openvino-int4-stock-sym-g32", "int4-stock-sym-g32", {"summary": summary, "block_size": 32})


BASELINES = [stock_nncf_int8, stock_int4_sym_g32]
