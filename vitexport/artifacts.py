"""Artifacts, their manifests, and writes that never leave something that looks finished but is not."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
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
    def load(cls, path: str | Path, verify: bool = True) -> "Artifact":
        """An artifact folder (or any file inside it) -> Artifact, from its manifest.

        The manifest is checked before anything runs: its fields, that `main` and every file stay inside the folder,
        and (unless `verify` is False, for artifacts edited on purpose) every file's size and sha256.
        """
        p = Path(path)
        if not p.exists():
            raise VitexportError(f"artifact not found: {p}")
        d = p if p.is_dir() and (p / MANIFEST).is_file() else p.parent
        if not (d / MANIFEST).is_file():
            raise VitexportError(f"{p} is not a vitexport artifact (no {MANIFEST} beside it): pass an artifact folder from a build's output")
        try:
            m = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VitexportError(f"{d / MANIFEST} is corrupt ({e}): rebuild the artifact") from None
        _check_manifest(d, m, verify)
        return cls(m["backend"], m["precision"], d, m["main"], m)


def _inside(directory: Path, rel: str) -> bool:
    return (directory / rel).resolve().is_relative_to(directory.resolve())


def _check_manifest(d: Path, m: Any, verify: bool) -> None:
    where = d / MANIFEST
    if not isinstance(m, dict):
        raise VitexportError(f"{where} is not a vitexport manifest (not a JSON object): rebuild the artifact")
    for key, kind in (("backend", str), ("precision", str), ("main", str), ("preprocessing", dict), ("io", dict), ("files", list)):
        if not isinstance(m.get(key), kind):
            raise VitexportError(f"{where} is not a vitexport manifest ('{key}' missing or not a {kind.__name__}): rebuild the artifact")
    shape = m["io"].get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[1:])):
        raise VitexportError(f"{where} has no valid io.input_shape (['batch', C, H, W]): rebuild the artifact")
    if not isinstance(m.get("labels", []), list):
        raise VitexportError(f"{where} has 'labels' that are not a list: rebuild the artifact")
    try:
        from .data import Preprocessing

        Preprocessing.from_dict(m["preprocessing"]).output_size
    except (TypeError, ValueError, VitexportError) as e:
        raise VitexportError(f"{where} has damaged preprocessing ({e}): rebuild the artifact") from None
    entries = [f for f in m["files"] if isinstance(f, dict) and isinstance(f.get("path"), str)]
    for rel in [m["main"], *(f["path"] for f in entries)]:
        if not _inside(d, rel):
            raise VitexportError(f"{where} points outside its folder ({rel}): refusing to follow it; rebuild the artifact")
    if not (d / m["main"]).exists():
        raise VitexportError(f"artifact {d} is incomplete: its main file {m['main']} is missing (copy the whole folder, or rebuild it)")
    for f in entries:
        target = d / f["path"]
        if not target.is_file():
            raise VitexportError(f"artifact {d} is incomplete: {f['path']} is missing (copy the whole folder, or rebuild it)")
        if verify and (target.stat().st_size != f.get("size_bytes") or sha256(target) != f.get("sha256")):
            raise VitexportError(
                f"{target} does not match the sha256 in its manifest (changed or damaged since the build): rebuild the artifact, "
                "or pass --ignore-sha256 if you edited it on purpose"
            )


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


BUILD_FILE = ".vitexport-build.json"  # in a partial folder: which process is writing it (a dead one's is stale)


def _lock_path(out: Path) -> Path:
    out = out.absolute()
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` for a whole build: a second build into the same folder fails at once.

    The lock is flock(2) on `.<out>.lock` beside it, so the kernel releases it when a build dies, even by SIGKILL.
    The file is removed on release; a build that locked a file someone removed meanwhile locks again.
    """
    import fcntl

    path = _lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VitexportError(f"cannot write to {path.parent}: {e.strerror}: choose another --out") from None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise VitexportError(f"another vitexport build (pid {holder}) is writing {out}: wait for it to finish, or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def clean_stale_partials(out: Path) -> list[str]:
    """Under `output_lock(out)`: remove the partial folders that dead builds into `out` left (SIGKILL, power loss).

    Only folders with vitexport's build file are removed (no live build can own them while we hold the lock);
    anything else that looks like one is named, not touched. Returns what was said.
    """
    out = out.absolute()
    said = []
    for p in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        info = p / BUILD_FILE
        if p.is_dir() and info.is_file() and ".partial-" in p.name:
            try:
                pid = json.loads(info.read_text()).get("pid", "?")
            except (OSError, ValueError):
                pid = "?"
            shutil.rmtree(p, ignore_errors=True)
            said.append(f"removed {p}, the partial output of a build that died (pid {pid})")
        else:
            said.append(f"{p} looks like the leftover of an interrupted build that vitexport cannot vouch for: check it and remove it")
    for line in said:
        logging.getLogger(__name__).warning(line)
    return said


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename.

    On any error (or interrupt) the temporary folder is removed and `out` is left as it was. The folder carries a
    build file with this process's pid until the rename, so a rerun can tell a dead build's leftovers. `out` is
    checked again just before the rename: a folder that appeared meanwhile is replaced only with --force.
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
        os.chmod(tmp, _umask_mode())  # mkdtemp makes 0700; the output should have the mode any new folder gets
        (tmp / BUILD_FILE).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "out": str(out.absolute()), "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}))
        yield tmp
        check_output(out, force)  # again: someone may have created it while we worked
        (tmp / BUILD_FILE).unlink()
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
