"""Do two build folders hold the same artifacts? For checking that a change meant as a speed-up changed no model.

    python benchmarks/artifact_diff.py OUT_A OUT_B [--out benchmarks/results/artifact-diff.json]

Each artifact file of OUT_A is compared with OUT_B's: ONNX graphs by their nodes' op types and every initializer's
values (external data included), CoreML packages' weight files by bytes and their model.mlmodel by the parsed protobuf
(the user metadata's map is serialised in no fixed order, so its bytes differ between identical builds; coremltools'
conversion date is left out), OpenVINO IR by its weights' bytes and its model.xml with the names OpenVINO numbers
itself (``Constant_6242``: a counter of the nodes made earlier in the process, so a build after another one in the
same process numbers them differently) read as one, everything else by bytes; manifests and reports are skipped
(they hold timings). The rows' fidelity on the evaluation split (top-1, agreement, cosine, lost/gained) is compared
from both report.json files. Exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

SKIP_SUFFIXES = {".json", ".md", ".html", ".log", ".txt", ".data"}  # .data: read through its .onnx
CONVERSION_DATE = "com.github.apple.coremltools.conversion_date"
FIDELITY = ("top1", "agreement", "cosine", "lost", "gained", "n")


def _onnx_same(a: Path, b: Path) -> bool:
    import onnx
    from onnx import numpy_helper

    ma, mb = onnx.load(str(a)), onnx.load(str(b))
    ia = {t.name: numpy_helper.to_array(t, base_dir=str(a.parent)).tobytes() for t in ma.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t, base_dir=str(b.parent)).tobytes() for t in mb.graph.initializer}
    return ia == ib and [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]


def _mlmodel_same(a: Path, b: Path) -> bool:
    from coremltools.proto import Model_pb2

    ms = []
    for p in (a, b):
        m = Model_pb2.Model()
        m.ParseFromString(p.read_bytes())
        # coremltools stamps the day of the conversion: two builds either side of midnight are the same program
        m.description.metadata.userDefined.pop(CONVERSION_DATE, None)
        ms.append(m)
    return ms[0] == ms[1]  # protobuf equality compares maps as maps


_NAME = re.compile(rb'name="([^"]*)"')
_NUMBERED = re.compile(rb"([A-Za-z]+)_\d+")  # Constant_6242, MVN_42139_0_0/nncf_smooth_quant


def _openvino_xml_same(a: Path, b: Path) -> bool:
    def numbered_as_one(text: bytes) -> bytes:
        return _NAME.sub(lambda m: b'name="' + _NUMBERED.sub(rb"\1_#", m.group(1)) + b'"', text)

    return numbered_as_one(a.read_bytes()) == numbered_as_one(b.read_bytes())


def compare(a: Path, b: Path) -> dict:
    files, differ = 0, []
    for fa in sorted(p for p in a.rglob("*") if p.is_file()):
        rel = fa.relative_to(a)
        if fa.suffix in SKIP_SUFFIXES or fa.name.startswith("report"):
            continue
        fb = b / rel
        files += 1
        if not fb.exists():
            differ.append(f"{rel}: missing in {b}")
        elif fa.suffix == ".onnx":
            if not _onnx_same(fa, fb):
                differ.append(f"{rel}: ONNX differs")
        elif fa.name == "model.mlmodel":
            if not _mlmodel_same(fa, fb):
                differ.append(f"{rel}: CoreML program differs")
        elif fa.suffix == ".xml" and (fa.parent / (fa.stem + ".bin")).exists():
            if not _openvino_xml_same(fa, fb):
                differ.append(f"{rel}: OpenVINO IR differs")
        elif hashlib.sha256(fa.read_bytes()).digest() != hashlib.sha256(fb.read_bytes()).digest():
            differ.append(f"{rel}: bytes differ")
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    rows_b = {r["name"]: r for r in rb["rows"]}
    fidelity = {}
    for r in ra["rows"]:
        fa_ = {k: (r.get("accuracy") or {}).get(k) for k in FIDELITY}
        fb_ = {k: ((rows_b.get(r["name"]) or {}).get("accuracy") or {}).get(k) for k in FIDELITY}
        fidelity[r["name"]] = "same" if fa_ == fb_ else {"a": fa_, "b": fb_}
    return {"a": str(a), "b": str(b), "files_compared": files, "differences": differ, "fidelity": fidelity,
            "identical": not differ and all(v == "same" for v in fidelity.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"command": "python " + " ".join(["benchmarks/artifact_diff.py", *sys.argv[1:]]), **compare(args.a, args.b)}
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    sys.exit(0 if result["identical"] else 1)


if __name__ == "__main__":
    main()
