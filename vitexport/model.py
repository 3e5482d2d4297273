"""ModelSpec: a ViT / DeiT checkpoint, its preprocessing and its labels.

The checkpoint is loaded through the ordinary `from_pretrained` path (a hub id or a local directory).
torch and transformers are imported inside functions so that `import vitexport` stays light.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .data import Preprocessing
from .errors import VitexportError

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("vit", "deit")
# Architectures with a classification head; anything else of a supported model type is a backbone.
CLASSIFIERS = {
    "ViTForImageClassification",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
}
SUPPORTED_ARCHITECTURES = CLASSIFIERS | {"ViTModel", "DeiTModel"}


@dataclass(frozen=True)
class ModelSpec:
    source: str  # hub id or directory, as the user gave it
    model_type: str  # "vit" | "deit"
    architecture: str  # e.g. ViTForImageClassification, ViTModel
    task: str  # "classification" | "embedding"
    preprocessing: Preprocessing
    id2label: Mapping[int, str] = field(default_factory=dict)
    image_size: int = 224
    hidden_size: int = 768
    num_layers: int = 12
    config: Mapping[str, Any] = field(default_factory=dict, repr=False)
    trust_pickle: bool = False

    @property
    def output_name(self) -> str:
        return "logits" if self.task == "classification" else "embedding"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w = self.preprocessing.output_size
        return (int(self.config.get("num_channels", 3)), h, w)

    @property
    def activation_bytes_per_image(self) -> int:
        """float32 bytes of the linear layers' inputs for one image (what a calibration pass fetches per image)."""
        h, w = self.preprocessing.output_size
        patch = int(self.config.get("patch_size", 16))
        tokens = (h // patch) * (w // patch) + 2  # + class (and DeiT's distillation) token: an upper bound
        inter = int(self.config.get("intermediate_size", 4 * self.hidden_size))
        return tokens * (3 * self.hidden_size + inter) * 4 * self.num_layers

    @classmethod
    def load(cls, source: str | Path, trust_pickle: bool = False) -> "ModelSpec":
        src = str(source)
        local = Path(src)
        if local.exists() or _looks_like_path(src):
            _check_local_dir(local, trust_pickle)
        try:
            from transformers import AutoConfig, AutoImageProcessor
        except ImportError as e:  # pragma: no cover - core dependency
            raise VitexportError(f"transformers is required to load checkpoints ({e}): pip install transformers") from None

        config = _load(AutoConfig.from_pretrained, src, "config")
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise VitexportError(
                f"{src} is a '{config.model_type}' checkpoint; vitexport supports Vision Transformers "
                f"({', '.join(SUPPORTED_MODEL_TYPES)}: ViTForImageClassification, ViTModel, DeiT)"
            )
        archs = list(getattr(config, "architectures", None) or [])
        arch = archs[0] if archs else ("ViTModel" if config.model_type == "vit" else "DeiTModel")
        task = "classification" if arch in CLASSIFIERS else "embedding"
        if arch.endswith("ForMaskedImageModeling"):
            raise VitexportError(f"{src} is a {arch} (masked image modelling) checkpoint: export a classifier or a ViTModel backbone")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise VitexportError(f"{src}: architecture {arch} is not one vitexport exports: use a checkpoint of {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        if int(getattr(config, "num_channels", 3)) != 3:
            raise VitexportError(f"{src} takes {config.num_channels}-channel images; vitexport feeds RGB images (3 channels): use a 3-channel checkpoint")

        proc_cfg = _processor_config(src, AutoImageProcessor)
        pre = Preprocessing.from_processor_config(proc_cfg, source=str(proc_cfg.get("image_processor_type", "")))
        if pre.output_size != (config.image_size, config.image_size):
            raise VitexportError(
                f"{src}: its image processor produces {pre.output_size} images but the model expects {config.image_size}x{config.image_size}; fix preprocessor_config.json"
            )
        id2label = {int(k): v for k, v in (config.id2label or {}).items()} if task == "classification" else {}
        return cls(
            source=src,
            model_type=config.model_type,
            architecture=arch,
            task=task,
            preprocessing=pre,
            id2label=id2label,
            image_size=int(config.image_size),
            hidden_size=int(config.hidden_size),
            num_layers=int(config.num_hidden_layers),
            config=config.to_dict(),
            trust_pickle=trust_pickle,
        )

    def load_torch(self):
        """The PyTorch module that export traces: pixel_values -> logits (classifier) or embedding (backbone)."""
        import transformers

        transformers.utils.logging.disable_progress_bar()  # our own progress reporting speaks for the build

        cls = getattr(transformers, self.architecture, None)
        if cls is None:  # a supported architecture that this transformers lacks (DeiT was removed from some releases)
            raise VitexportError(f"transformers {transformers.__version__} has no class {self.architecture}: install a transformers that has it")
        kwargs: dict[str, Any] = {"attn_implementation": "eager"}  # plain MatMul/Softmax attention: every backend fuses it
        if not self.trust_pickle:
            kwargs["use_safetensors"] = True
        kwargs["output_loading_info"] = True
        model, info = _load(cls.from_pretrained, self.source, "weights", **kwargs)
        _refuse_random_weights(self.source, self.architecture, info)
        return _Head(model.eval(), self.task).eval()

    def labels_list(self) -> list[str]:
        return [self.id2label.get(i, str(i)) for i in range(len(self.id2label))]

    def summary(self, num_parameters: int | None = None) -> dict:
        return {
            "source": self.source,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "task": self.task,
            "image_size": self.image_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_labels": len(self.id2label),
            "parameters": num_parameters,
        }


def _looks_like_path(src: str) -> bool:
    # A hub id is "name" or "org/name"; anything else (./x, /x, a/b/c, x\\y) is meant as a path.
    return src.startswith((".", "/", "~")) or src.count("/") > 1 or "\\" in src


def _check_local_dir(path: Path, trust_pickle: bool) -> None:
    if not path.exists():
        raise VitexportError(f"model directory not found: {path} (pass a checkpoint directory or a hub id such as google/vit-base-patch16-224)")
    if not path.is_dir():
        raise VitexportError(f"--model must be a checkpoint directory or hub id, not a file: {path}")
    if not (path / "config.json").is_file():
        raise VitexportError(f"{path} has no config.json: it is not a Hugging Face checkpoint directory")
    has_safe = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    has_pickle = any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth"))
    if not has_safe and has_pickle and not trust_pickle:
        raise VitexportError(f"{path} only has pickle weights (.bin), which can run code when loaded: convert it to safetensors, or pass --trust-pickle if you trust its source")
    if not has_safe and not has_pickle:
        raise VitexportError(f"{path} has no weights (model.safetensors)")
    _check_weight_files(path)


def _refuse_random_weights(source: str, architecture: str, info: Mapping[str, Any]) -> None:
    """from_pretrained initialises at random whatever the checkpoint lacks and only logs it: that would be an artifact
    whose outputs mean nothing. Missing or mismatched weights stop the build."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in (info.get("mismatched_keys") or []))
    if mismatched:
        raise VitexportError(f"{source}: weights {', '.join(mismatched[:3])} have another shape than config.json says: fix config.json or the weights")
    if missing:
        names = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise VitexportError(
            f"{source} has no weights for {names}: as a {architecture} they would be random; "
            "fix 'architectures' in config.json (a classifier is ViTForImageClassification) or use a complete checkpoint"
        )


def _check_weight_files(path: Path) -> None:
    """Read every safetensors header now (cheap): a truncated or damaged file fails before any slow work."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="np") as st:  # parses the header and checks it covers the file
                st.keys()
        except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
            raise VitexportError(f"{f} is damaged ({str(e).splitlines()[0][:160] if str(e) else e.__class__.__name__}): download or copy it again") from None


def _processor_config(src: str, auto_processor) -> dict:
    local = Path(src) / "preprocessor_config.json"
    if local.is_file():
        try:
            return json.loads(local.read_text())
        except json.JSONDecodeError as e:
            raise VitexportError(f"{local} is not valid JSON ({e}): fix or replace it") from None
    proc = _load(auto_processor.from_pretrained, src, "image processor config")
    return proc.to_dict()


def _load(fn, src: str, what: str, **kwargs):
    try:
        return fn(src, **kwargs)
    except VitexportError:
        raise
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if Path(src).is_dir():
            raise VitexportError(f"cannot load the {what} of {src}: {first}") from None
        raise VitexportError(
            f"cannot load the {what} of '{src}' from the Hugging Face Hub ({first}): check the id and your network, or pass a local checkpoint directory"
        ) from None
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        raise VitexportError(f"cannot load the {what} of {src}: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}") from None
    except Exception as e:  # damaged files, refused pickles, shape mismatches: transformers/torch raise many types
        text = str(e).strip()
        if "ignore_mismatched_sizes" in text or "size mismatch" in text:
            raise VitexportError(f"the weights of {src} have other shapes than its config.json says: fix config.json or the weights") from None
        raise VitexportError(f"cannot load the {what} of {src}: {e.__class__.__name__}: {text.splitlines()[0][:200] if text else ''}") from None


def _torch_head():
    import torch

    class Head(torch.nn.Module):
        """One tensor out, so the ONNX graph has a plain, named output."""

        def __init__(self, model, task: str):
            super().__init__()
            self.model = model
            self.task = task

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            if self.task == "classification":
                return out.logits
            pooled = getattr(out, "pooler_output", None)
            return pooled if pooled is not None else out.last_hidden_state[:, 0]

    return Head


def _Head(model, task):  # noqa: N802 - a factory that keeps torch out of module import
    return _torch_head()(model, task)
