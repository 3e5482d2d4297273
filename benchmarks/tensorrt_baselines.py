"""Stock-recipe baselines for the TensorRT target, measured beside vitexport's TensorRT int8 by the same harness.

The stock tool for TensorRT-ready QDQ ONNX is NVIDIA's Model Optimizer (``nvidia-modelopt[onnx]``, ONNX PTQ). It does
not install cleanly here: ``pip install torch==2.13.0 "nvidia-modelopt[onnx]"`` resolves (pip --dry-run, modelopt
0.47.0) to onnxruntime-gpu 1.24.4 beside the installed onnxruntime 1.32 (both own the ``onnxruntime`` package: the
CPU build would be overwritten by an older GPU build that needs CUDA libraries), downgrades onnx 1.23 -> 1.21 and
pulls cupy-cuda12x. So no ModelOpt row is produced here.

What this file offers instead is the stock *settings* TensorRT documents for explicit quantization, through
onnxruntime's own quantizer: QDQ, symmetric signed int8 activations and weights (zero point 0), per-channel weights,
Q/DQ on MatMul/Gemm inputs only, MinMax calibration. Rows are emulated exactly like vitexport's (ONNX Runtime, float
fake-quant of the QDQ graph). Builders follow benchmarks/run_matrix.py: ``(reference, calibration, tmp) -> Artifact``.
"""

from __future__ import annotations

from pathlib import Path

from stock import ort_reader
from vitexport.artifacts import Artifact, write_manifest
from vitexport.backends.tensorrt import EngineSettings, engine_plan, write_engine_kit


def stock_tensorrt_qdq(max_images: int = 128):
    """onnxruntime quantize_static with TensorRT's explicit-quantization settings (MatMul/Gemm only, s8s8, MinMax)."""

    def make(reference, calibration, tmp: Path) -> Artifact:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        out = tmp / "tensorrt-int8-stock-ort-qdq"
        out.mkdir()
        quantize_static(
            str(reference.path),
            str(out / "model.onnx"),
            ort_reader(calibration, reference.input_name, max_images),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"],
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        fields = reference.manifest_fields()
        plan = engine_plan("int8", EngineSettings(), fields["io"]["input"], fields["io"]["input_shape"][1:])
        write_engine_kit(out, plan)
        recipe = {
            "summary": f"stock: onnxruntime quantize_static with TensorRT settings (QDQ, symmetric int8 activations and per-channel weights, op_types MatMul/Gemm (ORT also puts Q/DQ on their outputs and on the attention matmuls), MinMax, {max_images} calibration images); nvidia-modelopt does not install here",
            "method": "onnxruntime quantize_static",
        }
        return write_manifest(out, backend="tensorrt", precision="int8-stock-ort-qdq", main="model.onnx", recipe=recipe, **fields)

    return make
