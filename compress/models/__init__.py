"""Model intake: timm architecture + weights, Hugging Face folder, or ONNX file.

Loading never reaches the network and never runs code from the user's files: timm models are
built from the installed library and filled from safetensors (or ``torch.load(weights_only=True)``),
HF models load with ``local_files_only`` and safetensors only, ONNX files are parsed, not executed.
"""

from .handle import ModelHandle, SentenceEmbedder
from .loaders import load_model

__all__ = ["ModelHandle", "SentenceEmbedder", "load_model"]
