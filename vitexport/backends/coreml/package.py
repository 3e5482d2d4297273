"""The saved package: the metadata written into it, the weight-free reference graph beside it for emulation, and
a reader of saved .mlpackage files (MIL program + weight.bin) that needs neither coremltools' converter nor torch."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...errors import VitexportError
from .settings import EMBEDDING_OUTPUT, EMULATION_DIR, INPUT_NAME, INSTALL_HINT, PACKAGE, SKELETON, WEIGHT_MAP


def _describe_model(mlmodel, reference, precision: str, target: str, recipe: Mapping[str, Any]) -> None:
    from importlib.metadata import version

    spec = reference.spec
    pre = spec.preprocessing.to_dict()
    h, w = spec.input_shape[1:]
    what = "image classifier" if spec.task == "classification" else "image embedding backbone"
    source = _source_name(spec.source)  # never the build machine's path
    mlmodel.short_description = (
        f"{spec.architecture} {what} from {source}, {precision}, built by vitexport. Input: an RGB image of exactly {h}x{w}, "
        f"framed as the checkpoint's preprocessing does ({_resize_text(spec.preprocessing)}; see vitexport.app_framing); scaling and normalisation happen inside the model."
    )
    author, licence = _card_fields(spec.source)
    if author:
        mlmodel.author = author
    mlmodel.license = licence or f"not stated by the checkpoint ({source}): check its model card before shipping"
    mlmodel.version = version("vitexport") if _has_dist("vitexport") else "0"
    mlmodel.input_description[INPUT_NAME] = f"RGB image {h}x{w}, already resized and centre-cropped ({_resize_text(spec.preprocessing)})"
    if spec.task == "classification":
        mlmodel.output_description["classLabel"] = "most likely label"
        mlmodel.output_description["classLabel_probs"] = "probability of every label (softmax)"
    else:
        mlmodel.output_description[EMBEDDING_OUTPUT] = f"embedding ({reference.verification.get('embedding') or 'pooled'})"
    meta = mlmodel.user_defined_metadata
    meta["vitexport.version"] = mlmodel.version
    meta["vitexport.precision"] = precision
    meta["vitexport.minimum_deployment_target"] = target
    meta["vitexport.preprocessing"] = json.dumps(pre)
    meta["vitexport.app_preprocessing"] = f"resize/crop to {h}x{w} in the app: {_resize_text(spec.preprocessing)}"
    meta["vitexport.app_framing"] = app_framing(spec.preprocessing)
    meta["vitexport.model"] = json.dumps({**spec.summary(reference.num_parameters), "source": source})
    meta["vitexport.task"] = spec.task


def _source_name(source: str) -> str:
    """A hub id as is; a local checkpoint by its folder name (the absolute path says nothing to the app)."""
    return Path(source).name if Path(source).exists() else source


def app_framing(pre) -> str:
    """How an app reproduces the evaluated framing with Vision (CoreML's image input neither resizes nor crops).

    resize HxW then crop hxw is the central (h/H, w/W) of the original, stretched to hxw: a centred regionOfInterest
    with .scaleFill. shortest-edge s then crop c is the central square of side c/s of the short side: the same
    region fraction with .centerCrop. Vision's own resampling filter differs from the checkpoint's."""
    h, w = pre.output_size
    if pre.resize:
        fh, fw = (pre.crop[0] / pre.resize[0], pre.crop[1] / pre.resize[1]) if pre.crop else (1.0, 1.0)
        option = ".scaleFill"
    elif pre.shortest_edge and pre.crop:
        fh = fw = pre.crop[0] / pre.shortest_edge
        option = ".centerCrop"
    else:
        return f"feed an RGB image of exactly {h}x{w}"
    roi = f"CGRect(x: {(1 - fw) / 2:.4f}, y: {(1 - fh) / 2:.4f}, width: {fw:.4f}, height: {fh:.4f})"
    return (
        f"{_resize_text(pre)} = the central {fh:.2%} x {fw:.2%} (height x width) of the image scaled to {h}x{w}: "
        f"VNCoreMLRequest regionOfInterest = {roi}, imageCropAndScaleOption = {option}"
    )


def _resize_text(pre) -> str:
    parts = []
    if pre.shortest_edge:
        parts.append(f"resize shortest edge to {pre.shortest_edge}")
    elif pre.resize:
        parts.append(f"resize to {pre.resize[0]}x{pre.resize[1]}")
    if pre.crop:
        parts.append(f"centre crop {pre.crop[0]}x{pre.crop[1]}")
    return ", then ".join(parts) or "none"


def _has_dist(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


def _card_fields(source: str) -> tuple[str | None, str | None]:
    """author / licence from a local checkpoint's model card (README.md front matter) when it has them."""
    card = Path(source) / "README.md"
    author = licence = None
    if card.is_file():
        for line in card.read_text(errors="replace").splitlines()[:40]:
            if line.lower().startswith("license:"):
                licence = line.split(":", 1)[1].strip()
            if line.lower().startswith(("author:", "authors:")):
                author = line.split(":", 1)[1].strip()
    if "/" in source and not Path(source).exists():
        author = author or source.split("/")[0]
    return author, licence


def _write_emulation(out_dir: Path, reference, matched: Mapping[str, tuple[str, bool]]) -> None:
    """emulation/graph.onnx: the reference graph with its weights removed; weights.json: which package weight fills
    each (``matched``: reference initializer -> (torch name, transposed?), torch_weights.match_initializers)."""
    import onnx

    pkg = PackageReader(out_dir / PACKAGE)
    model = onnx.load(str(reference.path))
    consumed = pkg.consumed_weights()
    mapping = {}
    keep = []
    for init in model.graph.initializer:
        if init.name not in matched:
            keep.append(init)
            continue
        tname, transpose = matched[init.name]
        stem = tname.replace(".", "_")
        shape = [int(d) for d in init.dims]
        size = int(np.prod(shape))
        cands = [n for n, shp in consumed.items() if f"_{stem}_" in f"_{n}_" and int(np.prod(shp)) == size]
        if len(cands) != 1:
            raise VitexportError(f"coreml emulation: cannot find the package weight for {tname} (candidates {cands}); please report this model")
        mapping[init.name] = {"const": cands[0], "torch": tname, "transpose": transpose, "shape": shape}
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    d = out_dir / EMULATION_DIR
    d.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(d / SKELETON))
    (d / WEIGHT_MAP).write_text(json.dumps({"input_preprocessing": "package", "initializers": mapping}, indent=1) + "\n")


def _weight_summary(path: Path) -> dict[str, Any]:
    pkg = PackageReader(path)
    kinds: dict[str, int] = {}
    for op in pkg.ops.values():
        if op.type.startswith("constexpr_"):
            kinds[op.type] = kinds.get(op.type, 0) + 1
    return {"constexpr_ops": kinds, "weight_bin_bytes": pkg.weight_bin_bytes(), "storage": pkg.storage_by_dtype()}


# ---------------------------------------------------------------------------------------------------------- reading
#
# A reader for saved .mlpackage files that needs neither coremltools' converter nor torch (importing coremltools
# imports torch and transformers when they are installed; runners must not): the protobuf classes that ship with
# coremltools are loaded under a private package name, weight.bin is read with numpy.

_DTYPES = {10: np.float16, 11: np.float32, 12: np.float64, 21: np.int8, 22: np.int16, 23: np.int32, 24: np.int64, 31: np.uint8, 32: np.uint16,
           33: np.uint32, 34: np.uint64, 1: np.bool_}
_SUBBYTE = {25: (4, True), 35: (4, False), 36: (2, False), 37: (1, False), 38: (6, False), 39: (3, False)}  # dataType -> (bits, signed)


def _proto():
    name = "_vitexport_coreml_proto"
    if name + ".Model_pb2" in sys.modules:
        return sys.modules[name + ".Model_pb2"], sys.modules[name + ".MIL_pb2"]
    spec = importlib.util.find_spec("coremltools")
    if spec is None or not spec.origin:
        raise VitexportError(f"reading a CoreML package needs coremltools' protobuf definitions: {INSTALL_HINT}")
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(Path(spec.origin).parent / "proto")]
    sys.modules[name] = pkg
    return importlib.import_module(name + ".Model_pb2"), importlib.import_module(name + ".MIL_pb2")


def unpack_subbyte(raw: bytes | np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """n-bit values packed little-endian (first value in the lowest bits), as MIL blob storage writes them."""
    b = np.unpackbits(np.frombuffer(bytes(raw), np.uint8), bitorder="little")[: count * bits].reshape(count, bits).astype(np.int16)
    v = (b << np.arange(bits, dtype=np.int16)).sum(axis=1)
    if signed:
        v = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
    return v.astype(np.int8 if signed else np.uint8)


class PackageReader:
    """The MIL program of a saved .mlpackage: every constant and constexpr op, dequantized on request."""

    def __init__(self, path: Path):
        self.path = Path(path)
        data = self.path / "Data" / "com.apple.CoreML"
        if not (data / "model.mlmodel").is_file():
            raise VitexportError(f"{self.path} is not an ML Program .mlpackage (no Data/com.apple.CoreML/model.mlmodel)")
        model_pb2, _ = _proto()
        self.spec = model_pb2.Model()
        self.spec.ParseFromString((data / "model.mlmodel").read_bytes())
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise VitexportError(f"{self.path} is not an ML Program")
        self.weights_dir = data / "weights"
        self._blobs: dict[str, bytes] = {}
        fn = self.spec.mlProgram.functions["main"]
        self.block = fn.block_specializations[fn.opset]
        self.ops = {}
        for op in self.block.operations:
            for o in op.outputs:
                self.ops[o.name] = op
        self._cache: dict[str, np.ndarray] = {}

    # -- raw storage

    def _blob(self, file_name: str) -> bytes:
        rel = file_name.replace("@model_path/", "")
        if rel not in self._blobs:
            self._blobs[rel] = (self.weights_dir.parent / rel).read_bytes()
        return self._blobs[rel]

    def weight_bin_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weights_dir.glob("*") if p.is_file()) if self.weights_dir.is_dir() else 0

    @staticmethod
    def _shape(vtype) -> tuple[int, ...]:
        t = vtype.tensorType
        return tuple(int(d.constant.size) for d in t.dimensions)

    def _value(self, value) -> np.ndarray:
        t = value.type.tensorType
        dt, shape = int(t.dataType), self._shape(value.type)
        count = int(np.prod(shape)) if shape else 1
        kind = value.WhichOneof("value")
        if kind == "blobFileValue":
            buf = self._blob(value.blobFileValue.fileName)
            off = int(value.blobFileValue.offset)
            sentinel, _ = np.frombuffer(buf, np.uint32, 2, off)
            if sentinel != 0xDEADBEEF:
                raise VitexportError(f"{self.path}: corrupt weight.bin (bad blob header at {off})")
            nbytes, data_off = (int(x) for x in np.frombuffer(buf, np.uint64, 2, off + 8))
            raw = buf[data_off : data_off + nbytes]
            if dt in _SUBBYTE:
                bits, signed = _SUBBYTE[dt]
                return unpack_subbyte(raw, bits, count, signed).reshape(shape)
            return np.frombuffer(raw, _DTYPES[dt], count).reshape(shape)
        if value.immediateValue.WhichOneof("value") == "list":  # e.g. the classifier's labels
            return np.array([self._value(v).reshape(-1)[0] for v in value.immediateValue.list.values], dtype=object)
        tv = value.immediateValue.tensor
        which = tv.WhichOneof("value")
        if which == "bytes":
            raw = tv.bytes.values
            if dt in _SUBBYTE:
                bits, signed = _SUBBYTE[dt]
                return unpack_subbyte(raw, bits, count, signed).reshape(shape)
            return np.frombuffer(raw, _DTYPES[dt], count).reshape(shape)
        if which == "strings":
            return np.array(list(tv.strings.values), dtype=object).reshape(shape)
        vals = list(getattr(tv, which).values) if which else []
        return np.asarray(vals, dtype=_DTYPES.get(dt, np.float32)).reshape(shape)

    # -- values

    def _input(self, op, key: str) -> np.ndarray | None:
        if key in op.inputs:
            arg = op.inputs[key].arguments[0]
            return self.value(arg.name) if arg.WhichOneof("binding") == "name" else self._value(arg.value)
        if key in op.attributes:
            return self._value(op.attributes[key])
        return None

    def value(self, name: str) -> np.ndarray:
        """A constant (dequantized when it is a constexpr op's output) as numpy, in its stored dtype family."""
        if name in self._cache:
            return self._cache[name]
        op = self.ops.get(name)
        if op is None:
            raise KeyError(name)
        t = op.type
        if t == "const":
            v = self._value(op.attributes["val"])
        elif t == "constexpr_affine_dequantize":  # iOS16: scale * (q - zp) along `axis`
            q = self._input(op, "quantized_data").astype(np.float32)
            zp = self._input(op, "zero_point").astype(np.float32)
            scale = self._input(op, "scale").astype(np.float32)
            axis = int(self._input(op, "axis"))
            bshape = [1] * q.ndim
            if scale.size > 1:
                bshape[axis] = -1
            v = ((q - zp.reshape(bshape if zp.size > 1 else [1] * q.ndim)) * scale.reshape(bshape)).astype(np.float32)
        elif t == "constexpr_blockwise_shift_scale":  # iOS18: (data - offset) * scale, scale/offset repeated per block
            data = self._input(op, "data").astype(np.float32)
            scale = _repeat_blocks(self._input(op, "scale").astype(np.float32), data.shape)
            off = self._input(op, "offset")
            if off is not None:
                data = data - _repeat_blocks(off.astype(np.float32), data.shape)
            v = data * scale
        elif t == "constexpr_lut_to_dense":
            lut = self._input(op, "lut").astype(np.float32)
            idx = self._input(op, "indices")
            shape = self._input(op, "shape")
            if shape is not None:  # iOS16: flat lut, bit-packed indices
                bits = int(np.log2(lut.size))
                n = int(np.prod(shape))
                codes = unpack_subbyte(idx.tobytes(), bits, n, False) if bits < 8 else idx.reshape(-1)
                v = lut.reshape(-1)[codes.astype(np.int64)].reshape(tuple(int(s) for s in shape))
            else:  # iOS18: indices of the output's shape, lut [*groups, 2^n, vector_size]
                if lut.shape[-1] != 1:
                    raise VitexportError(f"{self.path}: vector palettization is not supported by the reader")
                grid = lut[..., 0]  # [*groups, 2^n]
                gidx = np.ix_(*[np.arange(s) // (s // g) for s, g in zip(idx.shape, grid.shape[:-1])])
                v = grid[gidx + (idx.astype(np.int64),)]
        elif t == "constexpr_cast":
            v = self._input(op, "source_val").astype(np.float32)
        else:
            raise VitexportError(f"{self.path}: the reader does not know the op {t} (producing {name})")
        if t != "const":  # CoreML materialises the weight in the op's output type (float16 in a float16 program)
            v = v.astype(_DTYPES.get(int(op.outputs[0].type.tensorType.dataType), np.float32))
        self._cache[name] = v
        return v

    def consumed_weights(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the constant tensors (>= 2 elements) that compute ops read: the model's weights."""
        out = {}
        for op in self.block.operations:
            if op.type == "const" or op.type.startswith("constexpr_"):
                continue
            for arg in op.inputs.values():
                for b in arg.arguments:
                    if b.WhichOneof("binding") != "name":
                        continue
                    src = self.ops.get(b.name)
                    if src is None or not (src.type == "const" or src.type.startswith("constexpr_")):
                        continue
                    shape = self._shape(src.outputs[0].type)
                    if int(np.prod(shape) if shape else 1) >= 2 and int(src.outputs[0].type.tensorType.dataType) in (10, 11):
                        out[b.name] = shape
        return out

    def image_preprocessing(self, input_name: str = INPUT_NAME) -> tuple[float, np.ndarray]:
        """The scale and per-channel bias the package applies to its image input (1 and 0 when it has none)."""
        scale, bias = 1.0, np.zeros(3, np.float32)
        consumers = [op for op in self.block.operations if any(b.name == input_name for a in op.inputs.values() for b in a.arguments)]
        cur = input_name
        for _ in range(2):
            nxt = [op for op in self.block.operations if op.type in ("mul", "add") and any(b.name == cur for a in op.inputs.values() for b in a.arguments)]
            if not nxt:
                break
            op = nxt[0]
            other = next(b.name for k, a in op.inputs.items() for b in a.arguments if b.name != cur)
            val = self.value(other).astype(np.float32)
            if op.type == "mul":
                scale = float(val.reshape(-1)[0])
            else:
                bias = val.reshape(-1)
            cur = op.outputs[0].name
        del consumers
        return scale, bias

    def computes_in_fp16(self) -> bool:
        return any(int(o.type.tensorType.dataType) == 10 for op in self.block.operations if op.type not in ("const",) and not op.type.startswith("constexpr_") for o in op.outputs)

    def storage_by_dtype(self) -> dict[str, int]:
        """Bytes of weight.bin per stored data type (sub-byte types make the compression visible)."""
        _, mil = _proto()
        out: dict[str, int] = {}
        for op in self.block.operations:
            values = list(op.attributes.values()) + [b.value for a in op.inputs.values() for b in a.arguments if b.WhichOneof("binding") == "value"]
            for val in values:
                if val.WhichOneof("value") != "blobFileValue":
                    continue
                buf = self._blob(val.blobFileValue.fileName)
                nbytes = int(np.frombuffer(buf, np.uint64, 1, int(val.blobFileValue.offset) + 8)[0])
                name = mil.DataType.Name(int(val.type.tensorType.dataType))
                out[name] = out.get(name, 0) + nbytes
        return out


def _repeat_blocks(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    for axis, (s, g) in enumerate(zip(shape, a.shape)):
        if g != s and g != 1:
            a = np.repeat(a, s // g, axis=axis)
    return a
