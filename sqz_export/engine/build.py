"""TensorRT engine builder: exported decoder ONNX -> serialized engine with decode and prefill profiles.

The quantized graph's ``sqz::SqzLinear`` nodes become IPluginV3 layers from ``libsqz_trt_plugin.so``
(the ONNX parser picks the plugin from the node's op type and its ``plugin_namespace`` /
``plugin_version`` attributes). The FP16 baseline is the same builder without the plugin. The network
is strongly typed (TensorRT 11 has no other mode; on 10.x we ask for it), so precision comes from
the ONNX graph itself: an FP16 graph gives an FP16 engine.

Two optimization profiles cover the two phases of generation with a KV cache::

    profile 0 "decode":  input_ids [b, 1]     past [b, h, p, d]  p in [0, max_context - 1]
    profile 1 "prefill": input_ids [b, s]     past [b, h, 0, d]  s in [1, max_seq]
    (b in [1, max_batch]; attention_mask [b, p + s]; position_ids [b, s])

Select the profile per execution context (decode: 0, prefill: 1).
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from sqz_export import atomic
from sqz_export.errors import UserError
from sqz_export.export.signature import DecoderSignature

logger = logging.getLogger(__name__)

PLUGIN_NAME = "SqzLinear"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "sqz"
PLUGIN_LIBRARY_NAME = "libsqz_trt_plugin.so"
PLUGIN_LIBRARY_ENV = "SQZ_PLUGIN_LIBRARY"
REPO_ROOT = Path(__file__).resolve().parents[2]

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]
"""Per network input: (min, opt, max) shapes of one optimization profile."""


@dataclasses.dataclass
class BuildLimits:
    """Shape ranges the engine must accept; every engine call must lie inside one profile."""

    max_batch: int = 1
    max_seq: int = 512
    """Most tokens of one prefill call."""
    max_context: int = 2048
    """Most tokens of past plus new tokens (the KV cache length after a decode step)."""

    def validate(self) -> None:
        if min(self.max_batch, self.max_seq, self.max_context) < 1:
            raise UserError(f"build limits must be positive, got {self}")
        if self.max_seq > self.max_context:
            raise UserError(f"--max-seq {self.max_seq} exceeds --max-context {self.max_context}")


@dataclasses.dataclass
class BuildResult:
    engine_path: Path
    engine_bytes: int
    seconds: float
    tensorrt_version: str
    sqz_nodes: int
    """SqzLinear nodes in the ONNX graph."""
    plugin_layers: int
    """Plugin layers in the parsed network (at least sqz_nodes: one per SqzLinear node)."""
    profiles: dict[str, ProfileShapes]


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or a UserError that says how to get it."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise UserError(
            "TensorRT Python package not found: pip install tensorrt (needs NVIDIA's index, "
            "--extra-index-url https://pypi.nvidia.com) on a machine with an NVIDIA GPU and driver; "
            f"see plugins/README.md ({exc})"
        ) from exc
    return trt


def find_plugin_library(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Locates libsqz_trt_plugin.so: the argument, then $SQZ_PLUGIN_LIBRARY, then build/ folders.

    Raises:
        UserError: no library at the given path, or none found anywhere.
    """
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise UserError(f"--plugin-library {path}: no such file")
        return path
    from_env = os.environ.get(PLUGIN_LIBRARY_ENV)
    if from_env:
        path = Path(from_env)
        if not path.is_file():
            raise UserError(f"${PLUGIN_LIBRARY_ENV}={from_env}: no such file")
        return path
    for build_dir in dict.fromkeys((Path.cwd() / "build", REPO_ROOT / "build")):
        if build_dir.is_dir():
            found = sorted(build_dir.rglob(PLUGIN_LIBRARY_NAME))
            if found:
                return found[0]
    raise UserError(
        f"{PLUGIN_LIBRARY_NAME} not found in ./build or {REPO_ROOT / 'build'}; build it with "
        "`cmake -S . -B build -DTensorRT_ROOT=/path/to/TensorRT && cmake --build build -j`, "
        f"or pass --plugin-library / set ${PLUGIN_LIBRARY_ENV}"
    )


def load_plugin_library(trt: ModuleType, path: Path) -> None:
    """Makes the SqzLinear creator available to this process's TensorRT.

    The library registers itself when loaded into a process that already has libnvinfer (this
    one: ``trt`` is imported). If that did not happen (it was loaded earlier, or the soname differs),
    TensorRT's own ``IPluginRegistry.load_library`` registers it through ``getCreators``.
    """
    registry = trt.get_plugin_registry()
    ctypes.CDLL(str(path))
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        logger.info("%s did not register itself at load; registering through IPluginRegistry.load_library", path)
        if registry.load_library(str(path)) is None:
            raise UserError(f"{path}: TensorRT could not load the plugin library (see the TensorRT log above)")
    if registry.get_creator(PLUGIN_NAME, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise UserError(f"{path} does not provide the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} version {PLUGIN_VERSION} plugin")
    logger.info("plugin %s::%s v%s from %s", PLUGIN_NAMESPACE, PLUGIN_NAME, PLUGIN_VERSION, path)


def profile_shapes(signature: DecoderSignature, limits: BuildLimits) -> dict[str, ProfileShapes]:
    """(min, opt, max) per input for the decode and prefill profiles (see the module docstring)."""
    limits.validate()
    heads, head_dim = signature.past_shape
    batch = (1, 1, limits.max_batch)  # latency first: optimize for batch 1

    def phase(seq: Shape, past: Shape) -> ProfileShapes:
        def span(shape_at: Any) -> tuple[Shape, Shape, Shape]:
            return (shape_at(0), shape_at(1), shape_at(2))  # min, opt, max

        tokens = span(lambda i: (batch[i], seq[i]))
        shapes: ProfileShapes = {
            "input_ids": tokens,
            "attention_mask": span(lambda i: (batch[i], past[i] + seq[i])),
        }
        if signature.has_position_ids:
            shapes["position_ids"] = tokens
        cache = span(lambda i: (batch[i], heads, past[i], head_dim))
        shapes.update((name, cache) for name in signature.past_names)
        return shapes

    max_past = limits.max_context - 1
    return {
        "decode": phase(seq=(1, 1, 1), past=(0, max_past // 2, max_past)),
        "prefill": phase(seq=(1, max(1, limits.max_seq // 2), limits.max_seq), past=(0, 0, 0)),
    }


def count_sqz_nodes(onnx_path: Path) -> int:
    """SqzLinear nodes of the main graph (the model-local function of the same name is not a node)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return sum(1 for node in graph.node if node.op_type == PLUGIN_NAME and node.domain == PLUGIN_NAMESPACE)


def _severity_levels(trt: ModuleType) -> dict[Any, int]:
    severity = trt.ILogger.Severity
    return {
        severity.INTERNAL_ERROR: logging.CRITICAL,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,  # TensorRT's INFO is chatty (tactics, memory); keep it at -v
        severity.VERBOSE: logging.DEBUG - 1,
    }


def make_trt_logger(trt: ModuleType) -> Any:
    """A trt.ILogger that forwards to Python logging (logger ``sqz_export.engine.tensorrt``)."""
    levels = _severity_levels(trt)
    trt_log = logging.getLogger(f"{__name__.rpartition('.')[0]}.tensorrt")

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            trt_log.log(levels.get(severity, logging.INFO), "%s", msg)

    return _Logger()


def network_flags(trt: ModuleType) -> int:
    """Strongly typed networks: asked for on TensorRT 10, the only kind (flag deprecated) on 11+."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _parser_errors(parser: Any) -> Iterator[str]:
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        node = error.node_name() if hasattr(error, "node_name") else error.node()
        yield f"node {node}: {error.desc()}"


def _plugin_layer_count(trt: ModuleType, network: Any) -> int:
    kinds = {getattr(trt.LayerType, name) for name in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, name)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    *,
    plugin_library: str | os.PathLike[str] | None = None,
    baseline: bool = False,
    limits: BuildLimits | None = None,
    workspace_mib: int | None = None,
) -> BuildResult:
    """Builds and writes one engine.

    Args:
        onnx_path: ``model.onnx`` (with SqzLinear nodes) or, with ``baseline=True``, ``baseline.onnx``.
        engine_path: where the serialized engine goes (written atomically).
        plugin_library: libsqz_trt_plugin.so; found by :func:`find_plugin_library` when None.
        baseline: build a graph without SqzLinear nodes (no plugin library needed).
        limits: profile ranges; defaults of :class:`BuildLimits` when None.
        workspace_mib: cap on TensorRT's tactic workspace (its default when None).

    Raises:
        UserError: TensorRT or the plugin library is missing, the graph does not match the mode, or
            parsing/building fails (TensorRT's messages are in the log).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    limits = limits or BuildLimits()
    signature = DecoderSignature.from_onnx(onnx_path)
    sqz_nodes = count_sqz_nodes(onnx_path)
    if baseline and sqz_nodes:
        raise UserError(f"{onnx_path} has {sqz_nodes} SqzLinear nodes; --baseline expects the FP graph (baseline.onnx)")
    if not baseline and not sqz_nodes:
        raise UserError(f"{onnx_path} has no sqz::SqzLinear nodes; for the FP graph use --baseline {onnx_path}")
    if signature.float_dtype.itemsize != 2:
        logger.warning("%s computes in %s: the engine will too (TensorRT networks are strongly typed); export with --dtype fp16", onnx_path, signature.float_dtype)
    profiles = profile_shapes(signature, limits)

    trt = import_tensorrt()
    if not baseline:
        load_plugin_library(trt, find_plugin_library(plugin_library))
    trt_logger = make_trt_logger(trt)
    start = time.perf_counter()
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise UserError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(_parser_errors(parser)))
    plugin_layers = _plugin_layer_count(trt, network)
    if plugin_layers < sqz_nodes:
        raise UserError(
            f"{onnx_path}: {sqz_nodes} SqzLinear nodes but {plugin_layers} plugin layers after parsing; the parser "
            "expanded some into the model-local function instead of using the plugin (TensorRT >= 10.7 prefers a "
            "registered plugin; is sqz::SqzLinear version 1 registered? run with -v for TensorRT's log)"
        )
    logger.info("parsed %s: %d layers, %d SqzLinear plugin layers", onnx_path, network.num_layers, plugin_layers)

    config = builder.create_builder_config()
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for name, shapes in profiles.items():
        unknown = network_inputs - set(shapes)
        if unknown:
            raise UserError(f"{onnx_path}: inputs {sorted(unknown)} are not decoder inputs this builder knows how to profile")
        profile = builder.create_optimization_profile()
        for tensor in sorted(network_inputs):
            profile.set_shape(tensor, *shapes[tensor])
        index = config.add_optimization_profile(profile)
        logger.info("profile %d %s: input_ids %s", index, name, " .. ".join(str(s) for s in shapes["input_ids"]))

    logger.info("building the engine (TensorRT %s; this takes a while: it times kernels for every layer)", trt.__version__)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (its errors are in the log above; -v shows more)")
    atomic.write_bytes(engine_path, memoryview(serialized))
    seconds = time.perf_counter() - start
    return BuildResult(
        engine_path=engine_path,
        engine_bytes=engine_path.stat().st_size,
        seconds=seconds,
        tensorrt_version=trt.__version__,
        sqz_nodes=sqz_nodes,
        plugin_layers=plugin_layers,
        profiles=profiles,
    )
