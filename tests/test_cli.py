"""The sqz-export command line: help, error paths, and quantize -> inspect -> eval on a tiny model."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import SAMPLE_TEXT, make_tiny_model, save_tiny_model

from sqz_export.cli import COMMAND_MODULES, main
from sqz_export.models import quantizable_linears


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Runs the real entry point in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "sqz_export", *args], capture_output=True, text=True, timeout=300)


def test_top_level_help_lists_every_stage() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("quantize", "eval", "inspect"):
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMAND_MODULES)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: sqz-export {command}" in capsys.readouterr().out


def test_help_does_not_import_torch() -> None:
    """`sqz-export --help` must answer at once: building the parser may not pull in torch (~2 s)."""
    code = "import sys; from sqz_export.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_bad_sparsity_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "-o", "x", "--sparsity", "150%"])
    assert exit_info.value.code == 2
    assert "expected a fraction in [0, 1)" in capsys.readouterr().err


def test_missing_model_is_a_clean_error(tmp_path: Path) -> None:
    result = run_cli("quantize", "--model", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "error: model path" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_inspect_of_a_non_checkpoint_is_a_clean_error(tmp_path: Path) -> None:
    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 2
    assert "missing sqz_manifest.json" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text(SAMPLE_TEXT)
    return save_tiny_model(root / "model", "llama"), text


@pytest.mark.parametrize(("method", "bits", "sparsity"), [("squeezellm", 3, "0.45%"), ("squeezellm", 4, "0"), ("rtn", 4, "0")])
def test_quantize_inspect_eval_end_to_end(tiny_setup: tuple[Path, Path], tmp_path: Path, method: str, bits: int, sparsity: str) -> None:
    model, text = tiny_setup
    out = tmp_path / "ckpt"
    common = ["--dataset", str(text), "--seq-len", "64"]
    result = run_cli(
        "quantize", "--model", str(model), "-o", str(out), "--method", method, "--bits", str(bits),
        "--sparsity", sparsity, "--calib-windows", "4", "--eval-windows", "4", "--fisher-dtype", "fp32",
        "--json", str(tmp_path / "q.json"), *common,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "q.json").read_text())
    assert summary["layers"] == 14 and summary["bits"] == bits
    assert summary["calibration_tokens"] == (4 * 64 if method == "squeezellm" else 0)

    result = run_cli("inspect", str(out), "--json", "-")
    assert result.returncode == 0, result.stderr
    inspected = json.loads(result.stdout[result.stdout.index("{"):])
    assert inspected["quant_method"] == "squeezellm" and inspected["method"] == method and inspected["layers"] == 14
    if sparsity == "0":  # packed bytes follow from the shapes alone: words of the indices plus the fp16 LUTs
        layers = quantizable_linears(make_tiny_model("llama")).values()
        expected = sum(math.ceil(l.in_features / 32) * bits * l.out_features * 4 + l.out_features * 2**bits * 2 for l in layers)
        assert inspected["quantized_packed_bytes"] == expected
        assert inspected["compression_ratio"] == pytest.approx(inspected["quantized_fp16_bytes"] / expected)
    expected_fraction = 0.0045 if sparsity != "0" else 0.0
    assert abs(inspected["sparse_fraction"] - expected_fraction) <= 0.0001

    result = run_cli("eval", str(out), "--eval-windows", "4", "--json", str(tmp_path / "e.json"), *common)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((tmp_path / "e.json").read_text())
    # The checkpoint evaluates to the perplexity measured right after quantization (same weights, fp16 rounding aside).
    assert evaluated["perplexity"] == pytest.approx(summary["perplexity"], rel=1e-3)


def test_same_seed_quantize_runs_in_two_processes_write_identical_files(tiny_setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Checkpoints are byte-reproducible: sorted safetensors metadata, fixed tensor order, no timings."""
    model, text = tiny_setup
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        result = run_cli(
            "quantize", "--model", str(model), "-o", str(out), "--bits", "3", "--sparsity", "0.45%",
            "--calib-windows", "4", "--fisher-dtype", "fp32", "--dataset", str(text), "--seq-len", "64", "--seed", "7",
        )
        assert result.returncode == 0, result.stderr
        digests.append({path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(out.iterdir())})
    assert "model.safetensors" in digests[0] and len(digests[0]) >= 4
    assert digests[0] == digests[1]


def test_percentages_are_stored_exactly(tiny_setup: tuple[Path, Path], tmp_path: Path) -> None:
    model, text = tiny_setup
    out = tmp_path / "ckpt"
    assert main(["quantize", "--model", str(model), "-o", str(out), "--method", "rtn", "--sparsity", "0.45%", "--dataset", str(text), "--seq-len", "64"]) == 0
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["sparsity"] == 0.0045 and qconfig["sensitive_fraction"] == 0.0005
    assert "timings" not in qconfig


def test_inspect_lists_layers_in_model_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_models import make_checkpoint

    from sqz_export.validate import natural_key

    checkpoint = make_checkpoint(tmp_path, "llama")
    assert main(["inspect", str(checkpoint), "--layers"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("    model.")]
    assert len(names) == 14 and names == sorted(names, key=natural_key)
    assert natural_key("model.layers.2.mlp") < natural_key("model.layers.10.mlp")
