"""Polygraphy runner for a built engine, with the SqzLinear plugin registered first.

The compare stage feeds this runner and an onnxruntime runner to Polygraphy's Comparator; the
engine is loaded with Polygraphy's composable loaders (BytesFromPath -> EngineFromBytes), not by
hand.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from sqz_export.engine.build import find_plugin_library, import_tensorrt, load_plugin_library
from sqz_export.errors import UserError

logger = logging.getLogger(__name__)

PROFILES = {"decode": 0, "prefill": 1}
"""Optimization profile index of each phase, in the order ``build_engine`` adds them."""


def make_trt_runner(
    engine_path: str | os.PathLike[str],
    plugin_library: str | os.PathLike[str] | None,
    *,
    profile: str | int = "prefill",
    name: str | None = None,
) -> Any:
    """A Polygraphy ``TrtRunner`` for ``engine_path``.

    Args:
        engine_path: engine written by ``sqz-export build``.
        plugin_library: libsqz_trt_plugin.so; None searches like ``sqz-export build`` does and
            goes on without a plugin if none is found (enough for the FP16 baseline engine).
        profile: "prefill" (any prompt length up to the build's --max-seq, empty cache), "decode"
            (one new token after a cache of up to --max-context - 1 tokens), or a profile index for
            engines built elsewhere.
        name: runner name in Polygraphy's reports (default: the engine's file name).

    Raises:
        UserError: TensorRT, the engine file or the plugin library is missing, or the profile is unknown.
    """
    path = Path(engine_path)
    if not path.is_file():
        raise UserError(f"{path}: no such engine file (build it with `sqz-export build`)")
    if isinstance(profile, str) and profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; expected one of {sorted(PROFILES)} or an index")
    index = PROFILES[profile] if isinstance(profile, str) else profile
    trt = import_tensorrt()
    # Before deserialization: the engine's plugin layers are created from the registered creator.
    try:
        library = find_plugin_library(plugin_library)
    except UserError:
        if plugin_library is not None:
            raise
        logger.info("no SqzLinear plugin library found; only engines without SqzLinear layers (the FP16 baseline) will load")
    else:
        load_plugin_library(trt, library)
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    engine = EngineFromBytes(BytesFromPath(str(path)))
    return TrtRunner(engine, name=name or f"trt:{path.name}", optimization_profile=index)
