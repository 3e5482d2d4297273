"""Measuring artifacts on devices over SSH (`--remote`): the host side.

Only the system OpenSSH client is used (``ssh``, in batch mode), so users' ~/.ssh/config, keys, agents and jump hosts
work and vitexport handles no passwords. For each device, in its own thread (one ssh at a time per device):

1. one ssh to look: python there, cache folders, what the cache already holds, free disk;
2. the runner (``device_runner.py``: stdlib + numpy + the runtime) and a probe of the device's facts and runtimes;
3. copies into a content-addressed cache (``~/.cache/vitexport`` by default): artifact folders keyed by the sha256 of
   their manifest (which hashes every file), the preprocessed images keyed by theirs. Each copy is a tar stream
   unpacked into a temporary folder on the device and renamed into place, so a cache entry is complete or absent;
4. one ssh that runs every artifact there and returns the raw outputs and timings as JSON.

Scoring happens here, on the host, with the shared harness: the device's outputs against the labels and against the
fp32 reference outputs computed once on the host. Device rows carry ``measured_on`` (the device's name and facts).
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import json
import logging
import shlex
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..artifacts import sha256
from ..errors import VitexportError

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("device_runner.py")
DEFAULT_CACHE = ".cache/vitexport"  # relative to the device user's home
DEFAULT_TIMEOUT = 3600.0
EXIT_MISSING = 3  # device_runner.py: numpy or a runtime is missing
SKIP_FILES = {"model.engine", "engine.json"}  # an engine built elsewhere is no use on the device: it builds its own
EMULATED_TIMING_NOTE = "latency not measured: the device is emulated ({}); its arithmetic is the target's, its timings are not"
SHIPPED_NOTE = "images preprocessed on the host once and shipped as one float32 array: devices measure the artifact's own numerics, not their image decoder"


@dataclass(frozen=True)
class Device:
    """One SSH destination and how to run there."""

    dest: str  # user@host or a Host alias of ~/.ssh/config
    name: str  # how its rows are labelled (measured_on)
    python: str = "python3"
    cache: str = DEFAULT_CACHE
    timeout: float = DEFAULT_TIMEOUT
    ssh_config: str | None = None


def parse_devices(specs: Sequence[str], python: str | None = None, timeout: float | None = None, cache: str | None = None, ssh_config: str | None = None) -> tuple[Device, ...]:
    """``--remote [NAME=]DEST`` values -> Devices; one clear error for a bad one."""
    out: list[Device] = []
    for spec in specs:
        name, sep, dest = spec.partition("=")
        if not sep:
            name, dest = spec, spec
        if not dest or dest.startswith("-") or any(c.isspace() for c in dest) or not name:
            raise VitexportError(f"bad --remote {spec!r}: give USER@HOST or an ssh alias, optionally NAME=USER@HOST")
        if timeout is not None and timeout <= 0:
            raise VitexportError(f"--remote-timeout must be positive, not {timeout}")
        if ssh_config and not Path(ssh_config).is_file():
            raise VitexportError(f"ssh config {ssh_config} not found: pass an existing file to --ssh-config")
        c = cache or DEFAULT_CACHE
        c = c[2:] if c.startswith("~/") else c  # the remote shell starts in the home folder
        out.append(Device(dest, name, python or "python3", c, float(timeout or DEFAULT_TIMEOUT), ssh_config))
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise VitexportError(f"--remote names must differ ({', '.join(names)}): label them NAME=USER@HOST")
    return tuple(out)


def manifest_sha256(directory: Path) -> str:
    """An artifact's identity: the sha256 of its manifest, which itself hashes every file of the artifact."""
    return hashlib.sha256((Path(directory) / "manifest.json").read_bytes()).hexdigest()


# ---------------------------------------------------------------- ssh


class Session:
    """The ssh processes of one measurement, so Ctrl-C, a timeout or another device's failure can stop them all."""

    def __init__(self) -> None:
        self._procs: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.cancelled = threading.Event()

    def popen(self, cmd: list[str]) -> subprocess.Popen:
        if self.cancelled.is_set():
            raise VitexportError("cancelled")
        # a session of its own: a terminal's Ctrl-C reaches vitexport, which stops every ssh itself (cancel())
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        with self._lock:
            self._procs.add(p)
        return p

    def done(self, p: subprocess.Popen) -> None:
        with self._lock:
            self._procs.discard(p)

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            procs = list(self._procs)
        for p in procs:  # closing ssh closes the device command's stdin: device_runner.py and tar stop there too
            try:
                p.kill()
            except OSError:
                pass


def _ssh_base(dev: Device) -> list[str]:
    cmd = ["ssh", "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if dev.ssh_config:
        cmd += ["-F", dev.ssh_config]
    return cmd + [dev.dest]


def _ssh_error(dev: Device, stderr: str) -> VitexportError:
    """ssh's own failure (exit 255) as one line that says what to do."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "no message"
    if "Permission denied" in stderr or "Too many authentication failures" in stderr:
        return VitexportError(f"{dev.name}: authentication refused by {dev.dest} ({last}): vitexport runs ssh in batch mode, keys or an agent only, no passwords: add your key there (ssh-copy-id {dev.dest}) or set IdentityFile in your ssh config")
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        return VitexportError(f"{dev.name}: the host key of {dev.dest} is unknown or has changed: connect once with `ssh {dev.dest}` to check and accept it")
    if "Could not resolve hostname" in stderr:
        return VitexportError(f"{dev.name}: cannot resolve {dev.dest} ({last}): check the name, or add it to your ssh config")
    return VitexportError(f"{dev.name}: cannot reach {dev.dest} ({last}): is the device on, and its sshd running?")


def _ssh(session: Session, dev: Device, remote: str, timeout: float, feed=None, what: str = "") -> tuple[int, str, str]:
    """Run `remote` (a shell command line) on the device. `feed(stdin)` streams input; otherwise stdin stays open
    (and unused) until the command ends, so the device side sees EOF, and stops, only when this ssh goes away."""
    p = session.popen(_ssh_base(dev) + ["sh -c " + shlex.quote(remote)])  # POSIX sh whatever the login shell is
    bufs: dict[str, bytes] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: bufs.__setitem__(k, s.read()), daemon=True) for k, s in (("out", p.stdout), ("err", p.stderr))]
    for t in readers:
        t.start()
    timed_out = False
    try:
        if feed is not None:
            try:
                feed(p.stdin)
                p.stdin.close()
            except (BrokenPipeError, ConnectionResetError, ValueError, OSError):
                pass  # the device side failed: its stderr says why
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            p.kill()
            p.wait()
        for t in readers:
            t.join()
    finally:
        try:
            p.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        session.done(p)
    if session.cancelled.is_set():
        raise VitexportError(f"{dev.name}: cancelled")
    out = bufs.get("out", b"").decode("utf-8", "replace")
    err = bufs.get("err", b"").decode("utf-8", "replace")
    if timed_out:
        raise VitexportError(f"{dev.name}: {what or 'the device'} did not finish within {timeout:.0f} s (--remote-timeout): raise it, or use fewer images (--num-eval / --limit)")
    if p.returncode == 255:
        raise _ssh_error(dev, err)
    return p.returncode, out, err


# ---------------------------------------------------------------- the cache on the device


def _q(s: str) -> str:
    return shlex.quote(s)


def _look(session: Session, dev: Device, keys: Mapping[str, str]) -> dict[str, Any]:
    """One ssh: is python there, can the cache be made, which entries exist, how much disk is free."""
    c, py = _q(dev.cache), _q(dev.python)
    checks = "".join(f'[ -e {c}/{_q(path)} ] && echo "VX have {key}"; ' for key, path in keys.items())
    script = (
        f'mkdir -p {c}/artifacts {c}/inputs {c}/runner {c}/tmp {c}/engines 2>/dev/null || {{ echo "VX nocache"; exit 0; }}; '
        f"find {c}/tmp -mindepth 1 -maxdepth 1 -mmin +120 -exec rm -rf {{}} + 2>/dev/null; "  # copies orphaned by a lost link
        f'if command -v {py} >/dev/null 2>&1; then echo "VX python $({py} -c \'import sys; print(\"%d.%d\" % sys.version_info[:2])\' 2>/dev/null || echo broken)"; '
        f'else echo "VX nopython"; fi; '
        f"{checks}"
        f'echo "VX free_kb $(df -Pk {c} | awk \'NR==2 {{print $4}}\')"; '
        'command -v timeout >/dev/null 2>&1 && echo "VX timeout"; echo "VX end"'
    )
    rc, out, err = _ssh(session, dev, script, 120, what="looking at the device")
    facts: dict[str, Any] = {"have": set()}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or parts[0] != "VX":
            continue
        if parts[1] == "have":
            facts["have"].add(parts[2])
        elif parts[1] in ("python", "free_kb"):
            facts[parts[1]] = parts[2] if len(parts) > 2 else ""
        else:
            facts[parts[1]] = True
    if "end" not in facts and "nocache" not in facts:
        raise VitexportError(f"{dev.name}: the device's shell did not answer as expected ({(err.strip() or out.strip())[:200]})")
    if facts.get("nocache"):
        raise VitexportError(f"{dev.name}: cannot create the cache folder {dev.cache} there: pass a writable --remote-cache DIR")
    if "python" not in facts:
        raise VitexportError(f"{dev.name}: no {dev.python} on {dev.dest}: install Python 3.9+ there (sudo apt install python3) or pass --remote-python PATH")
    ver = facts["python"]
    try:
        ok = tuple(int(v) for v in ver.split(".")) >= (3, 9)
    except ValueError:
        ok = False
    if not ok:
        raise VitexportError(f"{dev.name}: {dev.python} on {dev.dest} is {'not a working python' if ver == 'broken' else 'Python ' + ver}: the device runner needs Python 3.9+ (pass --remote-python PATH)")
    return facts


def _free_check(dev: Device, free_kb: str | None, need: int) -> None:
    try:
        free = int(free_kb or "") * 1024
    except ValueError:
        return
    if need and free < need + (16 << 20):  # a margin for the runtime's own scratch files
        raise VitexportError(f"{dev.name}: the device's disk is full: {free / 1e6:.0f} MB free in {dev.cache}, the copies need {need / 1e6:.0f} MB: free space there or pass --remote-cache DIR on a bigger disk")


def _copy(session: Session, dev: Device, files: Sequence[tuple[Path, str]], dest: str, timeout: float) -> None:
    """Stream `files` (path on the host, name in the entry) as one tar into a temporary folder on the device, then
    rename it to `dest` (relative to the cache). An interrupted copy leaves no entry: only a temporary folder that the
    device's shell removes on exit (and the next look removes if the link died before that)."""
    c = _q(dev.cache)
    remote = (
        f'd=$(mktemp -d {c}/tmp/copy.XXXXXX) || exit 4; trap \'rm -rf "$d"\' EXIT HUP INT TERM PIPE; '
        f'tar -xf - -C "$d" || exit 5; '
        f'if [ -e {c}/{_q(dest)} ]; then exit 0; fi; mv "$d/entry" {c}/{_q(dest)}'
    )

    def feed(stdin) -> None:
        with tarfile.open(fileobj=stdin, mode="w|") as tar:
            for path, name in files:
                tar.add(str(path), arcname=f"entry/{name}" if name else "entry", recursive=False)

    rc, _, err = _ssh(session, dev, remote, timeout, feed=feed, what=f"copying {dest}")
    if rc != 0:
        if "No space left" in err or "Disk quota" in err:
            raise VitexportError(f"{dev.name}: the device's disk is full while copying {dest} into {dev.cache} (nothing was left half-copied): free space there or pass --remote-cache DIR")
        line = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), f"exit {rc}")
        raise VitexportError(f"{dev.name}: copying {dest} to the device failed: {line.strip()[:200]}")


def _artifact_files(directory: Path) -> list[tuple[Path, str]]:
    m = json.loads((directory / "manifest.json").read_text())
    names = [f["path"] for f in m.get("files", []) if Path(f["path"]).name not in SKIP_FILES]
    return [(directory / n, n) for n in names] + [(directory / "manifest.json", "manifest.json")]


# ---------------------------------------------------------------- one device


@dataclass(frozen=True)
class DeviceRun:
    device: Device
    facts: Mapping[str, Any]
    runtimes: Mapping[str, Any]
    results: tuple[Mapping[str, Any], ...]
    seconds: float
    copied_bytes: int


@dataclass(frozen=True)
class Job:
    """What every device runs: these artifacts on these inputs."""

    artifacts: tuple[Path, ...]  # artifact folders on the host
    inputs: Path  # float32 .npy, preprocessed on the host
    batch: int = 32
    threads: int | None = None
    latency: bool = True
    throughput_batch: int = 16


def run_on_device(session: Session, dev: Device, job: Job, progress=None) -> DeviceRun:
    start = time.perf_counter()
    runner_sha = sha256(RUNNER)[:16]
    shas = {d: manifest_sha256(d) for d in job.artifacts}
    inputs_sha = sha256(job.inputs)
    keys = {f"runner-{runner_sha}": f"runner/{runner_sha}/device_runner.py", **{s: f"artifacts/{s}" for s in shas.values()}, f"inputs-{inputs_sha}": f"inputs/{inputs_sha}.npy"}
    say = (lambda msg: progress.step(f"{dev.name}: {msg}")) if progress else (lambda msg: None)
    say(f"connecting to {dev.dest}")
    look = _look(session, dev, keys)
    have = look["have"]
    if f"runner-{runner_sha}" not in have:
        _copy(session, dev, [(RUNNER, "device_runner.py")], f"runner/{runner_sha}", 300)
    runner = f"runner/{runner_sha}/device_runner.py"
    backends = sorted({json.loads((d / "manifest.json").read_text())["backend"] for d in job.artifacts})
    rc, out, err = _ssh(session, dev, f"cd {_q(dev.cache)} && {_q(dev.python)} {runner} probe --backends {','.join(backends)} </dev/null", 300, what="probing the device")
    if rc != 0:
        raise VitexportError(f"{dev.name}: the device runner failed to start with {dev.python}: {_last(err, rc)}")
    probe = json.loads(out.strip().splitlines()[-1])
    if probe["missing"]:
        what = "; ".join(f"{name}: {hint}" for name, hint in probe["missing"].items())
        raise VitexportError(f"{dev.name}: missing on {dev.dest} for {probe.get('python_executable', dev.python)}: {what}")
    todo = [(d, s) for d, s in shas.items() if s not in have]
    need = sum(sum(p.stat().st_size for p, _ in _artifact_files(d)) for d, _ in todo)
    if f"inputs-{inputs_sha}" not in have:
        need += job.inputs.stat().st_size
    _free_check(dev, look.get("free_kb"), need)
    for d, s in todo:
        say(f"copying {d.name} ({sum(p.stat().st_size for p, _ in _artifact_files(d)) / 1e6:.1f} MB, once: cached by sha256)")
        _copy(session, dev, _artifact_files(d), f"artifacts/{s}", dev.timeout)
    if f"inputs-{inputs_sha}" not in have:
        say(f"copying the preprocessed images ({job.inputs.stat().st_size / 1e6:.1f} MB)")
        _copy(session, dev, [(job.inputs, "")], f"inputs/{inputs_sha}.npy", dev.timeout)
    copied = need
    spec = {
        "artifacts": [{"name": d.name, "dir": f"artifacts/{s}", "sha256": s} for d, s in shas.items()],
        "inputs": f"inputs/{inputs_sha}.npy",
        "batch": job.batch,
        "threads": job.threads,
        "latency": job.latency and not probe["facts"].get("emulation"),
        "throughput_batch": job.throughput_batch,
        "engines_dir": "engines",
    }
    b64 = base64.b64encode(json.dumps(spec).encode()).decode()
    limit = f"timeout -k 10 {int(dev.timeout)} " if look.get("timeout") else ""
    say(f"running {len(shas)} artifact{'s' if len(shas) > 1 else ''} there")
    rc, out, err = _ssh(session, dev, f"cd {_q(dev.cache)} && exec {limit}{_q(dev.python)} {runner} run {b64}", dev.timeout + 30, what="the run")
    if rc in (124, 137) and limit:
        raise VitexportError(f"{dev.name}: the run did not finish within {dev.timeout:.0f} s (--remote-timeout): raise it, or use fewer images (--num-eval / --limit)")
    if rc == EXIT_MISSING:
        raise VitexportError(f"{dev.name}: {_tagged(err, 'MISSING') or _last(err, rc)}")
    if rc != 0:
        raise VitexportError(f"{dev.name}: the run failed on the device: {_tagged(err, 'ERROR') or _last(err, rc)}")
    try:
        result = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise VitexportError(f"{dev.name}: the device runner returned no result ({_last(err, rc)})") from None
    return DeviceRun(dev, result["facts"], probe["runtimes"], tuple(result["results"]), round(time.perf_counter() - start, 2), copied)


def _tagged(err: str, tag: str) -> str | None:
    for line in err.splitlines():
        if line.startswith(tag + ": "):
            return line[len(tag) + 2 :].strip()
    return None


def _last(err: str, rc: int) -> str:
    lines = [ln.strip() for ln in err.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit status {rc}"


def run_on_devices(devices: Sequence[Device], job: Job, progress=None) -> list[DeviceRun]:
    """Every device in parallel (one thread and one ssh at a time each); the first failure, or Ctrl-C, stops all."""
    session = Session()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(len(devices), 1), thread_name_prefix="vitexport-remote")
    futures = [pool.submit(run_on_device, session, d, job, progress) for d in devices]
    try:
        for f in concurrent.futures.as_completed(futures):
            f.result()  # raises the first failure
        return [f.result() for f in futures]
    except BaseException:
        session.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- rows, scored on the host


def decode_outputs(result: Mapping[str, Any]) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(result["outputs_npy_b64"])), allow_pickle=False)


def measured_on(run: DeviceRun) -> dict[str, Any]:
    return {"name": run.device.name, "ssh": run.device.dest, "facts": dict(run.facts), "runtimes": dict(run.runtimes), "seconds": run.seconds}


def device_notes(run: DeviceRun, result: Mapping[str, Any]) -> list[str]:
    f = run.facts
    notes = [f"measured on {run.device.name} ({f.get('cpu')}, {f.get('cores')} cores, {', '.join(f.get('cpu_features') or []) or 'no int8 dot-product/VNNI features'}; {f.get('os')}; {result.get('runtime')})"]
    if f.get("emulation"):
        notes.append(EMULATED_TIMING_NOTE.format(f["emulation"]))
    engine = result.get("engine")
    if engine:
        notes.append(f"engine built on the device with build_engine.py (TensorRT {engine.get('tensorrt')}, {engine.get('seconds')} s{', cached' if engine.get('cached') else ''})")
    trtexec = result.get("trtexec")
    if trtexec and trtexec.get("found") and (trtexec.get("latency") or {}).get("median") is not None:
        notes.append(f"trtexec batch-1 latency median {trtexec['latency']['median']:.3f} ms ({trtexec['path']})")
    elif trtexec and not trtexec.get("found"):
        notes.append("trtexec not found on the device (looked on PATH and under /usr/src/tensorrt/bin)")
    return notes


def measure(
    devices: Sequence[Device],
    artifacts: Sequence[Any],
    inputs: Path,
    labels: Sequence[int | None] | None,
    classifier: bool,
    reference_outputs: np.ndarray | None,
    row,
    *,
    threads: int | None = None,
    latency: bool = True,
    batch_size: int = 32,
    throughput_batch: int = 16,
    score: bool = True,
    progress=None,
) -> list:
    """Rows for every artifact on every device: outputs scored here against labels and the host's fp32 reference
    outputs (computed once), latency and memory as the device measured them. `row(artifact, **fields)` makes a Row."""
    from ..harness import accuracy as _accuracy

    job = Job(tuple(Path(a.directory) for a in artifacts), Path(inputs), batch_size, threads, latency, throughput_batch)
    start = time.perf_counter()
    runs = run_on_devices(devices, job, progress)
    wall = round(time.perf_counter() - start, 2)  # the devices ran in parallel: this against the sum of their seconds
    rows = []
    for run in runs:
        for art, res in zip(artifacts, run.results):
            acc = None
            if score:
                outputs = decode_outputs(res)
                acc = _accuracy.score(outputs, labels if labels is not None else [None] * len(outputs), reference_outputs, classifier, False).to_dict()
            rows.append(row(art, accuracy=acc, latency=res.get("latency"), memory=res.get("memory"), notes=tuple(device_notes(run, res)), measured_on={**measured_on(run), "wall_seconds": wall}))
    return rows


def describe_devices(rows: Sequence[Any]) -> list[str]:
    """One line per device that measured rows: what decides how an artifact runs there."""
    seen: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        mo = getattr(r, "measured_on", None) or {}
        if isinstance(mo, Mapping) and mo.get("facts") and mo.get("ssh"):
            seen.setdefault(mo["name"], mo)
    lines = []
    for name, mo in seen.items():
        f = mo["facts"]
        runtimes = ", ".join(f"{k} {v}" for k, v in (mo.get("runtimes") or {}).items() if v)
        board = f"{f['board']}, " if f.get("board") else ""
        feats = ", ".join(f.get("cpu_features") or []) or "none of the int8 dot-product/VNNI features"
        emu = f"; EMULATED ({f['emulation']}): timings are not the device's" if f.get("emulation") else ""
        lines.append(f"{name}: {board}{f.get('cpu')} ({f.get('machine')}, {f.get('cores')} cores, {feats}), {f.get('memory_mb')} MB, {f.get('os')}, Python {f.get('python')}, {runtimes}{emu}")
    return lines
