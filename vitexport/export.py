"""torch -> the float32 reference ONNX that every backend starts from, checked against PyTorch on real images."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .artifacts import save_onnx
from .errors import VitexportError
from .model import ModelSpec

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # >= 17 keeps LayerNormalization one op (decomposed LayerNorm overflows in fp16 on TensorRT)
INPUT_NAME = "pixel_values"
# Export is float32; anything past these is an exporter bug, not rounding.
MAX_ABS_DIFF = 1e-3
MIN_AGREEMENT = 1.0


@dataclass(frozen=True)
class Reference:
    """The verified fp32 ONNX and what every later stage needs to know about it."""

    path: Path
    spec: ModelSpec
    opset: int
    num_parameters: int
    verification: Mapping[str, Any] = field(default_factory=dict)
    # the build's --cache-dir, for steps that keep their own results there with or without calibration images (CoreML)
    cache_dir: str | None = None
    # the same graph on the rows its output reads (quantization/unread_rows.py), written once beside it for every
    # fp32/fp16 artifact to copy or convert; None where there is nothing to drop. ``read_rows`` says what was dropped
    read_rows_path: Path | None = None
    read_rows: Mapping[str, Any] = field(default_factory=dict)

    @property
    def input_name(self) -> str:
        return INPUT_NAME

    @property
    def output_name(self) -> str:
        return self.spec.output_name

    def metadata(self) -> dict[str, Any]:
        """What travels inside every artifact so a consumer can feed it without the checkpoint."""
        return {
            "vitexport.model": {**self.spec.summary(self.num_parameters), "source": portable_source(self.spec.source)},
            "vitexport.preprocessing": self.spec.preprocessing.to_dict(),
            "vitexport.labels": self.spec.labels_list(),
            "vitexport.task": self.spec.task,
            "vitexport.embedding": self.verification.get("embedding", ""),
        }

    def manifest_fields(self) -> dict[str, Any]:
        """What every artifact's manifest says about the model it came from (see artifacts.write_manifest)."""
        return {
            "model": self.spec.summary(self.num_parameters),
            "preprocessing": self.spec.preprocessing.to_dict(),
            "labels": self.spec.labels_list(),
            "io": {"input": self.input_name, "input_shape": ["batch", *self.spec.input_shape], "output": self.output_name, "task": self.spec.task},
        }

    def load(self):
        import onnx

        return onnx.load(str(self.path))


def portable_source(source: str) -> str:
    """A hub id as is; a local checkpoint by its folder name: the absolute path says nothing to an app, and would make
    the same model's bytes depend on the folder it was built in (the manifest keeps the full path)."""
    return Path(source).name if Path(source).exists() else source


# where the exporter's tracing ran: a Python traceback (File "/path/x.py", line 3) or a bare path to a .py file
_SOURCE_PATH = re.compile(r'File "|(?:^|[\s"\'(\[])(?:/|[A-Za-z]:\\)\S*\.py\b')


def strip_source_paths(model) -> int:
    """Drop node-level metadata_props that name source files (torch's ``pkg.torch.onnx.stack_trace``): they hold the
    paths of the checkout and of the Python installation, so two checkouts would build different bytes of the same
    model. Other node metadata (fx node, name scopes) stays. Returns how many entries were dropped."""
    dropped = 0
    for node in _all_nodes(model):
        keep = [p for p in node.metadata_props if not _SOURCE_PATH.search(p.value)]
        if len(keep) != len(node.metadata_props):
            dropped += len(node.metadata_props) - len(keep)
            kept = [(p.key, p.value) for p in keep]
            del node.metadata_props[:]
            for key, value in kept:
                node.metadata_props.add(key=key, value=value)
    return dropped


def _all_nodes(model):
    """Every node of the model: the main graph's, its subgraphs' (If, Loop, Scan bodies) and its functions'."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            yield node
            for a in node.attribute:
                graphs.extend([a.g] if a.HasField("g") else list(a.graphs))
    for f in model.functions:
        yield from f.node


MIN_OPSET = 17


def check_opset(opset: int) -> None:
    """17 keeps LayerNormalization one op; the newest is what the installed onnx defines."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        why = f" (LayerNormalization needs opset {MIN_OPSET} or newer)" if isinstance(opset, int) and opset < MIN_OPSET else ""
        raise VitexportError(f"--opset {opset} is out of range{why}: choose {MIN_OPSET} to {newest} (default {DEFAULT_OPSET})")


def verification_problem(v: Mapping[str, Any]) -> str | None:
    """Why a verification fails, or None. NaN compares False with everything, so non-finite values fail explicitly."""
    if not v.get("finite", True) or not np.isfinite(v["max_abs_diff"]):
        return f"the model gives non-finite outputs (NaN or inf) on {v['n']} real images: check its weights and preprocessor_config.json (image_std, rescale_factor)"
    if v["max_abs_diff"] > MAX_ABS_DIFF or v["top1_agreement"] < MIN_AGREEMENT:
        return (
            f"the exported ONNX disagrees with PyTorch (max abs diff {v['max_abs_diff']:.2e}, top-1 agreement "
            f"{v['top1_agreement']:.3f} on {v['n']} images): please report this model"
        )
    return None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def export_reference(spec: ModelSpec, out_dir: Path, verify_inputs: np.ndarray, opset: int = DEFAULT_OPSET, module=None, cache_dir: str | None = None) -> Reference:
    """Trace `spec` to ONNX (dynamic batch) in `out_dir/model.onnx` and check it against PyTorch on `verify_inputs`.

    `module`: the spec's `load_torch()` when the caller already loaded it (to check the weights before slow work).
    `cache_dir` (--cache-dir): an earlier build's ONNX of the same weights, code and toolchain (export_key) is copied
    instead of traced again, and checked against PyTorch all the same; one that fails the check is traced afresh."""
    check_opset(opset)
    if not np.isfinite(verify_inputs).all():
        raise VitexportError("the preprocessed images contain NaN or inf: check image_mean, image_std and rescale_factor in preprocessor_config.json")
    module = module if module is not None else spec.load_torch()
    num_parameters = sum(p.numel() for p in module.parameters())
    embedding = ""
    if spec.task == "embedding":
        embedding = "pooler_output" if getattr(module.model, "pooler", None) is not None else "cls_hidden_state"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    ref = Reference(path, spec, opset, num_parameters)
    key = export_key(ref, module) if cache_dir else None
    cached = key is not None and _cached_reference(cache_dir, key, out_dir)
    if not cached:
        _trace(ref, module, embedding, verify_inputs)
    verification, logits = compare(module, path, verify_inputs, spec.output_name)
    problem = verification_problem(verification)
    if problem and cached:  # an entry that no longer holds what its key says: never trust it, trace again
        log.warning("cache: the cached reference ONNX failed its check against PyTorch (%s); exporting it again", problem)
        shutil.rmtree(_cache_entry(cache_dir, key), ignore_errors=True)
        _clear(out_dir)
        _trace(ref, module, embedding, verify_inputs)
        (verification, logits), cached = compare(module, path, verify_inputs, spec.output_name), False
        problem = verification_problem(verification)
    if problem:
        raise VitexportError(problem)
    if key is not None and not cached:
        _store_reference(cache_dir, key, out_dir)
    verification["embedding"] = embedding
    log.info("reference ONNX verified on %d images: max abs diff %.2e", verification["n"], verification["max_abs_diff"])
    rows_path, rows = write_read_rows(path, out_dir / READ_ROWS, verify_inputs[:2], logits[:2])
    return Reference(path, spec, opset, num_parameters, verification, cache_dir, rows_path, rows)


READ_ROWS = "read_rows.onnx"


def write_read_rows(path: Path, target: Path, x: np.ndarray, reference: np.ndarray | None = None) -> tuple[Path | None, dict[str, Any]]:
    """The reference at ``path`` with its unread rows dropped, written to ``target`` once, if its outputs on ``x`` are
    the reference's (the same in exact arithmetic; on onnxruntime's float32 kernels the same bits so far, within 1e-5 of
    the largest output allowed): (target, what was dropped), or (None, why not) and nothing left written.
    ``reference``: the reference's outputs on ``x`` in onnxruntime where the caller has them (the export's check)."""
    import onnx

    from .quantization.unread_rows import drop_unread_rows, summary

    model = onnx.load(str(path))
    done = drop_unread_rows(model)
    if done is None:
        return None, summary(done)
    save_onnx(model, target)
    try:
        a = _logits(path, x) if reference is None else np.asarray(reference)
        b = _logits(target, x)
        diff = float(np.abs(a - b).max()) / max(float(np.abs(a).max()), 1e-6)
    except VitexportError:  # onnxruntime refused the sliced graph: a bug here, never the user's
        diff = float("inf")
    if not diff <= 1e-5:
        log.warning("the reference on its read rows differs from it by %.2e of its largest output: artifacts keep every row", diff)
        target.unlink()
        Path(str(target) + ".data").unlink(missing_ok=True)
        return None, {"rows_read": None, "why": f"the sliced graph's outputs differed from the reference's by {diff:.2e} of the largest"}
    return target, {**summary(done), "relative_diff_to_reference": diff}


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    from .ort_session import ort_session

    sess = ort_session(path, 0)
    return sess.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _trace(ref: Reference, module, embedding: str, verify_inputs: np.ndarray) -> None:
    """torch.onnx's dynamo exporter -> ``ref.path``: the graph with source paths stripped and the metadata embedded."""
    import torch

    spec = ref.spec
    c, h, w = spec.input_shape
    example = torch.from_numpy(np.ascontiguousarray(verify_inputs[:2])) if len(verify_inputs) >= 2 else torch.randn(2, c, h, w)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=ref.opset,
                input_names=[INPUT_NAME],
                output_names=[spec.output_name],
                dynamic_shapes={"pixel_values": {0: batch}},
                optimize=True,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; each is a failed export of this model
            first = _ANSI.sub("", str(e)).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise VitexportError(f"torch.onnx could not export {spec.source} ({e.__class__.__name__}: {first})") from None
    model = program.model_proto
    model.producer_name = "vitexport"
    strip_source_paths(model)
    dropped = drop_all_visible_attention_mask(model)
    if dropped:
        log.info("dropped an all-visible attention mask added to %d attention score tensors", dropped)
    model.graph.output[0].doc_string = _output_doc(spec, embedding)
    save_onnx(model, ref.path, ref.metadata())


EXPORT_FORMAT = 1  # bump when what the cached reference ONNX holds changes meaning


def export_key(ref: Reference, module) -> str:
    """sha256 of what the exported graph is made from: every tensor of the module's state dict, its structure,
    the metadata written into the file, the opset, the exporter's and the model code's versions, and the source of
    this module and model.py (the code that shapes the graph: a change to it is a new key, never a stale hit)."""
    import onnx
    import onnxscript
    import torch
    import transformers

    h = hashlib.sha256()

    def put(b: bytes) -> None:
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)

    put(repr((EXPORT_FORMAT, ref.opset, torch.__version__, onnx.__version__, onnxscript.__version__, transformers.__version__)).encode())
    for source in (Path(__file__), Path(__file__).with_name("model.py")):
        put(source.read_bytes())
    put(json.dumps(ref.metadata(), sort_keys=True).encode())
    put_module(put, module)
    return h.hexdigest()


def put_module(put, module) -> None:
    """Feed a torch module's structure and every parameter and buffer (name, dtype, shape, bytes) to a key's
    ``put(bytes)``: what a cache entry made from the module depends on (this file's and CoreML's conversion keys)."""
    import torch

    put(repr(module).encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        put(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        put(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _cache_entry(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"reference-{key[:32]}"


def _cached_reference(cache_dir, key: str, out_dir: Path) -> bool:
    """Copy the cached reference (model.onnx and its weights file, if any) into ``out_dir``; False when none."""
    entry = _cache_entry(cache_dir, key)
    if not (entry / "model.onnx").is_file():
        return False
    try:
        for f in entry.iterdir():
            shutil.copyfile(f, out_dir / f.name)
    except OSError as e:
        log.warning("cache: cannot read %s (%s); exporting instead", entry, e)
        _clear(out_dir)
        return False
    from .quantization.cache import touch

    touch(entry)  # used now: --cache-max-size removes the least recently used entries first
    log.info("cache: reference ONNX from %s", entry)
    return True


def _clear(out_dir: Path) -> None:
    """Remove what a cache copy left in ``out_dir``: a stray ``model.onnx.data`` beside a freshly traced model would
    change the reference's sha256 (cache.file_sha256 reads it) though the model never reads it."""
    for f in out_dir.iterdir():
        if f.is_file():
            f.unlink()


def _store_reference(cache_dir, key: str, out_dir: Path) -> None:
    """The verified reference into the cache: copied into a temporary folder, then renamed (never half an entry)."""
    entry, tmp = _cache_entry(cache_dir, key), None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".reference-", dir=entry.parent))
        for f in out_dir.iterdir():
            if f.is_file():
                shutil.copyfile(f, tmp / f.name)
        os.rename(tmp, entry)  # fails when another build stored it first: theirs is kept
    except OSError as e:
        if not entry.is_dir():
            log.warning("cache: cannot write %s (%s)", entry, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # no half-written folder left behind (a full disk, say)


def _output_doc(spec: ModelSpec, embedding: str) -> str:
    """What the output is, in the ONNX file itself, for apps that read it without vitexport."""
    if spec.task == "classification":
        return f"logits [batch, {len(spec.id2label)}]: one score per label (softmax for probabilities); labels in metadata vitexport.labels"
    what = "the pooler output (dense + tanh on the CLS token)" if embedding == "pooler_output" else "the final hidden state of the CLS token"
    return f"embedding [batch, {spec.hidden_size}]: {what}"


def drop_all_visible_attention_mask(model) -> int:
    """Remove an additive attention mask that masks nothing. Returns how many score Adds were removed.

    Without an ``attention_mask`` argument transformers 5 still builds one for eager attention: Where(all true, 0,
    -3.4e38) expanded to [batch, 1, N, N] and added to every layer's scores before Softmax. It adds zero, costs an op
    per layer, and an Add between the score MatMul and Softmax is more than the fused attention patterns of TensorRT
    and OpenVINO have to match. The verification against PyTorch that follows checks the result like any export.
    """
    from onnx import numpy_helper

    g = model.graph
    consts = {t.name: t for t in g.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    ranks = _ranks(model)
    outputs = {o.name for o in g.output}

    def const(name):
        return numpy_helper.to_array(consts[name]) if name in consts else None

    removed = 0
    for where in [n for n in g.node if n.op_type == "Where"]:
        cond, x, mask = where.input[0], where.input[1], where.output[0]
        if producer.get(cond) is not None and producer[cond].op_type == "Expand":
            cond = producer[cond].input[0]
        c, zero = const(cond), const(x)
        if c is None or zero is None or not c.all() or np.any(zero != 0) or mask in outputs:
            continue
        users = consumers.get(mask, [])
        others = [u.input[1] if u.input[0] == mask else u.input[0] for u in users]
        # dropping "+ 0" is only exact when the Add does not broadcast its other input up to the mask's rank
        if not users or any(u.op_type != "Add" or u.output[0] in outputs for u in users):
            continue
        if any(ranks.get(o) is None or ranks.get(mask) is None or ranks[o] < ranks[mask] for o in others):
            continue
        for u, other in zip(users, others):
            for n in consumers.get(u.output[0], []):
                for k, i in enumerate(n.input):
                    if i == u.output[0]:
                        n.input[k] = other
            g.node.remove(u)
            removed += 1
    if removed:
        _drop_dead_nodes(model)
    return removed


def _ranks(model) -> dict[str, int]:
    from .quantization.graph import inferred_value_info

    return {v.name: len(v.type.tensor_type.shape.dim) for v in inferred_value_info(model) if v.type.tensor_type.HasField("shape")}


def _drop_dead_nodes(model) -> None:
    from .quantization.graph import drop_unused_constants

    g = model.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    drop_unused_constants(model)


def compare(module, onnx_path: Path, inputs: np.ndarray, output_name: str, batch: int = 8) -> tuple[dict[str, Any], np.ndarray]:
    """(how the ONNX at ``onnx_path``, in onnxruntime, agrees with ``module`` in PyTorch on ``inputs``; the ONNX's
    outputs on them, which the read-rows check reuses)."""
    import torch

    from .ort_session import ort_session

    sess = ort_session(onnx_path, what=f"the exported ONNX (an opset newer than this onnxruntime runs? the default is --opset {DEFAULT_OPSET})")
    torch_out, onnx_out = [], []
    with torch.inference_mode():
        for i in range(0, len(inputs), batch):
            x = np.ascontiguousarray(inputs[i : i + batch], dtype=np.float32)
            torch_out.append(module(torch.from_numpy(x)).numpy())
            onnx_out.append(sess.run([output_name], {INPUT_NAME: x})[0])
    t, o = np.concatenate(torch_out), np.concatenate(onnx_out)
    return {
        "n": int(len(t)),
        "finite": bool(np.isfinite(t).all() and np.isfinite(o).all()),
        "max_abs_diff": float(np.abs(t - o).max()),
        "top1_agreement": float((t.argmax(-1) == o.argmax(-1)).mean()),
        "against": f"torch {torch.__version__}",
    }, o


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx reports progress with print(): keep stdout clean for --json, keep the lines in the debug log."""
    buf = io.StringIO()
    noisy = logging.getLogger("torch.onnx")
    level = noisy.level
    noisy.setLevel(logging.ERROR)  # e.g. "torchvision is not installed. Skipping torchvision::nms"
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        noisy.setLevel(level)
    for line in buf.getvalue().splitlines():
        log.debug("torch.onnx: %s", line)
