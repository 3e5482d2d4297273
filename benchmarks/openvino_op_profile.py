"""Where OpenVINO int8's batch-1 time goes against NNCF's stock int8: a per-op profile of both IRs, and one layout
variant of ours timed against them (issue 13).

    python benchmarks/perf_build.py --only-vit-base --work W ...        # leaves W/vit-base/openvino-int8 and the NNCF IR
    python benchmarks/openvino_op_profile.py --work W --model vit-base  # ~3 min on 2 cores

Both IRs are compiled as an application would on this host: ours with the precision its rt_info declares, NNCF's
with the CPU plugin's default (bf16 on CPUs with AMX or AVX512-BF16), 2 threads, batch 1. The profile
(``PERF_COUNT``, ``get_profiling_info``) sums each executed node's real time over ``--infers`` inferences, by node
type and kernel (exec type), and lists the FakeQuantize nodes the plugin runs on their own (not fused into a
neighbour): each costs a pass over its tensor and, in bf16 models, a reorder to f32 before it.

The variant: ours with every per-tensor FakeQuantize that follows a Transpose/Reshape chain moved above the chain.
For a per-tensor quantizer the move is exact arithmetic; the plugin may still compile the two differently, so
the largest logit difference between them is reported, then the latency of ours, the variant and NNCF's,
interleaved round by round (``harness.latency.compare``), ``--repeats`` times, as ratios to NNCF's.
Writes benchmarks/results/openvino-op-profile-<model>.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from perf_build import stock_nncf_default_runner  # noqa: E402


def profile(models: dict[str, tuple[Path, str]], threads: int, infers: int, x: np.ndarray) -> dict:
    """Per model, per (node type, exec type): milliseconds per inference and nodes; and the FakeQuantize nodes run
    alone. ``models``: name -> (IR, precision). The models take turns, one inference each, so drift of a shared host
    hits them alike."""
    import openvino as ov

    core = ov.Core()
    requests = {}
    for name, (path, precision) in models.items():
        compiled = core.compile_model(core.read_model(str(path)), "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision,
                                                                           "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True})
        requests[name] = compiled.create_infer_request()
        for _ in range(5):
            requests[name].infer({0: x})
    ms = {n: collections.Counter() for n in models}
    nodes = {n: collections.Counter() for n in models}
    alone: dict[str, set[str]] = {n: set() for n in models}
    for _ in range(infers):
        for name, request in requests.items():
            request.infer({0: x})
            for p in request.get_profiling_info():
                if p.status != p.Status.EXECUTED:
                    continue
                key = f"{p.node_type} ({p.exec_type})"
                ms[name][key] += p.real_time.total_seconds() * 1e3 / infers
                nodes[name][key] += 1
                if p.node_type == "FakeQuantize":
                    alone[name].add(p.node_name)
    return {n: {"total_ms": sum(ms[n].values()), "by_kernel": {k: {"ms": round(v, 3), "nodes": nodes[n][k] // infers} for k, v in ms[n].most_common()},
                "fakequantize_alone": sorted(alone[n])} for n in models}


def move_fakequantize_up(src: Path, dst: Path) -> int:
    """Copy of IR ``src`` at ``dst`` with backends.openvino.fakequantize_above_moves applied; returns how many moved."""
    import openvino as ov

    from vitexport.backends.openvino import fakequantize_above_moves

    model = ov.Core().read_model(str(src))
    moved = fakequantize_above_moves(model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return moved


def logits(path: Path, precision: str, x: np.ndarray) -> np.ndarray:
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": 2})
    return np.concatenate([compiled({0: x[i : i + 1]})[0] for i in range(len(x))])


def markdown(res: dict) -> str:
    lines = ["# OpenVINO int8 against NNCF's stock int8, op by op (benchmarks/openvino_op_profile.py)", "",
             f"Command: `{res['command']}`. Host: {res['host']}. Batch 1, {res['threads']} threads; ours compiled in {res['precision_ours']}, "
             f"NNCF's in the plugin's default, {res['precision_nncf']}. Per-op times are the plugin's own counters (they add up to less than a "
             "timed inference), averaged over the profiled inferences, the two IRs taking turns.", ""]
    for name in ("ours", "nncf"):
        p = res["profile"][name]
        lines += [f"## {name}: {p['total_ms']:.1f} ms in profiled nodes", "", "| kernel | ms | nodes |", "|---|---|---|"]
        lines += [f"| {k} | {v['ms']:.2f} | {v['nodes']} |" for k, v in list(p["by_kernel"].items())[:14]]
        lines += ["", f"FakeQuantize run on their own: {len(p['fakequantize_alone'])}", ""]
    v = res["variant"]
    lines += ["## Variant: per-tensor FakeQuantize moved above its Transpose/Reshape chain", "",
              f"Moved: {v['moved']}. Largest logit difference from ours: {v['max_abs_diff_f32']:.4g} in f32, {v['max_abs_diff_default']:.4g} in "
              f"{res['precision_ours']} (largest logit {v['max_abs_logit']:.3g}); top-1 the same on all {v['images']} images: {v['same_top1']}.", "",
              "| row | latency / NNCF stock, per interleaved run | median |", "|---|---|---|"]
    for n, rs in res["latency_vs_nncf"].items():
        lines.append(f"| {n} | {', '.join(f'{r:.3f}' for r in rs)} | {float(np.median(rs)):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="a perf_build.py --work folder")
    ap.add_argument("--model", default="vit-base", choices=("vit-base", "deit-tiny"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--infers", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import openvino as ov

    from vitexport import backends
    from vitexport.artifacts import Artifact
    from vitexport.backends.openvino import OpenVinoRunner, _declared_hint
    from vitexport.harness.latency import compare
    from vitexport.harness.report import host_info

    root = Path(args.work) / args.model
    ours, nncf = root / "openvino-int8" / "model.xml", root / "openvino-int8-stock-nncf" / "model.xml"
    for p in (ours, nncf):
        if not p.is_file():
            sys.exit(f"{p} is missing: run benchmarks/perf_build.py with --work {args.work} first")
    core = ov.Core()
    default = core.get_property("CPU", "INFERENCE_PRECISION_HINT")
    default = default.get_type_name() if hasattr(default, "get_type_name") else str(default)
    mine = _declared_hint(core.read_model(str(ours)))
    x = np.random.default_rng(0).random((8, 3, 224, 224), np.float32)
    res = {"command": "python " + " ".join(["benchmarks/openvino_op_profile.py", *sys.argv[1:]]), "host": f"{host_info()['cpu']}, {host_info()['cores']} cores",
           "threads": args.threads, "precision_ours": mine, "precision_nncf": default,
           "profile": profile({"ours": (ours, mine), "nncf": (nncf, default)}, args.threads, args.infers, x[:1])}
    variant = Path(args.work) / "op-profile" / args.model / "openvino-int8-fq-moved" / "model.xml"
    moved = move_fakequantize_up(ours, variant)
    a32, b32 = logits(ours, "f32", x), logits(variant, "f32", x)
    a, b = logits(ours, mine, x), logits(variant, mine, x)
    res["variant"] = {"moved": moved, "images": len(x), "max_abs_diff_f32": float(np.abs(a32 - b32).max()), "max_abs_diff_default": float(np.abs(a - b).max()),
                      "max_abs_logit": float(np.abs(a32).max()), "same_top1": bool((a.argmax(1) == b.argmax(1)).all() and (a32.argmax(1) == b32.argmax(1)).all())}
    runners = {"ours": backends.get("openvino").runner(Artifact.load(ours.parent), args.threads),
               "ours, FakeQuantize moved": OpenVinoRunner(variant, args.threads, precision=mine),  # an edited IR: no manifest of its own
               "nncf": stock_nncf_default_runner(nncf, args.threads)}
    runs = [compare(runners, x[:1], rounds=5, seconds=1.0) for _ in range(args.repeats)]
    res["latency_vs_nncf"] = {n: [round(r[n]["p50_ms"] / r["nncf"]["p50_ms"], 3) for r in runs] for n in runners if n != "nncf"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"openvino-op-profile-{args.model}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"openvino-op-profile-{args.model}.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
