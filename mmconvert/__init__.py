"""mmconvert: package multimodal Qwen3 checkpoints as HF, safetensors and GGUF bundles.

The code lives in three subpackages mapped from the repository's top-level folders:
``mmconvert.convert`` (what to do), ``mmconvert.formats`` (how bytes are read and written)
and ``mmconvert.verify`` (is it right).
"""

__version__ = "0.1.0"
