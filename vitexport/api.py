"""What the CLI and users call: build(), evaluate(), bench().

Data flows one way: ModelSpec -> ImageSets -> verified reference ONNX -> backend artifacts -> harness -> Report.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import backends as _backends
from .artifacts import Artifact, check_output, clean_stale_partials, output_lock, staged_output, tool_versions
from .data import ImageSet, Preprocessing, overlap
from .errors import VitexportError
from .harness import accuracy as _accuracy
from .harness.latency import measure, measure_all
from .harness.memory import PeakMemory
from .harness import output as _output
from .harness.host import host_info
from .harness.report import Report, Row, now
from .ort_session import release_freed_memory
from .progress import Progress, Stages

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / "models" / "deit-tiny-patch16-224"
DEFAULT_CALIB = REPO_ROOT / "calibration" / "calib"
DEFAULT_EVAL = REPO_ROOT / "calibration" / "eval"
# --cache-max-size: three ViT-Base-sized models' entries (2.6 GB each at 256 images), and GitHub's cache quota
DEFAULT_CACHE_MAX_BYTES = 10 << 30
VERIFY_IMAGES = 16


@dataclass(frozen=True)
class BuildOptions:
    model: str = str(DEFAULT_MODEL)
    backend: str = "onnxruntime"
    precisions: tuple[str, ...] = ("fp32", "int8", "int4")
    calib: str | None = str(DEFAULT_CALIB)
    eval: str | None = str(DEFAULT_EVAL)
    classes: str | None = None
    num_calib: int | None = None
    num_eval: int | None = None
    out: str = "dist"
    force: bool = False
    threads: int | None = None
    opset: int = 18
    trust_pickle: bool = False
    latency: bool = True
    batch_size: int = 32
    # a profile's [options.*] tables: {"<backend>": {<setting>: ..., "<precision>": {"recipe": {...}, ...}}}
    options: Mapping[str, Any] = field(default_factory=dict)
    target: str | None = None
    # quality gates (harness/gate.py): recorded in the report, so report.html shows the verdict
    min_agreement: float | None = None
    max_top1_drop: float | None = None
    gate_rule: str = "point"
    cache_dir: str | None = None  # on-disk cache: reference ONNX (export.export_key), float statistics, sensitivity scores, GPTQ codes (quantization.cache), CoreML conversions
    cache_max_bytes: int | None = DEFAULT_CACHE_MAX_BYTES  # after the build, least recently used entries go until cache_dir fits; None: no bound
    remote: tuple = ()  # vitexport.remote.Device: measure every artifact on these devices too, in parallel


def load_target(name_or_path: str) -> dict[str, Any]:
    """A checked device profile: shipped (by name, inside the package) or a TOML file (see vitexport.profiles)."""
    from . import profiles

    return profiles.load(name_or_path)


def target_settings(target: str | None, backend: str | None, precisions: Sequence[str] | None, threads: int | None) -> dict[str, Any]:
    """BuildOptions fields from a device profile; what the user gave explicitly (not None) wins."""
    t = load_target(target) if target else {}
    out = {
        "backend": backend or t.get("backend", "onnxruntime"),
        "precisions": tuple(precisions or t.get("precisions", ("fp32", "int8", "int4"))),
        "threads": threads if threads is not None else t.get("threads"),
        "options": {k: dict(v) for k, v in (t.get("options") or {}).items()},
        "target": t.get("name"),
    }
    trt_version = (out["options"].get("tensorrt") or {}).get("tensorrt")
    if trt_version and "tensorrt" in str(out["backend"]):  # the device's TensorRT decides the opset it can parse
        from .backends.tensorrt import max_onnx_opset

        cap = max_onnx_opset(trt_version)
        if cap is not None:
            out["opset"] = cap
    return out


def _require_default(path: str | None, what: str, flag: str) -> None:
    """The default DeiT-tiny and its images (46 MB) are in the source checkout, not in the wheel: say so, once."""
    if path and not Path(path).exists() and Path(path).is_relative_to(REPO_ROOT):
        raise VitexportError(
            f"the default {what} ({path}) is not installed: the shipped DeiT-tiny and its images come with a clone of "
            f"vitexport, not with the wheel; pass {flag} (and --model/--calib/--eval as needed) or run from a clone"
        )


def build(opts: BuildOptions, progress: Progress | None = None, extra_builders: Sequence[Callable[..., Artifact]] = ()) -> Report:
    """Export, build one artifact per precision, measure all of them, write --out. Returns the Report.

    `extra_builders` (reference, calibration, out_dir) -> Artifact add rows built some other way (benchmarks use
    this for stock-recipe baselines), measured by the same harness in the same run.
    """
    progress = progress or Progress(enabled=False)
    check_build_options(opts)
    check_output(Path(opts.out), opts.force)
    started = time.time()
    try:
        with output_lock(Path(opts.out)):  # one build per --out at a time, from here to the final rename
            clean_stale_partials(Path(opts.out))
            return _build_locked(opts, progress, extra_builders)
    finally:  # a failed build's entries are what its rerun needs: kept like a finished one's
        if opts.cache_dir and opts.cache_max_bytes is not None:
            _bound_cache(opts.cache_dir, opts.cache_max_bytes, started, progress)


def _bound_cache(cache_dir: str, max_bytes: int, started: float, progress: Progress) -> None:
    """--cache-max-size: the least recently used entries of ``cache_dir`` removed until it fits (quantization.cache.prune).
    A cache that cannot be pruned costs disk, not the build: a warning, never an error."""
    from .quantization.cache import prune

    try:
        # entries used in this build are kept: their times are at least its start (less a coarse file system's 2 s)
        done = prune(cache_dir, max_bytes, started - 2.0)
    except OSError as e:
        log.warning("cache: cannot prune %s (%s)", cache_dir, e)
        return
    if done.removed:
        progress.step(f"cache: removed {done.removed} least recently used entries ({done.removed_bytes / 1e6:.0f} MB); {cache_dir} holds {done.kept_bytes / 1e6:.0f} MB")
    if done.over:
        log.warning("cache: this build's own entries take %.0f MB, more than --cache-max-size (%.0f MB): none was removed; raise the bound",
                    done.kept_bytes / 1e6, max_bytes / 1e6)


def check_build_options(opts: BuildOptions) -> None:
    """Everything about the options that can be checked before any slow work."""
    _check_counts(num_calib=("--num-calib", opts.num_calib), num_eval=("--num-eval", opts.num_eval), threads=("--threads", opts.threads), batch_size=("batch_size", opts.batch_size))
    from .export import check_opset

    check_opset(opts.opset)
    _check_out_is_not_an_input(Path(opts.out), {"--model": opts.model, "--calib": opts.calib, "--eval": opts.eval, "--classes": opts.classes})


def _check_counts(**counts: tuple[str, int | None]) -> None:
    for flag, value in counts.values():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise VitexportError(f"{flag} must be a positive whole number, not {value}")


def _check_out_is_not_an_input(out: Path, inputs: Mapping[str, str | None]) -> None:
    """--force replaces --out: it must never be, contain or sit inside a folder the build reads, nor the current folder."""
    target = out.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or cwd.is_relative_to(target):
        raise VitexportError(f"--out {out} is the current folder (or contains it), which a build would replace: choose a new folder, e.g. --out dist")
    if target.is_mount():
        raise VitexportError(f"--out {out} is a mount point, which a build would replace: choose a folder inside it")
    for flag, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue  # a hub id, or a default that is not used
        src = Path(value).expanduser().resolve()
        if target == src or target.is_relative_to(src) or src.is_relative_to(target):
            how = "is" if target == src else ("is inside" if target.is_relative_to(src) else "contains")
            raise VitexportError(f"--out {out} {how} the {flag} input {value}: the build would replace what it reads; choose an --out outside every input")


def _check_free_space(folder: Path, need: int) -> None:
    """The sizes known before the work starts (image caches, the reference ONNX) must fit on --out's disk."""
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need:
        raise VitexportError(f"not enough free space on {folder}: this build needs at least {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free: free some space or choose an --out on another disk")


def _weights_bytes(source: str) -> int:
    d = Path(source)
    return sum(p.stat().st_size for p in d.glob("*.safetensors")) if d.is_dir() else 0


def _checked_plan(opts: BuildOptions) -> list[tuple[_backends.Backend, list[str]]]:
    """The defaults are installed, the backends and precisions exist and the options are spelled right: before any slow work."""
    for path, what, flag in ((opts.model, "model", "--model"), (opts.calib, "calibration images", "--calib"), (opts.eval, "evaluation images", "--eval")):
        _require_default(path, what, flag)
    plan = _plan(opts.backend, opts.precisions)
    from .profiles import check_options

    check_options(opts.options, "build options")  # the same checks as a profile's: a typo is an error, not a default
    return plan


@dataclass(frozen=True)
class _Images:
    """The evaluation set, the calibration set when any artifact needs one, and how many images they share."""

    evalset: ImageSet
    calibset: ImageSet | None
    shared: int | None


def _image_sets(opts: BuildOptions, spec, plan: list[tuple[_backends.Backend, list[str]]], extra: bool) -> _Images:
    if not opts.eval:
        raise VitexportError("pass --eval DIR: the export is verified, and every artifact measured, on real images")
    evalset = ImageSet.from_folder(opts.eval, spec.preprocessing, spec.id2label, opts.classes, limit=opts.num_eval)
    needing = sorted({p for b, ps in plan for p in ps if _backends.needs_calibration(p, b)})
    if not (extra or needing):
        return _Images(evalset, None, None)
    if not opts.calib:
        raise VitexportError(f"{', '.join(needing) or 'the extra builders'} need calibration images: pass --calib DIR")
    calibset = ImageSet.from_folder(opts.calib, spec.preprocessing, spec.id2label, opts.classes, limit=opts.num_calib)
    shared = overlap(calibset, evalset)
    if shared:
        log.warning("%d calibration images are also evaluation images: accuracy figures will flatter the quantized rows", shared)
    return _Images(evalset, calibset, shared)


# a calibration pass holds one batch's linear-layer inputs at once: DeiT-tiny 13 MB an image (batches of 16),
# ViT-Base 51 MB (batches of 7 instead of 16: 0.45 GB less at the build's peak)
CALIBRATION_BATCH_BYTES = 384 << 20


def _calibration(calibset: ImageSet, calib_x: np.ndarray, opts: BuildOptions, bytes_per_image: int) -> _backends.Calibration:
    """The preprocessed calibration images as the backends draw on them (in batches of at most 16 that keep a
    pass's activations under CALIBRATION_BATCH_BYTES, fingerprinted for --cache-dir)."""
    n = max(1, min(16, CALIBRATION_BATCH_BYTES // max(bytes_per_image, 1)))
    batches = lambda: (np.asarray(calib_x[i : i + n]) for i in range(0, len(calib_x), n))  # noqa: E731
    fingerprint = None
    if opts.cache_dir:
        from .quantization.cache import images_sha256

        fingerprint = images_sha256(batches())
    return _backends.Calibration(batches=batches, count=len(calib_x), source=str(calibset.root), cache_dir=opts.cache_dir, fingerprint=fingerprint)


def _build_artifacts(
    plan: list[tuple[_backends.Backend, list[str]]], reference, calibration: _backends.Calibration | None, opts: BuildOptions,
    stages: Stages, progress: Progress, tmp: Path, extra_builders: Sequence[Callable[..., Artifact]],
) -> tuple[list[Artifact], dict[str, dict[str, Any]]]:
    """(every artifact, in plan order, then the extra rows; each one's build seconds and peak memory)."""
    artifacts: list[Artifact] = []
    builds: dict[str, dict[str, Any]] = {}

    def timed(make) -> None:
        start = time.perf_counter()
        with PeakMemory() as pm:
            art = make()
        release_freed_memory()  # what the step freed is not carried into the next step's peak
        artifacts.append(art)
        builds[art.name] = {"seconds": round(time.perf_counter() - start, 2), "peak_mb": pm.peak_mb, "process_peak_mb": PeakMemory.process_peak_mb()}

    for backend, precisions in plan:
        for precision in precisions:
            progress.step(f"building {backend.name} {precision}")
            # each calibration pass, search and rounding step has its own bar and timing (the stages argument);
            # the whole build step is one stage too, so conversion is what its sub-stages leave over
            with stages.stage(f"build {backend.name} {precision}"):
                child = stages.child(f"{backend.name} {precision}")
                timed(lambda: backend.build(reference, calibration if _backends.needs_calibration(precision, backend) else None, precision, opts.options, tmp / f"{backend.name}-{precision}", stages=child))
    for make_extra in extra_builders:
        with stages.stage("build extra rows"):
            timed(lambda: make_extra(reference, calibration, tmp))
    return artifacts, builds


def _remote_rows(opts: BuildOptions, artifacts: list[Artifact], reference_path: Path, eval_x: np.ndarray, eval_npy: Path, evalset: ImageSet, classifier: bool, progress: Progress) -> list[Row]:
    """Device rows, scored here against the fp32 reference outputs, computed here once."""
    from . import remote
    from .backends.onnxruntime import OrtRunner

    ref_out = _accuracy.run_all(OrtRunner(reference_path, opts.threads), eval_x, opts.batch_size)
    return remote.measure(opts.remote, artifacts, eval_npy, evalset.labels, classifier, ref_out, _row, threads=opts.threads, latency=opts.latency, batch_size=opts.batch_size, progress=progress)


def _build_report(opts: BuildOptions, spec, reference, rows: list[Row], images: _Images, calibration: _backends.Calibration | None, stages: Stages) -> Report:
    evalset = images.evalset
    report = Report(
        model={**spec.summary(reference.num_parameters), "label_examples": [spec.id2label[i] for i in sorted(spec.id2label)[:5]]},
        rows=tuple(rows),
        reference={"opset": reference.opset, "verification": dict(reference.verification)},
        evaluation={
            "images": len(evalset),
            "source": str(evalset.root),
            "labelled": sum(lab is not None for lab in evalset.labels),
            "label_source": evalset.label_source,
            "calibration_images": calibration.count if calibration else 0,
            "calibration_source": calibration.source if calibration else None,
            "calibration_overlap": images.shared,  # images (by content) in both sets; None when there was no calibration set
            "preprocessing": spec.preprocessing.to_dict(),
            "target": opts.target,
            **({"devices": [d.name for d in opts.remote], "shipped": _remote_note()} if opts.remote else {}),
        },
        host=host_info(),
        tools=tool_versions(),
        created=now(),
        stages=tuple(stages.records),
    )
    return with_gate(report, opts.min_agreement, opts.max_top1_drop, opts.gate_rule)


def _build_locked(opts: BuildOptions, progress: Progress, extra_builders: Sequence[Callable[..., Artifact]]) -> Report:
    plan = _checked_plan(opts)
    from .model import ModelSpec  # needs transformers; eval/bench never import it

    progress.step(f"loading {opts.model}")
    spec = ModelSpec.load(opts.model, trust_pickle=opts.trust_pickle)
    module = spec.load_torch()  # now, not after preprocessing: random-initialised or mismatched weights stop the build first
    images = _image_sets(opts, spec, plan, bool(extra_builders))
    evalset, calibset = images.evalset, images.calibset
    image_bytes = 4 * int(np.prod(spec.input_shape)) * (len(evalset) + (len(calibset) if calibset is not None else 0))
    _check_free_space(Path(opts.out).absolute().parent, image_bytes + _weights_bytes(spec.source) + (1 << 20))

    stages = Stages(progress)
    with staged_output(Path(opts.out), opts.force) as tmp:
        cache = tmp / ".work"
        with stages.stage("preprocessing eval images"):
            eval_x = _materialize(evalset, cache / "eval.npy", progress, "preprocessing eval images")
        calibration = None
        if calibset is not None:
            with stages.stage("preprocessing calibration images"):
                calib_x = _materialize(calibset, cache / "calib.npy", progress, "preprocessing calibration images")
            calibration = _calibration(calibset, calib_x, opts, spec.activation_bytes_per_image)

        from .export import export_reference

        progress.step(f"exporting {spec.architecture} to ONNX (opset {opts.opset}) and checking it against PyTorch")
        with stages.stage("export and verification"):
            reference = export_reference(spec, cache / "reference", np.asarray(eval_x[:VERIFY_IMAGES]), opset=opts.opset, module=module, cache_dir=opts.cache_dir)
        del module
        release_freed_memory()  # the exporter's freed heap: 1.1 GB of RSS for ViT-Base that every later peak stacked on

        artifacts, builds = _build_artifacts(plan, reference, calibration, opts, stages, progress, tmp, extra_builders)
        classifier = spec.task == "classification"
        rows = measure_artifacts(artifacts, eval_x, evalset.labels, classifier, opts, progress, reference_path=reference.path, stages=stages)
        if opts.remote:
            rows += _remote_rows(opts, artifacts, reference.path, eval_x, cache / "eval.npy", evalset, classifier, progress)
        rows = [replace(r, build=builds.get(r.name)) for r in rows]
        shutil.rmtree(cache, ignore_errors=True)
        rows = [_final_path(r, tmp, Path(opts.out)) for r in rows]
        report = _build_report(opts, spec, reference, rows, images, calibration, stages)
        _output.write(report, tmp)
    return report


def with_gate(report: Report, min_agreement: float | None, max_top1_drop: float | None, rule: str = "point") -> Report:
    """The report with its quality-gate verdict recorded (unchanged when no bar is given)."""
    if min_agreement is None and max_top1_drop is None:
        return report
    from .harness.gate import check

    return replace(report, gate=check(report.rows, {"min_agreement": min_agreement, "max_top1_drop": max_top1_drop}, rule).to_dict())


def _final_path(row: Row, tmp: Path, out: Path) -> Row:
    """Rows were measured in the staging folder: point paths (and notes that name them) at where they will be.
    The reference ONNX lives in the work cache, which is not kept: its row has no path."""
    notes = tuple(n.replace(str(tmp), str(out)) for n in row.notes)
    rel = Path(row.path).relative_to(tmp) if row.path else None
    if rel is None or rel.parts[0] == ".work":
        return replace(row, path="", notes=notes)
    return replace(row, path=str(out / rel), notes=notes)


def _plan(backend_names: str | Sequence[str], precisions: str | Sequence[str]) -> list[tuple[_backends.Backend, list[str]]]:
    """Which backend builds which precisions: each backend builds the requested precisions it has, in its own order.
    Several backends in one run put their rows side by side against the same reference and images."""
    names = [n.strip() for n in (backend_names.split(",") if isinstance(backend_names, str) else backend_names) if n.strip()]
    requested = [p.strip().lower() for p in (precisions.split(",") if isinstance(precisions, str) else precisions) if p.strip()]
    plan = []
    for name in dict.fromkeys(names):
        backend = _backends.get(name)
        ok, why = backend.available()
        if not ok:
            raise VitexportError(f"backend {name} is not available here: {why}")
        mine = [p for p in requested if p in backend.precisions]
        plan.append((backend, _backends.parse_precisions(mine, backend) if mine else []))
    if not plan:
        raise VitexportError("no backend given: pass e.g. --backend onnxruntime")
    known = {p for b, _ in plan for p in b.precisions}
    bad = [p for p in requested if p not in known]
    if bad or not requested:
        offered = ", ".join(dict.fromkeys(p for b, _ in plan for p in b.precisions))
        raise VitexportError(f"backend {','.join(b.name for b, _ in plan)} has no precision {', '.join(bad) or '(none given)'}: choose from {offered}")
    return plan


def _materialize(images: ImageSet, path: Path, progress: Progress, label: str) -> np.ndarray:
    """Decode and preprocess every image once, into a memory-mapped array (memory stays flat for big sets)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(images), *images.load(0).shape))
    # reserve the blocks now: a memory-mapped write to a full disk is SIGBUS (exit 135, no message), this is ENOSPC
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    with progress.bar(label, total=len(images)) as tick:
        for i in range(len(images)):
            arr[i] = images.load(i)
            tick(1)
    arr.flush()
    return arr


def measure_artifacts(
    artifacts: Sequence[Artifact],
    inputs: np.ndarray,
    labels: Sequence[int | None],
    classifier: bool,
    opts: BuildOptions,
    progress: Progress,
    reference_path: Path | None = None,
    reference_outputs: np.ndarray | None = None,
    reference: Artifact | None = None,
    stages: Stages | None = None,
    strict: bool = False,
) -> list[Row]:
    """Run every artifact that can run here on the same inputs; the reference outputs are computed once.

    The reference is `reference` when given (eval --reference), else the ONNX Runtime fp32 artifact when one was
    built, else the reference ONNX itself, measured as its own row: every report has its reference row, so Δ top-1,
    ×smaller and ×faster always have a base, whatever precisions a profile builds.
    `strict`: an artifact that cannot run here is an error (eval/bench of one artifact), not a 'not run here' row.
    """
    from .harness.report import REFERENCE

    stages = stages or Stages()
    evaluation = stages.child("evaluation")

    ref_out = reference_outputs
    artifacts, reference = _with_reference(list(artifacts), reference, reference_path if ref_out is None else None)
    is_reference = lambda a: a is reference  # noqa: E731
    measured: list[tuple[Artifact, dict | None, dict | None, list[str]]] = []
    timed: dict[str, Any] = {}  # runners kept for the interleaved timing after every accuracy pass
    for art in sorted(artifacts, key=lambda a: not is_reference(a)):
        acc = mem = None
        # loading is part of evaluating (a compile, or an emulation's graph): inside the stage and the memory peak
        with PeakMemory() as pm, evaluation.stage(art.name, total=len(inputs)) as tick:
            runner, notes = _open_runner(art, opts.threads, strict)
            outputs = _accuracy.run_all(runner, inputs, opts.batch_size, tick) if runner is not None else None
        if runner is not None:
            if ref_out is None and is_reference(art):
                ref_out = outputs
            acc = _accuracy.score(outputs, labels, ref_out, classifier, runner.emulated).to_dict()
            mem = {"peak_mb": pm.peak_mb, "method": pm.method, "what": "load + evaluate"}
            if opts.latency and not runner.emulated:
                timed[art.name] = runner
            elif runner.emulated:
                notes.append("latency not measured: the target's runtime is not on this host")
            del runner
        measured.append((art, acc, mem, notes))
    lats: dict[str, Any] = {}
    if timed:
        progress.step(f"timing {len(timed)} artifact{'s' if len(timed) > 1 else ''}, interleaved")
        with stages.stage("timing (interleaved)"):
            lats = measure_all(timed, np.asarray(inputs[:16]))
        timed.clear()
    rows = [
        _row(art, accuracy=acc, latency=lats[art.name].to_dict() if art.name in lats else None, memory=mem, notes=tuple(notes), role=REFERENCE if is_reference(art) else "")
        for art, acc, mem, notes in measured
    ]
    order = {a.name: i for i, a in enumerate(artifacts)}
    return sorted(rows, key=lambda r: order[r.name])


def _with_reference(artifacts: list[Artifact], reference: Artifact | None, reference_path: Path | str | None) -> tuple[list[Artifact], Artifact | None]:
    """(the artifacts with the reference first when it is not among them, the reference): the given one, else the
    ONNX Runtime fp32 artifact, else the reference ONNX at ``reference_path`` (None: the outputs are given)."""
    from .harness.report import is_reference_artifact

    if reference is None:
        reference = next((a for a in artifacts if is_reference_artifact(a.backend, a.precision)), None)
    if reference is None and reference_path is not None:
        reference = _reference_artifact(Path(reference_path))
    if reference is not None and all(a is not reference for a in artifacts):
        artifacts.insert(0, reference)
    return artifacts, reference


def _open_runner(art: Artifact, threads: int | None, strict: bool) -> tuple[Any, list[str]]:
    """(the artifact's runner, or None and the note saying why it does not run here; an error when ``strict``)."""
    try:
        return _backends.get(art.backend).runner(art, threads), []
    except VitexportError as e:
        if strict:
            raise VitexportError(f"cannot run {art.directory} here: {e}") from None
        return None, [f"not run here: {e}"]
    except ImportError as e:  # an emulation's own dependency (onnx) on a runtime-only install
        return None, [f"not run here: emulating it needs {e.name or e}: pip install {e.name or 'onnx'}"]


def _reference_artifact(path: Path) -> Artifact:
    """The build's reference ONNX seen as an artifact, so it is measured like one and shown as the reference row."""
    from .artifacts import size_on_disk

    summary = "the fp32 reference ONNX every row is compared with, run by ONNX Runtime (not kept in --out: add fp32 to --precision to keep it as an artifact)"
    return Artifact("onnxruntime", "fp32", path.parent, path.name, {"size_bytes": size_on_disk(path), "recipe": {"summary": summary, "kind": "float32 reference"}})


def _row(art: Artifact, **measured: Any) -> Row:
    files = {f.get("path"): f.get("sha256") for f in art.manifest.get("files", [])}
    return Row(
        name=art.name, backend=art.backend, precision=art.precision, path=str(art.path), size_bytes=art.size_bytes, recipe=_recipe_view(art.manifest.get("recipe", {})),
        sha256=files.get(art.main), tools=dict(art.manifest.get("tools", {})), **measured,
    )


def _remote_note() -> str:
    from .remote import SHIPPED_NOTE

    return SHIPPED_NOTE


def _recipe_view(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a recipe worth a report column; the whole recipe stays in the artifact's manifest."""
    keep = ("summary", "kind", "method", "calibration_images", "block_size", "block_sizes", "smoothquant_alpha", "activation_type", "weight_type")
    view = {k: recipe[k] for k in keep if k in recipe}
    stayed = _stayed_float(recipe.get("float") or recipe.get("kept_float") or [])
    if stayed:
        view["stayed_float"] = stayed
    if isinstance(recipe.get("kept_float_ops"), str):
        view["float_ops"] = recipe["kept_float_ops"]
    return view


def _stayed_float(entries: Sequence[Any]) -> str:
    """Which linear layers a recipe left float and why, in words: 'sensitivity fallback: block 0 qkv ×3, ...'."""
    by_reason: dict[str, dict[str, int]] = {}
    for f in entries:
        if not isinstance(f, Mapping):
            continue
        where = f.get("role") or f.get("node") or "?"
        if f.get("block") is not None:
            where = f"block {f['block']} {where}"
        counts = by_reason.setdefault(str(f.get("reason", "not given")), {})
        counts[where] = counts.get(where, 0) + 1
    return "; ".join(f"{reason}: " + ", ".join(w + (f" ×{n}" if n > 1 else "") for w, n in c.items()) for reason, c in by_reason.items())


# ---------------------------------------------------------------- one artifact


def _artifact_images(artifact: Artifact, images: str | None, classes: str | None, limit: int | None) -> ImageSet | None:
    if images is None:
        return None
    pre = Preprocessing.from_dict(artifact.manifest["preprocessing"])
    labels = {i: name for i, name in enumerate(artifact.manifest.get("labels", []))}
    return ImageSet.from_folder(images, pre, labels, classes, limit=limit)


def evaluate(
    artifact_path: str,
    images: str,
    reference: str | None = None,
    classes: str | None = None,
    limit: int | None = None,
    threads: int | None = None,
    latency: bool = False,
    progress: Progress | None = None,
    remote: Sequence[Any] = (),
    verify: bool = True,
) -> Report:
    """Accuracy of one artifact on a folder of images (and agreement with a reference artifact, if given).

    With `remote` (vitexport.remote.Devices) the artifact runs on those devices instead, on the images preprocessed
    here; a reference artifact still runs here, once, and the devices' outputs are scored here against it.
    `verify` False runs artifacts whose files no longer match their manifest's sha256 (edited on purpose)."""
    progress = progress or Progress(enabled=False)
    _check_counts(limit=("--limit", limit), threads=("--threads", threads))
    art = _load_artifact(artifact_path, verify)
    ref = _load_artifact(reference, verify) if reference else None
    if ref is not None:
        _check_comparable(art, ref)
    imageset = _artifact_images(art, images, classes, limit)
    assert imageset is not None
    arts = [art]
    opts = BuildOptions(threads=threads, latency=latency)
    classifier = art.manifest.get("io", {}).get("task", "classification") == "classification"
    with tempfile.TemporaryDirectory(prefix="vitexport-eval-") as tmp:
        x = _materialize(imageset, Path(tmp) / "images.npy", progress, "preprocessing images")
        if remote:
            from . import remote as _remote

            ref_out = None
            if ref is not None:
                ref_runner = _backends.get(ref.backend).runner(ref, threads)
                ref_out = _accuracy.run_all(ref_runner, x, opts.batch_size)
                del ref_runner
            rows = _remote.measure(remote, [art], Path(tmp) / "images.npy", imageset.labels, classifier, ref_out, _row, threads=threads, latency=latency, batch_size=opts.batch_size, progress=progress)
        else:
            rows = measure_artifacts(arts, x, imageset.labels, classifier, opts, progress, reference=ref, strict=True)
        del x
    return Report(
        model=art.manifest.get("model", {}),
        rows=tuple(rows),
        evaluation={"images": len(imageset), "source": str(imageset.root), "labelled": sum(lab is not None for lab in imageset.labels), "label_source": imageset.label_source, **({"devices": [d.name for d in remote], "shipped": _remote_note()} if remote else {})},
        host=host_info(),
        tools=tool_versions(),
        created=now(),
    )


def _load_artifact(path: str, verify: bool) -> Artifact:
    """Artifact.load (manifest, paths, sha256) and a backend this vitexport has, before any image is read."""
    art = Artifact.load(path, verify=verify)
    if art.backend not in _backends.names():
        raise VitexportError(f"{art.directory} names backend '{art.backend}', which this vitexport does not have ({', '.join(_backends.names())}): upgrade vitexport or rebuild the artifact")
    return art


def _check_comparable(art: Artifact, ref: Artifact) -> None:
    """--reference must take the same input and give the same kind of output, or agreement and cosine mean nothing."""
    a, r = art.manifest, ref.manifest
    for what, get in (
        ("task", lambda m: m["io"].get("task")),
        ("input shape", lambda m: m["io"].get("input_shape")),
        ("number of labels", lambda m: len(m.get("labels") or [])),
        ("preprocessing", lambda m: Preprocessing.from_dict(m["preprocessing"])),
    ):
        if get(a) != get(r):
            raise VitexportError(f"--reference {ref.directory} has another {what} ({get(r)}) than {art.directory} ({get(a)}): pass the fp32 artifact of the same build")


def bench(artifact_path: str, images: str | None = None, threads: int | None = None, throughput_batch: int = 16, progress: Progress | None = None, remote: Sequence[Any] = (), verify: bool = True) -> Report:
    """Latency, throughput and peak memory of one artifact on this host (or on `remote` devices, in parallel)."""
    progress = progress or Progress(enabled=False)
    _check_counts(threads=("--threads", threads), batch=("--batch", throughput_batch))
    art = _load_artifact(artifact_path, verify)
    imageset = _artifact_images(art, images, None, 16)
    if imageset is not None:
        x = np.stack([imageset.load(i) for i in range(len(imageset))])
    else:
        shape = [int(d) for d in art.manifest["io"]["input_shape"][1:]]
        x = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)
    if remote:
        from . import remote as _remote

        with tempfile.TemporaryDirectory(prefix="vitexport-bench-") as tmp:
            np.save(Path(tmp) / "inputs.npy", x)
            rows = _remote.measure(remote, [art], Path(tmp) / "inputs.npy", None, False, None, _row, threads=threads, latency=True, throughput_batch=throughput_batch, score=False, progress=progress)
        return Report(model=art.manifest.get("model", {}), rows=tuple(rows), host=host_info(), tools=tool_versions(), created=now())
    with PeakMemory() as pm:
        try:
            runner = _backends.get(art.backend).runner(art, threads)
        except VitexportError as e:
            raise VitexportError(f"cannot run {art.directory} here: {e}") from None
        except ImportError as e:  # an emulation's own dependency (onnx) on a runtime-only install
            raise VitexportError(f"{art.name} cannot run here: emulating it needs {e.name or e}: pip install {e.name or 'onnx'}") from None
        progress.step(f"timing {art.name} on {runner.device}")
        lat = measure(runner, x, throughput_batch=throughput_batch)
    notes = ("emulated runtime: these timings are not the target's",) if runner.emulated else ()
    row = _row(art, latency={**lat.to_dict(), "emulated": bool(runner.emulated)}, memory={"peak_mb": pm.peak_mb, "method": pm.method, "what": "load + timing"}, notes=notes)
    return Report(model=art.manifest.get("model", {}), rows=(row,), host=host_info(), tools=tool_versions(), created=now())


def check_report_out(out: Path, force: bool, inputs: Mapping[str, str | None]) -> None:
    """eval/bench --out, before the slow part: writable, not an input (an artifact replaced by its own report)."""
    _check_out_is_not_an_input(out, inputs)
    check_output(out, force)


def write_report(report: Report, out: str, force: bool = False) -> None:
    """report.json, report.md and report.html into the folder `out` (eval and bench --out), staged like a build."""
    with output_lock(Path(out)), staged_output(Path(out), force) as tmp:
        _output.write(report, tmp)

