"""sqz-export: a deployment compiler for SqueezeLLM dense-and-sparse quantized LLMs."""

from __future__ import annotations

__version__ = "0.1.0"
