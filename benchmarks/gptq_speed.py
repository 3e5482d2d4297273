"""The rounding kernels of the build (int8 GPTQ, int4 GPTQ with its clip search, 4-bit palettes), this checkout's
against an earlier revision's, on ViT-Base's linear shapes: the same outputs, and how much faster.

Per ViT-Base block the build rounds q, k, v and the attention output (768 x 768), fc1 (3072 x 768) and fc2
(768 x 3072), once per recipe that needs them (ONNX Runtime int8, CoreML int8 and TensorRT's smoothed layers, int4,
palette4); these time one block's six layers per kernel with synthetic weights and a Hessian from correlated
inputs (speed depends on the shapes only), each revision in its own fresh process, the two revisions taking turns
round by round on this shared host, and check every code, scale and palette is the same bits. The whole-build
effect is in `perf_build.py`'s stage table, where the host's day moves every stage by 5-15 %.

    python benchmarks/gptq_speed.py --base REV [--rounds 4] [--out benchmarks/results/gptq-speed.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SHAPES = [(768, 768)] * 4 + [(3072, 768), (768, 3072)]  # q, k, v, attention output, fc1, fc2 as [N, K]

WORKER = r"""
import hashlib, json, sys, time
import numpy as np
from vitexport.quantization.gptq import damped_inverse_factor
from vitexport.quantization.int4 import Int4Recipe, quantize_gptq
from vitexport.quantization.int8 import gptq_weight
from vitexport.quantization.palette import palettize_gptq

shapes = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
seconds = {"int8": 0.0, "int4": 0.0, "palette4": 0.0}
h = hashlib.sha256()
for n, k in shapes:
    x = (rng.standard_normal((3000, k)) @ (np.eye(k) + 0.1 * rng.standard_normal((k, k)))).astype(np.float32) * rng.uniform(0.1, 3, k).astype(np.float32)
    hess = x.T.astype(np.float64) @ x
    w = (rng.standard_normal((n, k)) * 0.02).astype(np.float32)
    factor = damped_inverse_factor(hess, 0.01)
    for name, run in (("int8", lambda: gptq_weight(w, hess, True, factor=lambda: factor)),
                      ("int4", lambda: quantize_gptq(w, hess, 128, Int4Recipe(), factor=lambda: factor)),
                      ("palette4", lambda: palettize_gptq(w, hess, factor=lambda: factor))):
        t = time.perf_counter()
        out = run()
        seconds[name] += time.perf_counter() - t
        parts = (out.codes, out.scales, out.zero_points) if name == "int4" else out
        for p in parts:
            h.update(np.ascontiguousarray(p).tobytes())
print(json.dumps({"seconds": seconds, "digest": h.hexdigest()}))
"""


def run_once(src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", WORKER, json.dumps(SHAPES)], env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier revision (git rev)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gptq-speed.json"))
    args = ap.parse_args()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    base = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.base], capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="vitexport-base-") as tmp:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", tmp, base], check=True)
        try:
            runs: dict[str, list[dict]] = {base: [], head: []}
            for r in range(args.rounds):
                for rev, src in ((base, Path(tmp)), (head, ROOT)) if r % 2 == 0 else ((head, ROOT), (base, Path(tmp))):
                    runs[rev].append(run_once(src))
                    print(f"round {r + 1}: {rev} {runs[rev][-1]['seconds']}", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", tmp], check=False)
    digests = {rev: {x["digest"] for x in xs} for rev, xs in runs.items()}
    kernels = {}
    for k in ("int8", "int4", "palette4"):
        b = sorted(x["seconds"][k] for x in runs[base])
        h = sorted(x["seconds"][k] for x in runs[head])
        kernels[k] = {f"{base}_s": [round(v, 3) for v in b], f"{head}_s": [round(v, 3) for v in h], "median_ratio": round(h[len(h) // 2] / b[len(b) // 2], 3)}
    result = {
        "command": "python " + " ".join(["benchmarks/gptq_speed.py", *sys.argv[1:]]),
        "what": "seconds to round one ViT-Base block's six linears (synthetic weights, Hessian of correlated inputs), per kernel; each revision in a fresh process, rounds alternating",
        "base": base, "head": head, "rounds": args.rounds,
        "same_outputs": digests[base] == digests[head] and len(digests[head]) == 1,
        "kernels": kernels,
        "host": _host(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def _host() -> str:
    sys.path.insert(0, str(ROOT))
    from vitexport.harness.host import cpu_features, cpu_name

    return f"{cpu_name()} ({', '.join(cpu_features())}), {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
