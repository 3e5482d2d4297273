"""The reference ONNX does not depend on where the code ran: torch's exporter writes the Python stack of every node
(the checkout's and the installation's paths) into node metadata, which export.py strips, so two checkouts build the
same bytes and the artifacts' sha256 mean the model, not the folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
from onnx import helper

from vitexport.export import strip_source_paths

ROOT = Path(__file__).resolve().parent.parent


def _metadata_values(model: onnx.ModelProto) -> list[str]:
    values = [p.value for p in model.metadata_props] + [p.value for p in model.graph.metadata_props]
    return values + [p.value for n in model.graph.node for p in n.metadata_props]


def test_no_metadata_names_the_checkout_or_the_installation(reference):
    model = onnx.load(str(reference.path))
    assert any(n.metadata_props for n in model.graph.node)  # the exporter's other node metadata is kept
    leaks = [v[:120] for v in _metadata_values(model) if str(ROOT) in v or sys.prefix in v or 'File "' in v]
    assert not leaks, leaks


_EXPORT = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    import numpy as np
    from vitexport.export import export_reference
    from vitexport.model import ModelSpec

    spec = ModelSpec.load(sys.argv[1])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = export_reference(spec, Path(sys.argv[2]), x)
    print(hashlib.sha256(ref.path.read_bytes()).hexdigest())
    """
)


def test_two_checkouts_export_the_same_bytes(tiny_vit, tmp_path):
    # the same package from two folders, run from two working directories, on the same checkpoint
    hashes = []
    for name in ("checkout-a", "somewhere/else/checkout-b"):
        checkout = tmp_path / name
        shutil.copytree(ROOT / "vitexport", checkout / "vitexport", ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        out = subprocess.run([sys.executable, "-c", _EXPORT, str(tiny_vit), str(checkout / "ref")], cwd=checkout, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        model = onnx.load(str(checkout / "ref" / "model.onnx"))
        assert not [v for v in _metadata_values(model) if str(checkout) in v]
        hashes.append(out.stdout.split()[-1])
    assert hashes[0] == hashes[1]


def test_strip_reaches_subgraphs_and_keeps_other_metadata():
    def node(name: str) -> onnx.NodeProto:
        n = helper.make_node("Identity", ["x"], ["y"], name=name)
        n.metadata_props.add(key="pkg.torch.onnx.stack_trace", value='File "/home/me/repo/vitexport/model.py", line 3, in forward')
        n.metadata_props.add(key="pkg.torch.onnx.fx_node", value="%y : call_function[target=aten.clone](args = (%x,))")
        return n

    body = helper.make_graph([node("inner")], "body", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    outer = node("outer")
    branch = helper.make_node("If", ["c"], ["z"], then_branch=body, else_branch=body)
    graph = helper.make_graph([outer, branch], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])], [])
    model = helper.make_model(graph)
    assert strip_source_paths(model) == 3  # outer, and the If's two branches
    for n in [model.graph.node[0], *model.graph.node[1].attribute[0].g.node, *model.graph.node[1].attribute[1].g.node]:
        assert [p.key for p in n.metadata_props] == ["pkg.torch.onnx.fx_node"]
