"""The onnxruntime custom-op library (plugins/ort, libsqz_ort_ops.so) against the torch reference and
the ONNX function fallback: one-node graphs over bits, sparsity, odd shapes and M, its refusals, what
the session holds, and whole tiny models through generate and compare.

The library is built once per session with CMake when onnxruntime's C API header is found (env
ONNXRUNTIME_INCLUDE_DIR / ONNXRUNTIME_ROOT, else /tmp/ort_headers); the PyPI wheel has no headers, so
without them the tests that need the library skip with that reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_onnx_function import one_node_model
from tiny_models import SAMPLE_TEXT, random_packed
from tolerances import TOLERANCES, tolerance

from sqz_export import ort_ops, ort_session
from sqz_export.checkpoint import load_quantized_model
from sqz_export.cli import main
from sqz_export.compare.driver import SQZ, CompareOptions, compare_folder
from sqz_export.errors import UserError
from sqz_export.export.sqz_model import BASELINE_FILE, MODEL_FILE
from sqz_export.formats import PackedLinear
from sqz_export.generate import OnnxGenerator

FALLBACK_HEADERS = Path("/tmp/ort_headers")
"""Where a developer session keeps onnxruntime's headers fetched for this build (never committed)."""
PROMPT = [5, 17, 42, 9, 33, 71]
STEPS = 12


@pytest.fixture(scope="session")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    headers = ort_ops.find_headers([FALLBACK_HEADERS])
    if headers is None:
        pytest.skip(
            "onnxruntime headers not found (the PyPI wheel ships none): set ONNXRUNTIME_ROOT to a release archive "
            f"or ONNXRUNTIME_INCLUDE_DIR to a folder with {ort_ops.HEADER}"
        )
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not on the PATH")
    return ort_ops.build_library(tmp_path_factory.mktemp("ort-ops"), headers)


def run(model: onnx.ModelProto, x: np.ndarray, library: Path | None) -> np.ndarray:
    options = ort_ops.session_options(library)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def dense_reference(layer: PackedLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T in fp32 on the reconstructed weight, rounded once to x's dtype."""
    return (x.float() @ layer.weight().t()).to(x.dtype)


def gemm_min_m() -> int:
    """kGEMM_MIN_M of plugins/ort/sqzOrtOps.cpp: from this many rows of x on, the op runs W's dequantized
    tiles through onnxruntime's Gemm instead of the LUT GEMV."""
    source = (ort_ops.SOURCE_DIR / "sqzOrtOps.cpp").read_text()
    found = re.search(r"constexpr int64_t kGEMM_MIN_M = (\d+);", source)
    assert found, "kGEMM_MIN_M not found in sqzOrtOps.cpp"
    return int(found.group(1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("density", [0.0, 0.03])
@pytest.mark.parametrize("shape", [(5, 33), (64, 96), (17, 1), (40, 128), (33, 310)])
@pytest.mark.parametrize("rows", [1, 7, gemm_min_m() + 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_and_function(
    library: Path, bits: int, density: float, shape: tuple[int, int], rows: int, dtype: torch.dtype
) -> None:
    layer = random_packed(*shape, bits, density, seed=bits * 11 + shape[1])
    model = one_node_model(layer, dtype)
    x = torch.randn(1, rows, shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
    y = run(model, x.numpy(), library)
    assert y.dtype == x.numpy().dtype and y.shape == (1, rows, shape[0])
    tol = tolerance("sqz_linear_cpu" if dtype == torch.float32 else "sqz_linear", dtype)
    torch.testing.assert_close(torch.from_numpy(y), dense_reference(layer, x), **tol)
    torch.testing.assert_close(torch.from_numpy(y), torch.from_numpy(run(model, x.numpy(), None)), **tol)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.05])
def test_identity_input_gives_exact_weight(library: Path, bits: int, density: float) -> None:
    """x = I makes every output one product with 1 (plus zeros): the dequantization must be exact, in the
    GEMV (the first rows of I) and in the tiles the large-M path hands to onnxruntime's Gemm (all 70)."""
    layer = random_packed(24, 70, bits, density, seed=5)
    model = one_node_model(layer, torch.float32)
    for rows in (gemm_min_m() - 1, 70):
        y = run(model, np.eye(70, dtype=np.float32)[None, :rows], library)
        assert np.array_equal(y[0], layer.weight().numpy().T[:rows])


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("density", [0.0, 0.03])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_m_takes_tiles_through_gemm(library: Path, bits: int, density: float, dtype: torch.dtype) -> None:
    """From kGEMM_MIN_M rows on: K = 4224 makes tiles of 256 rows, so N = 300 is one full tile and a
    partial one, each copied into its columns of y; one row fewer is the GEMV, on the same reference."""
    layer = random_packed(300, 4224, bits, density, seed=bits + 17)
    model = one_node_model(layer, dtype)
    tol = tolerance("sqz_linear_cpu" if dtype == torch.float32 else "sqz_linear", dtype)
    for batch, rows in ((1, gemm_min_m()), (1, gemm_min_m() - 1), (3, gemm_min_m() + 1)):
        x = torch.randn(batch, rows, 4224, generator=torch.Generator().manual_seed(rows)).to(dtype)
        y = run(model, x.numpy(), library)
        assert y.shape == (batch, rows, 300)
        torch.testing.assert_close(torch.from_numpy(y), dense_reference(layer, x), **tol)


def test_large_m_path_is_logged_once(library: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The first call from kGEMM_MIN_M rows on says so in onnxruntime's log (INFO), once per node."""
    model = one_node_model(random_packed(300, 4224, 3, 0.03, seed=1), torch.float32)
    options = ort_ops.session_options(library)
    options.log_severity_level = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for rows in (gemm_min_m() - 1, gemm_min_m(), gemm_min_m() + 5):
        session.run(None, {"x": np.ones((1, rows, 4224), np.float32)})
    log = capfd.readouterr().err
    assert "CPU LUT kernel for M < " + str(gemm_min_m()) in log
    assert log.count("W dequantized in tiles of 256 rows into onnxruntime's Gemm") == 1
    assert f"{gemm_min_m()} rows of x: W dequantized" in log


@pytest.mark.parametrize("rows", [3, 40])
def test_multithreaded_rows_match_one_thread(library: Path, rows: int) -> None:
    """The balanced split over onnxruntime's intra-op threads writes every row once, as one thread does;
    so do the parallel dequantization and onnxruntime's Gemm of the large-M path (40 rows)."""
    layer = random_packed(1000, 256, 3, 0.03, seed=9)
    model = one_node_model(layer, torch.float32)
    x = torch.randn(1, rows, 256, generator=torch.Generator().manual_seed(2)).numpy()
    outputs = []
    for threads in (1, 4):
        options = ort_ops.session_options(library)
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"x": x})[0])
    assert np.array_equal(outputs[0], outputs[1])


def _rss_kib() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS"))


def test_runs_do_not_grow_memory(library: Path) -> None:
    """Every call's scratch (fp16 x and y in fp32, both paths) goes back to onnxruntime, the allocator
    wrapper KernelContext_GetAllocator hands out included: it leaked about 240 bytes a call once, which
    30,000 calls turn into 7 MB."""
    model = one_node_model(random_packed(24, 64, 3, 0.03, seed=4), torch.float16)
    session = ort.InferenceSession(model.SerializeToString(), ort_ops.session_options(library), providers=["CPUExecutionProvider"])
    feeds = [{"x": np.ones((1, rows, 64), np.float16)} for rows in (1, gemm_min_m())]
    for _ in range(500):
        for feed in feeds:
            session.run(None, feed)
    before = _rss_kib()
    for _ in range(15_000):
        for feed in feeds:
            session.run(None, feed)
    assert _rss_kib() - before < 2048, f"RSS grew {_rss_kib() - before} KiB over 30,000 calls"


def test_session_keeps_the_packed_weights(library: Path, tmp_path: Path) -> None:
    """With the library the optimized graph is the SqzLinear node on the packed initializers as they
    were (no folded dense weight); without it onnxruntime folds the function into a dense MatMul."""
    layer = random_packed(48, 160, 3, 0.03, seed=3)
    model = one_node_model(layer, torch.float16)
    packed = {t.name: (t.data_type, list(t.dims)) for t in model.graph.initializer}
    graphs = {}
    for name, lib in (("library", library), ("function", None)):
        options = ort_ops.session_options(lib)
        options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        graphs[name] = onnx.load(str(tmp_path / f"{name}.onnx")).graph
    assert [(n.domain, n.op_type) for n in graphs["library"].node] == [("sqz", "SqzLinear")]
    assert {t.name: (t.data_type, list(t.dims)) for t in graphs["library"].initializer} == packed
    assert "MatMul" in [n.op_type for n in graphs["function"].node]
    assert [list(t.dims) for t in graphs["function"].initializer if t.data_type == TensorProto.FLOAT] == [[160, 48]]


def _with_attribute(model: onnx.ModelProto, name: str, value: int) -> onnx.ModelProto:
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])
    return model


def _with_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    index = next(i for i, t in enumerate(model.graph.initializer) if t.name == name)
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, name))
    return model


def _refusals() -> list[tuple[str, Callable[[], onnx.ModelProto], str]]:
    def base(density: float = 0.0) -> onnx.ModelProto:
        return one_node_model(random_packed(16, 64, 3, density, seed=4), torch.float32)

    def corrupt_col() -> onnx.ModelProto:
        model = base(0.1)
        col = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "layer.sparse_col")).copy()
        col[0] = 64
        return _with_initializer(model, "layer.sparse_col", col)

    return [
        ("layout", lambda: _with_attribute(base(), "layout", 1), "layout=1 is not supported"),
        ("bits", lambda: _with_attribute(base(), "bits", 5), "bits=5 is not supported"),
        (
            "qweight",
            lambda: _with_initializer(base(), "layer.qweight", np.zeros((16, 5), np.int32)),
            "input 1 (qweight) has shape [16, 5], expected [16, 6]",
        ),
        ("col", corrupt_col, "is outside [0, in_features=64)"),
    ]


@pytest.mark.parametrize("case", _refusals(), ids=lambda case: case[0])
def test_bad_node_fails_the_session_naming_node_and_cause(
    library: Path, tmp_path: Path, case: tuple[str, Callable[[], onnx.ModelProto], str]
) -> None:
    _, build, expected = case
    path = tmp_path / "bad.onnx"
    onnx.save(build(), str(path))
    with pytest.raises(UserError, match="custom-op library") as raised:
        ort_session.create_session(path, ort_ops=library)
    assert "SqzLinear node '/layer/SqzLinear'" in str(raised.value)
    assert expected in str(raised.value)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is not on the PATH")
def test_library_exports_only_the_entry_point_and_needs_no_libonnxruntime(library: Path) -> None:
    symbols = subprocess.run(
        ["readelf", "--dyn-syms", "--wide", str(library)], capture_output=True, text=True, check=True
    ).stdout
    defined = {
        line.split()[-1]
        for line in symbols.splitlines()
        if " FUNC " in line and " GLOBAL " in line and " UND " not in line
    }
    assert defined == {ort_ops.ENTRY_POINT}
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert "libonnxruntime" not in needed
    assert ort_ops.check_library(library) == library


def test_check_library_names_the_file_and_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        ort_ops.check_library(tmp_path / "missing.so")
    text = tmp_path / "notes.txt"
    text.write_text("not a library")
    with pytest.raises(UserError, match=r"notes\.txt: not a shared library .*libsqz_ort_ops\.so"):
        ort_ops.check_library(text)
    other = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_shared.so"
    with pytest.raises(UserError, match="does not export RegisterCustomOps"):
        ort_ops.check_library(other)


@pytest.mark.parametrize("command", ["generate", "compare"])
def test_cli_rejects_a_bad_ort_ops_path(
    command: str, tiny_export: Callable[[str, str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny_export("llama", "fp32")
    text = tmp_path / "lib.txt"
    text.write_text("not a library")
    args = ["--onnx", str(folder), "--prompt", "x"] if command == "generate" else [str(folder)]
    assert main([command, *args, "--ort-ops", str(text)]) == 2
    err = capsys.readouterr().err
    assert f"--ort-ops {text}: not a shared library" in err and "libsqz_ort_ops.so" in err


@pytest.mark.parametrize("fuse_attention", [True, False])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_greedy_tokens_match_torch_reference(
    library: Path,
    arch: str,
    fuse_attention: bool,
    tiny_export: Callable[[str, str], Path],
    tiny_checkpoint: Callable[[str], Path],
) -> None:
    model, _ = load_quantized_model(tiny_checkpoint(arch))
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([PROMPT]), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0
        )
    path = tiny_export(arch, "fp32") / MODEL_FILE
    result = OnnxGenerator(path, ort_ops=library, fuse_attention=fuse_attention).greedy(PROMPT, STEPS)
    assert result.new_ids == expected[0, len(PROMPT) :].tolist()


def test_fp16_model_logits_match_the_function_fallback(library: Path, tiny_export: Callable[[str, str], Path]) -> None:
    path = tiny_export("llama", "fp16") / MODEL_FILE
    tokens = np.asarray([PROMPT])
    logits = {lib: OnnxGenerator(path, ort_ops=lib).step(tokens, None)[0] for lib in (library, None)}
    torch.testing.assert_close(
        torch.from_numpy(logits[library]).float(),
        torch.from_numpy(logits[None]).float(),
        **tolerance("model_logits", torch.float16),
    )


def test_unpack_mode_does_not_matter_with_the_library(
    library: Path, tiny_export: Callable[[str, str], Path], caplog: pytest.LogCaptureFixture
) -> None:
    """With the kernel there is no function to fold, so ``--unpack call`` must neither slow nor change it."""
    path = tiny_export("llama", "fp32") / MODEL_FILE
    tokens = np.asarray([PROMPT])
    with caplog.at_level("INFO", logger="sqz_export.ort_session"):
        logits = {
            unpack: OnnxGenerator(path, unpack=unpack, ort_ops=library).step(tokens, None)[0]
            for unpack in ort_session.UNPACK_MODES
        }
    np.testing.assert_array_equal(logits[ort_session.UNPACK_SESSION], logits[ort_session.UNPACK_CALL])
    assert "no effect with --ort-ops" in caplog.text and "constant folding off" not in caplog.text


def test_cli_generate_with_ort_ops(
    library: Path, tiny_export: Callable[[str, str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    summary = tmp_path / "gen.json"
    folder = tiny_export("llama", "fp16")
    argv = ["generate", "--onnx", str(folder), "--prompt", "The quick", "--max-new-tokens", "4", "--json", str(summary)]
    assert main([*argv, "--ort-ops", str(library)]) == 0
    result = json.loads(summary.read_text())
    assert result["ort_ops"] == str(library) and 1 <= len(result["new_ids"]) <= 4 and result["attention"] == "fused"
    assert f"custom-op library {library}" in capsys.readouterr().out
    assert main([*argv, "--ort-ops", str(library), "--attention", "exported"]) == 0
    exported = json.loads(summary.read_text())
    assert exported["attention"] == "exported" and exported["new_ids"] == result["new_ids"]


def test_compare_with_ort_ops_passes_against_the_reference(
    library: Path, tiny_export: Callable[[str, str], Path], tmp_path: Path
) -> None:
    text = tmp_path / "sample.txt"
    text.write_text(SAMPLE_TEXT)
    atol, rtol = TOLERANCES[("model_logits", torch.float32)]
    options = CompareOptions(
        dataset=str(text), windows=1, seq_len=32, iterations=1, atol=atol, rtol=rtol, ort_ops=library
    )
    report, _ = compare_folder(tiny_export("llama", "fp32"), options)
    (pair,) = [p for p in report.pairs if p.runner == SQZ]
    assert pair.passed is True and pair.top1_agreement == 1.0
    assert report.ort_ops == str(library) and f"custom-op library {library}" in report.table()


# --- sqz::DenseLinear: the fp16 weights create_session leaves dense (the lm_head) -----------------------


def dense_linear_model(weight: np.ndarray, dtype: np.dtype) -> onnx.ModelProto:
    """One sqz::DenseLinear node: y = x W^T with the fp16 initializer ``weight`` [N, K]."""
    n, k = weight.shape
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        [helper.make_node("DenseLinear", ["x", "w"], ["y"], domain="sqz", name="/lm_head/DenseLinear")],
        "dense",
        [helper.make_tensor_value_info("x", elem, ["batch", "rows", k])],
        [helper.make_tensor_value_info("y", elem, ["batch", "rows", n])],
        [numpy_helper.from_array(weight.astype(np.float16), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("sqz", 1)])


@pytest.mark.parametrize("shape", [(5, 33), (300, 4224), (17, 1), (64, 576)])
@pytest.mark.parametrize("rows", [1, 5, gemm_min_m(), gemm_min_m() + 9])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dense_linear_matches_the_fp32_product_of_its_fp16_weight(
    library: Path, shape: tuple[int, int], rows: int, dtype: type
) -> None:
    """The GEMV below kGEMM_MIN_M rows and the fp32 tiles into onnxruntime's Gemm above (K = 4224: two
    tiles of N = 300) against x @ W^T in float64, rounded to x's dtype once."""
    rng = np.random.default_rng(shape[1] + rows)
    weight = rng.standard_normal(shape).astype(np.float16)
    x = rng.standard_normal((2, rows, shape[1])).astype(dtype)
    y = run(dense_linear_model(weight, dtype), x, library)
    assert y.dtype == dtype and y.shape == (2, rows, shape[0])
    expected = torch.from_numpy((x.astype(np.float64) @ weight.astype(np.float64).T).astype(dtype))
    tol = tolerance("sqz_linear_cpu" if dtype == np.float32 else "sqz_linear", torch.float32 if dtype == np.float32 else torch.float16)
    torch.testing.assert_close(torch.from_numpy(y), expected, **tol)


def test_dense_linear_of_the_identity_is_its_weight(library: Path) -> None:
    """fp16 -> fp32 is exact, so x = I gives W bit for bit, in the GEMV and in the Gemm path's tiles."""
    weight = np.random.default_rng(3).standard_normal((300, 40)).astype(np.float16)
    model = dense_linear_model(weight, np.float32)
    for rows in (gemm_min_m() - 1, 40):
        y = run(model, np.eye(40, dtype=np.float32)[None, :rows], library)
        assert np.array_equal(y[0], weight.astype(np.float32).T[:rows])


def test_dense_linear_logs_its_kernels_and_first_large_m_call(library: Path, capfd: pytest.CaptureFixture[str]) -> None:
    weight = np.ones((300, 4224), np.float16)
    options = ort_ops.session_options(library)
    options.log_severity_level = 1
    model = dense_linear_model(weight, np.float32)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for rows in (gemm_min_m() - 1, gemm_min_m(), gemm_min_m() + 5):
        session.run(None, {"x": np.ones((1, rows, 4224), np.float32)})
    log = capfd.readouterr().err
    assert f"DenseLinear node '/lm_head/DenseLinear': CPU fp16 GEMV for M < {gemm_min_m()}" in log
    assert log.count("W converted to fp32 in tiles of 256 rows into onnxruntime's Gemm") == 1


def test_dense_linear_refuses_a_weight_that_is_not_a_matrix(library: Path) -> None:
    model = dense_linear_model(np.ones((4, 8), np.float16), np.float32)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((2, 4, 8), np.float16), "w"))
    with pytest.raises(Exception, match=r"DenseLinear node '/lm_head/DenseLinear': input 1 \(w\) must be fp16 \[out_features, in_features\]"):
        run(model, np.ones((1, 1, 8), np.float32), library)


def _matmul_graph(weights: dict[str, tuple[np.ndarray, bool]]) -> onnx.ModelProto:
    """y_i = x @ W_i for each weight: (array, through_transpose) -> MatMul(x, Transpose(array)) or MatMul(x, array)."""
    nodes, inits, outputs = [], [], []
    for name, (array, through_transpose) in weights.items():
        inits.append(numpy_helper.from_array(array, name))
        operand = name
        if through_transpose:
            operand = f"{name}_t"
            nodes.append(helper.make_node("Transpose", [name], [operand], perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", ["x", operand], [f"y_{name}"], name=f"matmul_{name}"))
        outputs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT16, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [3, 64])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_fp16_weight_matmuls_run_as_dense_linear(library: Path, tmp_path: Path) -> None:
    """create_session's rewrite: a tied head (MatMul on Transpose(E)) reads E itself, an untied [K, N] weight
    reads one folded Transpose, an fp32 weight is left to onnxruntime; the file is untouched; outputs as before."""
    from graph_passes import CleanupPass, Fp16WeightLinearPass

    rng = np.random.default_rng(0)
    model = _matmul_graph(
        {
            "embedding": (rng.standard_normal((96, 64)).astype(np.float16), True),
            "head_t": (rng.standard_normal((64, 80)).astype(np.float16), False),
            "fp32_t": (rng.standard_normal((64, 16)).astype(np.float32), False),
        }
    )
    model.graph.node[-1].input[0] = "x32"  # the fp32 MatMul reads an fp32 x
    model.graph.node.insert(0, helper.make_node("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
    model.graph.output[-1].type.tensor_type.elem_type = TensorProto.FLOAT
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    before = path.read_bytes()
    rewritten = onnx.load(str(path), load_external_data=False)
    result = Fp16WeightLinearPass().run(rewritten)
    CleanupPass(infer_shapes=False).run(rewritten)
    assert result.count == 2
    ops = [(n.domain, n.op_type, list(n.input)) for n in rewritten.graph.node]
    assert ("sqz", "DenseLinear", ["x", "embedding"]) in ops
    assert ("sqz", "DenseLinear", ["x", "head_t/as_n_by_k"]) in ops
    assert ("", "MatMul", ["x32", "fp32_t"]) in ops
    assert ("", "Transpose", ["embedding"]) not in ops  # the tied head's Transpose is gone

    x = rng.standard_normal((3, 64)).astype(np.float16)
    session = ort_session.create_session(path, ort_ops=library)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for got, expected in zip(session.run(None, {"x": x}), plain.run(None, {"x": x}), strict=True):
        tol = tolerance("sqz_linear", torch.float16)
        torch.testing.assert_close(torch.from_numpy(got).float(), torch.from_numpy(expected).float(), **tol)
    assert path.read_bytes() == before


def test_session_holds_the_fp16_head_once(library: Path, tiny_export: Callable[[str, str], Path], tmp_path: Path) -> None:
    """On an fp16 export the optimized session graph runs the head as DenseLinear on one fp16 [N, K] matrix:
    no fp32 copy of it (what onnxruntime alone folds), and no [K, N] original left beside it."""
    path = tiny_export("llama", "fp16") / MODEL_FILE
    options = ort_ops.session_options(library)
    source, _ = ort_session._cpu_graph(path, onnx.load(str(path), load_external_data=False), options, None, with_library=True)
    assert isinstance(source, bytes)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph
    (dense,) = [n for n in optimized.node if n.op_type == "DenseLinear"]
    head = next(t for t in optimized.initializer if t.name == dense.input[1])
    n, k = head.dims
    assert head.data_type == TensorProto.FLOAT16
    assert not [t.name for t in optimized.initializer if list(t.dims) == [k, n]]
    assert not [t.name for t in optimized.initializer if t.data_type == TensorProto.FLOAT and sorted(t.dims) == sorted([n, k])]


def test_an_older_onnxruntime_keeps_the_graph_as_it_is(
    library: Path, tiny_export: Callable[[str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before 1.21 onnxruntime cannot find the external data of a graph handed over as bytes: no rewrite."""
    monkeypatch.setattr(ort, "__version__", "1.20.1")
    path = tiny_export("llama", "fp16") / MODEL_FILE
    graph = onnx.load(str(path), load_external_data=False)
    assert ort_session._cpu_graph(path, graph, ort_ops.session_options(library), None, with_library=True) == (str(path), [])


def _shared_x_model(layers: dict[str, tuple[PackedLinear, str]], tmp_path: Path) -> Path:
    """SqzLinear nodes named after ``layers`` ({name: (layer, x input)}), one output each, saved with
    external data as an export is."""
    from graph_passes import sqz_linear_node

    nodes, tensors, outputs = [], [], []
    for name, (layer, x) in layers.items():
        node, weights = sqz_linear_node(name, layer, x, f"y_{name}")
        node.name = name
        nodes.append(node)
        tensors += weights
        outputs.append(helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT16, None))
    k = next(iter(layers.values()))[0].in_features
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT16, ["rows", k]) for x in sorted({x for _, x in layers.values()})]
    model = helper.make_model(
        helper.make_graph(nodes, "shared", inputs, outputs, tensors),
        opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("sqz", 1)],
    )
    path = tmp_path / "shared.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="shared.onnx.data", size_threshold=0)
    return path


@pytest.mark.parametrize("rows", [1, gemm_min_m() + 3])
def test_sqz_linears_on_one_x_merge_into_one_node_with_the_same_outputs(library: Path, tmp_path: Path, rows: int) -> None:
    """q/k/v-like nodes (sparse, one x) merge into one node + Split, a dense node on the same x and a node on
    another x stay; every output is bit for bit what the unmerged graph gives (the same rows, the same kernel)."""
    layers = {
        "q": (random_packed(40, 96, 3, 0.03, seed=1), "x"),
        "k": (random_packed(16, 96, 3, 0.05, seed=2), "x"),
        "v": (random_packed(24, 96, 3, 0.02, seed=3), "x"),
        "dense": (random_packed(8, 96, 3, 0.0, seed=4), "x"),
        "other": (random_packed(8, 96, 3, 0.03, seed=5), "x2"),
    }
    path = _shared_x_model(layers, tmp_path)
    feed = {x: np.random.default_rng(rows).standard_normal((rows, 96)).astype(np.float16) for x in ("x", "x2")}
    plain = ort.InferenceSession(str(path), ort_ops.session_options(library), providers=["CPUExecutionProvider"])
    options = ort_ops.session_options(library)
    source, weights = ort_session._cpu_graph(path, onnx.load(str(path), load_external_data=False), options, None, with_library=True)
    graph = onnx.load_from_string(source).graph
    sqz_nodes = [n.name for n in graph.node if n.op_type == "SqzLinear"]
    assert sqz_nodes == ["q/merged", "dense", "other"] and len(weights) == 6
    (split,) = [n for n in graph.node if n.op_type == "Split"]
    casts = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Cast"}
    assert [casts[name] for name in split.output] == ["y_q", "y_k", "y_v"]  # the Split runs on fp32 (Fp32IoPass)
    merged = ort_session.create_session(path, ort_ops=library)
    for got, expected in zip(merged.run(None, feed), plain.run(None, feed), strict=True):
        np.testing.assert_array_equal(got, expected)


def _casts_onnxruntime_runs(path: Path, library: Path | None, tmp_path: Path, rewrite: bool = True) -> tuple[int, onnx.GraphProto]:
    """Casts in the graph onnxruntime runs for ``path`` (its optimized model), and the graph it was given:
    as it is without a library; with one, with the library's CPU rewrites when ``rewrite`` (as
    create_session does), else only the DenseLinear one."""
    options = ort_ops.session_options(library)
    optimized = tmp_path / f"optimized-{path.stem}-{rewrite}.onnx"
    options.optimized_model_filepath = str(optimized)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{optimized.name}.data")
    model = onnx.load(str(path), load_external_data=False)
    if library is None:
        source, weights = str(path), []
    elif rewrite:
        source, weights = ort_session._cpu_graph(path, model, options, None, with_library=True)
    else:
        from graph_passes import CleanupPass, Fp16WeightLinearPass

        Fp16WeightLinearPass().run(model)
        CleanupPass(infer_shapes=False).run(model)
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        source, weights = model.SerializeToString(), []
    ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    del weights  # alive until the session has read them
    casts = sum(node.op_type == "Cast" for node in onnx.load(str(optimized), load_external_data=False).graph.node)
    return casts, onnx.load_from_string(source).graph if isinstance(source, bytes) else model.graph


def test_sqz_nodes_run_on_fp32_activations_with_no_more_casts_than_the_baseline(
    library: Path, tiny_export: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """Every sqz node of the fp16 graph reads an fp32 x and its (or its Split's) outputs are cast back
    to fp16; onnxruntime then runs no more Casts than on the FP16 baseline graph. Without the pass it ran
    more: its fp16 neighbours' Casts could not cancel against nodes kept on fp16."""
    folder = tiny_export("llama", "fp16")
    with_pass, graph = _casts_onnxruntime_runs(folder / MODEL_FILE, library, tmp_path)
    producers = {output: node for node in graph.node for output in node.output}
    sqz_nodes = [node for node in graph.node if node.domain == "sqz"]
    assert {node.op_type for node in sqz_nodes} == {"SqzLinear", "DenseLinear"}
    for node in sqz_nodes:
        cast = producers[node.input[0]]
        assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT
        (user,) = [reader for reader in graph.node if node.output[0] in reader.input]
        for output in user.output if user.op_type == "Split" else node.output:
            (cast,) = [reader for reader in graph.node if output in reader.input]
            assert cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == TensorProto.FLOAT16
    baseline, _ = _casts_onnxruntime_runs(folder / BASELINE_FILE, None, tmp_path)
    without, _ = _casts_onnxruntime_runs(folder / MODEL_FILE, library, tmp_path, rewrite=False)
    assert with_pass <= baseline < without


def test_fp32_io_leaves_fp32_graphs_alone(tiny_export: Callable[[str, str], Path]) -> None:
    from graph_passes import Fp32IoPass

    model = onnx.load(str(tiny_export("llama", "fp32") / MODEL_FILE), load_external_data=False)
    before = model.SerializeToString()
    result = Fp32IoPass().run(model)
    assert result.count == 0 and result.refusals and {r.reason for r in result.refusals} == {"x is fp32 already"}
    assert model.SerializeToString() == before


def test_merged_weights_are_checked_at_creation(library: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The merged tensors reach the kernel as constants (checked once, CSR included), not per call."""
    layers = {name: (random_packed(16, 64, 4, 0.05, seed=i), "x") for i, name in enumerate(("gate", "up"))}
    path = _shared_x_model(layers, tmp_path)
    options = ort_ops.session_options(library)
    options.log_severity_level = 1
    source, weights = ort_session._cpu_graph(path, onnx.load(str(path), load_external_data=False), options, None, with_library=True)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((1, 64), np.float16)})
    log = capfd.readouterr().err
    assert "SqzLinear node 'gate/merged'" in log and "N=32, sparse, weights checked at creation" in log
    assert len(weights) == 6
