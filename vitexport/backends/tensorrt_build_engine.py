#!/usr/bin/env python3
"""Build the TensorRT engine of this vitexport artifact, on the machine that will run it.

vitexport copies this file into every TensorRT artifact folder as ``build_engine.py``, beside ``model.onnx`` and
``tensorrt.json`` (the build plan: precision flags, the batch range of the optimisation profile, the workspace
limit, where the timing cache lives). It needs only TensorRT's Python bindings (on a Jetson they come with JetPack)
and the standard library: no vitexport, no torch, no onnx.

    python3 build_engine.py                      # writes model.engine and engine.json beside this file
    python3 build_engine.py --max-batch 8 --timing-cache /tmp/trt.cache

``trtexec.sh`` in the same folder is the equivalent trtexec command line. An engine only runs on the GPU model and
TensorRT version that built it: build it on the device. vitexport uses this same code when TensorRT and a GPU are
present on the machine that runs ``vitexport build``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLAN = "tensorrt.json"
ENGINE_INFO = "engine.json"


def load_plan(directory: Path = HERE) -> dict:
    return json.loads((directory / PLAN).read_text())


def build_engine(plan: dict, directory: Path, timing_cache: Path | None = None, log=print) -> dict:
    """Parse ``plan["onnx"]``, build with the plan's flags and profile, write ``plan["engine"]`` and engine.json.

    Returns what engine.json says (TensorRT version, GPU, settings, seconds). Raises RuntimeError on failure.
    """
    import tensorrt as trt

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:  # TensorRT 8.x (JetPack 5, JetPack 6.0) still needs the explicit-batch flag; 10.x ignores/deprecates it
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan["strongly_typed"]:  # TensorRT >= 9: types come from the ONNX, no precision flags
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = directory / plan["onnx"]
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan["workspace_mb"]) << 20)
    for name in plan["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan["cleared_flags"]:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    if plan.get("builder_optimization_level") is not None:
        config.builder_optimization_level = int(plan["builder_optimization_level"])

    profile = builder.create_optimization_profile()
    shapes = plan["shapes"]
    profile.set_shape(plan["input"], shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache) if timing_cache else (directory / plan["timing_cache"])
    reused = _use_timing_cache(config, cache_path)

    log(f"building {plan['precision']} engine from {onnx_path.name} with TensorRT {trt.__version__} "
        f"(flags {', '.join(plan['builder_flags']) or 'none'}{', strongly typed' if plan['strongly_typed'] else ''}; "
        f"batch {shapes['min'][0]}..{shapes['max'][0]}, optimised for {shapes['opt'][0]})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT could not build the engine (see the TensorRT messages above)")
    engine_path = directory / plan["engine"]
    engine_path.write_bytes(bytes(serialized))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    info = _engine_info(plan, trt.__version__, cache_path, reused, time.perf_counter() - start, engine_path.stat().st_size)
    (directory / ENGINE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log(f"wrote {engine_path} ({info['size_bytes'] / 1e6:.1f} MB) in {info['seconds']} s")
    return info


def _use_timing_cache(config, cache_path: Path) -> bool:
    """Give the builder the timing cache at ``cache_path`` if it fits this GPU and TensorRT; whether it was reused."""
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    reused = bool(cache_bytes) and config.set_timing_cache(cache, ignore_mismatch=False)
    if not reused:  # no cache yet, or one made on another GPU / TensorRT version: start a fresh one
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return bool(reused)


def _engine_info(plan: dict, version: str, cache_path: Path, reused: bool, seconds: float, size: int) -> dict:
    """engine.json: what was built, where, from which plan."""
    return {
        "engine": plan["engine"],
        "precision": plan["precision"],
        "tensorrt": version,
        "device": _device_name(),
        "builder_flags": plan["builder_flags"],
        "strongly_typed": plan["strongly_typed"],
        "shapes": plan["shapes"],
        "workspace_mb": plan["workspace_mb"],
        "timing_cache": str(cache_path),
        "timing_cache_reused": reused,
        "seconds": round(seconds, 1),
        "size_bytes": size,
    }


def _device_name() -> str:
    """The GPU's name, through whichever small CUDA binding is here (only for the record)."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, props = cudart.cudaGetDeviceProperties(0)
        name = props.name
        return (name.decode() if isinstance(name, bytes) else str(name)).rstrip("\x00")
    except Exception:
        pass
    jetson = Path("/proc/device-tree/model")
    if jetson.is_file():
        return jetson.read_text(errors="ignore").rstrip("\x00").strip()
    return os.environ.get("VITEXPORT_GPU_NAME", "NVIDIA GPU")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build this artifact's TensorRT engine on this machine.")
    ap.add_argument("--min-batch", type=int, help="smallest batch the engine accepts")
    ap.add_argument("--opt-batch", type=int, help="batch TensorRT optimises for")
    ap.add_argument("--max-batch", type=int, help="largest batch the engine accepts")
    ap.add_argument("--workspace-mb", type=int, help="workspace memory pool limit (MiB)")
    ap.add_argument("--timing-cache", type=Path, help="timing cache file, reused between builds")
    args = ap.parse_args(argv)
    plan = load_plan()
    shapes = plan["shapes"]
    for key, value in (("min", args.min_batch), ("opt", args.opt_batch), ("max", args.max_batch)):
        if value is not None:
            shapes[key] = [value, *shapes[key][1:]]
    if not shapes["min"][0] <= shapes["opt"][0] <= shapes["max"][0]:
        print("error: batches must satisfy min <= opt <= max", file=sys.stderr)
        return 2
    if args.workspace_mb is not None:
        plan["workspace_mb"] = args.workspace_mb
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        print("error: TensorRT's Python bindings are not installed (on a Jetson: sudo apt install python3-libnvinfer; "
              "elsewhere: pip install tensorrt), or use trtexec.sh", file=sys.stderr)
        return 2
    try:
        build_engine(plan, HERE, args.timing_cache)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
