"""A Raspberry Pi 5 in emulation, measured through `vitexport build --target raspberry-pi-5 --remote` (not CI).

What it sets up (once, cached under --work, default ~/.cache/vitexport-emulated-pi):

- an arm64 Debian bookworm rootfs (Raspberry Pi OS is Debian on aarch64): ``mmdebstrap --arch=arm64 --variant=apt
  --include=python3.11,python3-minimal bookworm`` (about 9 minutes, 250 MB; needs qemu-user-static, binfmt-support,
  mmdebstrap and a mounted binfmt_misc);
- the aarch64 wheels of onnxruntime and numpy, at the host's versions (``pip download --platform manylinux..._aarch64``),
  installed into the rootfs with ``pip install --target``: the device has ONLY its runtime and numpy;
- a Pi-5-style ``proc/cpuinfo`` (4x Cortex-A76, Features with asimddp, no i8mm/SVE) and device-tree model in the rootfs:
  qemu would show the host's x86 /proc/cpuinfo, and ONNX Runtime's CPU detection needs an ARM one (with it, ORT sees
  asimddp and runs its dot-product int8 kernels);
- ``python3-pi5``: a wrapper that execs ``qemu-aarch64-static -cpu cortex-a76 -L ROOTFS ROOTFS/usr/bin/python3.11``
  (not ``-cpu max``: that turns on SVE and i8mm, which a Pi does not have), used as ``--remote-python``;
- its own sshd on 127.0.0.1 (random port, throwaway keys, no passwords, UsePAM no, StrictModes no), stopped at the end.

Then it runs, on the real DeiT-tiny with the shipped calibration set and the first --num-eval shipped evaluation images:

1. ``vitexport build --target raspberry-pi-5 --remote emulated-arm=pi5`` (fp32/int8/int4): host rows and ARM rows in
   one report; rows from the device are labelled ``emulated-arm`` (the arithmetic is ARM's, the timings are not, so
   the device skips timing when it knows it is emulated);
2. the same int8 recipe with full 8-bit weights (``reduce_range = false``) instead of the 7-bit default, so the two
   can be compared on ARM, where the dot-product kernels accumulate in int32 and 7 bits buy nothing;
3. two emulated Pis in one build (``--remote pi-a=... --remote pi-b=...``, int8 only, fewer images) against each alone:
   the wall time of the device phase in parallel versus the sum of the two alone.

    python benchmarks/emulated_pi.py                      # set up if needed, run all three, write benchmarks/results/
    python benchmarks/emulated_pi.py --steps other-weights,parallel   # steps can run apart (and at once)

Results: benchmarks/results/emulated-pi5.report.{json,md} (step 1), emulated-pi5-8bit.report.json (step 2),
emulated-pi5.json (the comparison, the parallel timing, the commands).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PI5_CPUINFO_CORE = """processor\t: {i}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
PI5_MODEL = "Raspberry Pi 5 Model B Rev 1.0"


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


# ---------------------------------------------------------------- the emulated Pi


def ensure_binfmt() -> None:
    """mmdebstrap runs the arm64 maintainer scripts through binfmt_misc + qemu-user-static."""
    for tool, pkg in (("mmdebstrap", "mmdebstrap"), ("qemu-aarch64-static", "qemu-user-static"), ("update-binfmts", "binfmt-support")):
        if not shutil.which(tool):
            sh(["apt-get", "install", "-y", pkg])
    if not Path("/proc/sys/fs/binfmt_misc/status").exists():
        sh(["mount", "binfmt_misc", "-t", "binfmt_misc", "/proc/sys/fs/binfmt_misc"])
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        sh(["update-binfmts", "--enable", "qemu-aarch64"])


def rootfs(work: Path) -> Path:
    root = work / "rootfs"
    if (root / "usr" / "bin" / "python3.11").exists():
        return root
    ensure_binfmt()
    partial = work / "rootfs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    sh(["mmdebstrap", "--arch=arm64", "--variant=apt", "--include=python3.11,python3-minimal", "bookworm", partial])
    os.replace(partial, root)
    return root


def install_runtime(work: Path, root: Path) -> None:
    """onnxruntime + numpy (the host's versions) for aarch64 CPython 3.11, and nothing else of ours."""
    import numpy
    import onnxruntime

    target = root / "usr" / "lib" / "python3" / "dist-packages"
    stamp = target / f".vitexport-onnxruntime-{onnxruntime.__version__}-numpy-{numpy.__version__}"
    if stamp.exists():
        return
    wheels = work / "wheels"
    plat = ["--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_17_aarch64"]
    sh([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", *plat, "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "-d", wheels, f"onnxruntime=={onnxruntime.__version__}", f"numpy=={numpy.__version__}"])
    sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--upgrade", "--only-binary=:all:", *plat, "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--target", target, *sorted(wheels.glob("*.whl"))])
    stamp.write_text("")


def pi_facts(root: Path, cores: int = 4) -> None:
    (root / "proc").mkdir(exist_ok=True)
    text = "\n".join(PI5_CPUINFO_CORE.format(i=i) for i in range(cores))
    (root / "proc" / "cpuinfo").write_text(text + f"\nRevision\t: d04170\nSerial\t\t: 0000000000000000\nModel\t\t: {PI5_MODEL}\n")
    (root / "proc" / "device-tree").mkdir(exist_ok=True)
    (root / "proc" / "device-tree" / "model").write_text(PI5_MODEL + "\x00")


def wrapper(work: Path, root: Path, cpu: str = "cortex-a76") -> Path:
    w = work / f"python3-{cpu}"
    w.write_text(
        "#!/bin/sh\n"
        "# an aarch64 python3.11 in qemu-user, as the --remote-python of the emulated Pi\n"
        f'export VITEXPORT_DEVICE_EMULATION="qemu-aarch64 -cpu {cpu}"\n'
        f'exec qemu-aarch64-static -cpu {cpu} -L {root} {root}/usr/bin/python3.11 "$@"\n'
    )
    w.chmod(0o755)
    return w


# ---------------------------------------------------------------- sshd on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sshd(d: Path, aliases: list[str]) -> tuple[subprocess.Popen, Path]:
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        sh(["apt-get", "install", "-y", "openssh-server"])
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    for key in ("host", "client"):
        sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / key])
    shutil.copyfile(d / "client.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n"
        "UsePAM no\nStrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "MaxStartups 64\nMaxSessions 64\nLogLevel ERROR\n"
    )
    pub = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    (d / "ssh_config").write_text(
        "".join(
            f"Host {a}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {d}/client\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {d}/known_hosts\n  StrictHostKeyChecking yes\n  LogLevel ERROR\n"
            for a in aliases
        )
    )
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", d / "sshd_config"], stderr=open(d / "sshd.log", "w"))
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, d / "ssh_config"
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"sshd did not start: {(d / 'sshd.log').read_text()}")


# ---------------------------------------------------------------- the runs


def vitexport(args: list[str], capture: Path | None = None) -> tuple[float, list[str]]:
    cmd = [sys.executable, "-m", "vitexport.cli", *args]
    start = time.perf_counter()
    if capture:
        with open(capture, "w") as f:
            sh(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=f)
    else:
        sh(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start, cmd


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (c - h, c + h)


def rows_of(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["name"], (r.get("measured_on") or {}).get("name", "host")): r for r in report["rows"]}


def summary(row: dict) -> dict:
    a = row["accuracy"]
    n = a["n"]
    agree = round(a["agreement"] * n)
    return {
        "top1": a["top1"],
        "agreement": a["agreement"],
        "agreement_95ci": wilson(agree, n),
        "disagree": n - agree,
        "cosine": a["cosine"],
        "lost": a["lost"],
        "gained": a["gained"],
        "n": n,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "vitexport-emulated-pi")
    ap.add_argument("--num-eval", type=int, default=24, help="evaluation images (emulation is ~100x slower than native: seconds per image)")
    ap.add_argument("--num-eval-parallel", type=int, default=4)
    ap.add_argument("--steps", default="profile,other-weights,parallel", help="which of profile, other-weights, parallel to run (results add to one file)")
    ap.add_argument("--int8-artifact", type=Path, help="the int8 artifact the parallel step evaluates (default: this run's)")
    ap.add_argument("--setup-only", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    root = rootfs(args.work)
    install_runtime(args.work, root)
    pi_facts(root)
    py = wrapper(args.work, root)
    check = subprocess.run([py, "-c", "import onnxruntime, numpy, platform; print(platform.machine(), onnxruntime.__version__, numpy.__version__)"], capture_output=True, text=True)
    print("emulated device python:", check.stdout.strip() or check.stderr.strip()[-300:], file=sys.stderr)
    if check.returncode != 0:
        return 1
    if args.setup_only:
        return 0

    RESULTS.mkdir(parents=True, exist_ok=True)
    steps = set(args.steps.split(","))
    result_file = RESULTS / "emulated-pi5.json"
    out: dict = json.loads(result_file.read_text()) if result_file.is_file() else {}  # steps run apart add to one file
    out["setup"] = {"rootfs": "mmdebstrap --arch=arm64 --variant=apt --include=python3.11,python3-minimal bookworm", "python": "qemu-aarch64-static -cpu cortex-a76 -L ROOTFS ROOTFS/usr/bin/python3.11", "device_python_check": check.stdout.strip()}

    def save() -> None:
        result_file.write_text(json.dumps(out, indent=2) + "\n")

    int8_artifact = args.int8_artifact
    saved = RESULTS / "emulated-pi5.report.json"
    if "profile" not in steps and "profile" not in out and saved.is_file():  # step 1 ran in another invocation
        report = json.loads(saved.read_text())
        cmd = f"build --target raspberry-pi-5 --num-eval {report['evaluation']['images']} --out DIST --remote emulated-arm=pi5 --remote-python python3-cortex-a76 ..."
        out["profile"] = {"command": cmd, "rows": {f"{n}@{w}": summary(r) for (n, w), r in rows_of(report).items() if r.get("accuracy")}}
        out["host"] = report.get("host")
        save()
    with tempfile.TemporaryDirectory(prefix="vitexport-emulated-pi-") as tmp:
        tmp = Path(tmp)
        sshd, cfg = start_sshd(tmp, ["pi5", "pi-a", "pi-b"])
        try:
            remote = ["--remote-python", str(py), "--ssh-config", str(cfg), "--remote-cache", str(tmp / "device-cache"), "--remote-timeout", "7200"]
            profile_text = (REPO / "vitexport" / "targets" / "raspberry-pi-5.toml").read_text()
            if "profile" in steps:  # 1. the profile as it ships: host rows + emulated-arm rows for fp32/int8/int4
                dist = tmp / "pi5"
                secs, cmd = vitexport(["build", "--target", "raspberry-pi-5", "--num-eval", str(args.num_eval), "--out", str(dist), "--remote", "emulated-arm=pi5", *remote])
                report = json.loads((dist / "report.json").read_text())
                shutil.copyfile(dist / "report.json", RESULTS / "emulated-pi5.report.json")
                shutil.copyfile(dist / "report.md", RESULTS / "emulated-pi5.report.md")
                out["profile"] = {"command": " ".join(cmd[2:]), "seconds": round(secs, 1), "rows": {f"{n}@{w}": summary(r) for (n, w), r in rows_of(report).items() if r.get("accuracy")}}
                out["profile"]["int8_weights"] = json.loads((dist / "onnxruntime-int8" / "manifest.json").read_text())["recipe"].get("weights")
                out["host"] = report.get("host")
                save()
                int8_artifact = int8_artifact or dist / "onnxruntime-int8"

            if "other-weights" in steps:  # 2. the other weight width, same images: 7-bit vs 8-bit on ARM (and here)
                other = "true" if "reduce_range = false" in profile_text else "false"
                toml = tmp / "pi5-other-weights.toml"
                keep = [ln for ln in profile_text.splitlines() if "reduce_range" not in ln and ln.strip() != "[options.onnxruntime.int8]"]
                body = "\n".join(keep) + f"\n\n[options.onnxruntime.int8]\nrecipe = {{ reduce_range = {other} }}\n"
                toml.write_text(body)
                dist2 = tmp / "pi5-other"
                secs, cmd = vitexport(["build", "--target", str(toml), "--precision", "int8", "--num-eval", str(args.num_eval), "--out", str(dist2), "--remote", "emulated-arm=pi5", *remote])
                report2 = json.loads((dist2 / "report.json").read_text())
                shutil.copyfile(dist2 / "report.json", RESULTS / f"emulated-pi5-reduce-range-{other}.report.json")
                out["other_weights"] = {"reduce_range": other == "true", "profile_toml": body, "command": " ".join(cmd[2:]), "seconds": round(secs, 1), "rows": {f"{n}@{w}": summary(r) for (n, w), r in rows_of(report2).items() if r.get("accuracy")}}
                save()
                int8_artifact = int8_artifact or dist2 / "onnxruntime-int8"

            if "parallel" in steps and int8_artifact:  # 3. two devices in parallel vs each alone, fresh caches
                par: dict = {"artifact": str(int8_artifact)}
                for label, remotes in (("pi-a alone", ["pi-a=pi-a"]), ("pi-b alone", ["pi-b=pi-b"]), ("both", ["pi-a=pi-a", "pi-b=pi-b"])):
                    slug = label.replace(" ", "-")
                    rr = ["--remote-python", str(py), "--ssh-config", str(cfg), "--remote-cache", str(tmp / f"cache-{slug}"), "--remote-timeout", "7200"]
                    flags = [x for r in remotes for x in ("--remote", r)]
                    secs, cmd = vitexport(["eval", str(int8_artifact), "--images", str(REPO / "calibration" / "eval"), "--limit", str(args.num_eval_parallel), "--json", *flags, *rr], capture=tmp / f"{slug}.json")
                    rep = json.loads((tmp / f"{slug}.json").read_text())
                    dev = {r["measured_on"]["name"]: r["measured_on"] for r in rep["rows"]}
                    par[label] = {"command": " ".join(cmd[2:]), "command_seconds": round(secs, 1), "device_seconds": {k: v["seconds"] for k, v in dev.items()}, "device_phase_wall_seconds": next(iter(dev.values()))["wall_seconds"]}
                alone = par["pi-a alone"]["device_phase_wall_seconds"] + par["pi-b alone"]["device_phase_wall_seconds"]
                par["sum_alone_seconds"] = round(alone, 1)
                par["parallel_over_sum"] = round(par["both"]["device_phase_wall_seconds"] / alone, 3)
                out["parallel"] = par
                save()
        finally:
            sshd.terminate()
            sshd.wait(10)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
