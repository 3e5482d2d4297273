"""The `vitexport` command: parses arguments and calls vitexport.api. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import Terminated, VitexportError, from_os_error

EXIT_USAGE = 2  # a user mistake: bad path, bad image, unsupported model, missing runtime
EXIT_GATE = 1  # the build finished but an artifact failed a --min-agreement / --max-top1-drop gate
EXIT_BUG = 3  # an unexpected exception: a bug in vitexport (one line; --verbose shows the traceback)
EXIT_SIGINT = 130  # Ctrl-C: 128 + SIGINT, as shells report it
EXIT_SIGTERM = 143  # SIGTERM (CI runners, `timeout`): 128 + SIGTERM

_EPILOG_BUILD = """examples:
  vitexport build                                   # the shipped DeiT-tiny, ONNX Runtime fp32/int8/int4, into dist/
  vitexport build --model google/vit-base-patch16-224 --calib imgs/calib --eval imgs/val --out vit-b
  vitexport build --target raspberry-pi-5 --min-agreement 97 --max-top1-drop 0.5   # fails (exit 1) on a bad artifact
"""


class _Parser(argparse.ArgumentParser):
    """argparse's errors as the one line every other error is (argparse would print the usage block first)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"vitexport: error: {message} (see {self.prog} --help)\n")


def _common() -> argparse.ArgumentParser:
    """The options every command takes (output and threads)."""
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the report as JSON on stdout, nothing else")
    common.add_argument("--quiet", "-q", action="store_true", help="no progress and no table; errors still go to stderr")
    common.add_argument("--verbose", "-v", action="store_true", help="log what each stage does")
    common.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for the runtimes (default: the runtime's own choice)")
    return common


def _remote() -> argparse.ArgumentParser:
    """The options of commands that can measure on devices over ssh."""
    remote = argparse.ArgumentParser(add_help=False)
    g = remote.add_argument_group("measuring on devices over SSH (the system ssh client: your ~/.ssh/config, keys and agent)")
    g.add_argument("--remote", action="append", default=[], metavar="[NAME=]USER@HOST", help="run on this device over ssh (repeat for several devices, measured in parallel); NAME labels its rows (default: USER@HOST)")
    g.add_argument("--remote-python", default="python3", metavar="PATH", help="the device's python, 3.9+ with numpy and the artifact's runtime (default: python3)")
    g.add_argument("--remote-timeout", type=float, default=None, metavar="SECONDS", help="give up on a device after this long per copy or run (default: 3600)")
    g.add_argument("--remote-cache", default=None, metavar="DIR", help="cache folder on the device, relative to its home (default: .cache/vitexport)")
    g.add_argument("--ssh-config", default=None, metavar="FILE", help="ssh config file to use instead of ~/.ssh/config")
    return remote


def _add_build(sub, parents: list[argparse.ArgumentParser]) -> None:
    from . import api, backends

    b = sub.add_parser("build", parents=parents, help="export, quantize and measure artifacts for a target", description="Export a ViT/DeiT checkpoint to a verified fp32 ONNX, build one artifact per precision for a backend, measure each against the fp32 reference on the evaluation images, and write artifacts, report.json, report.md and report.html to --out.", epilog=_EPILOG_BUILD, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--model", default=str(api.DEFAULT_MODEL), metavar="ID_OR_DIR", help="hub id (google/vit-base-patch16-224, facebook/deit-tiny-patch16-224, google/vit-base-patch16-224-in21k) or checkpoint directory (default: the shipped DeiT-tiny)")
    b.add_argument("--backend", metavar="LIST", help=f"target runtime(s), comma-separated for rows side by side: {', '.join(backends.names())} (default: the --target's, else onnxruntime)")
    b.add_argument("--precision", metavar="LIST", help="comma-separated precisions (default: the --target's, else fp32,int8,int4)")
    b.add_argument("--target", metavar="NAME_OR_TOML", help="device profile: a shipped name (vitexport targets) or a .toml file (sets backend, precisions, options unless given here)")
    b.add_argument("--calib", default=str(api.DEFAULT_CALIB), metavar="DIR", help="calibration images (default: the shipped calibration set)")
    b.add_argument("--eval", default=str(api.DEFAULT_EVAL), metavar="DIR", help="evaluation images; labels from an ImageFolder layout or WNID_* names + classes.tsv (default: the shipped quick-eval set)")
    b.add_argument("--classes", metavar="TSV", help="index<TAB>wnid<TAB>label file for WNID_* image names (default: classes.tsv inside the image folder)")
    b.add_argument("--num-calib", type=int, default=None, metavar="N", help="use at most N calibration images (default: all)")
    b.add_argument("--num-eval", type=int, default=None, metavar="N", help="use at most N evaluation images (default: all)")
    b.add_argument("--out", default="dist", metavar="DIR", help="output folder (default: dist)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists (the old one is kept until the new one is complete)")
    b.add_argument("--opset", type=int, default=None, help="ONNX opset, 17 or newer (default: 18, or what the --target's TensorRT parses)")
    b.add_argument("--trust-pickle", action="store_true", help="allow checkpoints that only have pickle (.bin) weights")
    b.add_argument("--no-latency", action="store_true", help="skip timing (accuracy, size and memory only)")
    b.add_argument("--cache-dir", metavar="DIR", help="keep the verified reference ONNX, the float calibration statistics, the int8 sensitivity scores, the GPTQ codes and the CoreML conversions in DIR, each keyed by the sha256 of what it is computed from, and reuse them in later builds (default: no cache)")
    b.add_argument("--cache-max-size", type=_size, default=api.DEFAULT_CACHE_MAX_BYTES, metavar="SIZE", help="after the build, remove the least recently used entries of --cache-dir until it fits SIZE (e.g. 10G, 500M; 'none': no bound; default: 10G); this build's own entries are always kept")
    b.add_argument("--min-agreement", type=float, metavar="PCT", help="exit 1 if any artifact agrees with fp32 top-1 on fewer than PCT%% of images (see --gate-rule)")
    b.add_argument("--max-top1-drop", type=float, metavar="POINTS", help="exit 1 if any artifact's labelled top-1 is more than POINTS below fp32")
    b.add_argument("--gate-rule", choices=("point", "interval"), default="point", help="when a gate fails: 'point' (default) when the measured figure is beyond the bar; 'interval' only when its whole 95%% interval is (a failure noise cannot explain)")


def _add_eval(sub, parents: list[argparse.ArgumentParser]) -> None:
    e = sub.add_parser("eval", parents=parents, help="accuracy of one artifact on a folder of images", description="Measure one artifact's accuracy on a folder of images with the preprocessing recorded in its manifest. Needs only the artifact's runtime, numpy and pillow (no torch).")
    e.add_argument("artifact", help="artifact folder (or a file inside it), e.g. dist/onnxruntime-int8")
    e.add_argument("--images", required=True, metavar="DIR", help="images; labels from an ImageFolder layout or WNID_* names + classes.tsv")
    e.add_argument("--reference", metavar="ARTIFACT", help="an fp32 artifact to measure top-1 agreement and cosine against")
    e.add_argument("--classes", metavar="TSV", help="index<TAB>wnid<TAB>label file for WNID_* image names")
    e.add_argument("--limit", type=int, metavar="N", help="use at most N images")
    e.add_argument("--latency", action="store_true", help="also time batch-1 latency")
    e.add_argument("--ignore-sha256", action="store_true", help="run artifacts whose files no longer match their manifest's sha256 (only for artifacts you edited on purpose)")
    e.add_argument("--out", metavar="DIR", help="also write report.json, report.md and report.html to DIR")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")


def _add_bench(sub, parents: list[argparse.ArgumentParser]) -> None:
    n = sub.add_parser("bench", parents=parents, help="latency, throughput and peak memory of one artifact on this host", description="Time one artifact on this host: batch-1 p50/p90 latency after warm-up, throughput at a larger batch, peak memory. Needs only the artifact's runtime and numpy.")
    n.add_argument("artifact", help="artifact folder (or a file inside it)")
    n.add_argument("--images", metavar="DIR", help="time on real images from DIR (default: random inputs of the right shape)")
    n.add_argument("--batch", type=int, default=16, metavar="N", help="batch size for the throughput figure (default: 16)")
    n.add_argument("--ignore-sha256", action="store_true", help="run an artifact whose files no longer match its manifest's sha256 (only if you edited it on purpose)")
    n.add_argument("--out", metavar="DIR", help="also write report.json, report.md and report.html to DIR")
    n.add_argument("--force", action="store_true", help="replace --out if it exists")


def _add_targets_and_report(sub, common: argparse.ArgumentParser) -> None:
    sub.add_parser("targets", parents=[common], help="list the shipped device profiles")
    r = sub.add_parser("report", help="work with report.json files (merge reports from several hosts and devices)")
    rsub = r.add_subparsers(dest="report_command", metavar="ACTION")
    r.set_defaults(report_parser=r)
    m = rsub.add_parser("merge", parents=[common], help="join report.json files into one report", description="Join the rows of several report.json files (e.g. a host build and runs on devices) into one report.json + report.md. Rows of the same artifact name must be the same artifact (same sha256), measured on the same images.")
    m.add_argument("reports", nargs="+", metavar="REPORT_JSON")
    m.add_argument("-o", "--out", required=True, metavar="DIR", help="folder for the merged report.json and report.md")
    m.add_argument("--force", action="store_true", help="replace DIR if it exists")


def _parser() -> argparse.ArgumentParser:
    common, remote = _common(), _remote()
    p = _Parser(prog="vitexport", description="Turn a Hugging Face Vision Transformer into verified, quantized device artifacts, with one report of accuracy, size, latency and memory.")
    p.add_argument("--version", action="version", version=f"vitexport {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_build(sub, [common, remote])
    _add_eval(sub, [common, remote])
    _add_bench(sub, [common, remote])
    _add_targets_and_report(sub, common)
    return p


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.ERROR if quiet else (logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("vitexport: %(levelname)s: %(message)s" if not verbose else "%(name)s: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("vitexport").setLevel(level)
    for noisy in ("onnx_ir", "onnxscript", "torch", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _emit(report, args) -> None:
    from .harness.report import render_terminal

    if args.json:
        sys.stdout.write(report.to_json())
    elif not args.quiet:
        print(render_terminal(report))
        from .remote import describe_devices

        for line in describe_devices(report.rows):
            print(line)


def _devices(args) -> tuple:
    """--remote and its settings -> Devices (none: measure on this host)."""
    if not args.remote:
        return ()
    from .remote import parse_devices

    return parse_devices(args.remote, args.remote_python, args.remote_timeout, args.remote_cache, args.ssh_config)


def _size(text: str) -> int | None:
    """--cache-max-size: bytes, or a number with K, M, G or T (powers of 1024); 'none' for no bound."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t in ("NONE", "UNLIMITED"):
        return None
    scale = 1024 ** ("KMGT".index(t[-1]) + 1) if t and t[-1] in "KMGT" else 1
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # also NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes or a number with K, M, G or T (e.g. 10G), or 'none'")
    return int(value * scale)


def _check_gates(min_agreement: float | None, max_drop: float | None) -> None:
    """Before the build: a NaN gate would compare False with everything and never fail."""
    import math

    for flag, value in (("--min-agreement", min_agreement), ("--max-top1-drop", max_drop)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise VitexportError(f"{flag} {value} must be a number of percent (points), 0 or more")


def _write(report, args) -> None:
    if args.out:
        from . import api

        api.write_report(report, args.out, args.force)
        if not (args.quiet or args.json):
            print(f"\nwrote {args.out}/ (report.html, report.md, report.json)")


def _gate(report, min_agreement: float | None, max_drop: float | None, rule: str = "point") -> list[str]:
    """The failed checks of the report's quality gate (recorded by api.build; the rule lives in harness/gate.py)."""
    if report.gate:
        return [c["message"] for c in report.gate.get("checks", []) if c.get("failed")]
    from .harness.gate import check

    return check(report.rows, {"min_agreement": min_agreement, "max_top1_drop": max_drop}, rule).failures()


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.quiet or args.json, args.verbose)
    from .progress import Progress

    progress = Progress(enabled=not (args.quiet or args.json))
    for stream in (sys.stdout, sys.stderr):  # a path that is not valid UTF-8 is printed escaped, not a crash at the end
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    previous = _terminate_like_interrupt()
    try:
        return _run(args, progress)
    except VitexportError as e:
        print(f"vitexport: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"vitexport: terminated ({signal.Signals(e.signum).name}); nothing was written", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("vitexport: interrupted; nothing was written", file=sys.stderr)
        return EXIT_SIGINT
    except OSError as e:  # a full disk, a read-only folder: the environment, not vitexport
        print(f"vitexport: error: {from_os_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except MemoryError:
        print("vitexport: error: out of memory: use fewer images (--num-calib, --num-eval) or a machine with more memory", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:  # a bug: one line (exit 3, not the gate's 1); --verbose keeps the traceback for the report
        if args.verbose:
            logging.getLogger("vitexport").exception("internal error")
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        print(f"vitexport: error: internal error {e.__class__.__name__}: {first} (a bug: rerun with --verbose and report the traceback)", file=sys.stderr)
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminate_like_interrupt():
    """SIGTERM raises Terminated (a KeyboardInterrupt) so staged output and locks clean up; returns the old handler."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None  # signals can only be handled in the main thread; an embedding application keeps its own

    def handler(signum, frame):
        raise Terminated(signum)

    return signal.signal(signal.SIGTERM, handler)


def _run_build(args, progress) -> int:
    from . import api

    _check_gates(args.min_agreement, args.max_top1_drop)
    opts = api.BuildOptions(
        model=args.model,
        calib=args.calib,
        eval=args.eval,
        classes=args.classes,
        num_calib=args.num_calib,
        num_eval=args.num_eval,
        out=args.out,
        force=args.force,
        trust_pickle=args.trust_pickle,
        latency=not args.no_latency,
        min_agreement=args.min_agreement,
        max_top1_drop=args.max_top1_drop,
        gate_rule=args.gate_rule,
        cache_dir=args.cache_dir,
        cache_max_bytes=args.cache_max_size,
        remote=_devices(args),
        **{**api.target_settings(args.target, args.backend, args.precision.split(",") if args.precision else None, args.threads), **({"opset": args.opset} if args.opset is not None else {})},
    )
    report = api.build(opts, progress)
    _emit(report, args)
    if not (args.quiet or args.json):
        print(f"\nwrote {args.out}/ (report.html, report.md, report.json, one folder per artifact)")
    failures = _gate(report, args.min_agreement, args.max_top1_drop, args.gate_rule)
    if failures:
        print("vitexport: quality gate failed: " + "; ".join(failures), file=sys.stderr)
        return EXIT_GATE
    return 0


def _run_eval(args, progress) -> int:
    from . import api

    if args.out:
        api.check_report_out(Path(args.out), args.force, {"artifact": args.artifact, "--images": args.images, "--reference": args.reference, "--classes": args.classes})  # before the slow part
    report = api.evaluate(args.artifact, args.images, args.reference, args.classes, args.limit, args.threads, args.latency, progress, remote=_devices(args), verify=not args.ignore_sha256)
    _emit(report, args)
    _write(report, args)
    return 0


def _run_bench(args, progress) -> int:
    from . import api

    if args.out:
        api.check_report_out(Path(args.out), args.force, {"artifact": args.artifact, "--images": args.images})
    report = api.bench(args.artifact, args.images, args.threads, args.batch, progress, remote=_devices(args), verify=not args.ignore_sha256)
    _emit(report, args)
    _write(report, args)
    return 0


def _run_report(args, progress) -> int:
    if args.report_command != "merge":
        args.report_parser.print_help(sys.stderr)
        return EXIT_USAGE
    from .remote.merge import merge_files

    report = merge_files(args.reports, args.out, args.force)
    _emit(report, args)
    if not (args.quiet or args.json):
        print(f"\nwrote {args.out}/report.json, report.md and report.html ({len(report.rows)} rows from {len(args.reports)} reports)")
    return 0


def _run_targets(args, progress) -> int:
    from . import api
    from .profiles import shipped

    profiles = [api.load_target(n) for n in shipped()]
    if args.json:
        print(json.dumps(profiles, indent=2))
    else:
        for t in profiles:
            print(f"{t['name']:<22} {t.get('backend', '?'):<12} {','.join(t.get('precisions', [])):<20} {t.get('description', '')}")
    return 0


_COMMANDS = {"build": _run_build, "eval": _run_eval, "bench": _run_bench, "report": _run_report, "targets": _run_targets}


def _run(args, progress) -> int:
    run = _COMMANDS.get(args.command)
    return run(args, progress) if run else 0


if __name__ == "__main__":
    sys.exit(main())
