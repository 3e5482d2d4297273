"""The calibration reader the stock onnxruntime quantizers take, fed from vitexport's Calibration (one image a time)."""

from __future__ import annotations


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
