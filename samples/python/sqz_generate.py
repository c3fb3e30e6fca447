"""Greedy generation from a sqz-export engine with the SqzLinear plugin, using only TensorRT + torch.

    python samples/python/sqz_generate.py runs/model.engine \
        --plugin-library build/plugins/sqzLinearPlugin/libsqz_trt_plugin.so \
        --tokenizer runs/onnx --prompt "The capital of France is" --steps 16

The same three steps as samples/cpp/sqzGenerate.cpp, in Python: import tensorrt first, then load the
plugin library (it registers sqz::SqzLinear v1 with the TensorRT it finds in the process); deserialize
the engine and use profile 1 for the prompt (prefill) and profile 0 for each new token (decode); the
present.N.* outputs of one step are the past_key_values.N.* inputs of the next. Device memory comes
from torch CUDA tensors (any allocator works: TensorRT only sees the addresses).
"""

from __future__ import annotations

import argparse
import ctypes
import sys

import tensorrt as trt
import torch

DECODE_PROFILE, PREFILL_PROFILE = 0, 1
TORCH_DTYPES = {trt.float16: torch.float16, trt.bfloat16: torch.bfloat16, trt.float32: torch.float32, trt.int64: torch.int64}


def load_plugin(path: str) -> None:
    ctypes.CDLL(path)
    if trt.get_plugin_registry().get_creator("SqzLinear", "1", "sqz") is None:
        sys.exit(f"{path} did not register sqz::SqzLinear version 1 (load it after `import tensorrt`)")


class Generator:
    def __init__(self, engine: trt.ICudaEngine) -> None:
        if engine.num_optimization_profiles != 2:
            sys.exit("expected the decode and prefill profiles that `sqz-export build` adds")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.engine = engine
        self.past = [name for name in names if name.startswith("past_key_values.")]
        self.present = [name.replace("past_key_values.", "present.") for name in self.past]
        self.has_position_ids = "position_ids" in names
        _, self.heads, _, self.head_dim = engine.get_tensor_shape(self.past[0])
        self.cache_dtype = TORCH_DTYPES[engine.get_tensor_dtype(self.past[0])]
        self.stream = torch.cuda.Stream()
        self.contexts = {}
        for profile in (DECODE_PROFILE, PREFILL_PROFILE):
            context = engine.create_execution_context()
            context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts[profile] = context
        self.cache = [torch.empty(1, self.heads, 0, self.head_dim, dtype=self.cache_dtype, device="cuda") for _ in self.past]
        self.placeholder = torch.empty(64, dtype=torch.uint8, device="cuda")

    def step(self, tokens: list[int]) -> int:
        """Runs ``tokens`` after the cache; returns the greedy next token and grows the cache."""
        past_len = self.cache[0].shape[2]
        context = self.contexts[PREFILL_PROFILE if past_len == 0 else DECODE_PROFILE]
        seq = len(tokens)
        inputs = {
            "input_ids": torch.tensor([tokens], dtype=torch.int64, device="cuda"),
            "attention_mask": torch.ones(1, past_len + seq, dtype=torch.int64, device="cuda"),
        }
        if self.has_position_ids:
            inputs["position_ids"] = torch.arange(past_len, past_len + seq, dtype=torch.int64, device="cuda")[None]
        inputs.update(zip(self.past, self.cache, strict=True))
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            # An empty cache (prefill) has no storage; TensorRT still wants a valid address.
            context.set_tensor_address(name, tensor.data_ptr() or self.placeholder.data_ptr())
        outputs = {}
        for name in ["logits", *self.present]:
            shape = tuple(context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=TORCH_DTYPES[self.engine.get_tensor_dtype(name)], device="cuda")
            context.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # inputs were written on torch's current stream
        if not context.execute_async_v3(self.stream.cuda_stream):
            sys.exit("TensorRT execution failed (see the TensorRT log)")
        self.stream.synchronize()
        self.cache = [outputs[name] for name in self.present]
        return int(outputs["logits"][0, -1].float().argmax())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", help="engine from `sqz-export build`")
    parser.add_argument("--plugin-library", required=True, help="libsqz_trt_plugin.so")
    parser.add_argument("--tokens", help="prompt token ids, comma separated (or use --tokenizer + --prompt)")
    parser.add_argument("--tokenizer", help="folder with the tokenizer (the `sqz-export export` output folder)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--steps", type=int, default=16, help="tokens to generate")
    args = parser.parse_args()

    logger = trt.Logger(trt.Logger.WARNING)
    load_plugin(args.plugin_library)
    with open(args.engine, "rb") as handle:
        engine = trt.Runtime(logger).deserialize_cuda_engine(handle.read())
    if engine is None:
        sys.exit(f"{args.engine}: could not deserialize the engine (see the TensorRT log)")
    tokenizer = None
    if args.tokens:
        prompt = [int(t) for t in args.tokens.split(",")]
    elif args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        prompt = tokenizer(args.prompt)["input_ids"]
    else:
        sys.exit("give --tokens or --tokenizer (with --prompt)")

    generator = Generator(engine)
    generated = [generator.step(prompt)]
    while len(generated) < args.steps:
        generated.append(generator.step([generated[-1]]))
    print("prompt ids:   ", prompt)
    print("generated ids:", generated)
    if tokenizer is not None:
        print(args.prompt + tokenizer.decode(generated, skip_special_tokens=True))


if __name__ == "__main__":
    main()
