"""vitexport: Hugging Face Vision Transformers to verified, quantized device artifacts, with one honest report.

Only light modules are imported here; torch, transformers and every backend runtime are imported where used.
"""

from .errors import VitexportError

__version__ = "0.1.0"
__all__ = ["VitexportError", "__version__"]
