#!/usr/bin/env python3
"""The device side of `vitexport ... --remote`: runs artifacts on a Raspberry Pi, a Jetson or any SSH host.

vitexport copies this one file (and nothing else of itself) to the device, beside the artifact folders and the
preprocessed images (one float32 .npy array). It needs Python 3.9+, numpy and the artifact's runtime
(onnxruntime, openvino, or TensorRT's Python bindings + cuda-python): no torch, no transformers, no onnx, no
vitexport. Runtimes are imported only when an artifact asks for them.

    python3 device_runner.py probe [--backends onnxruntime,openvino]   # host facts and runtime versions, as JSON
    python3 device_runner.py run JOB_BASE64                            # run artifacts on the inputs, JSON on stdout

`run` loads each artifact by its manifest.json, runs the whole input array through it in batches (the raw outputs go
back to the host, which scores them against labels and the fp32 reference with the shared harness), then times
batch-1 latency of all loaded artifacts interleaved round by round after a warm-up (the method of vitexport's
harness/latency.py: p50/p90 pooled over rounds, spread = slowest round median / fastest) and each one's throughput.
When its stdin closes (the host's ssh went away: Ctrl-C, timeout) it exits at once.
"""

import base64
import io
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import threading
import time

RUNNER_VERSION = 1
EXIT_MISSING = 3  # numpy or a runtime is missing: the host turns this into "install X on the device"
MANIFEST = "manifest.json"
# CPU features that decide int8 arithmetic (the same list as vitexport's harness/report.py)
INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp", "i8mm", "bf16")
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE", "0xd4f": "Neoverse-V2", "0xd40": "Neoverse-V1"}
# what to install, per runtime, on a Debian/Raspberry Pi OS or JetPack device
INSTALL = {
    "numpy": "python3 -m pip install numpy (or: sudo apt install python3-numpy)",
    "onnxruntime": "python3 -m pip install onnxruntime numpy",
    "openvino": "python3 -m pip install openvino numpy",
    "tensorrt": "TensorRT's Python bindings come with JetPack (sudo apt install python3-libnvinfer), plus python3 -m pip install cuda-python numpy",
}
TRTEXEC_PLACES = ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec", "/opt/tensorrt/bin/trtexec")


class Missing(Exception):
    """A module the device lacks; its message says what to install."""


def log(msg):
    sys.stderr.write("device: " + msg + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- host facts


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def host_facts():
    """CPU model, cores, int8-relevant CPU features, memory, OS, board: what decides how an artifact runs here."""
    cpuinfo = _read("/proc/cpuinfo").splitlines()
    name, flags, parts = "", set(), []
    for line in cpuinfo:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "Model", "Hardware") and not name:
            name = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
        elif key == "CPU part":
            parts.append(value.lower())
    cores = sorted({ARM_PARTS.get(p, p) for p in parts})
    if parts and (not name or name.startswith("Raspberry")):
        name = (name + ", " if name else "") + "/".join(cores)
    mem = re.search(r"MemTotal:\s+(\d+)", _read("/proc/meminfo"))
    os_release = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', _read("/etc/os-release"), re.M))
    facts = {
        "hostname": platform.node(),
        "cpu": name or platform.processor() or "CPU",
        "cpu_features": [f for f in INT8_FEATURES if f in flags],
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "memory_mb": int(mem.group(1)) // 1024 if mem else None,
        "os": os_release.get("PRETTY_NAME") or platform.platform(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "board": _read("/proc/device-tree/model").rstrip("\x00").strip() or None,
        "runner": RUNNER_VERSION,
    }
    emulated = os.environ.get("VITEXPORT_DEVICE_EMULATION")  # set by an emulator wrapper (benchmarks/emulated_pi.py)
    if emulated:
        facts["emulation"] = emulated
    return facts


def runtime_versions(backends):
    out = {}
    for b in backends:
        try:
            out[b] = _runtime_version(b)
        except Missing:
            out[b] = None
    return out


def _runtime_version(backend):
    if backend == "onnxruntime":
        return _import("onnxruntime", backend).__version__
    if backend == "openvino":
        return _import("openvino", backend).get_version().split("-")[0]
    if backend == "tensorrt":
        return _import("tensorrt", backend).__version__
    raise Missing("this device runner cannot run %s artifacts (only onnxruntime, openvino, tensorrt)" % backend)


def _import(module, backend):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Missing("%s is not installed for %s (%s): %s" % (module, sys.executable, str(e).splitlines()[0][:120], INSTALL.get(backend, INSTALL["numpy"]))) from None


# ---------------------------------------------------------------- runners (stdlib + numpy + the runtime)


class OrtRunner:
    def __init__(self, directory, manifest, threads):
        ort = _import("onnxruntime", "onnxruntime")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.session = ort.InferenceSession(os.path.join(directory, manifest["main"]), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.threads = threads
        self.runtime = "onnxruntime " + ort.__version__
        self.device = "%s (%s), CPUExecutionProvider" % (host_facts()["cpu"], platform.machine())
        # ranges taken at run time span the batch: one image per run, as vitexport.backends.onnxruntime.runtime_ranges
        self.per_image = False
        with open(os.path.join(directory, manifest["main"]), "rb") as f:
            tail = b""
            while not self.per_image:
                chunk = f.read(1 << 24)
                if not chunk:
                    break
                self.per_image = b"DynamicQuantize" in tail + chunk
                tail = chunk[-15:]

    def run(self, x):
        if self.per_image and len(x) > 1:
            np = _import("numpy", "numpy")
            return np.concatenate([self.run(x[i : i + 1]) for i in range(len(x))])
        return self.session.run([self.output_name], {self.input_name: x})[0]


class OpenVinoRunner:
    def __init__(self, directory, manifest, threads):
        ov = _import("openvino", "openvino")
        core = ov.Core()
        device = os.environ.get("VITEXPORT_OPENVINO_DEVICE") or manifest.get("recipe", {}).get("device") or "CPU"
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if device.startswith("CPU"):
            # the precision the artifact's figures hold for (bf16 for an int8 IR with bf16 outside int8)
            config["INFERENCE_PRECISION_HINT"] = os.environ.get("VITEXPORT_OPENVINO_INFERENCE_PRECISION") or manifest.get("recipe", {}).get("inference_precision_hint") or "f32"
            if threads:
                config["INFERENCE_NUM_THREADS"] = int(threads)
        self.request = core.compile_model(os.path.join(directory, manifest["main"]), device, config).create_infer_request()
        self.threads = threads
        self.runtime = "openvino " + ov.get_version().split("-")[0]
        self.device = "%s (%s), OpenVINO %s" % (host_facts()["cpu"], platform.machine(), device)

    def run(self, x):
        return self.request.infer({0: x})[0].copy()


class TensorRTRunner:
    """Runs a built engine through TensorRT's Python API, device memory through cuda-python."""

    def __init__(self, engine_dir, info):
        np = _import("numpy", "numpy")
        trt = _import("tensorrt", "tensorrt")
        try:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
        except ImportError:
            raise Missing("cuda-python is not installed for %s: python3 -m pip install cuda-python" % sys.executable) from None
        self.np, self.trt, self.rt = np, trt, cudart
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(os.path.join(engine_dir, info["engine"]), "rb") as f:
            self.engine = runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError("TensorRT cannot load the engine it just built")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))
        self.stream = self._ok(cudart.cudaStreamCreate())
        self.buffers = {}
        self.threads = None
        self.runtime = "TensorRT " + trt.__version__
        self.device = info.get("device") or "NVIDIA GPU"

    def _ok(self, result):
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if int(err) != 0:
            raise RuntimeError("CUDA error %s" % err)
        return rest[0] if rest else None

    def _buffer(self, name, nbytes):
        ptr, size = self.buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._ok(self.rt.cudaFree(ptr))
            ptr, size = int(self._ok(self.rt.cudaMalloc(nbytes))), nbytes
            self.buffers[name] = (ptr, size)
        return ptr

    def run(self, x):
        np = self.np
        if len(x) > self.max_batch:
            return np.concatenate([self.run(x[i : i + self.max_batch]) for i in range(0, len(x), self.max_batch)])
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), self.out_dtype)
        d_in, d_out = self._buffer(self.input_name, x.nbytes), self._buffer(self.output_name, out.nbytes)
        self.context.set_tensor_address(self.input_name, d_in)
        self.context.set_tensor_address(self.output_name, d_out)
        kind = self.rt.cudaMemcpyKind
        self._ok(self.rt.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes, kind.cudaMemcpyHostToDevice, self.stream))
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT failed to run the engine")
        self._ok(self.rt.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes, kind.cudaMemcpyDeviceToHost, self.stream))
        self._ok(self.rt.cudaStreamSynchronize(self.stream))
        return out.astype(np.float32, copy=False)


def tensorrt_engine(directory, engines_dir):
    """Build the folder's engine on this device with the folder's own build_engine.py, once per artifact and
    TensorRT version (kept under engines_dir, beside the device's timing cache). Returns (engine folder, engine.json)."""
    trt = _import("tensorrt", "tensorrt")
    sha = os.path.basename(os.path.normpath(directory))
    final = os.path.join(engines_dir, "%s-trt%s" % (sha, trt.__version__))
    info_path = os.path.join(final, "engine.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            return final, dict(json.load(f), cached=True)
    os.makedirs(engines_dir, exist_ok=True)
    tmp = os.path.join(engines_dir, ".tmp-%s-%d" % (sha[:16], os.getpid()))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        for name in os.listdir(directory):  # the script finds its files beside itself: copy the small ones, link the model
            src = os.path.join(directory, name)
            if name.endswith((".py", ".json")):
                shutil.copyfile(src, os.path.join(tmp, name))
            else:
                os.symlink(os.path.abspath(src), os.path.join(tmp, name))
        cache = os.path.join(engines_dir, "tensorrt-timing.cache")  # kept on the device, shared by every build here
        log("building the TensorRT engine with %s/build_engine.py" % os.path.basename(directory))
        r = subprocess.run([sys.executable, os.path.join(tmp, "build_engine.py"), "--timing-cache", cache], stdout=sys.stderr, stderr=subprocess.PIPE, universal_newlines=True)
        if r.returncode != 0:
            raise RuntimeError("build_engine.py failed: " + (r.stderr.strip().splitlines() or ["exit %d" % r.returncode])[-1][:300])
        with open(os.path.join(tmp, "engine.json")) as f:
            info = json.load(f)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, dict(info, cached=False)


def find_trtexec():
    found = shutil.which("trtexec")
    if found:
        return found
    for p in TRTEXEC_PLACES:  # stock JetPack: under TensorRT's own bin folder, not on PATH
        if os.access(p, os.X_OK):
            return p
    return None


def trtexec_latency(engine_dir, plan, timeout=600):
    """trtexec's own batch-1 latency of the built engine, where trtexec exists (its figures, for comparison)."""
    exe = find_trtexec()
    if not exe:
        return {"found": False, "looked": ["PATH"] + list(TRTEXEC_PLACES)}
    chw = plan["shapes"]["opt"][1:]
    cmd = [exe, "--loadEngine=" + os.path.join(engine_dir, plan["engine"]), "--shapes=%s:%s" % (plan["input"], "x".join(str(d) for d in [1] + list(chw))), "--useCudaGraph", "--noDataTransfers"]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"found": True, "path": exe, "error": "trtexec did not finish in %d s" % timeout}
    out = {"found": True, "path": exe, "command": " ".join(cmd), "returncode": r.returncode}
    for key, pattern in (("latency", r"\]\s*Latency: (.*)"), ("gpu_compute", r"GPU Compute Time: (.*)"), ("throughput_qps", r"Throughput: ([\d.]+) qps")):
        m = re.search(pattern, r.stdout)
        if m and key == "throughput_qps":
            out[key] = float(m.group(1))
        elif m:
            out[key] = {k: float(v) for k, v in re.findall(r"(min|max|mean|median|percentile\(90%\)) = ([\d.]+) ms", m.group(1))}
    return out


def load(entry, job):
    """A runner for one artifact folder, plus what the host should know about how it was prepared."""
    directory = entry["dir"]
    with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    backend, extra = manifest["backend"], {}
    if backend == "onnxruntime":
        return OrtRunner(directory, manifest, job.get("threads")), extra
    if backend == "openvino":
        return OpenVinoRunner(directory, manifest, job.get("threads")), extra
    if backend == "tensorrt":
        _import("tensorrt", "tensorrt")
        engine_dir, info = tensorrt_engine(directory, job["engines_dir"])
        extra["engine"] = info
        with open(os.path.join(engine_dir, "tensorrt.json")) as f:
            plan = json.load(f)
        if job.get("latency", True):
            extra["trtexec"] = trtexec_latency(engine_dir, plan)
        return TensorRTRunner(engine_dir, info), extra
    raise Missing("this device runner cannot run %s artifacts (only onnxruntime, openvino, tensorrt)" % backend)


# ---------------------------------------------------------------- timing (harness/latency.py's method)


def _time_runs(runner, x, min_runs, min_seconds, max_seconds, max_runs):
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        runner.run(x)
        times.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if (len(times) >= min_runs and elapsed >= min_seconds) or elapsed >= max_seconds or len(times) >= max_runs:
            return times


def measure_all(runners, sample, rounds=3, seconds=1.0, warmup_seconds=1.0, throughput_batch=16):
    """Batch-1 latency of several runners interleaved round by round after a warm-up, then each one's throughput."""
    import numpy as np

    x1 = np.ascontiguousarray(sample[:1], dtype=np.float32)
    for r in runners.values():
        _time_runs(r, x1, 3, warmup_seconds, max(warmup_seconds, 5.0), 1000)
    per_round = {name: [] for name in runners}
    for _ in range(rounds):
        for name, r in runners.items():
            per_round[name].append(np.asarray(_time_runs(r, x1, 5, seconds, 4 * seconds, 1000)))
    out = {}
    for name, r in runners.items():
        t = np.concatenate(per_round[name]) * 1e3
        medians = [float(np.median(x)) for x in per_round[name]]
        ips = None
        if throughput_batch and throughput_batch > 1:
            reps = -(-throughput_batch // len(sample))
            xb = np.ascontiguousarray(np.concatenate([sample] * reps)[:throughput_batch], dtype=np.float32)
            r.run(xb)
            tb = _time_runs(r, xb, 3, seconds, 5 * seconds, 50)
            ips = float(throughput_batch / np.median(tb))
        out[name] = {
            "batch": 1,
            "p50_ms": float(np.percentile(t, 50)),
            "p90_ms": float(np.percentile(t, 90)),
            "mean_ms": float(t.mean()),
            "runs": int(len(t)),
            "threads": int(getattr(r, "threads", None) or os.cpu_count() or 1),
            "device": getattr(r, "device", "?"),
            "runtime": getattr(r, "runtime", "?"),
            "throughput_batch": throughput_batch if ips else None,
            "throughput_ips": ips,
            "rounds": rounds,
            "spread": float(max(medians) / min(medians)),
        }
    return out


def _status_kb(field):
    m = re.search(r"^%s:\s+(\d+)" % field, _read("/proc/self/status"), re.M)
    return int(m.group(1)) if m else None


class PeakMemory:
    """Peak RSS above the RSS at entry (VmHWM reset through clear_refs), as vitexport's harness/memory.py."""

    def __enter__(self):
        self.peak_mb, self.base = None, _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM above starting RSS (Linux)"
        except OSError:
            self.method, self.maxrss = "ru_maxrss growth (lower bound)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.method.startswith("VmHWM"):
            hwm = _status_kb("VmHWM")
            if hwm is not None and self.base is not None:
                self.peak_mb = max(hwm - self.base, 0) / 1024
        else:
            self.peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.maxrss, 0) / 1024
        return False


# ---------------------------------------------------------------- commands


def _watch_stdin():
    """Exit at once when the host's ssh goes away (its stdin closes), so nothing keeps running on the device."""

    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Exception:
            pass
        os._exit(130)

    threading.Thread(target=watch, daemon=True).start()


def cmd_probe(backends):
    versions = runtime_versions(backends)
    try:
        _import("numpy", "numpy")
        numpy_ok = True
    except Missing:
        numpy_ok = False
    missing = {b: INSTALL.get(b, "") for b, v in versions.items() if v is None}
    if not numpy_ok:
        missing["numpy"] = INSTALL["numpy"]
    return {"facts": host_facts(), "runtimes": versions, "missing": missing, "python_executable": sys.executable}


def cmd_run(job):
    import numpy as np

    x = np.load(job["inputs"], mmap_mode="r")
    batch = int(job.get("batch", 32))
    facts = host_facts()
    results, timed = [], {}
    for entry in job["artifacts"]:
        res = {"name": entry["name"], "sha256": entry.get("sha256")}
        start = time.perf_counter()
        with PeakMemory() as pm:
            runner, extra = load(entry, job)
            res["load_seconds"] = round(time.perf_counter() - start, 3)
            outs = []
            for i in range(0, len(x), batch):
                outs.append(np.asarray(runner.run(np.ascontiguousarray(x[i : i + batch], dtype=np.float32)), dtype=np.float32))
            log("%s: %d outputs" % (entry["name"], len(x)))
        buf = io.BytesIO()
        np.save(buf, np.concatenate(outs))
        res.update(extra, outputs_npy_b64=base64.b64encode(buf.getvalue()).decode("ascii"), memory={"peak_mb": pm.peak_mb, "method": pm.method, "what": "load + evaluate"}, runtime=runner.runtime, device=runner.device)
        results.append(res)
        if job.get("latency", True):
            timed[entry["name"]] = runner
        else:
            del runner
    if timed:
        log("timing %d artifact(s), interleaved" % len(timed))
        t = job.get("timing", {})
        lat = measure_all(timed, np.asarray(x[:16]), t.get("rounds", 3), t.get("seconds", 1.0), t.get("warmup_seconds", 1.0), job.get("throughput_batch", 16))
        for res in results:
            res["latency"] = lat.get(res["name"])
    return {"facts": facts, "results": results}


def main(argv):
    if sys.version_info < (3, 9):
        sys.stderr.write("vitexport device runner needs Python 3.9+, this is %s\n" % platform.python_version())
        return EXIT_MISSING
    if len(argv) >= 1 and argv[0] == "probe":
        backends = argv[2].split(",") if len(argv) >= 3 and argv[1] == "--backends" else []
        out = cmd_probe([b for b in backends if b])
    elif len(argv) == 2 and argv[0] == "run":
        _watch_stdin()
        job = json.loads(base64.b64decode(argv[1]).decode("utf-8"))
        try:
            out = cmd_run(job)
        except Missing as e:
            sys.stderr.write("MISSING: %s\n" % e)
            return EXIT_MISSING
        except MemoryError:
            sys.stderr.write("ERROR: out of memory on the device\n")
            return 1
        except Exception as e:  # a runtime's own exception types: one line for the host to show
            sys.stderr.write("ERROR: %s: %s\n" % (type(e).__name__, (str(e).strip().splitlines() or [""])[0][:300]))
            return 1
    else:
        sys.stderr.write(__doc__)
        return 2
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # not sys.exit: the stdin watcher thread would block the interpreter's shutdown
