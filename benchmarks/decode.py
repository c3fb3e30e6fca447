"""End-to-end decode latency of a LLaMA-7B-shaped model: FP16 linears vs SqzLinear 3/4-bit (dense and sparse).

The model is built directly from torch layers with random weights (no download, no transformers):
32 decoder layers of hidden 4096, 32 heads, MLP 11008, vocab 32000, RMSNorm, RoPE, a static KV cache.
One decode step (all layers, lm_head, greedy argmax, cache write, position + 1) is captured in a CUDA
graph; generating --new-tokens tokens is that many back-to-back replays timed with CUDA events, so
Python and launch overhead do not count (HF eager decode of this model is launch-bound at ~90 ms/token).
Peak memory is torch.cuda.max_memory_allocated over building and generating. Prints a table, writes JSON.

    python benchmarks/decode.py --out runs/decode.json
    python benchmarks/decode.py --layers 8 --variants fp16 sqz3 --out runs/decode8.json   # less memory/time
    python benchmarks/decode.py --device cpu --config tiny --new-tokens 4                # dry run of the logic
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sqz_export.kernels import benchutil
from sqz_export.runtime import SqzLinear

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape (LLaMA-7B by default)."""

    hidden: int = 4096
    heads: int = 32
    intermediate: int = 11008
    vocab: int = 32000
    layers: int = 32
    max_len: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


CONFIGS = {
    "llama-7b": ModelConfig(),
    "tiny": ModelConfig(hidden=64, heads=4, intermediate=160, vocab=128, layers=2, max_len=64),
}

# variant name -> (bits, sparse density); bits None = FP16 nn.Linear.
VARIANTS: dict[str, tuple[int | None, float]] = {
    "fp16": (None, 0.0),
    "sqz4": (4, 0.0),
    "sqz3": (3, 0.0),
    "sqz4-sparse": (4, 0.0045),
    "sqz3-sparse": (3, 0.0045),
}

LinearFactory = Callable[[int, int], nn.Module]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, device: torch.device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=torch.float16))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        variance = h.float().pow(2).mean(-1, keepdim=True)
        return (h.float() * torch.rsqrt(variance + 1e-6)).to(h.dtype) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    """LLaMA block for one new token per sequence, with a static KV cache [B, heads, max_len, head_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, linear: LinearFactory, device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        h, i = cfg.hidden, cfg.intermediate
        self.q, self.k, self.v, self.o = linear(h, h), linear(h, h), linear(h, h), linear(h, h)
        self.gate, self.up, self.down = linear(i, h), linear(i, h), linear(h, i)
        self.norm1, self.norm2 = RMSNorm(h, device), RMSNorm(h, device)
        shape = (batch, cfg.heads, cfg.max_len, cfg.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16, device=device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16, device=device))

    def forward(
        self, h: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        b = h.shape[0]
        heads, dim = self.cfg.heads, self.cfg.head_dim
        x = self.norm1(h)  # [B, 1, H]
        q = self.q(x).view(b, 1, heads, dim).transpose(1, 2)
        k = self.k(x).view(b, 1, heads, dim).transpose(1, 2)
        v = self.v(x).view(b, 1, heads, dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        attn = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        h = h + self.o(attn.transpose(1, 2).reshape(b, 1, -1))
        x = self.norm2(h)
        return h + self.down(F.silu(self.gate(x)) * self.up(x))


class Decoder(nn.Module):
    """Embedding, decoder layers, final norm, FP16 lm_head; ``step`` advances every sequence by one token."""

    def __init__(self, cfg: ModelConfig, batch: int, linear: LinearFactory, device: torch.device) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.randn(cfg.vocab, cfg.hidden, device=device, dtype=torch.float16) * 0.02)
        self.layers = nn.ModuleList(DecoderLayer(cfg, batch, linear, device) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, device)
        self.lm_head = fp16_linear(device)(cfg.vocab, cfg.hidden)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
        angles = torch.outer(torch.arange(cfg.max_len, device=device).float(), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().to(torch.float16))
        self.register_buffer("sin", angles.sin().to(torch.float16))
        self.register_buffer("positions", torch.arange(cfg.max_len, device=device))
        # Static decode state: the graph reads and updates these in place.
        self.register_buffer("tokens", torch.zeros(batch, dtype=torch.int64, device=device))
        self.register_buffer("pos", torch.zeros(1, dtype=torch.int64, device=device))

    @torch.no_grad()
    def step(self) -> None:
        cos = self.cos.index_select(0, self.pos).view(1, 1, 1, -1)
        sin = self.sin.index_select(0, self.pos).view(1, 1, 1, -1)
        mask = (self.positions <= self.pos).view(1, 1, 1, -1)
        h = F.embedding(self.tokens, self.embed).unsqueeze(1)  # [B, 1, H]
        for layer in self.layers:
            h = layer(h, self.pos, cos, sin, mask)
        logits = self.lm_head(self.norm(h))[:, 0]  # [B, vocab]
        self.tokens.copy_(logits.argmax(dim=-1))
        self.pos.add_(1)


def fp16_linear(device: torch.device) -> LinearFactory:
    def make(out_features: int, in_features: int) -> nn.Module:
        layer = nn.Linear(in_features, out_features, bias=False, device=device, dtype=torch.float16)
        nn.init.normal_(layer.weight, std=0.02)
        return layer.requires_grad_(False)

    return make


def sqz_linear_factory(bits: int, density: float, device: torch.device) -> LinearFactory:
    counter = iter(range(1 << 30))

    def make(out_features: int, in_features: int) -> nn.Module:
        packed = benchutil.random_packed(out_features, in_features, bits, density, seed=next(counter), device=device)
        return SqzLinear(packed).to(device)

    return make


@dataclasses.dataclass
class Result:
    variant: str
    bits: int | None
    density: float
    layers: int
    new_tokens: int
    ms_per_token: float
    tokens_per_s: float
    linear_weight_bytes: int
    peak_memory_bytes: int
    speedup_vs_fp16: float | None = None


def linear_bytes(model: nn.Module) -> int:
    total = 0
    for module in model.layers.modules():
        if isinstance(module, SqzLinear):  # qweight, LUT, CSR (what a decode step reads)
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def run_variant(name: str, cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> Result:
    bits, density = VARIANTS[name]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    factory = fp16_linear(device) if bits is None else sqz_linear_factory(bits, density, device)
    model = Decoder(cfg, args.batch, factory, device).eval()
    model.tokens.random_(0, cfg.vocab)
    prompt = args.prompt_len
    for _ in range(prompt):  # fill the cache (untimed); also warms up kernels and the JIT build
        model.step()
    if args.prompt_len + args.new_tokens > cfg.max_len:
        raise SystemExit(f"error: --prompt-len + --new-tokens must be <= max_len {cfg.max_len}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            pos0 = model.pos.clone()
            model.step()  # warm-up on a side stream before capture, as torch recommends
            model.pos.copy_(pos0)
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph):
            model.step()
        samples = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(args.repeats):
            model.pos.fill_(prompt)
            start.record()
            for _ in range(args.new_tokens):
                graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / args.new_tokens)
        ms = statistics.median(samples)
        peak = torch.cuda.max_memory_allocated(device)
        del graph
    else:
        samples = []
        for _ in range(args.repeats):
            model.pos.fill_(prompt)
            t0 = time.perf_counter()
            for _ in range(args.new_tokens):
                model.step()
            samples.append((time.perf_counter() - t0) * 1e3 / args.new_tokens)
        ms = statistics.median(samples)
        peak = 0
    result = Result(name, bits, density, cfg.layers, args.new_tokens, ms, 1e3 / ms, linear_bytes(model), peak)
    del model
    return result


def format_table(results: list[Result]) -> str:
    lines = [
        f"{'variant':<12} {'layers':>6} {'ms/token':>9} {'tok/s':>8} {'speedup':>8} {'linear GB':>9} {'peak GB':>8}"
    ]
    for r in results:
        speedup = f"{r.speedup_vs_fp16:.2f}x" if r.speedup_vs_fp16 else "-"
        lines.append(
            f"{r.variant:<12} {r.layers:>6} {r.ms_per_token:>9.3f} {r.tokens_per_s:>8.1f} {speedup:>8} "
            f"{r.linear_weight_bytes / 1e9:>9.3f} {r.peak_memory_bytes / 1e9:>8.2f}"
        )
    return "\n".join(lines)


def acceptance_line(results: list[Result], device: torch.device) -> str:
    """Issue 4's end-to-end criterion: dense 3-bit decode at least 3x faster per token than FP16."""
    if device.type != "cuda":
        return "acceptance: not evaluated (CPU dry-run timings mean nothing)"
    sqz3 = next((r for r in results if r.variant == "sqz3"), None)
    if sqz3 is None or sqz3.speedup_vs_fp16 is None:
        return "acceptance: not evaluated (needs the fp16 and sqz3 variants in one run)"
    verdict = "PASS" if sqz3.speedup_vs_fp16 >= 3.0 else "FAIL"
    return (
        f"acceptance (issue 4): sqz3 decode speedup over fp16 {sqz3.speedup_vs_fp16:.2f}x "
        f"(target >= 3.0, {sqz3.layers} layers)  {verdict}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="llama-7b")
    parser.add_argument(
        "--layers", type=int, default=None, help="decoder layers (default: the config's; fewer = less memory)"
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16, help="tokens decoded (untimed) before timing")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed generations; the median is reported")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run of the logic")
    parser.add_argument("--out", type=Path, default=None, help="JSON output path")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    device = benchutil.benchmark_device(args.device)
    if device is None:
        return 2
    cfg = CONFIGS[args.config]
    if args.layers is not None:
        cfg = dataclasses.replace(cfg, layers=args.layers)
    torch.manual_seed(0)
    results = []
    for name in args.variants:
        results.append(run_variant(name, cfg, args, device))
        logger.info("%s: %.3f ms/token", name, results[-1].ms_per_token)
    baseline = next((r for r in results if r.variant == "fp16"), None)
    for r in results:
        r.speedup_vs_fp16 = baseline.ms_per_token / r.ms_per_token if baseline else None
    print(format_table(results))
    print(acceptance_line(results, device))
    if args.out is not None:
        benchutil.write_report(
            args.out,
            "decode",
            device,
            args,
            model=dataclasses.asdict(cfg),
            results=[dataclasses.asdict(r) for r in results],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
