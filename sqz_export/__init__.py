"""sqz-export: a deployment compiler for SqueezeLLM dense-and-sparse quantized LLMs."""

from __future__ import annotations

__version__ = "0.1.0"

# `import sqz_export` lets transformers' from_pretrained load sqz-export checkpoints into packed
# SqzLinear layers, without importing torch or transformers itself (`sqz-export --help` must stay
# instant): the registration runs when transformers' quantizer registry is imported, or now if it was.
from sqz_export import _hf_hook  # noqa: E402

_hf_hook.install()
