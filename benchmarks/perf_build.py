"""How long the whole build takes, where the time goes, and whether our int8 is as fast as the stock int8.

    python benchmarks/perf_build.py                    # DeiT-tiny, then the ViT-Base config (256 calibration images)
    python benchmarks/perf_build.py --skip-vit-base    # DeiT-tiny only
    python benchmarks/perf_build.py --only-vit-base    # ViT-Base only, keeping DeiT-tiny's results in --out
    python benchmarks/perf_build.py --warm-cache ...   # each build with a fresh --cache-dir, then again from it (CI rebuild)
    python benchmarks/perf_build.py --warm-only ...    # only the rebuild, in this fresh process, from that cache

For each model, one ``vitexport build --backend onnxruntime,openvino,coreml,tensorrt --precision
fp32,fp16,int8,int4,palette4`` (the API call the CLI makes), plus the stock int8 rows it is compared with
(onnxruntime's quantize_dynamic, NNCF's default nncf.quantize) built in the same run from the same reference. Reported:

- wall seconds of the build *excluding* evaluation, timing and the stock rows (the report's per-stage records), and
  the same with them; process CPU seconds likewise (the host is shared, so CPU seconds are the steadier figure);
- every stage's wall and CPU seconds (export, preprocessing, the shared float-statistics pass, each recipe's own
  passes, sensitivity search, GPTQ, conversion, evaluation, timing), its resident memory at its end and the
  high-water mark since its artifact began (where that jumps is where the peak is);
- peak resident memory above the process's memory at the start of the build (VmHWM, reset per artifact);
- batch-1 latency of our int8 rows against the stock int8 rows and fp32, interleaved round by round in one run,
  as ratios (absolute times on a shared host mean little).

DeiT-tiny: the real checkpoint, calibration on the 125 images at sorted positions 0, 4, 8, ... of
../shared/imagenet-samples and evaluation on the other 375 (benchmarks/run_matrix.py's split). ViT-Base: the
random-weight google/vit-base-patch16-224 config, 256 calibration images, 32 evaluation images (speed and memory
only: its labels mean nothing). Results: benchmarks/results/perf-build.json and perf-build.md.

With ``--warm-cache`` each model's build runs with an empty ``--cache-dir`` (the cold figures, writing the entries
included), then once more from the entries it wrote: what a CI job that keeps the cache folder between runs pays
for an unchanged model and image set (no stock rows, no latency; the rows' fidelity must equal the cold build's).
That rebuild runs in the cold build's process, whose first-use imports are paid; ``--warm-only`` runs only the
rebuild, in a fresh process, from the cache an earlier ``--warm-cache`` run left in ``--work``, as a CI job would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_matrix import link_images, shared_split, stock_dynamic, vit_base_checkpoint  # noqa: E402

from vitexport import api  # noqa: E402
from vitexport.artifacts import Artifact  # noqa: E402
from vitexport.data import ImageSet, Preprocessing  # noqa: E402
from vitexport.harness.latency import compare  # noqa: E402
from vitexport.harness.memory import _status_kb  # noqa: E402
from vitexport.progress import Progress  # noqa: E402

BACKENDS = "onnxruntime,openvino,coreml,tensorrt"
PRECISIONS = ("fp32", "fp16", "int8", "int4", "palette4")
# rows timed against each other: ours, the stock int8 of the same runtime, and that runtime's fp32
LATENCY_ROWS = ("onnxruntime-fp32", "onnxruntime-int8", "onnxruntime-int8-stock-dynamic", "openvino-fp32", "openvino-int8", "openvino-int8-stock-nncf")


NNCF_DEFAULT = "openvino-int8-stock-nncf, OpenVINO's default precision"


def stock_nncf_default_runner(path: Path, threads: int | None):
    """NNCF's IR compiled with the CPU plugin's default INFERENCE_PRECISION_HINT for this host, which is what
    OpenVINO does when nobody says otherwise (bf16 on CPUs with AMX or AVX512-BF16); the report's own row runs in f32."""
    import openvino as ov

    from vitexport.backends.openvino import OpenVinoRunner

    default = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    return OpenVinoRunner(path, threads, precision=default.get_type_name() if hasattr(default, "get_type_name") else str(default))


def timed_runners(rows: list[tuple[str, str, str]], threads: int | None, names=LATENCY_ROWS) -> dict:
    """Runners of the (name, backend, artifact path) rows in ``names``, and NNCF's IR once more as a user runs it:
    plain compile_model (bf16 on AMX CPUs)."""
    from vitexport import backends

    runners = {}
    for name, backend, path in rows:
        if name in names:
            runners[name] = backends.get(backend).runner(Artifact.load(Path(path).parent), threads)
        if name == "openvino-int8-stock-nncf":
            runners[NNCF_DEFAULT] = stock_nncf_default_runner(Path(path), threads)
    return runners


def _is_excluded(stage: str) -> bool:
    """Stages that are not the build itself: measuring the rows, and building the stock comparison rows."""
    return stage.startswith("evaluation") or stage.startswith("timing") or stage == "build extra rows"


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def host_speed(seconds: float = 3.0) -> float:
    """GFLOP/s of one fixed float32 GEMM ([1576, 768] x [768, 3072]: ViT-Base fc1 at batch 8) on numpy's BLAS,
    every thread: the same code's stage times on this shared host followed its speed, which moved by 2x between
    days (DeiT-tiny's fp32 batch-1 latency, code-independent, went from 13-15 ms to 27-33 ms), so results say how
    fast the host was while they were made."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1576, 768), dtype=np.float32), rng.standard_normal((768, 3072), dtype=np.float32)
    out = np.empty((1576, 3072), np.float32)
    np.matmul(a, b, out=out)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.matmul(a, b, out=out)
        n += 1
    return 2 * 1576 * 768 * 3072 * n / (time.perf_counter() - t0) / 1e9


def run(name: str, opts: api.BuildOptions, extra, progress: Progress, sample_dir: Path, rounds: int, seconds: float, latency: bool = True, blocks: int = 40) -> dict:
    gauge0 = host_speed()
    rss0 = (_status_kb("VmRSS") or 0) / 1024
    load0 = os.getloadavg()  # the host is shared: how busy it was when the build started, and after
    t0, c0 = time.perf_counter(), _cpu_s()
    report = api.build(opts, progress, extra_builders=extra)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    stages = [dict(s) for s in report.stages]
    excluded = [s for s in stages if _is_excluded(s["stage"])]
    top = _top_stages(stages)
    ex_wall = sum(s["seconds"] for s in excluded if s in top)
    ex_cpu = sum(s["cpu_seconds"] for s in excluded if s in top)
    peak = max((r.build or {}).get("process_peak_mb") or 0 for r in report.rows)
    rows = {r.name: {"build_s": (r.build or {}).get("seconds"), "peak_mb_above_step": (r.build or {}).get("peak_mb"), "size_mb": round(r.size_bytes / 1e6, 2),
                     **({k: (r.accuracy or {}).get(k) for k in ("top1", "agreement", "cosine", "lost", "gained", "n")} if r.accuracy else {})} for r in report.rows}
    lat, paired = {}, {}
    if latency:
        progress.step(f"{name}: interleaved batch-1 latency of our int8 against the stock int8 rows")
        pre = Preprocessing.from_dict(report.evaluation["preprocessing"])
        sample = ImageSet.from_folder(sample_dir, pre, limit=1).load(0)[None]
        runners = timed_runners([(r.name, r.backend, r.path) for r in report.rows], opts.threads)
        lat = compare(runners, sample, rounds=rounds, seconds=seconds)
        lat = {k: {"p50_ms": v.p50_ms if hasattr(v, "p50_ms") else v["p50_ms"], "spread": v.spread if hasattr(v, "spread") else v.get("spread")} for k, v in lat.items()}
        paired = paired_ratios(runners, sample, blocks)
    return {
        "model": name,
        "command": f"vitexport build --backend {opts.backend} --precision {','.join(opts.precisions)} (calibration {report.evaluation.get('calibration_images')} images, evaluation {report.evaluation.get('images')})",
        "calibration_images": report.evaluation.get("calibration_images"),
        "evaluation_images": report.evaluation.get("images"),
        "wall_s_total": round(wall, 1),
        "cpu_s_total": round(cpu, 1),
        "wall_s_build": round(wall - ex_wall, 1),
        "cpu_s_build": round(cpu - ex_cpu, 1),
        "wall_s_evaluation_timing_stock": round(ex_wall, 1),
        "peak_mb_above_start": round(peak - rss0, 0),
        "rss_mb_at_start": round(rss0, 0),
        "stages": stages,
        "rows": rows,
        "latency": lat,
        "latency_paired": paired,
        "load_average_before": load0,
        "load_average_after": os.getloadavg(),
        "host_gflops_before_after": (round(gauge0, 1), round(host_speed(), 1)),
        **({"cache_mb": round(sum(f.stat().st_size for f in Path(opts.cache_dir).rglob("*") if f.is_file()) / 1e6, 1)} if opts.cache_dir else {}),
    }


PAIRS = (("onnxruntime-int8", "onnxruntime-int8-stock-dynamic"), ("openvino-int8", NNCF_DEFAULT), ("openvino-int8", "openvino-int8-stock-nncf"))


def paired_ratios(runners: dict, sample: np.ndarray, blocks: int) -> dict:
    """Each pair of PAIRS timed in short alternating blocks (harness.latency.paired_ratio): the ratio the issue asks
    about, with an interval, instead of a quotient of two rows' medians taken seconds apart."""
    from vitexport.harness.latency import paired_ratio

    return {f"{a} / {b}": paired_ratio(runners[a], runners[b], sample, blocks=blocks) for a, b in PAIRS if a in runners and b in runners}


def paired_markdown(ratios: dict) -> list[str]:
    lines = ["| ours / stock | median | 95 % interval of the median | interquartile | units |", "|---|---|---|---|---|"]
    return lines + [f"| {k} | {v['median']:.3f} | {v['ci95'][0]:.3f}-{v['ci95'][1]:.3f} | {v['q25']:.2f}-{v['q75']:.2f} | {v['pairs']} |" for k, v in ratios.items()]


def latency_only(work: Path, models: list[str], threads: int | None, blocks: int) -> dict:
    """Time the int8 rows an earlier run built under ``work`` against their stock rows again (PAIRS), in alternating
    blocks (paired_ratios)."""
    out = {}
    for key in models:
        report = json.loads((work / key / "report.json").read_text())
        runners = timed_runners([(r["name"], r["backend"], r["path"]) for r in report["rows"]], threads)
        pre = Preprocessing.from_dict(report["evaluation"]["preprocessing"])
        sample = ImageSet.from_folder(work / ("split" if key == "deit-tiny" else "split-vb") / "eval", pre, limit=1).load(0)[None]
        out[key] = {"blocks": blocks, "ratios": paired_ratios(runners, sample, blocks)}
    return out


def latency_markdown(command: str, host: str, res: dict) -> str:
    lines = ["# int8 latency against each runtime's stock int8, rows of an earlier perf_build.py run timed again (benchmarks/perf_build.py --latency-only)", "",
             f"Command: `{command}`. Host: {host}. Batch 1; units of four turns, ours, stock, stock, ours, each turn 3 timed runs after an untimed one, "
             "each unit giving ours / stock of their medians; the median of those ratios and its distribution-free 95 % interval. "
             f"`{NNCF_DEFAULT}` is NNCF's IR compiled as OpenVINO does by default on this host (bf16 on AMX / AVX512-BF16 CPUs), `openvino-int8-stock-nncf` the same IR forced to f32.", ""]
    for key, r in res.items():
        lines += [f"## {key}", ""] + paired_markdown(r["ratios"]) + [""]
    return "\n".join(lines) + "\n"


def _top_stages(stages: list[dict]) -> list[dict]:
    """Top-level stages only (a "build X" stage holds its "X: ..." sub-stages), so nothing counts twice."""
    return [s for s in stages if ": " not in s["stage"] or s["stage"].startswith("evaluation")]


def _outside_stages(r: dict) -> float:
    return r["wall_s_total"] - sum(s["seconds"] for s in _top_stages(r["stages"]))


def _same_rows(cold: dict | None, warm: dict) -> str:
    """Whether the rebuild from the cache gave the cold build's rows: the same size and the same fidelity figures."""
    if not cold:
        return "No cold build in these results to compare with."
    keys = ("size_mb", "top1", "agreement", "cosine", "lost", "gained")
    same = [n for n, v in warm["rows"].items() if n in cold["rows"] and all(cold["rows"][n].get(k) == v.get(k) for k in keys)]
    differ = sorted(set(warm["rows"]) - set(same))
    return (f"Rows with the cold build's size, agreement, cosine and lost/gained: {len(same)} of {len(warm['rows'])}"
            + (f" (differ: {', '.join(differ)})." if differ else "."))


def markdown(results: dict) -> str:
    lines = ["# Build performance (benchmarks/perf_build.py)", "", f"Command: `{results['command']}`. Host: {results['host']}. Each model's load average before and after "
             "says whether other jobs shared the cores: where it is well above the core count, wall seconds include waiting "
             "for a core and CPU seconds (process user + system) are the steadier figure.", ""]
    for key in ("deit-tiny", "deit-tiny-warm", "deit-tiny-warm-fresh", "vit-base", "vit-base-warm", "vit-base-warm-fresh"):
        r = results.get(key)
        if not r:
            continue
        lines += [f"## {r['model']}", "", r["command"] + (f" (run by `{r['run_by']}`)" if r.get("run_by") else ""), ""]
        if "-warm" in key:
            lines += [_same_rows(results.get(key.split("-warm")[0]), r), ""]
        lines += [
                  f"- build, excluding evaluation, timing and the stock rows: **{r['wall_s_build']:.0f} s wall, {r['cpu_s_build']:.0f} s CPU** "
                  f"(with them: {r['wall_s_total']:.0f} s wall, {r['cpu_s_total']:.0f} s CPU)",
                  f"- outside every stage (loading the checkpoint, first-use imports, writing the report; counted as build): {_outside_stages(r):.0f} s",
                  *([f"- --cache-dir folder after the build: {r['cache_mb']:.0f} MB"] if "cache_mb" in r else []),
                  f"- peak memory above the start of the build: {r['peak_mb_above_start']:.0f} MB (process peak {r['peak_mb_above_start'] + r.get('rss_mb_at_start', 0):.0f} MB, {r.get('rss_mb_at_start', 0):.0f} MB at the start: more where this process first wrote the ViT-Base checkpoint)", f"- load average (1, 5, 15 min) before the build: {', '.join(f'{x:.1f}' for x in r.get('load_average_before', ()))}; after the run: {', '.join(f'{x:.1f}' for x in r['load_average_after'])}",
                  *([f"- host speed before and after (perf_build.host_speed, a fixed float32 GEMM on every core): {r['host_gflops_before_after'][0]:.0f} and {r['host_gflops_before_after'][1]:.0f} GFLOP/s"] if "host_gflops_before_after" in r else []), "",
                  "| stage | wall s | CPU s | RSS at its end, MB | peak since its artifact began, MB |", "|---|---|---|---|---|"]
        lines += [f"| {s['stage']} | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} | {s.get('rss_mb', float('nan')):.0f} | {s.get('peak_mb', float('nan')):.0f} |"
                  for s in r["stages"] if s["seconds"] >= 0.5]
        lat = r["latency"]
        if lat:
            lines += ["", "Batch-1 latency, interleaved round by round (one run): ratio to onnxruntime-fp32 and to the same runtime's stock int8 "
                      f"(OpenVINO: NNCF's IR compiled as OpenVINO does by default on this host, `{NNCF_DEFAULT}`; the row without that suffix is the same IR forced to f32).", "",
                      "| row | p50 ms | × onnxruntime-fp32 | × stock int8 of its runtime | round spread |", "|---|---|---|---|---|"]
            ref = lat.get("onnxruntime-fp32", {}).get("p50_ms")
            for n, v in lat.items():
                stock = lat.get("onnxruntime-int8-stock-dynamic" if n.startswith("onnxruntime") else NNCF_DEFAULT if NNCF_DEFAULT in lat else "openvino-int8-stock-nncf", {}).get("p50_ms")
                lines.append(f"| {n} | {v['p50_ms']:.2f} | {v['p50_ms'] / ref:.2f} | {v['p50_ms'] / stock:.2f} | {v['spread'] or 0:.2f} |" if ref and stock else f"| {n} | {v['p50_ms']:.2f} | – | – | – |")
        if r.get("latency_paired"):
            lines += ["", "Our int8 over the same runtime's stock int8, batch 1, in units of four turns (ours, stock, stock, ours; 3 timed runs each after an untimed one; "
                      "median of the units' ratios, distribution-free 95 % interval): the figure to read for \"as fast as stock\".", ""] + paired_markdown(r["latency_paired"])
        acc = {n: v for n, v in r["rows"].items() if v.get("agreement") is not None}
        if acc and key == "deit-tiny":
            lines += ["", "Fidelity on the evaluation split (reported once, after the build):", "", "| row | top-1 % | agreement % | cosine | lost/gained |", "|---|---|---|---|---|"]
            for n, v in acc.items():
                lines.append(f"| {n} | {100 * (v['top1'] or 0):.1f} | {100 * v['agreement']:.1f} | {v['cosine']:.4f} | −{v.get('lost') or 0}/+{v.get('gained') or 0} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _with_cache(opts: api.BuildOptions, cache: Path, on: bool) -> api.BuildOptions:
    """With ``on``: ``opts`` writing to an empty cache folder (the cold build pays for writing it)."""
    if not on:
        return opts
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    return dataclasses.replace(opts, cache_dir=str(cache))


SAME = "rebuilt from the cache the build above wrote, in its process (first-use imports paid)"
FRESH = "rebuilt in a fresh process from the cache a cold --warm-cache build wrote"


def _cached(opts: api.BuildOptions, cache: Path) -> api.BuildOptions:
    if not cache.is_dir():
        raise SystemExit(f"{cache} does not exist: run with --warm-cache first")
    return dataclasses.replace(opts, cache_dir=str(cache))


def _warm(opts: api.BuildOptions) -> api.BuildOptions:
    return dataclasses.replace(opts, out=opts.out + "-warm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(HERE.parent.parent / "shared"))
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--work", default=str(HERE / "out" / "perf"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-vit-base", action="store_true")
    ap.add_argument("--only-vit-base", action="store_true")
    ap.add_argument("--vit-base-calib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--latency-only", action="store_true", help="only time the int8 rows an earlier run left in --work, against their stock rows")
    ap.add_argument("--blocks", type=int, default=40, help="units (ours, stock, stock, ours) per int8 / stock comparison")
    ap.add_argument("--warm-cache", action="store_true", help="build with an empty --cache-dir, then again from what it wrote")
    ap.add_argument("--warm-only", action="store_true", help="only the rebuild from the cache an earlier --warm-cache run left in --work, in this process")
    args = ap.parse_args()
    if args.warm_only and args.warm_cache:
        ap.error("--warm-only reuses the cache a --warm-cache run wrote: give one of them")
    shared, out, work = Path(args.shared), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if args.latency_only:
        from vitexport.harness.report import host_info

        h = host_info()
        models = [k for k in ("deit-tiny", "vit-base") if (work / k / "report.json").exists() and not (k == "deit-tiny" and args.only_vit_base) and not (k == "vit-base" and args.skip_vit_base)]
        command = "python " + " ".join(["benchmarks/perf_build.py", *sys.argv[1:]])
        res = latency_only(work, models, args.threads, args.blocks)
        (out / "perf-build-latency.json").write_text(json.dumps({"command": command, "host": h, "models": res}, indent=2) + "\n")
        (out / "perf-build-latency.md").write_text(latency_markdown(command, f"{h['cpu']}, {h['cores']} cores", res))
        print((out / "perf-build-latency.md").read_text())
        return 0
    from openvino_baselines import stock_nncf_int8
    from vitexport.harness.report import host_info

    progress = Progress(enabled=True)
    path = out / "perf-build.json"
    results = json.loads(path.read_text()) if (args.only_vit_base or args.warm_only) and path.exists() else {}
    before = {id(v) for v in results.values()}
    h = host_info()
    results.update({"command": "python " + " ".join(["benchmarks/perf_build.py", *sys.argv[1:]]), "host": f"{h['cpu']}, {h['cores']} cores"})
    extra = [stock_dynamic, stock_nncf_int8]
    if not args.only_vit_base:
        calib, evals = shared_split(shared, work / "split") if not (work / "split").exists() else (work / "split" / "calib", work / "split" / "eval")
        opts = api.BuildOptions(model=str(shared / "models" / "deit-tiny-patch16-224"), backend=BACKENDS, precisions=PRECISIONS, calib=str(calib), eval=str(evals), out=str(work / "deit-tiny"), force=True, threads=args.threads, latency=False)
        if args.warm_only:
            results["deit-tiny-warm-fresh"] = run(f"DeiT-tiny (real weights), {FRESH}", _warm(_cached(opts, work / "cache-deit-tiny")), [], progress, evals, 0, 0, latency=False)
        else:
            opts = _with_cache(opts, work / "cache-deit-tiny", args.warm_cache)
            results["deit-tiny"] = run("DeiT-tiny (real weights)", opts, extra, progress, evals, args.rounds, 1.5, blocks=args.blocks)
        if args.warm_cache:
            results["deit-tiny-warm"] = run(f"DeiT-tiny (real weights), {SAME}", _warm(opts), [], progress, evals, 0, 0, latency=False)
        path.write_text(json.dumps(results, indent=2) + "\n")
    if not args.skip_vit_base:
        ckpt = vit_base_checkpoint(work / "vit-base-random") if not (work / "vit-base-random" / "config.json").exists() else work / "vit-base-random"
        files = sorted((shared / "imagenet-samples").glob("*.JPEG"))
        if not (work / "split-vb").exists():
            link_images(files[: args.vit_base_calib], work / "split-vb" / "calib", None)
            link_images([f for i, f in enumerate(files) if i % 4 != 0][-32:], work / "split-vb" / "eval", None)
        opts = api.BuildOptions(model=str(ckpt), backend=BACKENDS, precisions=PRECISIONS, calib=str(work / "split-vb" / "calib"), eval=str(work / "split-vb" / "eval"), out=str(work / "vit-base"), force=True, threads=args.threads, latency=False)
        name = f"ViT-Base config (random weights), {args.vit_base_calib} calibration images"
        if args.warm_only:
            results["vit-base-warm-fresh"] = run(f"{name}, {FRESH}", _warm(_cached(opts, work / "cache-vit-base")), [], progress, work / "split-vb" / "eval", 0, 0, latency=False)
        else:
            opts = _with_cache(opts, work / "cache-vit-base", args.warm_cache)
            results["vit-base"] = run(name, opts, extra, progress, work / "split-vb" / "eval", args.rounds, 2.0, blocks=args.blocks)
        if args.warm_cache:
            results["vit-base-warm"] = run(f"{name}, {SAME}", _warm(opts), [], progress, work / "split-vb" / "eval", 0, 0, latency=False)
    for key in ("deit-tiny", "deit-tiny-warm", "deit-tiny-warm-fresh", "vit-base", "vit-base-warm", "vit-base-warm-fresh"):
        if key in results and id(results[key]) not in before:  # this run's entries (--only-vit-base and --warm-only keep older ones)
            results[key]["run_by"] = results["command"]
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out / "perf-build.md").write_text(markdown(results))
    print((out / "perf-build.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
