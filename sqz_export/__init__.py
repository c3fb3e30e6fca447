"""sqz-export: a deployment compiler for SqueezeLLM dense-and-sparse quantized LLMs."""

from __future__ import annotations

__version__ = "0.1.0"

# After __version__ (the modules below import it): `import sqz_export` lets transformers'
# from_pretrained load sqz-export checkpoints into packed SqzLinear layers.
from sqz_export import hf_quantizer  # noqa: E402

hf_quantizer.register()
