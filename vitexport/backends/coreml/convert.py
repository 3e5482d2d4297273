"""Conversion: the checkpoint's torch module (preprocessing folded in) -> a CoreML ML Program, then coremltools'
own weight compression for the precisions that use it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ...artifacts import sha256
from ...errors import VitexportError
from .. import Calibration
from .settings import EMBEDDING_OUTPUT, INPUT_NAME, CoreMLOptions

log = logging.getLogger(__name__)


def convert(ct, module, spec, folded: Mapping[str, Any], precision: str, target: str) -> tuple[Any, dict[str, Any]]:
    """torch.jit.trace (coremltools 9's torch.export path fails on ViT) and ct.convert to an ML Program whose image
    input carries the checkpoint's scale and bias; classifiers get CoreML's classifier outputs."""
    import torch

    c, h, w = spec.input_shape
    tc = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(module.eval(), torch.rand(1, c, h, w), check_trace=False)
    kwargs: dict[str, Any] = {}
    if spec.task == "classification":
        kwargs["classifier_config"] = ct.ClassifierConfig(spec.labels_list())
    else:
        kwargs["outputs"] = [ct.TensorType(name=EMBEDDING_OUTPUT)]
    mlmodel = ct.convert(
        traced,
        inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, c, h, w), scale=folded["scale"], bias=folded["bias"], color_layout=ct.colorlayout.RGB)],
        convert_to="mlprogram",
        minimum_deployment_target=getattr(ct.target, target),
        compute_precision=ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16,
        **kwargs,
    )
    return mlmodel, {"convert_s": round(time.perf_counter() - tc, 2), "compute_precision": "float32" if precision == "fp32" else "float16"}


class _quiet:
    """coremltools warns about untested torch versions and prints tqdm bars: keep them out of the build's output."""

    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        self._levels = {}
        for name in ("coremltools", "torch.jit"):
            lg = logging.getLogger(name)
            self._levels[name] = lg.level
            lg.setLevel(logging.ERROR)
        # coremltools' tqdm bars (one per pass pipeline) have no off switch: they go to a buffer, kept in the debug log
        self._buf = io.StringIO()
        self._err = contextlib.redirect_stderr(self._buf)
        self._err.__enter__()
        return self

    def __exit__(self, *exc):
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        self._err.__exit__(*exc)
        log.debug("coremltools: %s", self._buf.getvalue()[-2000:])
        self._w.__exit__(*exc)
        return False


class _validate_once:
    """coremltools validates the whole program before its pass pipelines and again after each of their ~90 graph
    passes: pure Python, a third of each conversion's pass time (DeiT-tiny: 21 s of the 54 s its five conversions
    take on a slow 2-core host; ViT-Base has the same ops). Inside this block each pipeline runs unchecked and its
    result is validated once, so a pass that leaves a broken program still fails the build, only later in the
    pipeline, and the package is the same bytes. Where coremltools' internals have moved, nothing is patched.

    Inside it too, the float16 pass's overflow check (``FP16ComputePrecision.fp16_overflow``, which gathers every
    finite value of every weight to take their maximum: 1.2-1.6 s of each ViT-Base conversion) first reads each
    weight's largest magnitude, and only a weight above float16's range takes coremltools' own check: the same
    answer for every op."""

    def __enter__(self):
        self._restore = None
        try:
            from coremltools.converters.mil.mil import Program
            from coremltools.converters.mil.mil.passes.pass_pipeline import PassPipelineManager
        except ImportError:
            return self
        real_apply, real_validate = PassPipelineManager.__dict__.get("apply_pipeline"), getattr(Program, "validate", None)
        if not isinstance(real_apply, staticmethod) or real_validate is None:
            return self
        restore_overflow = _quick_fp16_overflow()

        def apply_pipeline(prog, pass_pipeline):
            Program.validate = lambda *a, **k: None
            try:
                real_apply.__func__(prog, pass_pipeline)
            finally:
                Program.validate = real_validate
            if isinstance(prog, Program):
                prog.validate()

        PassPipelineManager.apply_pipeline = staticmethod(apply_pipeline)

        def restore():
            PassPipelineManager.apply_pipeline = real_apply
            Program.validate = real_validate
            restore_overflow()

        self._restore = restore
        return self

    def __exit__(self, *exc):
        if self._restore is not None:
            self._restore()
        return False


FP16_MAX = 65504.0


def _quick_fp16_overflow() -> Callable[[], None]:
    """Patch FP16ComputePrecision.fp16_overflow (see _validate_once) and return what undoes it; a no-op where it moved."""
    try:
        from coremltools.converters.mil.mil.passes.defs.quantization import FP16ComputePrecision
    except ImportError:
        return lambda: None
    real = FP16ComputePrecision.__dict__.get("fp16_overflow")
    if not isinstance(real, staticmethod):
        return lambda: None

    def fp16_overflow(op) -> bool:
        for inputs in op.inputs.values():
            for var in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
                if var.op is not None and var.op.op_type == "const" and var.is_tensor_or_scalar_of(dtype="fp32"):
                    value = np.asarray(var.op.val.val)
                    if value.size and not np.abs(value).max() <= FP16_MAX:  # NaN or too large: coremltools decides
                        return real.__func__(op)
        return False

    FP16ComputePrecision.fp16_overflow = staticmethod(fp16_overflow)

    def restore() -> None:
        FP16ComputePrecision.fp16_overflow = real

    return restore


class _CoreMLModule:
    """The traced module: reference head (eager attention) + softmax for classifiers, std folded into the patch conv."""

    @staticmethod
    def wrap(head, spec):
        import torch

        pre = spec.preprocessing
        scale = float(pre.rescale) if pre.rescale else 1.0
        mean = pre.mean or (0.0, 0.0, 0.0)
        std = pre.std or (1.0, 1.0, 1.0)
        conv_name, conv = next(((n, m) for n, m in head.named_modules() if isinstance(m, torch.nn.Conv2d)), (None, None))
        if conv is None:
            raise VitexportError(f"{spec.source}: no patch-embedding convolution found to fold the input std into")
        if any(p != 0 for p in (conv.padding if isinstance(conv.padding, tuple) else (conv.padding,))):
            raise VitexportError(f"{spec.source}: the patch convolution pads its input, so 1/std cannot be folded exactly")
        with torch.no_grad():
            conv.weight.div_(torch.tensor(std, dtype=conv.weight.dtype).view(1, -1, 1, 1))

        class Module(torch.nn.Module):
            def __init__(self, head, classifier: bool):
                super().__init__()
                self.head = head
                self.classifier = classifier

            def forward(self, image):
                out = self.head(image)
                return torch.softmax(out, dim=-1) if self.classifier else out

        # CoreML image input: y = scale * pixel + bias[c]; with bias = -mean the conv sees (x - mean), and W/std does the rest
        folded = {"scale": scale, "bias": [-float(m) for m in mean], "std": [float(s) for s in std], "conv": conv_name}
        return Module(head, spec.task == "classification"), folded


def _compress(ct, mlmodel, precision: str, opts: CoreMLOptions, calibration: Calibration | None, pre: Mapping[str, Any]):
    import coremltools.optimize.coreml as cto

    if precision in ("fp32", "fp16"):
        return mlmodel, {"compression": "none"}
    if precision in ("int8", "w8a8"):
        cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=opts.weight_threshold)
        keep = ("position_embeddings", "cls_token")
        config = _config(cto, mlmodel, cfg, keep)
        out = {"compression": "linear_quantize_weights", "mode": "linear_symmetric", "weight_type": "int8", "granularity": "per_channel", "kept_float": list(keep)}
        if precision == "w8a8":  # pragma: no cover - macOS only (needs CoreML predictions to calibrate)
            from coremltools.optimize.coreml.experimental import OpActivationLinearQuantizerConfig, linear_quantize_activations

            if calibration is None:
                raise VitexportError("coreml w8a8 needs calibration images: pass --calib DIR")
            from .runner import _to_pil

            samples = [{INPUT_NAME: img} for batch in calibration.batches() for img in _to_pil(batch, pre)]
            act = cto.OptimizationConfig(global_config=OpActivationLinearQuantizerConfig(mode="linear_symmetric"))
            mlmodel = linear_quantize_activations(mlmodel, act, samples)
            out["activation_type"] = "int8"
            out["activation_calibration"] = {"images": len(samples), "method": "coremltools linear_quantize_activations (CoreML predictions)"}
        return cto.linear_quantize_weights(mlmodel, config), out
    if precision == "int4":
        if opts.int4_method == "gptq":
            return mlmodel, {"compression": "GPTQ int4 codes from vitexport.quantization.int4", "weight_type": "uint4", "granularity": "per_block", "block_size": opts.int4_block_size}
        # coremltools' own round-to-nearest (its default symmetric mode): the stock recipe GPTQ is measured against
        cfg = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=opts.int4_block_size, weight_threshold=opts.weight_threshold)
        config = _config(cto, mlmodel, cfg, ("patch_embeddings",) + tuple(opts.keep_float))
        return cto.linear_quantize_weights(mlmodel, config), {"kept_float": ["patch_embeddings", *opts.keep_float],
            "compression": "linear_quantize_weights", "int4": {"method": "rtn"}, "weight_type": "int4", "mode": "linear_symmetric", "granularity": "per_block", "block_size": opts.int4_block_size}
    if precision == "palette4" and opts.palette_method == "gptq":
        return mlmodel, {"compression": "GPTQ palettes from vitexport.quantization.palette", "weight_type": "4-bit palette", "granularity": "per_grouped_channel",
                         "group_size": opts.palette_group_size, "per_channel_scale": False}
    if precision == "palette4":
        kw: dict[str, Any] = {"nbits": 4, "mode": "kmeans", "granularity": opts.palette_granularity, "weight_threshold": opts.weight_threshold,
                              "num_kmeans_workers": opts.palette_kmeans_workers}
        if opts.palette_granularity == "per_grouped_channel":
            kw["group_size"] = opts.palette_group_size
            kw["enable_per_channel_scale"] = opts.palette_per_channel_scale
        config = _config(cto, mlmodel, cto.OpPalettizerConfig(**kw), ("patch_embeddings",) + tuple(opts.keep_float))
        out = {"compression": "palettize_weights", "weight_type": "4-bit palette", "granularity": opts.palette_granularity,
               "group_size": kw.get("group_size"), "per_channel_scale": kw.get("enable_per_channel_scale", False),
               "kept_float": ["patch_embeddings", *opts.keep_float]}
        return cto.palettize_weights(mlmodel, config), out
    raise VitexportError(f"coreml has no precision {precision}")


def _config(cto, mlmodel, cfg, keep: tuple[str, ...]):
    """One config for every weight (per op type configs conflict when consts are shared, e.g. a random model's zero
    biases), except the named weights that stay float."""
    spec = mlmodel.get_spec()
    fn = spec.mlProgram.functions["main"]
    names = [o.name for op in fn.block_specializations[fn.opset].operations if op.type == "const" for o in op.outputs]
    skip = {n: None for n in names if any(k in n for k in keep)}
    return cto.OptimizationConfig(global_config=cfg, op_name_configs=skip)


# ----------------------------------------------------------------------------------------------------------------
# --cache-dir: converted programs. Tracing and converting are what a rebuild from the cache still spent (ViT-Base:
# 67 s of 130 s for five packages); the program is kept before its description (metadata naming the checkpoint,
# vitexport's version), which is written again on every build.

CONVERSION_FORMAT = 1  # bump when what a cached conversion holds changes meaning


def conversion_key(module, spec, folded: Mapping[str, Any], precision: str, target: str, opts: CoreMLOptions) -> str:
    """sha256 of everything ``convert`` and ``_compress`` make a program from: the traced module's structure, every
    weight and compression buffer (vitexport's GPTQ codes), the input's scale and bias, the labels, the precision,
    deployment target and options, this module's source and the versions of coremltools, torch and transformers."""
    from importlib.metadata import version

    import numpy as np

    from ...export import put_module

    h = hashlib.sha256()

    def put(part: bytes) -> None:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)

    labels = spec.labels_list() if spec.task == "classification" else None
    put(repr(("vitexport coreml conversion", CONVERSION_FORMAT, version("coremltools"), version("torch"), version("transformers"), np.__version__,
              precision, target, repr(opts), sorted((k, repr(v)) for k, v in folded.items()), tuple(spec.input_shape), spec.task, labels)).encode())
    put(Path(__file__).read_bytes())
    put_module(put, module)
    return h.hexdigest()


def _conversion_entry(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"coreml-{key[:32]}"


def _files_sha256(folder) -> dict[str, str]:
    """Every file of a package folder -> its sha256 (what an entry is checked against before use)."""
    return {str(f.relative_to(folder)): sha256(f) for f in sorted(Path(folder).rglob("*")) if f.is_file()}


def cached_conversion(ct, cache_dir, key: str) -> tuple[Any, dict[str, Any]] | None:
    """(program, what ``convert`` and ``_compress`` recorded) from an earlier build's conversion under ``key``, or
    None: no entry, or one that is unreadable, of another key, or whose files do not match their recorded sha256."""
    from ...quantization.cache import touch

    entry = _conversion_entry(cache_dir, key)
    if not (entry / "entry.json").is_file():
        return None
    try:
        meta = json.loads((entry / "entry.json").read_text())
        if meta.get("format") != CONVERSION_FORMAT or meta.get("key") != key or _files_sha256(entry / "model.mlpackage") != meta.get("files"):
            raise ValueError("another key, or files that do not match their sha256")
        mlmodel = ct.models.MLModel(str(entry / "model.mlpackage"), skip_model_load=True)
    except Exception as e:  # a damaged entry costs a conversion, never a wrong package
        log.warning("coreml: ignoring cached conversion %s (%s)", entry, e)
        shutil.rmtree(entry, ignore_errors=True)  # this build stores its own conversion in its place
        return None
    touch(entry)
    log.info("coreml: conversion from %s", entry)
    return mlmodel, dict(meta["recipe"])


def store_conversion(cache_dir, key: str, mlmodel, recipe: Mapping[str, Any]) -> None:
    """The program (before its description) into the cache: written into a temporary folder, then renamed."""
    entry, tmp = _conversion_entry(cache_dir, key), None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".coreml-", dir=entry.parent)
        mlmodel.save(os.path.join(tmp, "model.mlpackage"))
        meta = {"format": CONVERSION_FORMAT, "key": key, "recipe": dict(recipe), "files": _files_sha256(os.path.join(tmp, "model.mlpackage"))}
        with open(os.path.join(tmp, "entry.json"), "w") as f:
            json.dump(meta, f)
        os.rename(tmp, entry)  # fails when another build stored it first: theirs is kept
        tmp = None
    except OSError as e:  # a cache that cannot be written costs time, not the build
        if not entry.is_dir():
            log.warning("coreml: cannot write %s (%s)", entry, e)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
