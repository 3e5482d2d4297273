"""Artifacts, their manifests, and writes that never leave something that looks finished but is not."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata as _md
from pathlib import Path
from typing import Any, Iterator, Mapping

from .errors import VitexportError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
_TOOLS = ("vitexport", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf", "coremltools", "tensorrt", "numpy", "pillow")


def tool_versions(names: tuple[str, ...] = _TOOLS) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            continue
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@dataclass(frozen=True)
class Artifact:
    """One device-ready model: its folder, main file, and how it was made."""

    backend: str
    precision: str
    directory: Path
    main: str  # file or bundle inside `directory` that a runtime loads
    manifest: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def path(self) -> Path:
        return self.directory / self.main

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def size_bytes(self) -> int:
        return int(self.manifest.get("size_bytes") or size_on_disk(self.path))

    @classmethod
    def load(cls, path: str | Path) -> "Artifact":
        """An artifact folder (or any file inside it) -> Artifact, from its manifest."""
        p = Path(path)
        if not p.exists():
            raise VitexportError(f"artifact not found: {p}")
        d = p if p.is_dir() and (p / MANIFEST).is_file() else p.parent
        if not (d / MANIFEST).is_file():
            raise VitexportError(f"{p} is not a vitexport artifact (no {MANIFEST} beside it): pass an artifact folder from a build's output")
        try:
            m = json.loads((d / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise VitexportError(f"{d / MANIFEST} is corrupt ({e}): rebuild the artifact") from None
        return cls(m["backend"], m["precision"], d, m["main"], m)


def write_manifest(
    directory: Path,
    *,
    backend: str,
    precision: str,
    main: str,
    model: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    labels: list[str],
    io: Mapping[str, Any],
    recipe: Mapping[str, Any],
    extra_tools: tuple[str, ...] = (),
) -> Artifact:
    """Hash every file in `directory` and write manifest.json last, so its presence means 'complete'."""
    files = []
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files.append({"path": str(p.relative_to(directory)), "size_bytes": p.stat().st_size, "sha256": sha256(p)})
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "backend": backend,
        "precision": precision,
        "main": main,
        "size_bytes": size_on_disk(directory / main),
        "files": files,
        "model": dict(model),
        "preprocessing": dict(preprocessing),
        "labels": list(labels),
        "io": dict(io),
        "recipe": dict(recipe),
        "tools": tool_versions(_TOOLS + tuple(extra_tools)),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return Artifact(backend, precision, directory, main, manifest)


def check_output(out: Path, force: bool) -> None:
    """Fail before any slow work if `out` cannot become the output folder."""
    if out.exists() and not out.is_dir():
        raise VitexportError(f"output path {out} is a file, not a folder: choose another --out")
    if out.exists() and not force:
        raise VitexportError(f"output folder {out} already exists: pass --force to replace it, or choose another --out")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
                raise VitexportError(f"cannot write to {parent}: choose another --out")
            break


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename.

    On any error the temporary folder is removed and `out` is left as it was.
    """
    out = Path(out)
    check_output(out, force)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    except OSError as e:
        raise VitexportError(f"cannot write to {parent}: {e.strerror}: choose another --out") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- ONNX files

ONNX_2GB = 2**31 - 1


def save_onnx(model, path: Path, metadata: Mapping[str, Any] | None = None) -> None:
    """Save an ONNX model; past protobuf's 2 GB limit the weights go to `<name>.data` beside it."""
    import onnx

    if metadata:
        embed_metadata(model, metadata)
    big = sum(_initializer_nbytes(t) for t in model.graph.initializer) > ONNX_2GB - (64 << 20)
    if big:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def _initializer_nbytes(t) -> int:
    if t.raw_data:
        return len(t.raw_data)
    n = 1
    for d in t.dims:
        n *= d
    return n * 4


def embed_metadata(model, metadata: Mapping[str, Any]) -> None:
    """Key/values into ONNX metadata_props (JSON-encoded), so the .onnx alone says how to feed it."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key = k
        entry.value = v if isinstance(v, str) else json.dumps(v)
