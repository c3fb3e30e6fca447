"""``compare_folder``: run the exported graphs (and the torch reference, and TensorRT) on the same windows.

Runners (each optional except the sqz graph):

- ``torch-reference``: the quantized checkpoint as torch SqzLinear modules in fp32, the reference;
- ``sqz-onnxrt``: model.onnx in onnxruntime (the sqz::SqzLinear function, or the custom-op library
  of plugins/ort when ``ort_ops`` is given);
- ``fp16-baseline-onnxrt``: baseline.onnx in onnxruntime (the unquantized model);
- ``tensorrt``: a built engine with the SqzLinear plugin.

Pairs that run the same quantized model two ways get a pass/fail verdict at (atol, rtol); the
baseline pair measures what quantization changed and gets no verdict.

Memory: one runner is active at a time. Polygraphy's Comparator activates the runners one after the
other, each runner builds its session (or loads its model) on activation and drops it on
deactivation, and the latency pass does the same; so the peak is the largest runner's plus the
outputs kept for comparison (``logits`` of every window, per runner).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner
from polygraphy.comparator import Comparator, SimpleCompareFunc
from polygraphy.comparator.struct import IterationResult, RunResults

from sqz_export.compare.report import CompareReport, Latency, PairStats, top1_agreement
from sqz_export.compare.runners import TorchRunner, onnxrt_runner, trt_runner
from sqz_export.defaults import DEFAULT_DATASET
from sqz_export.errors import UserError
from sqz_export.export.signature import DecoderSignature
from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE, read_manifest
from sqz_export.ort_session import UNPACK_STREAM

logger = logging.getLogger(__name__)

COMPARED_OUTPUT = "logits"
DEFAULT_ATOL = 5e-2
DEFAULT_RTOL = 2e-2
DEFAULT_CHECK_STAT = "mean"
"""Default verdict: the mean error of fp16 logits against the fp32 reference within (atol, rtol).
An elementwise check is too strict for fp16 graphs of real depth: on SmolLM2-135M (30 layers) the
fp16 SqzLinear graph has a mean |error| of 0.014 but single logits off by 0.5 at 99% top-1 agreement."""
PLOT_SAMPLES = 1_000_000
"""Errors drawn per pair for the histogram (the full logits can be tens of millions of values)."""

REFERENCE, SQZ, BASELINE, TENSORRT = "torch-reference", "sqz-onnxrt", "fp16-baseline-onnxrt", "tensorrt"


@dataclasses.dataclass
class CompareOptions:
    checkpoint: Path | None = None
    """Checkpoint for the torch reference; default: the one recorded in the manifest, when it exists."""
    engine: Path | None = None
    plugin: Path | None = None
    dataset: str = DEFAULT_DATASET
    windows: int = 1
    seq_len: int = 512
    iterations: int = 10
    warm_up: int = 2
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    check_stat: str = DEFAULT_CHECK_STAT
    """Polygraphy's check_error_stat: which error statistic must be within the tolerances."""
    providers: list[str] | None = None
    ort_ops: Path | None = None
    """onnxruntime custom-op library for model.onnx's SqzLinear nodes (None: their ONNX function)."""
    unpack: str = UNPACK_STREAM
    """When model.onnx's SqzLinear function fallback unpacks (``sqz_export.ort_session``); no effect with ``ort_ops``."""
    fuse_attention: bool = True
    """Both graphs' attention as onnxruntime's GroupQueryAttention on the CPU provider (``create_session``)."""


def _token_windows(folder: Path, options: CompareOptions) -> np.ndarray:
    from transformers import AutoTokenizer

    from sqz_export.data import load_windows

    if not (folder / "tokenizer_config.json").is_file():
        raise UserError(f"{folder} has no tokenizer files; re-export from a checkpoint that holds its tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    windows = load_windows(tokenizer, options.dataset, evaluation=(options.windows, options.seq_len))["evaluation"]
    return windows.tokens.numpy()


def _runners(folder: Path, manifest: dict, signature: DecoderSignature, options: CompareOptions) -> list[BaseRunner]:
    runners: list[BaseRunner] = []
    checkpoint = options.checkpoint or (Path(manifest["checkpoint"]) if manifest.get("checkpoint") else None)
    if checkpoint is not None and checkpoint.is_dir():
        runners.append(TorchRunner(checkpoint, signature, REFERENCE))
    elif options.checkpoint is not None:
        raise UserError(f"--checkpoint {options.checkpoint} is not a folder")
    else:
        logger.warning("checkpoint %s not found; comparing without the torch reference", checkpoint)
    runners.append(
        onnxrt_runner(folder / MODEL_FILE, SQZ, options.providers, options.unpack, options.ort_ops, options.fuse_attention)
    )
    if (folder / BASELINE_FILE).is_file():
        runners.append(onnxrt_runner(folder / BASELINE_FILE, BASELINE, options.providers, fuse_attention=options.fuse_attention))
    if options.engine is not None:
        runners.append(trt_runner(options.engine, options.plugin, TENSORRT))
    return runners


def _logits_only(results: RunResults) -> RunResults:
    """Only the compared output (present.* caches are not comparable with the reference)."""
    kept = RunResults()
    for name, iterations in results:
        kept.append(
            (name, [IterationResult({COMPARED_OUTPUT: it[COMPARED_OUTPUT]}, it.runtime, name) for it in iterations])
        )
    return kept


def _median_ms(
    runner: BaseRunner, feed: dict[str, np.ndarray], options: CompareOptions
) -> tuple[float, dict[str, np.ndarray]]:
    """Median inference time of an active runner after warm-up, and its last outputs."""
    for _ in range(options.warm_up):
        runner.infer(feed)
    times = []
    for _ in range(options.iterations):
        outputs = runner.infer(feed)
        times.append(runner.last_inference_time())
    return statistics.median(times) * 1000, {name: np.array(value) for name, value in outputs.items()}


def _latency(
    runner: BaseRunner,
    signature: DecoderSignature,
    feed: dict[str, np.ndarray],
    options: CompareOptions,
    decode_runner: BaseRunner | None = None,
) -> Latency:
    """Median prefill time over the window and median one-token decode time after it.

    ``decode_runner`` times the decode step when it needs a different runner (a TensorRT engine's
    decode profile); by default the same active runner does both (no second session start).
    """

    def decode_step(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        if isinstance(runner, TorchRunner) or not all(name in outputs for name in signature.present_names):
            return None  # no KV cache: prefill only
        past = {p: outputs[q] for p, q in zip(signature.past_names, signature.present_names, strict=True)}
        return signature.feed(outputs[COMPARED_OUTPUT][:, -1:].argmax(-1), past)

    decode = None
    with runner:
        prefill, outputs = _median_ms(runner, feed, options)
        step = decode_step(outputs)
        if step is not None and decode_runner is None:
            decode, _ = _median_ms(runner, step, options)
    if step is not None and decode_runner is not None:
        with decode_runner:
            decode, _ = _median_ms(decode_runner, step, options)
    return Latency(runner.name, prefill, decode, options.iterations)


def compare_folder(folder: str | Path, options: CompareOptions) -> tuple[CompareReport, dict[str, np.ndarray]]:
    """Runs every available runner on the same token windows; returns the report and, per pair, a
    sample of absolute logit errors (for ``--plot``)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    signature = DecoderSignature.from_onnx(folder / MODEL_FILE)
    tokens = _token_windows(folder, options)
    feeds = [signature.feed(window[None]) for window in tokens]
    runners = _runners(folder, manifest, signature, options)
    names = [runner.name for runner in runners]
    logger.info("comparing %s, one runner (session or model) in memory at a time", ", ".join(names))

    results = _logits_only(Comparator.run(runners, data_loader=feeds))
    reference = names[0]
    pairs = [(0, index) for index in range(1, len(runners))]
    verdict_pairs = [pair for pair in pairs if names[pair[1]] != BASELINE]
    stats_pairs = [pair for pair in pairs if names[pair[1]] == BASELINE]
    by_pair = {}
    # Same model run two ways: a verdict at the tolerances. Baseline vs quantized: statistics only
    # (infinite tolerance), since that difference is the quantization error itself.
    for subset, atol, rtol in ((verdict_pairs, options.atol, options.rtol), (stats_pairs, np.inf, np.inf)):
        if subset:
            compare_func = SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat=options.check_stat)
            accuracy = Comparator.compare_accuracy(results, comparisons=subset, compare_func=compare_func)
            by_pair.update(
                {tuple(key): value for key, value in accuracy[0].items()}
            )  # one compare func -> one AccuracyResult
    logits = {
        name: [np.asarray(iteration[COMPARED_OUTPUT], dtype=np.float32) for iteration in iterations]
        for name, iterations in results
    }
    rng = np.random.default_rng(0)
    stats: list[PairStats] = []
    errors: dict[str, np.ndarray] = {}
    for _, other in pairs:
        name = names[other]
        per_iteration = by_pair[(reference, name)]
        outputs = [iteration[COMPARED_OUTPUT] for iteration in per_iteration]
        agreement, positions = top1_agreement(logits[name], logits[reference])
        verdict = None if name == BASELINE else all(bool(result) for result in outputs)
        stats.append(
            PairStats(
                reference=reference,
                runner=name,
                output=COMPARED_OUTPUT,
                max_abs=max(float(r.max_absdiff) for r in outputs),
                mean_abs=float(np.mean([float(r.mean_absdiff) for r in outputs])),
                max_rel=max(float(r.max_reldiff) for r in outputs),
                mean_rel=float(np.mean([float(r.mean_reldiff) for r in outputs])),
                top1_agreement=agreement,
                positions=positions,
                passed=verdict,
            )
        )
        diff = np.concatenate([np.abs(a - b).ravel() for a, b in zip(logits[name], logits[reference], strict=True)])
        errors[f"{name} vs {reference}"] = (
            rng.choice(diff, PLOT_SAMPLES, replace=False) if diff.size > PLOT_SAMPLES else diff
        )

    decode_runners = (
        {TENSORRT: trt_runner(options.engine, options.plugin, TENSORRT, "decode")} if options.engine else {}
    )
    latency = [_latency(runner, signature, feeds[0], options, decode_runners.get(runner.name)) for runner in runners]
    report = CompareReport(
        folder=str(folder),
        reference=reference,
        windows=len(feeds),
        seq_len=int(tokens.shape[1]),
        atol=options.atol,
        rtol=options.rtol,
        check_stat=options.check_stat,
        pairs=stats,
        latency=latency,
        ort_ops=str(options.ort_ops) if options.ort_ops else None,
        fused_attention=options.fuse_attention,
    )
    return report, errors
