"""`--remote`: artifacts measured on a device over a REAL ssh connection, scored on the host.

The device is this machine seen through its own sshd on 127.0.0.1 (random free port, throwaway host and client keys,
no passwords, stopped afterwards), and its python is a separate venv that has ONLY onnxruntime + numpy: no torch, no
transformers, no onnx, no vitexport. Nothing about ssh is mocked. TensorRT on a "Jetson" runs the artifact's own
build_engine.py and the TensorRT Python API against a stand-in tensorrt + cuda module (engines are "built" and "run"
by onnxruntime), through the same ssh path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from vitexport import remote
from vitexport.cli import main

CACHE = Path(os.environ.get("VITEXPORT_TEST_CACHE", Path.home() / ".cache" / "vitexport-tests"))


def _versions() -> tuple[str, str]:
    import onnxruntime

    return onnxruntime.__version__, np.__version__


def _venv(name: str, packages: list[str]) -> Path:
    """A venv of its own (no system site-packages), cached across test sessions; built aside and renamed into place."""
    key = "-".join([name, f"py{sys.version_info[0]}{sys.version_info[1]}", *[p.replace("==", "") for p in packages]])
    final = CACHE / key
    if (final / "ok").is_file():
        return final / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
    if packages:
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages], check=True)
    (tmp / "ok").write_text("\n".join(packages))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)  # bin/python finds its packages beside pyvenv.cfg, wherever the folder is
    return final / "bin" / "python"


@pytest.fixture(scope="session")
def device_python() -> Path:
    ort, npv = _versions()
    return _venv("device", [f"onnxruntime=={ort}", f"numpy=={npv}"])


@pytest.fixture(scope="session")
def numpy_only_python() -> Path:
    return _venv("numpy-only", [f"numpy=={np.__version__}"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sshd_binary() -> str:
    path = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if path and shutil.which("ssh") and shutil.which("ssh-keygen"):
        return path
    if os.geteuid() != 0:
        pytest.skip("openssh-server is not installed and this is not root: apt-get install openssh-server")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server", "openssh-client"], check=True, env=env, stdout=subprocess.DEVNULL)
    return shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real sshd on 127.0.0.1:<free port>; yields the ssh config file whose Host aliases reach it."""
    binary = _sshd_binary()
    d = tmp_path_factory.mktemp("sshd")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation folder
    for key in ("host", "client", "stranger"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copyfile(d / "client.pub", d / "authorized_keys")
    port, down = _free_port(), _free_port()
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    (d / "sshd_config").write_text(
        textwrap.dedent(
            f"""\
            Port {port}
            ListenAddress 127.0.0.1
            HostKey {d}/host
            PidFile {d}/sshd.pid
            AuthorizedKeysFile {d}/authorized_keys
            UsePAM no
            StrictModes no
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PubkeyAuthentication yes
            PermitRootLogin prohibit-password
            MaxStartups 64
            MaxSessions 64
            LogLevel ERROR
            """
        )
    )
    host_pub = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")

    def entry(alias: str, p: int, key: str) -> str:
        return (
            f"Host {alias}\n  HostName 127.0.0.1\n  Port {p}\n  User {user}\n  IdentityFile {d}/{key}\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {d}/known_hosts\n  StrictHostKeyChecking yes\n  PasswordAuthentication no\n  LogLevel ERROR\n"
        )

    (d / "ssh_config").write_text(entry("device", port, "client") + entry("device2", port, "client") + entry("stranger", port, "stranger") + entry("down", down, "client"))
    proc = subprocess.Popen([binary, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "w"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
            time.sleep(0.1)
    yield d / "ssh_config"
    proc.terminate()
    proc.wait(10)


@pytest.fixture()
def device_cache(tmp_path) -> Path:
    return tmp_path / "device-cache"  # absolute: this machine is the device


def _remote(sshd, python, cache, name="device") -> list[str]:
    return ["--remote", name, "--remote-python", str(python), "--ssh-config", str(sshd), "--remote-cache", str(cache)]


@pytest.fixture(scope="module")
def dist(tiny_vit, image_folder, calib_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("remote") / "dist"
    args = ["build", "--model", str(tiny_vit), "--eval", str(image_folder), "--calib", str(calib_folder), "--out", str(out), "--no-latency", "--precision", "fp32,int8", "--quiet"]
    assert main(args) == 0
    return out


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def _one_line_error(capsys) -> str:
    """Progress lines may come first; the failure itself is one last line, and no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("vitexport: error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in ln for ln in err), err
    return errors[0]


def _where(row: dict) -> str:
    return (row.get("measured_on") or {}).get("name", "host")  # host rows carry none


def _entries(cache: Path) -> dict[str, list[str]]:
    return {sub: sorted(p.name for p in (cache / sub).iterdir()) if (cache / sub).is_dir() else [] for sub in ("artifacts", "inputs", "tmp")}


# ---------------------------------------------------------------- the device needs only its runtime and numpy


def test_device_python_has_only_the_runtime_and_numpy(sshd, device_python):
    """Asked through the same ssh the runs use: the device's python sees onnxruntime and numpy, nothing of ours."""
    code = "import importlib.util as u; print(*[m for m in ('torch', 'transformers', 'onnx', 'vitexport', 'PIL', 'tqdm', 'onnxruntime', 'numpy') if u.find_spec(m)])"
    r = subprocess.run(["ssh", "-F", str(sshd), "device", f"cd / && {device_python} -c \"{code}\""], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["onnxruntime", "numpy"]


def test_eval_on_the_device_matches_the_host(dist, image_folder, sshd, device_python, device_cache, capsys):
    """Same artifact, same preprocessed images: the device's outputs, scored here, give the host's figures."""
    art, ref = dist / "onnxruntime-int8", dist / "onnxruntime-fp32"
    assert main(["eval", str(art), "--images", str(image_folder), "--reference", str(ref), "--json"]) == 0
    host = _json(capsys)["rows"][1]
    assert main(["eval", str(art), "--images", str(image_folder), "--reference", str(ref), "--json", *_remote(sshd, device_python, device_cache)]) == 0
    report = _json(capsys)
    (row,) = report["rows"]
    assert row["name"] == "onnxruntime-int8" and row["measured_on"]["name"] == "device"
    facts = row["measured_on"]["facts"]
    assert facts["cores"] == os.cpu_count() and facts["machine"] and facts["os"] and "cpu_features" in facts
    assert row["measured_on"]["runtimes"] == {"onnxruntime": _versions()[0]}
    assert row["accuracy"]["n"] == 24 and row["accuracy"]["emulated"] is False
    for k in ("top1", "top5", "agreement", "lost", "gained"):
        assert row["accuracy"][k] == host["accuracy"][k], k
    assert abs(row["accuracy"]["cosine"] - host["accuracy"]["cosine"]) < 1e-6
    assert row["sha256"] == host["sha256"]  # the same artifact, as reports merge it
    assert "shipped" in report["evaluation"] and report["evaluation"]["devices"] == ["device"]
    assert _entries(device_cache)["artifacts"] == [remote.manifest_sha256(art)] and _entries(device_cache)["tmp"] == []


def test_bench_on_the_device_and_the_cache_copies_once(dist, sshd, device_python, device_cache, capsys):
    art = dist / "onnxruntime-fp32"
    assert main(["bench", str(art), *_remote(sshd, device_python, device_cache)]) == 0
    out = capsys.readouterr()
    assert "copying onnxruntime-fp32" in out.err and "\ndevice: " in out.out and "onnxruntime " in out.out
    entry = device_cache / "artifacts" / remote.manifest_sha256(art)
    stamp = entry.stat().st_mtime_ns
    assert main(["bench", str(art), "--json", *_remote(sshd, device_python, device_cache)]) == 0
    out = capsys.readouterr()
    assert "copying onnxruntime-fp32" not in out.err  # content-addressed: already there
    assert entry.stat().st_mtime_ns == stamp
    (row,) = json.loads(out.out)["rows"]
    lat = row["latency"]
    assert lat["p50_ms"] > 0 and lat["p90_ms"] >= lat["p50_ms"] and lat["runs"] >= 15 and lat["rounds"] == 3
    assert lat["runtime"] == f"onnxruntime {_versions()[0]}" and lat["throughput_ips"] > 0
    assert row["accuracy"] is None and row["memory"]["peak_mb"] is not None


def test_build_on_two_devices_in_parallel_one_report(tiny_vit, image_folder, calib_folder, sshd, device_python, tmp_path, capsys):
    out = tmp_path / "dist"
    cache = tmp_path / "cache"
    args = ["build", "--model", str(tiny_vit), "--eval", str(image_folder), "--calib", str(calib_folder), "--out", str(out), "--precision", "fp32,int8", "--json"]
    args += ["--remote", "pi-a=device", "--remote", "pi-b=device2", "--remote-python", str(device_python), "--ssh-config", str(sshd), "--remote-cache", str(cache)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    where = [(r["name"], _where(r)) for r in report["rows"]]
    assert where == [("onnxruntime-fp32", "host"), ("onnxruntime-int8", "host"), ("onnxruntime-fp32", "pi-a"), ("onnxruntime-int8", "pi-a"), ("onnxruntime-fp32", "pi-b"), ("onnxruntime-int8", "pi-b")]
    rows = {(r["name"], _where(r)): r for r in report["rows"]}
    for dev in ("pi-a", "pi-b"):
        assert rows[("onnxruntime-fp32", dev)]["accuracy"]["agreement"] == 1.0  # same fp32 reference outputs as the host
        assert rows[("onnxruntime-int8", dev)]["accuracy"]["agreement"] == rows[("onnxruntime-int8", "host")]["accuracy"]["agreement"]
        assert rows[("onnxruntime-int8", dev)]["latency"]["p50_ms"] > 0
        assert rows[("onnxruntime-int8", dev)]["sha256"] == rows[("onnxruntime-int8", "host")]["sha256"]
    md = (out / "report.md").read_text()
    assert "| pi-a |" in md and "| pi-b |" in md
    assert report["evaluation"]["devices"] == ["pi-a", "pi-b"]


def test_report_merge_joins_by_sha256_and_refuses_other_artifacts(dist, image_folder, sshd, device_python, device_cache, tmp_path, tiny_vit, calib_folder, capsys):
    dev = tmp_path / "dev.json"
    assert main(["eval", str(dist / "onnxruntime-int8"), "--images", str(image_folder), "--json", *_remote(sshd, device_python, device_cache)]) == 0
    dev.write_text(capsys.readouterr().out)
    merged = tmp_path / "merged"
    assert main(["report", "merge", str(dist / "report.json"), str(dev), "-o", str(merged), "--quiet"]) == 0
    rows = json.loads((merged / "report.json").read_text())["rows"]
    assert [(r["name"], _where(r)) for r in rows] == [("onnxruntime-fp32", "this host"), ("onnxruntime-int8", "this host"), ("onnxruntime-int8", "device")]
    assert "| device |" in (merged / "report.md").read_text()
    # another build (calibrated on fewer images) has another int8 under the same name: refused, and nothing written
    other = tmp_path / "other"
    assert main(["build", "--model", str(tiny_vit), "--eval", str(image_folder), "--calib", str(calib_folder), "--num-calib", "4", "--out", str(other), "--no-latency", "--precision", "fp32,int8", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["report", "merge", str(other / "report.json"), str(dev), "-o", str(tmp_path / "bad")]) == 2
    assert "different artifact" in _one_line_error(capsys) and not (tmp_path / "bad").exists()
    assert main(["report", "merge", str(dist / "report.json"), str(dist / "report.json"), "-o", str(tmp_path / "twice")]) == 2
    assert "in both" in _one_line_error(capsys)


# ---------------------------------------------------------------- TensorRT on a "Jetson" (stand-in TensorRT API)

STANDIN_TENSORRT = '''
"""Stand-in for TensorRT's Python API (the calls build_engine.py and the device runner make). The "engine" is a JSON
pointer to the ONNX; running it runs that ONNX with onnxruntime in float32. It records nothing GPU-specific."""
import json, os
import numpy as np
__version__ = "10.3.0"
class Logger:
    WARNING = 2; ERROR = 1
    def __init__(self, *a): pass
class NetworkDefinitionCreationFlag: EXPLICIT_BATCH = 0; STRONGLY_TYPED = 5
class BuilderFlag: FP16 = "FP16"; INT8 = "INT8"; TF32 = "TF32"
class MemoryPoolType: WORKSPACE = "WORKSPACE"
class TensorIOMode: INPUT = 1; OUTPUT = 2
class DataType: FLOAT = "float32"
def nptype(t): return np.dtype(t).type
class _Cache:
    def __init__(self, b): self.b = b
    def serialize(self): return b"CACHE:" + self.b
class _Config:
    def __init__(self): self.flags, self.cleared, self.cache = [], [], None
    def set_memory_pool_limit(self, pool, n): self.workspace = n
    def set_flag(self, f): self.flags.append(f)
    def clear_flag(self, f): self.cleared.append(f)
    def create_optimization_profile(self): return _Profile()
    def add_optimization_profile(self, p): self.profile = p
    def create_timing_cache(self, b): return _Cache(b)
    def set_timing_cache(self, c, ignore_mismatch=False): self.cache = c; return bool(c.b)
    def get_timing_cache(self): return self.cache
class _Profile:
    def set_shape(self, name, mn, opt, mx): self.shape = (name, mn, opt, mx)
class _Network: pass
class OnnxParser:
    num_errors = 0
    def __init__(self, net, logger): self.net = net
    def parse_from_file(self, path):
        self.net.onnx = os.path.realpath(path); return os.path.isfile(path)
class Builder:
    def __init__(self, logger): pass
    def create_network(self, flags): return _Network()
    def create_builder_config(self): return _Config()
    def create_optimization_profile(self): return _Profile()
    def build_serialized_network(self, net, config):
        name, mn, opt, mx = config.profile.shape
        return json.dumps({"onnx": net.onnx, "input": name, "max": mx, "flags": config.flags}).encode()
class _Engine:
    def __init__(self, plan):
        import onnxruntime as ort
        self.plan = plan
        self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.names = [plan["input"], self.session.get_outputs()[0].name]
        self.num_io_tensors = 2
    def get_tensor_name(self, i): return self.names[i]
    def get_tensor_mode(self, n): return TensorIOMode.INPUT if n == self.names[0] else TensorIOMode.OUTPUT
    def get_tensor_profile_shape(self, n, p): return ([1] + self.plan["max"][1:], self.plan["max"], self.plan["max"])
    def get_tensor_dtype(self, n): return DataType.FLOAT
    def create_execution_context(self): return _Context(self)
class _Context:
    def __init__(self, e): self.e, self.addr = e, {}
    def set_input_shape(self, n, shape): self.shape = tuple(shape)
    def get_tensor_shape(self, n):
        return (self.shape[0], self.e.session.get_outputs()[0].shape[-1])
    def set_tensor_address(self, n, ptr): self.addr[n] = ptr
    def execute_async_v3(self, stream):
        import ctypes
        x = np.empty(self.shape, np.float32)
        ctypes.memmove(x.ctypes.data, self.addr[self.e.names[0]], x.nbytes)
        y = np.ascontiguousarray(self.e.session.run(None, {self.e.names[0]: x})[0], dtype=np.float32)
        ctypes.memmove(self.addr[self.e.names[1]], y.ctypes.data, y.nbytes)
        return True
class Runtime:
    def __init__(self, logger): pass
    def deserialize_cuda_engine(self, b): return _Engine(json.loads(b))
'''

STANDIN_CUDART = '''
"""Stand-in for cuda-python's runtime: "device memory" is host memory."""
import ctypes, types
_keep = {}
class cudaMemcpyKind: cudaMemcpyHostToDevice = 1; cudaMemcpyDeviceToHost = 2
def cudaMalloc(n):
    b = ctypes.create_string_buffer(n); _keep[ctypes.addressof(b)] = b; return (0, ctypes.addressof(b))
def cudaFree(p): _keep.pop(p, None); return (0,)
def cudaStreamCreate(): return (0, 1)
def cudaMemcpyAsync(dst, src, n, kind, stream): ctypes.memmove(dst, src, n); return (0,)
def cudaStreamSynchronize(s): return (0,)
'''


@pytest.fixture(scope="module")
def jetson_python(device_python, tmp_path_factory) -> Path:
    """The device venv plus the stand-in tensorrt and cuda modules, behind a wrapper used as --remote-python."""
    d = tmp_path_factory.mktemp("jetson")
    (d / "site" / "cuda" / "bindings").mkdir(parents=True)
    (d / "site" / "tensorrt.py").write_text(STANDIN_TENSORRT)
    (d / "site" / "cuda" / "__init__.py").write_text("")
    (d / "site" / "cuda" / "bindings" / "__init__.py").write_text("")
    (d / "site" / "cuda" / "bindings" / "runtime.py").write_text(STANDIN_CUDART)
    wrapper = d / "python3"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={d / "site"} exec {device_python} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_tensorrt_engine_built_and_run_on_the_device(reference, calibration, image_folder, sshd, jetson_python, device_cache, tmp_path, capsys):
    from vitexport.backends.tensorrt import TensorRTBackend

    art = TensorRTBackend().build(reference, None, "fp16", {"tensorrt": {"tensorrt": "10.3"}}, tmp_path / "tensorrt-fp16")
    plan = json.loads((art.directory / "tensorrt.json").read_text())
    assert plan["onnx_opset"] == reference.opset == 18 and plan["tensorrt"] == "10.3"
    args = ["eval", str(art.directory), "--images", str(image_folder), "--latency", "--json", *_remote(sshd, jetson_python, device_cache)]
    assert main(args) == 0
    (row,) = _json(capsys)["rows"]
    assert row["measured_on"]["runtimes"] == {"tensorrt": "10.3.0"}
    assert any("engine built on the device with build_engine.py (TensorRT 10.3.0" in n for n in row["notes"])
    assert any("trtexec not found" in n for n in row["notes"])
    assert row["latency"]["runtime"] == "TensorRT 10.3.0" and row["latency"]["p50_ms"] > 0
    assert row["accuracy"]["n"] == 24 and row["accuracy"]["top1"] is not None
    engines = device_cache / "engines"
    built = [p for p in engines.iterdir() if p.name.endswith("-trt10.3.0")]
    assert len(built) == 1 and (built[0] / "model.engine").is_file() and (engines / "tensorrt-timing.cache").is_file()
    assert not [p for p in engines.iterdir() if p.name.startswith(".tmp")]
    assert main(args) == 0  # the second run reuses the engine built on the device
    (row,) = _json(capsys)["rows"]
    assert any("cached" in n for n in row["notes"] if "engine built" in n)


def test_the_profiles_tensorrt_decides_the_opset(reference, tmp_path):
    """JetPack 6.0's TensorRT 8.6 parses opset 17 at most: the jetson-orin profile exports at 17, and an opset-18
    reference is refused for it (one clear error) rather than failing later on the device."""
    from vitexport.api import target_settings
    from vitexport.backends.tensorrt import TensorRTBackend, max_onnx_opset
    from vitexport.errors import VitexportError

    assert target_settings("jetson-orin", None, None, None)["opset"] == 17
    assert "opset" not in target_settings("raspberry-pi-5", None, None, None)
    assert (max_onnx_opset("8.6"), max_onnx_opset("10.3"), max_onnx_opset(None)) == (17, None, None)
    with pytest.raises(VitexportError, match="TensorRT 8.6 parses ONNX opset 17 at most.*--opset 17"):
        TensorRTBackend().build(reference, None, "fp16", {"tensorrt": {"tensorrt": "8.6"}}, tmp_path / "t")


# ---------------------------------------------------------------- every failure is one clear line


def test_unreachable_device(dist, sshd, device_python, device_cache, capsys):
    assert main(["bench", str(dist / "onnxruntime-fp32"), *_remote(sshd, device_python, device_cache, "down")]) == 2
    line = _one_line_error(capsys)
    assert "cannot reach down" in line and "sshd running" in line


def test_authentication_refused(dist, sshd, device_python, device_cache, capsys):
    assert main(["bench", str(dist / "onnxruntime-fp32"), *_remote(sshd, device_python, device_cache, "stranger")]) == 2
    line = _one_line_error(capsys)
    assert "authentication refused" in line and "no passwords" in line


def test_no_python_on_the_device(dist, sshd, device_cache, capsys):
    assert main(["bench", str(dist / "onnxruntime-fp32"), *_remote(sshd, "/nonexistent/python3", device_cache)]) == 2
    line = _one_line_error(capsys)
    assert "no /nonexistent/python3 on device" in line and "--remote-python" in line


def test_runtime_missing_on_the_device_says_what_to_install(dist, sshd, numpy_only_python, device_cache, capsys):
    assert main(["bench", str(dist / "onnxruntime-fp32"), *_remote(sshd, numpy_only_python, device_cache)]) == 2
    line = _one_line_error(capsys)
    assert "onnxruntime" in line and "pip install onnxruntime" in line
    assert _entries(device_cache)["artifacts"] == []  # found out before copying the artifact


def test_numpy_missing_on_the_device(dist, sshd, device_cache, tmp_path, capsys):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    assert main(["bench", str(dist / "onnxruntime-fp32"), *_remote(sshd, bare / "bin" / "python", device_cache)]) == 2
    assert "numpy" in _one_line_error(capsys)


def test_disk_full_on_the_device(dist, sshd, device_python, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs mounts to make a small disk")
    try:
        assert main(["bench", str(dist / "onnxruntime-fp32"), *_remote(sshd, device_python, small)]) == 2
        assert "disk is full" in _one_line_error(capsys)
        assert _entries(small)["artifacts"] == [] and _entries(small)["tmp"] == []
    finally:
        subprocess.run(["umount", str(small)])


def _slow_python(device_python, tmp_path, seconds: int = 60) -> Path:
    """The device python, but `run` (the measuring step) hangs first: for --remote-timeout and Ctrl-C. It hangs
    until ssh goes away (its stdin ends) or ``seconds`` pass, so no test leaves it running on the device."""
    w = tmp_path / "slow-python"
    w.write_text(f'#!/bin/sh\ncase "$*" in *" run "*) echo "slow run started" >&2; timeout {seconds} head -c 1 >/dev/null; exit 3;; esac\nexec {device_python} "$@"\n')
    w.chmod(0o755)
    return w


def test_timeout_on_the_device(dist, sshd, device_python, device_cache, tmp_path, capsys):
    start = time.monotonic()
    args = ["bench", str(dist / "onnxruntime-fp32"), *_remote(sshd, _slow_python(device_python, tmp_path), device_cache), "--remote-timeout", "4"]
    assert main(args) == 2
    assert time.monotonic() - start < 50
    line = _one_line_error(capsys)
    assert "did not finish within 4 s" in line and "--remote-timeout" in line
    assert _entries(device_cache)["tmp"] == []


def test_ctrl_c_stops_the_device_and_writes_nothing(tiny_vit, image_folder, calib_folder, sshd, device_python, tmp_path):
    out = tmp_path / "dist"
    # the device hangs far longer than the test waits: the build can only end early by stopping it
    slow = _slow_python(device_python, tmp_path, seconds=600)
    cmd = [sys.executable, "-X", "faulthandler", "-m", "vitexport.cli", "build", "--model", str(tiny_vit), "--eval", str(image_folder), "--calib", str(calib_folder), "--out", str(out), "--precision", "fp32", "--no-latency"]
    cmd += _remote(sshd, slow, tmp_path / "cache")
    # a Ctrl-C the build can hear: a shell running this suite as a background job (`... &`) hands its children
    # SIGINT ignored, and python keeps it ignored (every earlier CI failure of this test: the build never saw it)
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(iter(p.stderr.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 240  # a loaded CI host: the build's imports and export come first
    while not any("running 1 artifact" in s for s in seen) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not any("running 1 artifact" in s for s in seen):
        p.kill()
        pytest.fail("the build never reached the device:\n" + "".join(seen[-30:]))
    time.sleep(1)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)  # -X faulthandler: every thread's stack on stderr, then say where it hung
        p.wait(30)
        reader.join(5)
        pytest.fail("the build did not stop within 60 s of Ctrl-C:\n" + "".join(seen[-60:]))
    reader.join(5)
    assert p.returncode == 130
    assert any("interrupted; nothing was written" in s for s in seen) and not any("Traceback" in s for s in seen)
    assert not out.exists() and not list(tmp_path.glob(".dist.partial-*"))
    assert _entries(tmp_path / "cache")["tmp"] == []


def test_interrupted_copy_leaves_no_cache_entry(sshd, device_python, tmp_path):
    """A copy cut off half-way (the link drops, Ctrl-C) leaves no entry that looks complete, and no temporary folder."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 64)  # 64 MB: still streaming when the session is cancelled
    dev = remote.parse_devices(["device"], str(device_python), None, str(tmp_path / "cache"), str(sshd))[0]
    session = remote.Session()
    (tmp_path / "cache" / "tmp").mkdir(parents=True)
    threading.Timer(0.3, session.cancel).start()
    with pytest.raises(remote.VitexportError, match="cancelled"):
        remote._copy(session, dev, [(big, "big.bin")], "artifacts/abc", 60)
    for _ in range(50):  # the device's shell removes its temporary folder when its stdin ends
        if not list((tmp_path / "cache" / "tmp").iterdir()):
            break
        time.sleep(0.1)
    assert _entries(tmp_path / "cache") == {"artifacts": [], "inputs": [], "tmp": []}


def test_bad_remote_spec_is_one_line(dist, capsys):
    for bad in ("--remote=-oProxyCommand", "--remote=pi=", "--remote=pi=user@host -p 2"):  # never an ssh option
        assert main(["bench", str(dist / "onnxruntime-fp32"), bad]) == 2
        assert "bad --remote" in _one_line_error(capsys)


# ---------------------------------------------------------------- the README's device recipe


def test_eval_on_a_runtime_only_install(dist, image_folder, tmp_path):
    """onnxruntime + numpy + pillow + vitexport --no-deps: no tqdm, no onnx, no torch. eval works; a TensorRT
    artifact, which would need onnx to be emulated, is one note, not a crash."""
    code = textwrap.dedent(
        f"""
        import sys
        for m in ("torch", "transformers", "onnx", "tqdm", "onnxscript"):
            sys.modules[m] = None  # any import of them fails
        from vitexport.cli import main
        sys.exit(main(["eval", {str(dist / "onnxruntime-int8")!r}, "--images", {str(image_folder)!r}]))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert r.returncode == 0, r.stderr
    assert "onnxruntime-int8" in r.stdout and "Traceback" not in r.stderr
