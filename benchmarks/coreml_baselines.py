"""Stock CoreML compression recipes (coremltools' documented defaults), as baseline rows beside vitexport's.

Each builder is ``(reference, calibration, tmp: Path) -> Artifact`` like the ones in run_matrix.py; the rows are
emulated from the saved packages exactly like vitexport's own CoreML rows.
"""

from __future__ import annotations

from pathlib import Path

from stock import relabel
from vitexport.artifacts import Artifact
from vitexport.backends.coreml import CoreMLBackend


def _stock(reference, calibration, tmp: Path, precision: str, name: str, options: dict, summary: str) -> Artifact:
    out = tmp / f"coreml-{name}"
    art = CoreMLBackend().build(reference, calibration, precision, {"coreml": options}, out)
    return relabel(art, name, summary)


def stock_int8_rtn(reference, calibration, tmp: Path) -> Artifact:
    """coremltools linear_quantize_weights: int8 linear_symmetric per channel, round to nearest (iOS 16)."""
    return _stock(reference, calibration, tmp, "int8", "int8-stock-rtn", {"int8_method": "rtn"},
                  "stock: coremltools linear_quantize_weights int8 linear_symmetric per channel (round to nearest), fp16 compute, iOS16+")


def stock_int4_rtn(reference, calibration, tmp: Path) -> Artifact:
    """coremltools linear_quantize_weights: int4 linear_symmetric per_block 32, round to nearest (iOS 18)."""
    return _stock(reference, calibration, tmp, "int4", "int4-stock-rtn", {"int4_method": "rtn", "int4_block_size": 32},
                  "stock: coremltools linear_quantize_weights int4 linear_symmetric per_block 32 (round to nearest), fp16 compute, iOS18+")


def stock_palette4(reference, calibration, tmp: Path) -> Artifact:
    """coremltools palettize_weights: 4-bit k-means, per tensor (the OpPalettizerConfig default granularity, iOS 16)."""
    return _stock(reference, calibration, tmp, "palette4", "palette4-stock-per-tensor", {"palette_method": "kmeans", "palette_granularity": "per_tensor"},
                  "stock: coremltools palettize_weights 4-bit kmeans per tensor, fp16 compute, iOS16+")
