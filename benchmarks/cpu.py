"""CPU speed and memory of the packed SqzLinear kernel: op level against torch matmul, and SmolLM2 decode.

(a) Op level (``--part op``): y = x W^T for M = 1, 4, 16 on SmolLM2-135M and LLaMA-7B shapes, 3/4-bit,
dense and 0.45% sparse, through ``torch.ops.sqz.sqz_linear`` (the C++ kernel, widest ISA of this CPU).
Weights are random (never zeros: benchutil.random_packed) and rotated over enough copies that one pass
reads more than twice the last-level cache, as are the FP32 and BF16 weights of the torch matmuls timed
in the same run. Bandwidth is the packed bytes (indices + LUT + CSR) per second, against a memcpy
measured in the same run.

(b) Decode (``--part decode``): greedy generation of --new-tokens tokens of SmolLM2-135M, each variant
in its own child process (so peak RSS is its own): transformers FP32 and BF16 (the embedded GGUF) and
sqz checkpoints loaded with ``AutoModelForCausalLM.from_pretrained`` (``--checkpoint NAME=DIR``, e.g.
from ``sqz-export quantize --method rtn --bits 3 --sparsity 0.45% -o runs/sqz3s``). ms/token is the
generate() wall time over the new tokens (prefill of the short prompt included). Every row also times
the prefill of a long prompt (``--prefill-tokens``, default 256, the first tokens of the embedded
Wikipedia text; best of 3), the time to first token that the large-M paths (dequantized tiles into a
GEMM) serve. llama.cpp is a peer row when ``llama_cpp`` is importable. ``--decode-repeats N`` runs every
child N times, interleaved, and reports medians: single runs on a shared machine vary by 10-20%.

onnxruntime rows (``--onnx NAME=FOLDER``, folders written by ``sqz-export export``): the FP16
baseline.onnx, and model.onnx with the custom-op library (``--ort-ops LIB``; by default built into
build/ort when onnxruntime headers are found, see sqz_export.ort_ops), each greedy-decoded by
sqz_export.generate.OnnxGenerator (KV cache) in its own child process; ``--ort-function`` adds
model.onnx on its ONNX function fallback (dense weights after folding: several GB of session). ms/token
is prefill + decode wall time over the new tokens, as above; peak RSS includes session creation. Each
onnxruntime row also times the graph's weight-bearing linears alone (the MatMuls on an initializer, or
the SqzLinear nodes, each fed a [1, 1, K] input; lm_head, tied to the embedding through a Transpose,
is not among them): their share of a decode step, next to the rest of the exported decoder. Both
graphs run their attention as onnxruntime's GroupQueryAttention, as ``sqz-export generate`` does on a CPU
(``--attention exported``: as exported).

    python benchmarks/cpu.py --out runs/cpu.json --checkpoint sqz3s=runs/sqz3s sqz3=runs/sqz3 sqz4=runs/sqz4
    python benchmarks/cpu.py --part decode --onnx sqz3s=runs/sqz3s-onnx --ort-ops build/ort/libsqz_ort_ops.so
    python benchmarks/cpu.py --part op --shapes 4096x4096 --out runs/cpu_op.json

Prints tables and writes one JSON (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sqz_export.kernels import benchutil

SMOLLM2_SHAPES = ["576x576", "192x576", "1536x576", "576x1536"]
LLAMA7B_SHAPES = ["4096x4096", "11008x4096", "4096x11008"]
"""N x K (out_features x in_features)."""
PROMPT = "The history of anarchism"
PREFILL_TOKENS = 256
"""Length of the long prompt whose prefill every decode row times too: the first tokens of the
embedded Wikipedia text."""


def prefill_ids(tokenizer, tokens: int) -> list[int]:  # noqa: ANN001 (any transformers tokenizer)
    """The first ``tokens`` token ids of the embedded Wikipedia text."""
    from sqz_export.data import wikipedia_text

    ids = tokenizer(wikipedia_text()[: 16 * tokens])["input_ids"][:tokens]
    if len(ids) < tokens:
        raise ValueError(f"the embedded text gave {len(ids)} tokens, fewer than --prefill-tokens {tokens}")
    return ids


def llc_bytes() -> int:
    """Last-level cache of CPU 0 from sysfs (the largest cache index), 32 MiB when it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip() if (index / "size").exists() else ""
        if text.endswith("K"):
            sizes.append(int(text[:-1]) * 1024)
    return max(sizes, default=32 * 2**20)


def memcpy_rate(nbytes: int) -> float:
    """Bytes/s read + written by a dst.copy_(src) of ``nbytes`` (larger than the LLC), median of repeats."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    seconds = benchutil.time_per_call([lambda: dst.copy_(src)], torch.device("cpu"), iters=4, repeats=5)
    return 2 * nbytes / seconds


@dataclasses.dataclass
class OpRow:
    n: int
    k: int
    m: int
    bits: int
    density: float
    isa: str
    sqz_ms: float
    fp32_ms: float
    bf16_ms: float
    packed_bytes: int
    gbps: float
    copy_fraction: float
    speedup_fp32: float
    speedup_bf16: float
    max_abs_err: float


def packed_bytes(layer) -> int:  # noqa: ANN001
    tensors = [layer.qweight, layer.lut]
    if layer.sparse is not None:
        tensors += [layer.sparse.row_ptr, layer.sparse.col, layer.sparse.val]
    return sum(t.numel() * t.element_size() for t in tensors)


def op_rows(args: argparse.Namespace, copy_rate: float) -> list[OpRow]:
    from sqz_export import kernels
    from sqz_export.formats import to_rowmajor
    from sqz_export.kernels.reference import sqz_reference_weight

    cpu = torch.device("cpu")
    llc = llc_bytes()
    rows = []
    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        dense = {}
        for dtype in (torch.float32, torch.bfloat16):
            copies = benchutil.rotation_count(n * k * torch.finfo(dtype).bits // 8, llc)
            dense[dtype] = [torch.randn(n, k).to(dtype) for _ in range(copies)]
        for m in args.m:
            xs = {dtype: torch.randn(m, k).to(dtype) for dtype in dense}
            dense_ms = {
                dtype: 1e3 * benchutil.time_per_call(
                    [lambda w=w, x=xs[dtype]: torch.matmul(x, w.t()) for w in weights], cpu, args.iters, args.repeats
                )
                for dtype, weights in dense.items()
            }
            for bits in args.bits:
                for density in args.densities:
                    probe = benchutil.random_packed(n, k, bits, density, seed=0)
                    size = packed_bytes(probe)
                    copies = benchutil.rotation_count(size, llc)
                    layers = [probe] + [benchutil.random_packed(n, k, bits, density, seed=i) for i in range(1, copies)]
                    inputs = []
                    for layer in layers:
                        s = layer.sparse
                        sparse = (s.row_ptr, s.col, s.val, s.chunk_row) if s is not None else (None, None, None, None)
                        inputs.append((to_rowmajor(layer.qweight), layer.lut, *sparse, s.chunk_nnz if s else 0))
                    x = xs[torch.float32]

                    def call(i: int):  # noqa: ANN202
                        q, lut, rp, col, val, cr, chunk = inputs[i]
                        return torch.ops.sqz.sqz_linear(x, q, lut, rp, col, val, cr, bits, k, chunk)

                    q, lut, rp, col, val, _, _ = inputs[0]
                    expected = x @ sqz_reference_weight(q, lut, rp, col, val, bits, k).t()
                    err = float((call(0) - expected).abs().max())
                    seconds = benchutil.time_per_call(
                        [lambda i=i: call(i) for i in range(copies)], cpu, args.iters, args.repeats
                    )
                    isa = kernel_isa(kernels, bits)
                    rows.append(
                        OpRow(
                            n=n, k=k, m=m, bits=bits, density=density, isa=isa, sqz_ms=1e3 * seconds,
                            fp32_ms=dense_ms[torch.float32], bf16_ms=dense_ms[torch.bfloat16], packed_bytes=size,
                            gbps=size / seconds / 1e9, copy_fraction=size / seconds / copy_rate,
                            speedup_fp32=dense_ms[torch.float32] / (1e3 * seconds),
                            speedup_bf16=dense_ms[torch.bfloat16] / (1e3 * seconds), max_abs_err=err,
                        )
                    )  # fmt: skip
                    print(format_op_row(rows[-1]), flush=True)
        del dense
    return rows


def kernel_isa(kernels, bits: int) -> str:  # noqa: ANN001
    """Name of the ISA the op runs for ``bits`` on this CPU."""
    from sqz_export.kernels.build import cpu_extension

    return cpu_extension().isa_name(kernels.cpu_isa("auto", bits))


def format_op_row(r: OpRow) -> str:
    return (
        f"{r.n:>6}x{r.k:<6} M={r.m:<3} {r.bits}-bit {100 * r.density:4.2f}% {r.isa:<7} sqz {r.sqz_ms:8.3f} ms  "
        f"fp32 {r.fp32_ms:8.3f}  bf16 {r.bf16_ms:8.3f}  x{r.speedup_fp32:5.2f} fp32  x{r.speedup_bf16:5.2f} bf16  "
        f"{r.gbps:6.2f} GB/s ({100 * r.copy_fraction:4.1f}% of memcpy)  err {r.max_abs_err:.1e}"
    )


# ---- (b) decode, one child process per variant ------------------------------------------------------


def linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(resident bytes of the quantized linears' buffers or nn.Linear weights, their FP32 bytes)."""
    from sqz_export.models import quantizable_linears
    from sqz_export.runtime import SqzLinear

    resident = fp32 = 0
    for module in model.modules():
        if isinstance(module, SqzLinear):
            resident += sum(b.numel() * b.element_size() for b in module.buffers())
            fp32 += module.in_features * module.out_features * 4
    if fp32 == 0:
        for linear in quantizable_linears(model).values():
            resident += linear.weight.numel() * linear.weight.element_size()
            fp32 += linear.weight.numel() * 4
    return resident, fp32


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    exec from the parent, so every child would report at least the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line")


def decode_child(variant: str, source: str, new_tokens: int, prefill_tokens: int) -> dict[str, object]:
    """Runs in the child: load, warm up, time greedy generate and a long prompt's prefill, report
    ms/token and peak RSS."""
    import sqz_export  # noqa: F401  (registers the transformers quantizer)
    from transformers import AutoModelForCausalLM

    from sqz_export.models import load_model

    start = time.perf_counter()
    if variant in ("fp32", "bf16"):
        loaded = load_model(None)
        model, tokenizer = loaded.model, loaded.tokenizer
        if variant == "bf16":
            model = model.to(torch.bfloat16)
    else:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    load_s = time.perf_counter() - start
    model.eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    kwargs = {"do_sample": False, "pad_token_id": tokenizer.eos_token_id}
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, min_new_tokens=4, **kwargs)
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        seconds = time.perf_counter() - start
        long_prompt = torch.tensor([prefill_ids(tokenizer, prefill_tokens)])
        prefill_s = []
        for _ in range(3):
            start = time.perf_counter()
            model(long_prompt, use_cache=True)
            prefill_s.append(time.perf_counter() - start)
    resident, fp32 = linear_bytes(model)
    return {
        "variant": variant,
        "source": source,
        "ms_per_token": 1e3 * seconds / new_tokens,
        "new_tokens": int(out.shape[1] - ids["input_ids"].shape[1]),
        "prefill_tokens": prefill_tokens,
        "prefill_ms": 1e3 * min(prefill_s),
        "peak_rss_bytes": peak_rss_bytes(),
        "linear_bytes": resident,
        "linear_fp32_bytes": fp32,
        "load_seconds": load_s,
        "text": tokenizer.decode(out[0, ids["input_ids"].shape[1] :][:24]),
    }


def llama_cpp_child(new_tokens: int) -> dict[str, object]:
    import llama_cpp

    from sqz_export.models import default_gguf_path

    llm = llama_cpp.Llama(model_path=str(default_gguf_path()), n_threads=os.cpu_count() or 2, verbose=False)
    llm(PROMPT, max_tokens=4)
    start = time.perf_counter()
    llm(PROMPT, max_tokens=new_tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    return {
        "variant": "llama.cpp Q4_1",
        "source": str(default_gguf_path()),
        "ms_per_token": 1e3 * seconds / new_tokens,
        "peak_rss_bytes": peak_rss_bytes(),
    }


ORT_BASELINE, ORT_SQZ, ORT_FUNCTION = "ort-baseline", "ort-sqz", "ort-function"
"""onnxruntime variants: baseline.onnx; model.onnx with the custom-op library; model.onnx on its function."""
RESERVED_VARIANTS = ("fp32", "bf16", ORT_BASELINE, ORT_SQZ, ORT_FUNCTION, "llama.cpp")
"""Decode variants by fixed name; any other name is a --checkpoint NAME (selected by --only sqz)."""


def rss_bytes() -> int:
    """This process's current resident set (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def initializer_bytes(path: Path) -> int:
    """Bytes of a graph's initializers (from the tensor shapes; external data is not read)."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(path), load_external_data=False).graph
    total = 0
    for tensor in graph.initializer:
        count = 1
        for dim in tensor.dims:
            count *= dim
        total += count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def linear_subgraph(path: Path, out_dir: Path) -> Path:
    """The graph's weight-bearing linears alone (MatMul on an initializer, or SqzLinear), each fed by a
    graph input [1, 1, K] in x's dtype, written to ``out_dir``: one run of it is the linears' share of a
    decode step, without the rest of the exported decoder."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    dtype = model.graph.output[0].type.tensor_type.elem_type  # the logits': the export's activation dtype
    nodes, inputs, outputs, used = [], [], [], set()
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "SqzLinear") or node.input[1] not in initializers:
            continue
        if node.op_type == "SqzLinear":
            k = next(a.i for a in node.attribute if a.name == "in_features")
        else:
            k = initializers[node.input[1]].dims[0]
        index = len(nodes)
        copy = helper.make_node(node.op_type, [f"x{index}", *node.input[1:]], [f"y{index}"], domain=node.domain, name=node.name)
        copy.attribute.extend(node.attribute)
        nodes.append(copy)
        used.update(node.input[1:])
        inputs.append(helper.make_tensor_value_info(f"x{index}", dtype, [1, 1, k]))
        outputs.append(helper.make_tensor_value_info(f"y{index}", dtype, None))
    graph = helper.make_graph(nodes, "linears", inputs, outputs, [initializers[name] for name in sorted(used) if name in initializers])
    sub = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    target = out_dir / "linears.onnx"
    onnx.save(sub, str(target), save_as_external_data=True, location="linears.onnx.data")
    return target


def time_linears(path: Path, ort_ops: str | None, threads: int | None) -> tuple[int, float]:
    """(linear nodes, ms per run of them all at M = 1): median of 5 repeats of 10 runs."""
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from sqz_export.ort_ops import session_options

    with tempfile.TemporaryDirectory() as tmp:
        session = ort.InferenceSession(str(linear_subgraph(path, Path(tmp))), session_options(ort_ops, threads), providers=["CPUExecutionProvider"])
        dtypes = {"tensor(float16)": np.float16, "tensor(float)": np.float32}
        feed = {i.name: np.random.default_rng(0).standard_normal(i.shape).astype(dtypes[i.type]) for i in session.get_inputs()}
        calls = [lambda: session.run(None, feed)]
        seconds = benchutil.time_per_call(calls, torch.device("cpu"), iters=10, repeats=5)
        return len(feed), 1e3 * seconds


def ort_child(
    variant: str, folder: str, ort_ops: str, new_tokens: int, prefill_tokens: int, threads: int | None, fuse_attention: bool
) -> dict[str, object]:
    """Runs in the child: one onnxruntime session on an export folder's graph, greedy decode, a long
    prompt's prefill, peak RSS."""
    from transformers import AutoTokenizer

    from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE
    from sqz_export.generate import OnnxGenerator

    path = Path(folder) / (BASELINE_FILE if variant == ORT_BASELINE else MODEL_FILE)
    library = ort_ops if variant == ORT_SQZ else None
    rss_before = rss_bytes()
    start = time.perf_counter()
    generator = OnnxGenerator(path, ort_ops=library, threads=threads, fuse_attention=fuse_attention)
    session_s = time.perf_counter() - start
    session_peak = peak_rss_bytes()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer(PROMPT)["input_ids"]
    generator.greedy(prompt, 4)
    result = generator.greedy(prompt, new_tokens)
    long_prompt = prefill_ids(tokenizer, prefill_tokens)
    prefill_ms = 1e3 * min(generator.greedy(long_prompt, 1).prefill_s for _ in range(3))
    peak = peak_rss_bytes()
    del generator
    linear_nodes, linears_ms = time_linears(path, library, threads) if variant != ORT_FUNCTION else (0, None)
    return {
        "variant": variant,
        "source": str(path),
        "ort_ops": library,
        "intra_op_threads": threads,
        "fused_attention": fuse_attention,
        "ms_per_token": 1e3 * (result.prefill_s + result.decode_s) / len(result.new_ids),
        "decode_ms_per_token": 1e3 / result.tokens_per_s if result.tokens_per_s else None,
        "new_tokens": len(result.new_ids),
        "prefill_tokens": prefill_tokens,
        "prefill_ms": prefill_ms,
        "peak_rss_bytes": peak,
        "session_peak_rss_bytes": session_peak,
        "linear_nodes": linear_nodes,
        "linears_ms_per_step": linears_ms,
        "rss_before_session_bytes": rss_before,
        "initializer_bytes": initializer_bytes(path),
        "session_seconds": session_s,
        "text": tokenizer.decode(result.new_ids[:24]),
    }


def default_ort_ops() -> str | None:
    """build/ort/libsqz_ort_ops.so, built now if onnxruntime headers are found; None (with a reason) if not."""
    from sqz_export import ort_ops

    library = ort_ops.SOURCE_DIR.parents[1] / "build" / "ort" / ort_ops.LIBRARY_NAME
    if library.is_file():
        return str(library)
    headers = ort_ops.find_headers()
    if headers is None:
        print("onnxruntime sqz rows skipped: no --ort-ops and no onnxruntime headers to build it (ONNXRUNTIME_ROOT)")
        return None
    return str(ort_ops.build_library(library.parent, headers))


def decode_variants(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(variant, source, ort-ops library) of every decode child, in table order."""
    import importlib.util

    variants = [("fp32", "", ""), ("bf16", "", "")] + [(*spec.split("=", 1), "") for spec in args.checkpoint]
    folders = [spec.split("=", 1) for spec in args.onnx]
    library = args.ort_ops or (default_ort_ops() if folders else None)
    if folders:
        variants.append((ORT_BASELINE, folders[0][1], ""))
    for _, folder in folders:
        if library:
            variants.append((ORT_SQZ, folder, library))
        if args.ort_function:
            variants.append((ORT_FUNCTION, folder, ""))
    if importlib.util.find_spec("llama_cpp") is not None:
        variants.append(("llama.cpp", "", ""))
    else:
        print("llama.cpp row skipped: llama_cpp is not importable", flush=True)
    if args.only:
        variants = [v for v in variants if v[0] in args.only or (v[0] not in RESERVED_VARIANTS and "sqz" in args.only)]
    return variants


def format_decode_row(row: dict[str, object]) -> str:
    line = f"{row['variant']:<12} {row['ms_per_token']:7.2f} ms/token  peak RSS {row['peak_rss_bytes'] / 2**20:7.0f} MiB"
    if row.get("prefill_ms") is not None:
        line += f"  prefill of {row['prefill_tokens']} tokens {row['prefill_ms']:7.1f} ms"
    if row.get("linear_fp32_bytes"):
        ratio = row["linear_bytes"] / row["linear_fp32_bytes"]
        line += f"  linears {row['linear_bytes'] / 2**20:6.1f} MiB ({ratio:.3f}x FP32)"
    if row.get("linears_ms_per_step") is not None:
        line += f"  its {row['linear_nodes']} linears alone {row['linears_ms_per_step']:6.2f} ms/step"
    if "initializer_bytes" in row:
        line += (
            f"  initializers {row['initializer_bytes'] / 2**20:6.1f} MiB  session peak "
            f"{row['session_peak_rss_bytes'] / 2**20:6.0f} MiB (from {row['rss_before_session_bytes'] / 2**20:.0f})  {row['source']}"
        )
    return line


TIMED_FIELDS = ("ms_per_token", "decode_ms_per_token", "prefill_ms", "linears_ms_per_step")
"""Per-run times a decode row reports as the median of its repeats (every run kept in ``<field>_runs``)."""


def merge_repeats(runs: list[dict[str, object]]) -> dict[str, object]:
    """One row from the interleaved repeats of a variant: median times, the largest peak RSS."""
    import statistics

    row = dict(runs[0])
    for field in TIMED_FIELDS:
        values = [run[field] for run in runs if run.get(field) is not None]
        if values:
            row[field] = statistics.median(values)
            row[f"{field}_runs"] = values
    for field in ("peak_rss_bytes", "session_peak_rss_bytes"):
        if field in row:
            row[field] = max(run[field] for run in runs)
    row["repeats"] = len(runs)
    return row


def decode_child_run(args: argparse.Namespace, variant: str, source: str, library: str) -> dict[str, object]:
    """One decode child process: its JSON row."""
    cmd = [sys.executable, __file__, "--child", variant, "--child-source", source, "--new-tokens", str(args.new_tokens)]
    cmd += ["--prefill-tokens", str(args.prefill_tokens), "--attention", args.attention]
    if library:
        cmd += ["--ort-ops", library]
    if args.ort_threads is not None:
        cmd += ["--ort-threads", str(args.ort_threads)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"decode child {variant} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["load_average_after"] = os.getloadavg()
    return row


def decode_rows(args: argparse.Namespace) -> list[dict[str, object]]:
    """Every variant's child, ``--decode-repeats`` times interleaved (v1, v2, ..., v1, v2, ...), so a
    burst of load on a shared machine lands on one run of each rather than on all runs of one."""
    variants = decode_variants(args)
    runs: dict[tuple[str, str], list[dict[str, object]]] = {(v, s): [] for v, s, _ in variants}
    for repeat in range(args.decode_repeats):
        for variant, source, library in variants:
            row = decode_child_run(args, variant, source, library)
            runs[(variant, source)].append(row)
            prefix = f"[{repeat + 1}/{args.decode_repeats}] " if args.decode_repeats > 1 else ""
            print(prefix + format_decode_row(row), flush=True)
    rows = [merge_repeats(samples) for samples in runs.values()]
    if args.decode_repeats > 1:
        print(f"medians of {args.decode_repeats} interleaved runs:")
        for row in rows:
            print(format_decode_row(row), flush=True)
    baseline = next((r for r in rows if r["variant"] == ORT_BASELINE), None)
    for row in rows:
        if baseline is not None and row["variant"] == ORT_SQZ:
            # Repeat i of both ran back to back, so their ratio sees one machine state; the spread of these
            # ratios, not only the ratio of the medians, says whether a speedup holds on a shared machine.
            pairs = zip(baseline["ms_per_token_runs"], row["ms_per_token_runs"], strict=True)
            row["speedup_over_baseline_runs"] = [b / s for b, s in pairs]
            per_repeat = ", ".join(f"{ratio:.2f}x" for ratio in row["speedup_over_baseline_runs"])
            repeats = f" (repeat by repeat {per_repeat})" if row["repeats"] > 1 else ""
            print(
                f"onnxruntime {row['source']} with the custom op vs FP16 baseline.onnx: "
                f"{baseline['ms_per_token'] / row['ms_per_token']:.2f}x per token{repeats}, peak RSS "
                f"{row['peak_rss_bytes'] / baseline['peak_rss_bytes']:.2f}x; the linears alone "
                f"{baseline['linears_ms_per_step'] / row['linears_ms_per_step']:.2f}x; prefill of {row['prefill_tokens']} tokens "
                f"{baseline['prefill_ms'] / row['prefill_ms']:.2f}x (load average {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["op", "decode", "all"], default="all")
    parser.add_argument("--shapes", nargs="+", default=SMOLLM2_SHAPES + LLAMA7B_SHAPES, help="N x K")
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--bits", nargs="+", type=int, default=[3, 4])
    parser.add_argument("--densities", nargs="+", type=float, default=[0.0, 0.0045])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", nargs="*", default=[], help="NAME=DIR of sqz checkpoints for the decode part")
    parser.add_argument("--onnx", nargs="*", default=[], help="NAME=FOLDER of `sqz-export export` folders (onnxruntime rows)")
    parser.add_argument("--ort-ops", help="libsqz_ort_ops.so for the onnxruntime sqz rows (default: build/ort, built if needed)")
    parser.add_argument("--ort-function", action="store_true", help="also time model.onnx on its ONNX function fallback")
    parser.add_argument("--ort-threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument(
        "--attention",
        choices=("fused", "exported"),
        default="fused",
        help="the onnxruntime rows' attention: onnxruntime's GroupQueryAttention (default, as sqz-export generate runs it) or as exported",
    )
    parser.add_argument(
        "--only", nargs="*", default=[], help=f"decode variants to run, of {', '.join(RESERVED_VARIANTS)}, sqz (the --checkpoint rows)"
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--decode-repeats", type=int, default=1, help="run every decode child this many times, interleaved; rows report medians"
    )
    parser.add_argument(
        "--prefill-tokens", type=int, default=PREFILL_TOKENS, help="length of the long prompt whose prefill each decode row times"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/cpu.json"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-source", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "llama.cpp":
            row = llama_cpp_child(args.new_tokens)
        elif args.child in (ORT_BASELINE, ORT_SQZ, ORT_FUNCTION):
            row = ort_child(
                args.child, args.child_source, args.ort_ops, args.new_tokens, args.prefill_tokens, args.ort_threads, args.attention == "fused"
            )
        else:
            row = decode_child(args.child, args.child_source, args.new_tokens, args.prefill_tokens)
        print(json.dumps(row))
        return 0

    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads {torch.get_num_threads()}; LLC {llc_bytes() >> 20} MiB")
    results: dict[str, object] = {"load_average": load, "llc_bytes": llc_bytes()}
    if args.part in ("op", "all"):
        copy_rate = memcpy_rate(4 * llc_bytes())
        print(f"memcpy {copy_rate / 1e9:.2f} GB/s (read + write)")
        results["memcpy_bytes_per_s"] = copy_rate
        results["op_rows"] = [dataclasses.asdict(r) for r in op_rows(args, copy_rate)]
    if args.part in ("decode", "all"):
        results["decode_rows"] = decode_rows(args)
    benchutil.write_report(args.out, "cpu", torch.device("cpu"), args, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
