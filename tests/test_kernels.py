"""torch.ops.sqz.sqz_linear: CPU reference grid, exact cases, the C++ reference twin, and CUDA kernels.

CPU tests always run. The C++ reference (plugins/kernels/sqzLinearRef.cpp) is compiled with g++ into a
small shared library once per session and called through ctypes. `gpu` tests compare the CUDA
kernels with the CPU op on the same inputs, with y poisoned (NaN) before the launch.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import tolerance
from toolchain import cuda_include_dir

from sqz_export import kernels
from sqz_export.kernels import benchutil, build
from sqz_export.kernels.ops import CPU_GEMM_MIN_M
from sqz_export.formats import FormatError, PackedLinear, SparsePart, pack_indices, to_rowmajor
from sqz_export.runtime import SqzLinear

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the kernels only compile here)")

# (K, N): odd K (not a multiple of 32, or of 128 for the 3-bit 128-bit-load path) and odd N.
CPU_SHAPES = [(45, 7), (96, 33), (257, 130)]
DENSITIES = [0.0, 0.005]


def random_layer(out_features: int, in_features: int, bits: int, density: float, seed: int = 0) -> PackedLinear:
    """The shared builder with a heavy sparse row (the balanced splits must not leave it to one worker)."""
    return benchutil.random_packed(out_features, in_features, bits, density, seed, chunk_nnz=8, heavy_row=True)


def op_args(layer: PackedLinear) -> tuple:
    """(qweight layout 2, lut, row_ptr, col, val, chunk_row) as the op takes them."""
    s = layer.sparse
    sparse = (s.row_ptr, s.col, s.val, s.chunk_row) if s is not None else (None, None, None, None)
    return (to_rowmajor(layer.qweight), layer.lut, *sparse)


def chunk_nnz(layer: PackedLinear) -> int:
    return layer.sparse.chunk_nnz if layer.sparse is not None else 0


def run_op(layer: PackedLinear, x: torch.Tensor, kernel: str = "auto", device: str = "cpu") -> torch.Tensor:
    args = [t.to(device) if t is not None else None for t in op_args(layer)]
    return torch.ops.sqz.sqz_linear(x.to(device), *args, layer.bits, layer.in_features, chunk_nnz(layer), kernel)


# ---- CPU: the op against the fp32 dense reference ----------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("bits", [3, 4])
def test_cpu_op_matches_fp32_reference(
    bits: int, m: int, shape: tuple[int, int], density: float, dtype: torch.dtype
) -> None:
    k, n = shape
    layer = random_layer(n, k, bits, density, seed=bits * 7 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    y = run_op(layer, x)
    assert y.dtype == dtype and y.shape == (m, n)
    expected = x.to(torch.float32) @ layer.weight().t()  # independent decode: formats.unpack_indices
    torch.testing.assert_close(y.to(torch.float32), expected, **tolerance("sqz_linear", dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_identity_weight_is_exact(bits: int, dtype: torch.dtype) -> None:
    """W = I (idx 1 on the diagonal, LUT [0, 1, ...]): y must equal x bit for bit."""
    k = 45
    indices = torch.eye(k, dtype=torch.int64)
    lut = torch.zeros(k, 1 << bits, dtype=torch.float16)
    lut[:, 1] = 1.0
    layer = PackedLinear(bits, k, k, pack_indices(indices, bits), lut)
    x = torch.randn(5, k).to(dtype)
    assert torch.equal(run_op(layer, x), x)


def integer_layer(bits: int, dtype: torch.dtype) -> tuple[PackedLinear, torch.Tensor, torch.Tensor]:
    """Small-integer LUT, x and sparse values: every sum is an exact integer in fp32 and in the output."""
    k, n, m = 45, 7, 3
    generator = torch.Generator().manual_seed(bits)
    indices = torch.randint(0, 1 << bits, (n, k), generator=generator)
    lut = (torch.arange(1 << bits) - (1 << bits) // 2).repeat(n, 1).to(torch.float16)
    dense = torch.zeros(n, k)
    dense[0, 0], dense[0, 44], dense[3, 17], dense[5, 1], dense[5, 2] = 3, -1, 2, 1, -4
    layer = PackedLinear(bits, k, n, pack_indices(indices, bits), lut, SparsePart.from_dense(dense, chunk_nnz=2))
    x = torch.randint(-2, 3, (m, k), generator=generator).to(dtype)
    expected = (x.to(torch.float64) @ layer.weight().to(torch.float64).t()).to(dtype)
    return layer, x, expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4])
def test_integer_case_with_sparse_part_is_exact(bits: int, dtype: torch.dtype) -> None:
    layer, x, expected = integer_layer(bits, dtype)
    assert torch.equal(run_op(layer, x), expected)


def test_module_entry_point_matches_runtime_reference() -> None:
    layer = random_layer(33, 96, 3, 0.01, seed=3)
    module = SqzLinear(layer)
    x = torch.randn(2, 3, 96).to(torch.float16)
    y = kernels.sqz_linear(module, x)
    assert y.shape == (2, 3, 33) and y.dtype == torch.float16
    torch.testing.assert_close(y, module(x), **tolerance("sqz_linear", torch.float16))


def test_fp32_activations_run_the_reference() -> None:
    layer = random_layer(7, 45, 4, 0.05)
    x = torch.randn(4, 45)
    torch.testing.assert_close(run_op(layer, x), x @ layer.weight().t(), **tolerance("sqz_linear", torch.float32))


def test_available_reflects_cuda() -> None:
    assert kernels.available() == torch.cuda.is_available()


def test_bad_arguments_name_the_tensor() -> None:
    layer = random_layer(7, 45, 3, 0.05)
    qweight, lut, row_ptr, col, val, chunk_row = op_args(layer)
    x = torch.randn(2, 45).to(torch.float16)
    with pytest.raises(FormatError, match="qweight"):
        torch.ops.sqz.sqz_linear(x, qweight[:, :-1], lut, row_ptr, col, val, chunk_row, 3, 45, 8)
    with pytest.raises(FormatError, match="lut"):
        torch.ops.sqz.sqz_linear(x, qweight, lut.float(), row_ptr, col, val, chunk_row, 3, 45, 8)
    with pytest.raises(FormatError, match="together"):
        torch.ops.sqz.sqz_linear(x, qweight, lut, row_ptr, None, val, chunk_row, 3, 45, 8)
    with pytest.raises(FormatError, match="in_features"):
        torch.ops.sqz.sqz_linear(x[:, :40], qweight, lut, row_ptr, col, val, chunk_row, 3, 45, 8)
    with pytest.raises(FormatError, match="bits"):
        torch.ops.sqz.sqz_linear(x, qweight, lut, row_ptr, col, val, chunk_row, 5, 45, 8)
    with pytest.raises(FormatError, match="kernel"):
        torch.ops.sqz.sqz_linear(x, qweight, lut, row_ptr, col, val, chunk_row, 3, 45, 8, "fastest")


def test_fake_tensor_shape() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = random_layer(7, 45, 3, 0.0)
    real = (torch.randn(3, 45).to(torch.float16), *op_args(layer)[:2])
    with FakeTensorMode() as mode:
        x, qweight, lut = (mode.from_tensor(t) for t in real)
        y = torch.ops.sqz.sqz_linear(x, qweight, lut, None, None, None, None, 3, 45, 0)
    assert y.shape == (3, 7) and y.dtype == torch.float16


# ---- the C++ reference twin (plugins/kernels/sqzLinearRef.cpp) ------------------------------------

_SHIM = r"""
#include "sqzLinear.h"
#include "sqzGemvEmulate.h"
extern "C" const char* sqz_linear_ref(int m, int k, int n, int bits, int nnz, int chunkNnz, int bf16,
    const void* x, const int* qweight, const void* lut, const int* rowPtr, const int* col, const void* val,
    const int* chunkRow, void* y, int emulateGemv, int forceScalar) {
  sqz::SqzLinearShape s{m, k, n, bits, nnz, chunkNnz, bf16 ? sqz::DataType::kBF16 : sqz::DataType::kHALF};
  sqz::SqzLinearArgs a{};
  a.x = x; a.qweight = qweight; a.lut = lut; a.rowPtr = rowPtr; a.col = col; a.val = val; a.chunkRow = chunkRow; a.y = y;
  return emulateGemv ? sqz::sqzGemvEmulate(s, a, forceScalar != 0, forceScalar != 0) : sqz::sqzLinearRef(s, a);
}
"""


@pytest.fixture(scope="session")
def cpp_reference(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """sqzLinearRef.cpp, sqzLinearPolicy.cpp and the GEMV host emulation as a shared library (built once).

    -ffp-contract=off: the emulation's only fp math is explicit fmaf and the butterfly adds, as on the GPU.
    """
    compiler = shutil.which("g++") or shutil.which("c++")
    include = cuda_include_dir()
    if compiler is None or include is None:
        pytest.skip("the C++ reference needs g++ and the CUDA runtime headers (cuda_runtime_api.h)")
    out = tmp_path_factory.mktemp("sqzref")
    shim = out / "shim.cpp"
    shim.write_text(_SHIM)
    lib = out / "libsqzref.so"
    kernels_dir = REPO / "plugins" / "kernels"
    cmd = [
        compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror",
        f"-I{REPO / 'plugins' / 'common'}", f"-I{kernels_dir}", f"-I{kernels_dir / 'tests'}", f"-I{include}",
        str(shim), str(kernels_dir / "sqzLinearRef.cpp"), str(kernels_dir / "sqzLinearPolicy.cpp"),
        str(kernels_dir / "tests" / "sqzGemvEmulate.cpp"), "-o", str(lib),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"compiling the C++ reference failed:\n{result.stderr}"
    cdll = ctypes.CDLL(str(lib))
    cdll.sqz_linear_ref.restype = ctypes.c_char_p
    return cdll


def run_cpp_reference(
    cdll: ctypes.CDLL, layer: PackedLinear, x: torch.Tensor, emulate_gemv: bool = False, force_scalar: bool = False
) -> torch.Tensor:
    """sqzLinearRef, or with ``emulate_gemv`` the GEMV kernel's own lane code run on the host."""
    qweight, lut, row_ptr, col, val, chunk_row = op_args(layer)
    y = torch.empty(x.shape[0], layer.out_features, dtype=x.dtype)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr()) if t is not None else None
    nnz = layer.sparse.nnz if layer.sparse is not None else 0
    error = cdll.sqz_linear_ref(
        x.shape[0], layer.in_features, layer.out_features, layer.bits, nnz, chunk_nnz(layer),
        int(x.dtype == torch.bfloat16), ptr(x), ptr(qweight), ptr(lut), ptr(row_ptr), ptr(col), ptr(val),
        ptr(chunk_row), ptr(y), int(emulate_gemv), int(force_scalar),
    )  # fmt: skip
    assert error is None, error.decode()
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cpp_reference_matches_torch_op(
    cpp_reference: ctypes.CDLL, bits: int, density: float, dtype: torch.dtype
) -> None:
    layer = random_layer(130, 257, bits, density, seed=bits)
    x = torch.randn(4, 257).to(dtype)
    torch.testing.assert_close(
        run_cpp_reference(cpp_reference, layer, x), run_op(layer, x), **tolerance("sqz_linear", dtype)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpp_reference_integer_case_is_exact(cpp_reference: ctypes.CDLL, dtype: torch.dtype) -> None:
    layer, x, expected = integer_layer(3, dtype)
    assert torch.equal(run_cpp_reference(cpp_reference, layer, x), expected)


# ---- the C++ CPU kernel (plugins/kernels/sqzLinearCpu*.cpp) on every ISA this CPU has ---------------

CPU_KERNEL_ISAS = [isa for isa in kernels.CPU_ISAS if build.cpu_extension().supports(kernels.CPU_ISAS[isa])]
"""Every ISA path this CPU runs; "scalar" always (it forces the portable path on any CPU)."""
# (K, N): K < 32 (tail only), odd K and N, K = 1040 (33 groups: a K block boundary at M = 16 and a
# tail), and K = 4224 with N = 9 (rows fewer than the 16-row chunks).
CPU_KERNEL_SHAPES = [(20, 3), (45, 7), (257, 130), (1040, 5), (4224, 9)]


@pytest.mark.parametrize("m", [1, 3, 4, 16, 17])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", CPU_KERNEL_SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("isa", CPU_KERNEL_ISAS)
def test_cpu_kernel_matches_torch_reference(isa: str, bits: int, shape: tuple[int, int], density: float, m: int) -> None:
    """fp32 x in, fp32 y out: only the summation order differs from the fp32 dense reference."""
    k, n = shape
    layer = random_layer(n, k, bits, density, seed=bits * 13 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
    y = run_op(layer, x, kernel=isa)
    torch.testing.assert_close(y, x @ layer.weight().t(), **tolerance("sqz_linear_cpu", torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("isa", CPU_KERNEL_ISAS)
def test_cpu_kernel_matches_cpp_reference(cpp_reference: ctypes.CDLL, isa: str, bits: int, dtype: torch.dtype) -> None:
    layer = random_layer(130, 1040, bits, 0.005, seed=bits)
    x = torch.randn(16, 1040).to(dtype)
    torch.testing.assert_close(run_op(layer, x, kernel=isa), run_cpp_reference(cpp_reference, layer, x), **tolerance("sqz_linear", dtype))


@pytest.mark.parametrize("isa", CPU_KERNEL_ISAS)
def test_cpu_kernel_identity_and_integer_cases_are_exact(isa: str) -> None:
    for bits in (3, 4):
        indices = torch.eye(45, dtype=torch.int64)
        lut = torch.zeros(45, 1 << bits, dtype=torch.float16)
        lut[:, 1] = 1.0
        x = torch.randn(5, 45).to(torch.float16)
        assert torch.equal(run_op(PackedLinear(bits, 45, 45, pack_indices(indices, bits), lut), x, kernel=isa), x)
        layer, x, expected = integer_layer(bits, torch.float16)
        assert torch.equal(run_op(layer, x, kernel=isa), expected)


@pytest.mark.parametrize("m", [CPU_GEMM_MIN_M, CPU_GEMM_MIN_M + 9])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", CPU_KERNEL_SHAPES + [(4224, 300)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_large_m_dequantized_gemm_matches_torch_reference(bits: int, shape: tuple[int, int], density: float, m: int) -> None:
    """kernel="auto" from CPU_GEMM_MIN_M rows on: W in tiles (N = 300 at K = 4224 needs two tiles of
    256 rows, the second partial), dequantized by the best ISA (scalar for 2 and 8 bits), into torch's GEMM."""
    k, n = shape
    layer = random_layer(n, k, bits, density, seed=bits * 7 + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m * 3 + k))
    torch.testing.assert_close(run_op(layer, x), x @ layer.weight().t(), **tolerance("sqz_linear_cpu", torch.float32))
    below = x[: CPU_GEMM_MIN_M - 1]
    torch.testing.assert_close(run_op(layer, below), run_op(layer, below, kernel="gemv"), rtol=0, atol=0)


def test_large_m_identity_and_integer_cases_are_exact(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqz_export.kernels import ops

    monkeypatch.setattr(ops, "_logged_choices", set())  # each choice is logged once per process
    with caplog.at_level("INFO", logger="sqz_export.kernels.ops"):
        for bits in (3, 4):
            indices = torch.eye(45, dtype=torch.int64)
            lut = torch.zeros(45, 1 << bits, dtype=torch.float16)
            lut[:, 1] = 1.0
            x = torch.randn(CPU_GEMM_MIN_M + 3, 45).to(torch.float16)
            assert torch.equal(run_op(PackedLinear(bits, 45, 45, pack_indices(indices, bits), lut), x), x)
            layer, x, expected = integer_layer(bits, torch.float16)
            x, expected = x.repeat(CPU_GEMM_MIN_M, 1), expected.repeat(CPU_GEMM_MIN_M, 1)
            assert torch.equal(run_op(layer, x), expected)
    assert "dequantized tiles + torch GEMM" in caplog.text


CPU_KERNEL_SOURCES = ["sqzLinearCpu.cpp", "sqzLinearCpuAvx2.cpp", "sqzLinearCpuAvx512.cpp", "sqzLinearCpuAvx512Vbmi.cpp"]
"""plugins/kernels/ files of the CPU kernel, compiled with each C++ test program below."""


def run_cpu_kernel_program(test_source: str, binary: Path) -> subprocess.CompletedProcess[str]:
    """Compiles plugins/kernels/tests/``test_source`` with the CPU kernel and runs it (g++ required)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("needs g++")
    kernels_dir = REPO / "plugins" / "kernels"
    sources = [kernels_dir / "tests" / test_source, *(kernels_dir / s for s in CPU_KERNEL_SOURCES)]
    cmd = [compiler, "-std=c++17", "-O2", f"-I{REPO / 'plugins' / 'common'}", f"-I{kernels_dir}", *map(str, sources), "-o", str(binary)]
    built = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"compiling {test_source} failed:\n{built.stderr}"
    return subprocess.run([str(binary)], capture_output=True, text=True, check=False)


def test_both_avx512_decodes_give_the_same_bits(tmp_path: Path) -> None:
    """plugins/kernels/tests/sqzCpuDecodePaths.cpp: GEMV and dequantization, 240 shapes, bit for bit."""
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if " avx512vbmi" not in cpu_flags:
        pytest.skip("needs a CPU with AVX512_VBMI (both decodes must run)")
    ran = run_cpu_kernel_program("sqzCpuDecodePaths.cpp", tmp_path / "decode_paths")
    assert ran.returncode == 0 and "240 cases, 0 differ" in ran.stdout, ran.stdout


def test_cpu_fp16_conversions_match_the_portable_ones(tmp_path: Path) -> None:
    """plugins/kernels/tests/sqzCpuConvertTest.cpp: the onnxruntime op's fp16 <-> fp32 conversions
    (F16C on this CPU) give the bits of sqzFormat.h's, on every fp16 and the rounding edges."""
    ran = run_cpu_kernel_program("sqzCpuConvertTest.cpp", tmp_path / "convert")
    assert ran.returncode == 0 and " 0 differ" in ran.stdout, ran.stdout


def test_dense_fp16_gemv_matches_a_double_reference_on_every_isa(tmp_path: Path) -> None:
    """plugins/kernels/tests/sqzHalfLinearTest.cpp: sqzHalfLinearCpuRows (the onnxruntime library's
    DenseLinear) on every ISA this CPU has: K with and without lane tails, M = 0..11, partial row ranges."""
    ran = run_cpu_kernel_program("sqzHalfLinearTest.cpp", tmp_path / "half_linear")
    summary = re.search(r"^(\d+) cases, 0 differ$", ran.stdout, re.MULTILINE)
    assert ran.returncode == 0 and summary and int(summary.group(1)) >= 200, ran.stdout  # 200 per ISA, scalar always


def test_cpu_extension_runs_on_torchs_intra_op_threads() -> None:
    """ATen's parallel_for runs serially in an extension compiled without OpenMP: the op then used
    one core whatever torch.get_num_threads() said."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert build.cpu_extension().parallel_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_cpu_kernel_rejects_an_isa_the_cpu_lacks() -> None:
    missing = [isa for isa in kernels.CPU_ISAS if isa not in CPU_KERNEL_ISAS]
    if not missing:
        pytest.skip("this CPU supports every ISA path")
    layer = random_layer(7, 45, 3, 0.0)
    with pytest.raises(FormatError, match=missing[0]):
        run_op(layer, torch.randn(1, 45), kernel=missing[0])


def test_module_fast_path_checks_x_and_rechecks_new_buffers() -> None:
    """SqzLinear on CPU skips the op's dispatcher but not its checks: a wrong x fails every call, and
    buffers swapped after a first call are checked again."""
    module = SqzLinear(random_layer(7, 45, 3, 0.05))
    module(torch.randn(2, 45))
    with pytest.raises(FormatError, match="in_features=45"):
        module(torch.randn(2, 44))
    module.lut = module.lut.float()
    with pytest.raises(FormatError, match="lut"):
        module(torch.randn(2, 45))


def test_cpu_kernel_choice_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    layer = random_layer(11, 77, 3, 0.0)
    with caplog.at_level("INFO", logger="sqz_export.kernels.ops"):
        run_op(layer, torch.randn(2, 77), kernel="scalar")
    assert "lut-gemv scalar" in caplog.text


# (K, N): 3-bit K = 256 takes the 128-bit weight path (G % 4 == 0), K = 100 the 32-bit one; K = 520 has
# 128-bit x loads but a K tail; K = 45 neither. K = 4224: 132 groups = 33 three-bit units, so the lane
# loops take a second, partial step in which only some lanes are active (the others still take part
# in every LUT shuffle). Odd N leaves the last warp of a two-rows-per-warp tiling with one row.
EMULATED_SHAPES = [(45, 7), (100, 33), (256, 40), (520, 65), (4224, 9)]


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", EMULATED_SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gemv_lane_code_matches_op_on_host(
    cpp_reference: ctypes.CDLL, bits: int, shape: tuple[int, int], density: float, dtype: torch.dtype, m: int
) -> None:
    """The GEMV kernel's per-lane code (sqzGemvLane.cuh) run for 32 lanes on the CPU, in the tiling the
    launcher picks for m (m = 1: two output rows per warp up to 5 bits; m = 5: one): right results,
    and the 128-bit and the 32-bit load paths give bit-identical outputs (same per-lane summation order)."""
    k, n = shape
    layer = random_layer(n, k, bits, density, seed=bits + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    fast = run_cpp_reference(cpp_reference, layer, x, emulate_gemv=True)
    scalar = run_cpp_reference(cpp_reference, layer, x, emulate_gemv=True, force_scalar=True)
    torch.testing.assert_close(fast, run_op(layer, x), **tolerance("sqz_linear", dtype))
    assert torch.equal(fast, scalar)


def test_gemv_lane_code_stays_in_bounds(tmp_path: Path) -> None:
    """sqzGemvBoundsTest under AddressSanitizer: the lane code reads no byte past any buffer, for every
    bits / tail / alignment / tiling case. A stray read gives right results on the host and a fault or
    garbage on the GPU, so it needs its own check."""
    compiler = shutil.which("g++")
    include = cuda_include_dir()
    if compiler is None or include is None:
        pytest.skip("needs g++ and the CUDA runtime headers (cuda_runtime_api.h)")
    kernels_dir = REPO / "plugins" / "kernels"
    binary = tmp_path / "sqzGemvBoundsTest"
    cmd = [
        compiler, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
        f"-I{REPO / 'plugins' / 'common'}", f"-I{kernels_dir}", f"-I{kernels_dir / 'tests'}", f"-I{include}",
        str(kernels_dir / "tests" / "sqzGemvBoundsTest.cpp"), str(kernels_dir / "tests" / "sqzGemvEmulate.cpp"),
        str(kernels_dir / "sqzLinearPolicy.cpp"), "-o", str(binary),
    ]  # fmt: skip
    build = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if build.returncode != 0 and ("asan" in build.stderr or "ubsan" in build.stderr):
        pytest.skip(f"the compiler has no AddressSanitizer/UBSan runtime: {build.stderr.strip()[-300:]}")
    assert build.returncode == 0, build.stderr[-6000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-6000:]
    assert "stayed in bounds" in run.stdout


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gemv_tiling_does_not_change_bits(cpp_reference: ctypes.CDLL, bits: int) -> None:
    """Every m-tile (1..16 rows of x) and rows-per-warp choice sums each output in the same order, so
    17 rows at once (two 16-row tiles) equal the same rows taken 1, 2, 3 or 5 at a time, bit for bit.
    The GPU bitwise test relies on this too: it compares one launch with the host emulation."""
    k, n = 520, 65
    layer = random_layer(n, k, bits, 0.005, seed=bits)
    x = torch.randn(17, k, generator=torch.Generator().manual_seed(bits)).to(torch.float16)
    whole = run_cpp_reference(cpp_reference, layer, x, emulate_gemv=True)
    for rows in (1, 2, 3, 5):
        parts = [run_cpp_reference(cpp_reference, layer, x[i : i + rows], emulate_gemv=True) for i in range(0, 17, rows)]
        assert torch.equal(torch.cat(parts), whole), f"{rows} rows at a time"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gemv_lane_code_exact_cases(cpp_reference: ctypes.CDLL, bits: int) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        layer, x, expected = integer_layer(bits, dtype)
        assert torch.equal(run_cpp_reference(cpp_reference, layer, x, emulate_gemv=True), expected)


# ---- CUDA kernels ---------------------------------------------------------------------------------

# (K, N): odd tails; 3-bit K % 128 != 0 (32-bit word path); K % 8 == 0 but not % 32; one LLaMA width;
# a partial second lane step (K = 4224).
GPU_SHAPES = [(45, 7), (100, 33), (520, 65), (4096, 128), (4224, 33)]
GPU_MS = [1, 2, 4, 5, 16, 17, 70]


def _poisoned_launch(layer: PackedLinear, x: torch.Tensor, kernel: str) -> tuple[torch.Tensor, str]:
    args = [t.cuda() if t is not None else None for t in op_args(layer)]
    y = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device="cuda")
    name = kernels.cuda_launch(y, x.cuda(), *args, layer.bits, chunk_nnz(layer), kernel)
    torch.cuda.synchronize()
    return y, name


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["auto", "gemv", "dequant_gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_cuda_kernels_match_cpu_op(
    bits: int, shape: tuple[int, int], density: float, dtype: torch.dtype, kernel: str
) -> None:
    k, n = shape
    layer = random_layer(n, k, bits, density, seed=bits + k)
    for m in GPU_MS:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
        y, name = _poisoned_launch(layer, x, kernel)
        assert not torch.isnan(y).any(), f"{name}: some outputs were never written (M={m})"
        torch.testing.assert_close(
            y.cpu(),
            run_op(layer, x),
            **tolerance("sqz_linear", dtype),
            msg=lambda s, name=name, m=m: f"{name} M={m}: {s}",
        )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kernel", ["gemv", "dequant_gemm"])
def test_cuda_identity_and_integer_cases_are_exact(kernel: str) -> None:
    for dtype in (torch.float16, torch.bfloat16):
        k = 45
        lut = torch.zeros(k, 16, dtype=torch.float16)
        lut[:, 1] = 1.0
        identity = PackedLinear(4, k, k, pack_indices(torch.eye(k, dtype=torch.int64), 4), lut)
        x = torch.randn(20, k).to(dtype)
        assert torch.equal(_poisoned_launch(identity, x, kernel)[0].cpu(), x)
        layer, x, expected = integer_layer(3, dtype)
        assert torch.equal(_poisoned_launch(layer, x, kernel)[0].cpu(), expected)


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernel_choice_and_determinism() -> None:
    layer = random_layer(256, 4096, 3, 0.0045, seed=1)
    x1 = torch.randn(1, 4096).half()
    x64 = torch.randn(64, 4096).half()
    y1a, name1 = _poisoned_launch(layer, x1, "auto")
    y1b, _ = _poisoned_launch(layer, x1, "auto")
    y64a, name64 = _poisoned_launch(layer, x64, "auto")
    y64b, _ = _poisoned_launch(layer, x64, "auto")
    assert name1.startswith("gemv") and name64.startswith("dequant+gemm")
    assert torch.equal(y1a, y1b) and torch.equal(y64a, y64b), "results must be bit-identical run to run"


@pytest.mark.gpu
@needs_cuda
def test_cuda_module_forward_side_stream_and_graph() -> None:
    layer = random_layer(96, 520, 4, 0.0045, seed=2)
    module = SqzLinear(layer).cuda()
    x = torch.randn(3, 520, device="cuda", dtype=torch.float16)
    expected = run_op(layer, x.cpu())
    torch.testing.assert_close(module(x).cpu(), expected, **tolerance("sqz_linear", torch.float16))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y_side = module(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(y_side.cpu(), expected, **tolerance("sqz_linear", torch.float16))
    module(x)  # build and warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = module(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y_graph.cpu(), run_op(layer, x.cpu()), **tolerance("sqz_linear", torch.float16))


# ---- benchmark plumbing (CPU dry runs of benchmarks/kernels.py and benchmarks/decode.py) ------------


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("k", "density"), [(64, 0.0), (96, 0.05), (45, 0.05)])
def test_benchmark_random_layers_are_valid(k: int, density: float) -> None:
    from sqz_export.kernels.benchutil import random_packed

    layer = random_packed(33, k, 3, density, seed=1)
    layer.validate("bench")
    assert (layer.lut != 0).all()
    if density:
        assert layer.sparse.nnz > 0 and (layer.sparse.val != 0).all()


def test_kernels_benchmark_dry_run(tmp_path: Path) -> None:
    import json

    out = tmp_path / "kernels.json"
    bench = _load_benchmark("kernels")
    argv = ["--device", "cpu", "--shapes", "33x96", "--m", "1", "4", "--bits", "3", "--iters", "2", "--repeats", "1"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4  # 2 densities x 2 M
    assert all(r["max_abs_err"] < 1e-2 and r["sqz_us"] > 0 and r["cublas_fp16_us"] > 0 for r in rows)


def test_kernels_benchmark_acceptance_checks() -> None:
    """The issue's three kernel criteria are computed from the right rows, with None when not measured."""
    bench = _load_benchmark("kernels")

    def row(n: int, k: int, bits: int, density: float, sqz_us: float, fraction: float, seed_us: float | None):
        return bench.Row(
            n=n, k=k, m=1, bits=bits, density=density, nnz=0, kernel="gemv", sqz_us=sqz_us, cublas_fp16_us=40.0,
            speedup=40.0 / sqz_us, sqz_bytes=1, gbps=1.0, copy_fraction=fraction, max_abs_err=0.0,
            seed_design_us=seed_us, vs_seed_design=seed_us / sqz_us if seed_us else None,
        )  # fmt: skip

    rows = [
        row(4096, 4096, 3, 0.0, 4.0, 0.75, 13.0),
        row(4096, 4096, 3, 0.0045, 4.4, 0.70, None),
        row(11008, 4096, 4, 0.0, 10.0, 0.72, 19.0),
        row(11008, 4096, 4, 0.0045, 12.0, 0.60, None),
        row(12288, 4096, 3, 0.0, 1.0, 0.10, 1.0),  # not a 7B shape: ignored
    ]
    bandwidth, sparse, seed = bench.acceptance(rows)
    assert bandwidth.measured == pytest.approx(0.72) and bandwidth.passed is True
    assert sparse.measured == pytest.approx(0.2) and sparse.passed is False
    assert seed.measured == pytest.approx(1.9) and seed.passed is False
    assert all(c.measured is None and c.passed is None for c in bench.acceptance(rows[4:]))


def test_cpu_benchmark_interleaves_decode_repeats_and_reports_medians(monkeypatch: pytest.MonkeyPatch) -> None:
    """--decode-repeats runs v1, v2, v1, v2, ...; each row is the median of its runs (all kept), its
    peak RSS the largest."""
    import argparse

    bench = _load_benchmark("cpu")
    order: list[str] = []
    times = {"fp32": [60.0, 70.0, 50.0], "sqz3s": [30.0, 20.0, 40.0]}

    def fake_child(args: argparse.Namespace, variant: str, source: str, library: str) -> dict[str, object]:
        order.append(variant)
        run = order.count(variant)
        return {"variant": variant, "source": source, "ms_per_token": times[variant][run - 1], "peak_rss_bytes": 100 * run}

    monkeypatch.setattr(bench, "decode_child_run", fake_child)
    monkeypatch.setattr(bench, "decode_variants", lambda args: [("fp32", "", ""), ("sqz3s", "runs/sqz3s", "")])
    rows = bench.decode_rows(argparse.Namespace(decode_repeats=3))
    assert order == ["fp32", "sqz3s"] * 3
    assert [row["ms_per_token"] for row in rows] == [60.0, 30.0]
    assert rows[0]["ms_per_token_runs"] == [60.0, 70.0, 50.0]
    assert [row["peak_rss_bytes"] for row in rows] == [300, 300] and rows[1]["repeats"] == 3


def test_cpu_benchmark_reports_the_onnxruntime_speedup_repeat_by_repeat(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Besides the ratio of the medians, the sqz row keeps (and the summary prints) baseline / sqz of each
    repeat, whose two runs ran back to back: the spread a shared machine puts on the speedup."""
    import argparse

    bench = _load_benchmark("cpu")
    times = {bench.ORT_BASELINE: [24.0, 22.0, 26.0], bench.ORT_SQZ: [12.0, 11.5, 10.0]}
    calls: dict[str, int] = {}

    def fake_child(args: argparse.Namespace, variant: str, source: str, library: str) -> dict[str, object]:
        calls[variant] = calls.get(variant, 0) + 1
        return {
            "variant": variant,
            "source": source,
            "ms_per_token": times[variant][calls[variant] - 1],
            "linears_ms_per_step": 1.0,
            "linear_nodes": 2,
            "prefill_ms": 1.0,
            "prefill_tokens": 8,
            "peak_rss_bytes": 1,
        }

    monkeypatch.setattr(bench, "decode_child_run", fake_child)
    variants = [(bench.ORT_BASELINE, "b.onnx", ""), (bench.ORT_SQZ, "m.onnx", "lib.so")]
    monkeypatch.setattr(bench, "decode_variants", lambda args: variants)
    rows = bench.decode_rows(argparse.Namespace(decode_repeats=3))
    assert rows[1]["speedup_over_baseline_runs"] == pytest.approx([2.0, 22.0 / 11.5, 2.6])
    assert "2.09x per token (repeat by repeat 2.00x, 1.91x, 2.60x)" in capsys.readouterr().out


def test_decode_benchmark_dry_run(tmp_path: Path) -> None:
    import json

    out = tmp_path / "decode.json"
    bench = _load_benchmark("decode")
    argv = ["--device", "cpu", "--config", "tiny", "--layers", "1", "--new-tokens", "2", "--prompt-len", "1"]
    assert bench.main([*argv, "--repeats", "1", "--variants", "fp16", "sqz3-sparse", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in results] == ["fp16", "sqz3-sparse"]
    assert results[1]["linear_weight_bytes"] < results[0]["linear_weight_bytes"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [3, 4])
def test_cuda_gemv_equals_host_emulation_bitwise(cpp_reference: ctypes.CDLL, bits: int, dtype: torch.dtype) -> None:
    """The GPU runs the same lane code, tiling and butterfly as sqzGemvEmulate, so the bits must agree
    (M = 1 and 3: two output rows per warp; M = 5: one)."""
    for k, n in EMULATED_SHAPES:
        layer = random_layer(n, k, bits, 0.005, seed=k)
        for m in (1, 3, 5):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(dtype)
            y, name = _poisoned_launch(layer, x, "gemv")
            assert torch.equal(y.cpu(), run_cpp_reference(cpp_reference, layer, x, emulate_gemv=True)), (
                f"{name} K={k} N={n} M={m}"
            )
