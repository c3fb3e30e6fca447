"""``sqz-export quantize``: FP model + calibration text -> packed checkpoint (LNQ, SqueezeLLM, GPTQ or RTN)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from sqz_export.cli.common import (
    add_dataset_argument,
    add_json_argument,
    add_model_argument,
    check_outputs,
    byte_size,
    fraction,
    positive_int,
    print_table,
    write_json,
)
from sqz_export.defaults import DEFAULT_HESSIAN_DAMP, DEFAULT_HESSIAN_GROUPS, DEFAULT_LNQ_ITERATIONS, DEFAULT_METHOD, DEFAULT_N_INIT, METHODS

DEFAULT_SENSITIVE_FRACTION = 0.0005

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a causal LM to a packed SqueezeLLM-format checkpoint",
        description=(
            "Quantize every linear layer of the decoder blocks into SqueezeLLM's format: a non-uniform fp16 "
            "LUT per output channel, packed indices, and a sparse part that keeps a small fraction of the "
            "weights exact. The default method, lnq, starts from SqueezeLLM's Fisher-weighted k-means and "
            "refines LUTs and indices on GuidedQuant's gradient-weighted Hessians, choosing the exact weights "
            "of the whole model by the objective decrease they buy. Writes a checkpoint folder "
            "(safetensors + config.json)."
        ),
    )
    add_model_argument(parser)
    parser.add_argument("-o", "--output", required=True, type=Path, help="checkpoint folder to write (replaced atomically)")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default=DEFAULT_METHOD,
        help=(
            f"{DEFAULT_METHOD} (default): SqueezeLLM start + GuidedQuant LNQ refinement + objective-chosen sparse part; "
            "squeezellm: the paper's algorithm (Fisher-weighted k-means, magnitude + sensitivity split); "
            "gptq: uniform per-channel grid with GPTQ's error feedback; rtn: round-to-nearest on that grid, no calibration"
        ),
    )
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=3, help="bits per weight index (default: 3)")
    parser.add_argument("--sparsity", type=fraction, default=0.0045, help="fraction of weights kept exact, e.g. 0.0045 or 0.45%% (default: 0.45%%; 0 = dense only)")
    parser.add_argument("--sensitive-fraction", type=fraction, help="paper selection: part of --sparsity chosen by Fisher sensitivity, at most --sparsity; the rest are magnitude outliers (default: 0.05%%, or --sparsity when smaller; for lnq it shapes the start)")
    parser.add_argument(
        "--sparse-selection",
        choices=("objective", "paper"),
        help="how exact weights are chosen: objective (lnq's default: model-wide ranking by the objective decrease) or paper (per matrix: magnitude + Fisher; the other methods' default)",
    )
    parser.add_argument("--hessian-groups", type=positive_int, default=DEFAULT_HESSIAN_GROUPS, help=f"lnq: output-row groups per layer sharing one gradient-weighted Hessian (GuidedQuant's g; default: {DEFAULT_HESSIAN_GROUPS})")
    parser.add_argument("--lnq-iterations", type=int, default=DEFAULT_LNQ_ITERATIONS, help=f"lnq: rounds of LUT refit + index coordinate descent after a GPTQ sweep (default: {DEFAULT_LNQ_ITERATIONS})")
    damps = ", ".join(f"{damp} at {bits} bits" for bits, damp in DEFAULT_HESSIAN_DAMP.items())
    parser.add_argument("--hessian-damp", type=float, default=None, help=f"lnq: the objective uses H + DAMP * diag(H), which keeps it from fitting the noise of a small calibration set (default: {damps})")
    add_dataset_argument(parser)
    parser.add_argument("--calib-windows", type=positive_int, default=32, help="calibration windows for the statistics (default: 32)")
    parser.add_argument("--stats", "--fisher", dest="stats", type=Path, metavar="FILE", help="calibration statistics cache (.safetensors): reused when it matches the model and calibration (statistics it lacks are added), written when absent; a cache made for other settings is refused")
    parser.add_argument("--overwrite-cache", action="store_true", help="replace a --stats cache made for other settings (or a file that is no cache) instead of refusing")
    parser.add_argument("--fisher-dtype", choices=("bf16", "fp32"), default="bf16", help="forward/backward precision of the calibration pass; accumulation is always fp32 (default: bf16)")
    parser.add_argument("--kmeans-starts", type=int, default=DEFAULT_N_INIT, help=f"extra seeded k-means starts per row beyond the weighted-quantile start; more is slower and slightly better (default: {DEFAULT_N_INIT})")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default: 0)")
    parser.add_argument("--device", default="cpu", help="torch device for Fisher and k-means, e.g. cuda (default: cpu)")
    parser.add_argument("--run-dir", type=Path, metavar="DIR", help="run folder for finished blocks and scratch (default: .<output>.sqz-run beside the output; removed after success)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its --run-dir (same model, data and settings): finished blocks are not quantized again")
    parser.add_argument("--activation-memory", type=byte_size, default="1G", metavar="BYTES", help="block inputs of the calibration pass kept in memory, e.g. 512M or 4G; the rest go to --run-dir (default: 1G)")
    parser.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize block i while the calibration pass computes block i-1 (default); --no-overlap quantizes each block before the pass goes on: one block's weights and statistics in memory instead of two, slower where the two would overlap",
    )
    parser.add_argument("--eval-windows", type=int, default=0, help="after quantizing, report perplexity on this many windows from the end of --dataset (default: 0 = skip)")
    add_json_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sqz_export.atomic import check_replaceable, check_writable
    from sqz_export.caches import reusable_cache
    from sqz_export.cli import trim_freed_memory
    from sqz_export.checkpoint import FORMAT_NAME, MANIFEST_FILE, QuantizationConfig, load_quantized_model, write_checkpoint
    from sqz_export.data import load_windows
    from sqz_export.evaluate import perplexity
    from sqz_export.quantize import QuantizeOptions
    from sqz_export.quantize.calibration import STATISTICS_KEY_FIELD, BlockStatistics, StreamSettings, statistics_key
    from sqz_export.quantize.distributed import device_for, from_environment, shutdown
    from sqz_export.quantize.pipeline import ModelQuantizer
    from sqz_export.quantize.rundir import RunDir, default_run_dir
    from sqz_export.tensorfile import LazyTensor
    from sqz_export.validate import check_linears, check_seq_len
    from sqz_export.models import open_model
    from sqz_export.weights import open_blocked_model

    group = from_environment(args.device)
    if not group.leader:
        logging.getLogger().setLevel(logging.WARNING)  # one log, rank 0's; the others speak only of trouble
    options = QuantizeOptions(
        method=args.method,
        bits=args.bits,
        sparsity=args.sparsity,
        sensitive_fraction=min(DEFAULT_SENSITIVE_FRACTION, args.sparsity) if args.sensitive_fraction is None else args.sensitive_fraction,
        kmeans_n_init=args.kmeans_starts,
        seed=args.seed,
        device=device_for(group, args.device),
        hessian_groups=args.hessian_groups,
        lnq_iterations=args.lnq_iterations,
        hessian_damp=args.hessian_damp,
        sparse_selection=args.sparse_selection,
    )
    options.validate()
    request = options.statistics()
    # Everything that can fail without the weights fails before the long load: outputs, the model's
    # config and positions, the dataset (read and tokenized), the statistics cache.
    output = check_replaceable(args.output, MANIFEST_FILE, "checkpoint")
    check_outputs(args, "json")
    run_dir = (args.run_dir or default_run_dir(output)).expanduser().resolve()
    check_writable(run_dir, "--run-dir", folder_output=True)
    if args.stats is not None and (args.overwrite_cache or not args.stats.exists()):
        check_writable(args.stats, "--stats")  # it will be written
    timings: dict[str, float] = {}
    start = time.perf_counter()
    files = open_model(args.model)
    check_seq_len(args.seq_len, files.max_positions, files.source)
    windows = load_windows(
        files.tokenizer,
        args.dataset,
        calibration=(args.calib_windows, args.seq_len) if request is not None else None,
        evaluation=(args.eval_windows, args.seq_len) if args.eval_windows else None,
    )
    trim_freed_memory()  # the tokenizer's many small allocations, freed
    calibration = windows.get("calibration")
    autocast = torch.bfloat16 if args.fisher_dtype == "bf16" else None
    if calibration is not None:
        reusable_cache(args.stats, statistics_key(files.source, calibration, autocast), STATISTICS_KEY_FIELD, "--stats", overwrite=args.overwrite_cache)
    blocked = open_blocked_model(files, options.device)
    timings["load_model"] = time.perf_counter() - start
    linears = {name: layer for index in range(blocked.num_blocks) for name, layer in blocked.block_linears(index).items()}
    check_linears(linears)
    shapes = {name: tuple(layer.weight.shape) for name, layer in linears.items()}
    total = sum(n * k for n, k in shapes.values())
    logger.info("%d linear layers to quantize (%.1fM weights) in %d blocks", len(shapes), total / 1e6, blocked.num_blocks)

    key = {
        "source": files.source,
        "calibration": calibration.describe() if calibration is not None else None,
        "autocast": str(autocast),
        "method": options.method,
        "bits": options.bits,
        "sparsity": options.sparsity,
        "sensitive_fraction": options.sensitive_fraction,
        "settings": options.settings(),
    }
    run_folder = RunDir.open(run_dir, key, resume=args.resume, group=group)
    # Every rank must skip the same blocks (their collectives pair up): those finished on all ranks.
    parts = group.gather(run_folder.done_blocks())
    done: set[str] = group.broadcast(set.intersection(*parts) if parts is not None else None)
    quantizer = ModelQuantizer(options, total, blocked.num_blocks, run_folder, group=group, progress=group.leader, overlap=args.overlap)
    quantizer.finished = group.broadcast(run_folder.packed_blocks() if group.leader else None)
    for candidates in run_folder.refined_candidates(done):
        quantizer.selected.add(*candidates)

    def skip(index: int) -> bool:
        return blocked.block_name(index) in done

    def add(index: int, stats: object) -> None:
        items = {name: (layer.weight, layer.bias) for name, layer in blocked.block_linears(index).items()}
        quantizer.add(blocked.block_name(index), items, stats)

    start = time.perf_counter()
    try:
        with quantizer:
            if request is None:
                from sqz_export.quantize.calibration import CalibrationStats

                for index in range(blocked.num_blocks):
                    if not skip(index):
                        blocked.load_block(index)
                        add(index, CalibrationStats())
                        blocked.unload_block(index)
            else:
                logger.info("calibration: %d windows x %d tokens = %d tokens of %s (%s)", *calibration.tokens.shape, calibration.num_tokens, args.dataset, calibration.split)
                settings = StreamSettings(autocast_dtype=autocast, activation_memory=args.activation_memory, spill_folder=run_folder.activations, progress=group.leader, group=group)
                for index, stats in BlockStatistics(
                    blocked, calibration, request, settings, cache=args.stats, source=files.source, overwrite=args.overwrite_cache, skip=skip, spill_folder=run_folder.statistics
                ):
                    add(index, stats)
            quantizer_timings = quantizer.finish()
        timings["calibration_and_quantize_wall"] = time.perf_counter() - start
        timings.update(quantizer_timings)
        if not group.leader:
            shutdown(group)
            # Ends here, without the interpreter's teardown: there a C++ thread object of the
            # distributed runtime was seen to abort the process ("terminate called without an
            # active exception", exit -6) after the run had finished, in about one two-process
            # test run in five, even after the group was destroyed. Rank 0 has written everything.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

        tensors, modules = run_folder.packed_tensors()
        missing = sorted(set(shapes) - set(modules))
        if missing:
            raise RuntimeError(f"run folder {run_dir} lacks {len(missing)} packed layers after the run, first {missing[0]}")
        dense = blocked.dense_keys(set(shapes))
        for name, shape in dense.items():
            tensors[name] = LazyTensor(torch.float16, tuple(shape), _dense_reader(blocked, name))
        qconfig = QuantizationConfig(
            quant_method=FORMAT_NAME,
            method=options.method,
            bits=options.bits,
            sparsity=options.sparsity,
            sensitive_fraction=options.sensitive_fraction,
            modules=sorted(modules),
            source_model=files.source,
            calibration=calibration.describe() if calibration is not None else None,
            chunk_nnz=options.chunk_nnz,
            method_settings=options.settings(),
        )
        path = write_checkpoint(output, blocked.model.config, tensors, {name: modules[name] for name in sorted(modules)}, qconfig, files.tokenizer)
    except BaseException:
        # Finished blocks are kept for --resume; a run that finished none leaves nothing behind.
        if group.leader:
            finished = run_folder.done_blocks()
            if finished:
                logger.warning("%d of %d blocks are kept in %s: the same command with --resume continues from them", len(finished), blocked.num_blocks, run_dir)
            else:
                run_folder.remove()
        raise
    run_folder.remove()
    shutdown(group)

    nnz = sum(info["nnz"] for info in modules.values())
    packed_bytes = sum(t.numel() * t.element_size() for name, t in tensors.items() if name not in dense)
    summary: dict[str, object] = {
        "checkpoint": str(path),
        "method": options.method,
        "bits": options.bits,
        "layers": len(modules),
        "sparse_fraction": nnz / total,
        "calibration_tokens": calibration.num_tokens if calibration is not None else 0,
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
        "packed_bytes": packed_bytes,
        "fp16_bytes": total * 2,
        "ranks": group.world,
    }
    if torch.device(options.device).type == "cuda":
        summary["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(torch.device(options.device))
    if args.eval_windows:
        model, _ = load_quantized_model(path)  # the weights the checkpoint holds
        evaluation = windows["evaluation"]
        ppl = perplexity(model, evaluation.tokens, progress=True)
        summary["perplexity"] = ppl.perplexity
        summary["evaluation"] = evaluation.describe()
    rows = [
        ("checkpoint", str(path)),
        ("method", f"{options.method} {options.bits}-bit, {summary['sparse_fraction']:.4%} exact weights"),
        ("layers", str(len(modules))),
        ("calibration tokens", str(summary["calibration_tokens"])),
        ("quantized linears", f"{summary['fp16_bytes'] / 2**20:.1f} MiB fp16 -> {packed_bytes / 2**20:.1f} MiB packed"),
        ("time", ", ".join(f"{key} {value:.1f}s" for key, value in timings.items())),
    ]
    if "perplexity" in summary:
        rows.append(("perplexity", f"{summary['perplexity']:.3f} ({summary['evaluation']['num_tokens']} tokens)"))
    print_table(rows)
    write_json(args.json, summary)
    return 0


def _dense_reader(blocked: object, key: str):  # noqa: ANN202 - a loader closure
    import torch

    def load() -> torch.Tensor:
        tensor = blocked.read(key)
        return (tensor.to(torch.float16) if tensor.is_floating_point() else tensor).contiguous()

    return load
