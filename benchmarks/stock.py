"""Helpers the benchmark baselines share: the stock onnxruntime calibration reader, and relabelling a variant row."""

from __future__ import annotations

import json

from vitexport.artifacts import MANIFEST, Artifact


def ort_reader(calibration, input_name: str, max_images: int):
    """An onnxruntime CalibrationDataReader over the first ``max_images`` calibration images."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = (x[i : i + 1] for x in calibration.batches() for i in range(len(x)))
            self.left = max_images

        def get_next(self):
            if self.left == 0:
                return None
            self.left -= 1
            x = next(self.it, None)
            return None if x is None else {input_name: x}

    return Reader()


def relabel(art: Artifact, precision: str, summary: str) -> Artifact:
    """The same artifact under another row name (precision) and recipe summary: a variant built by a backend."""
    manifest = {**art.manifest, "precision": precision, "recipe": {**art.manifest["recipe"], "summary": summary}}
    (art.directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return Artifact.load(art.directory)
