"""CoreML settings: file names, the per-target options (``[options.coreml]``) and the deployment targets."""

from __future__ import annotations

import dataclasses

from ...errors import VitexportError

INSTALL_HINT = "pip install vitexport[coreml] (or: pip install coremltools)"
PACKAGE = "model.mlpackage"
EMULATION_DIR = "emulation"
SKELETON = "graph.onnx"  # the fp32 reference ONNX without its weights
WEIGHT_MAP = "weights.json"  # ONNX initializer -> the package's weight that fills it
INPUT_NAME = "image"
EMBEDDING_OUTPUT = "embedding"
COMPUTE_UNITS = ("cpu_only", "cpu_and_gpu", "cpu_and_ne", "all")

# precision -> (iOS, macOS) minimum deployment target; palette4 per tensor would be iOS16, grouped channels need iOS18
_TARGETS = {
    "fp32": ("iOS15", "macOS12"),
    "fp16": ("iOS15", "macOS12"),
    "int8": ("iOS16", "macOS13"),
    "int4": ("iOS18", "macOS15"),
    "palette4": ("iOS18", "macOS15"),
    "w8a8": ("iOS17", "macOS14"),
}


@dataclasses.dataclass(frozen=True)
class CoreMLOptions:
    """Per-target settings (``[options.coreml]`` in a device profile)."""

    platform: str = "iOS"  # "iOS" | "macOS": which deployment target family is recorded and required
    compute_units: str = "all"  # macOS runner: cpu_only | cpu_and_gpu | cpu_and_ne | all
    int8_method: str = "gptq"  # "gptq": core GPTQ-rounded per-channel codes (needs calibration) | "rtn": coremltools'
    int4_method: str = "gptq"  # "gptq": the core's GPTQ codes (needs calibration) | "rtn": coremltools round-to-nearest
    int4_block_size: int = 32
    palette_method: str = "gptq"  # "gptq": vitexport.quantization.palette (needs calibration) | "kmeans": coremltools'
    palette_granularity: str = "per_grouped_channel"  # or "per_tensor" (iOS16; kmeans only)
    palette_group_size: int = 16  # output channels sharing one 16-entry palette
    palette_kmeans_workers: int = 1
    palette_per_channel_scale: bool = False  # iOS18: scale each output channel before sharing a palette
    keep_float: tuple[str, ...] = ("position_embeddings", "cls_token", "classifier")  # int4/palette4: weights left fp16 (name parts)
    weight_threshold: int = 2048  # weights with fewer elements stay float (LayerNorm, biases, cls token)

    def __post_init__(self):
        if self.platform not in ("iOS", "macOS"):
            raise VitexportError(f"coreml platform must be iOS or macOS, not {self.platform!r}")
        if self.compute_units not in COMPUTE_UNITS:
            raise VitexportError(f"coreml compute_units must be one of {', '.join(COMPUTE_UNITS)}, not {self.compute_units!r}")
        if self.int8_method not in ("gptq", "rtn"):
            raise VitexportError(f"coreml int8_method must be gptq or rtn, not {self.int8_method!r}")
        if self.int4_method not in ("gptq", "rtn"):
            raise VitexportError(f"coreml int4_method must be gptq or rtn, not {self.int4_method!r}")
        if self.palette_method not in ("gptq", "kmeans"):
            raise VitexportError(f"coreml palette_method must be gptq or kmeans, not {self.palette_method!r}")
        if self.palette_granularity not in ("per_tensor", "per_grouped_channel"):
            raise VitexportError(f"coreml palette_granularity must be per_tensor or per_grouped_channel, not {self.palette_granularity!r}")
        if self.palette_group_size < 1 or self.int4_block_size < 16 or self.int4_block_size & (self.int4_block_size - 1) or self.weight_threshold < 0:
            raise VitexportError(
                f"coreml palette_group_size must be >= 1, int4_block_size a power of two >= 16 and weight_threshold >= 0, "
                f"not {self.palette_group_size}, {self.int4_block_size}, {self.weight_threshold}"
            )
        if self.palette_method == "gptq" and self.palette_granularity != "per_grouped_channel":
            raise VitexportError("coreml palette_method gptq is per grouped channel: set palette_method = \"kmeans\" for per_tensor")


def deployment_target(precision: str, opts: CoreMLOptions) -> str:
    ios, mac = _TARGETS[precision]
    if precision == "palette4" and opts.palette_granularity == "per_tensor":
        ios, mac = "iOS16", "macOS13"
    return ios if opts.platform == "iOS" else mac



def _coremltools():
    try:
        import coremltools as ct
    except ImportError as e:
        raise VitexportError(f"coremltools cannot be imported ({e}): {INSTALL_HINT}") from None
    return ct
