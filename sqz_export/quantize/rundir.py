"""The run folder of a streamed quantization: finished blocks on disk, so memory holds none and a run resumes.

Layout (``--run-dir``, default ``.<output>.sqz-run`` beside the output):

* ``run.json``: what the run computes (model, calibration, method and settings, ranks). ``--resume``
  continues only a run made for the same; anything else is refused, naming what differs.
* ``packed/<block>.safetensors``: a finished block's packed layers, written atomically when the block
  is done (their describe() in the metadata), so a killed run keeps every block it finished.
* ``refined/<block>.rank<R>.pt``: lnq with the model-wide sparse choice: a block's refined matrices and
  its sparse candidates, waiting for every block before the final round.
* ``activations/``, ``statistics/``: block inputs past the activation budget, per-block statistics
  for a ``--stats`` cache; both are scratch.

The checkpoint itself is assembled from ``packed/`` only at the end, in a temporary folder renamed into
place, so a killed run never leaves a partial checkpoint; the run folder is removed after success.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from sqz_export.atomic import open_for_write, write_text
from sqz_export.caches import key_differences
from sqz_export.checkpoint import _packed_tensors
from sqz_export.errors import UserError
from sqz_export.formats import PackedLinear
from sqz_export.quantize.distributed import SINGLE, Group
from sqz_export.quantize.pipeline import _Matrix
from sqz_export.tensorfile import LazyTensor, lazy_tensors, write_safetensors

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
RUN_FORMAT = 1


def default_run_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.sqz-run"


class RunDir:
    """A run folder, with the methods of :class:`sqz_export.quantize.pipeline.LayerStore`."""

    def __init__(self, folder: Path, group: Group = SINGLE) -> None:
        self.folder, self.group = folder, group
        self.packed_dir = folder / "packed"
        self.refined_dir = folder / "refined"
        self.activations = folder / "activations" / f"rank{group.rank}"
        self.statistics = folder / "statistics"

    @classmethod
    def open(cls, folder: Path, key: dict[str, Any], *, resume: bool, group: Group = SINGLE) -> RunDir:
        """Creates the folder for a new run, or checks a previous one for ``--resume``.

        Raises:
            UserError: ``--resume`` without a run folder, or one made for other settings; or, without
                ``--resume``, a folder holding finished blocks (the user decides whether to drop them).
        """
        key = {**key, "run_format": RUN_FORMAT, "ranks": group.world}
        run_file = folder / RUN_FILE
        if group.leader:
            if resume:
                if not run_file.is_file():
                    raise UserError(f"--resume: {folder} holds no interrupted run ({RUN_FILE} missing); run without --resume to start one")
                stored = json.loads(run_file.read_text())
                if stored != key:
                    raise UserError(f"--resume: the run in {folder} was made for other settings ({'; '.join(key_differences(stored, key))}); rerun with its settings, or without --resume to start over")
            else:
                if folder.exists():
                    if not run_file.is_file() and any(folder.iterdir()):
                        raise UserError(f"run folder {folder} exists and is not an sqz-export run folder; pass another --run-dir")
                    if cls(folder, group).done_blocks():  # hours of work, perhaps: never dropped silently
                        raise UserError(f"{folder} holds an interrupted run with finished blocks; add --resume to continue it, or delete the folder to start over")
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
                write_text(run_file, json.dumps(key, indent=2, sort_keys=True) + "\n")
        group.barrier()
        run = cls(folder, group)
        for path in (run.packed_dir, run.refined_dir, run.activations):
            path.mkdir(parents=True, exist_ok=True)
        if resume and group.leader:
            logger.info("resuming %s: %d blocks packed, %d refined", folder, len(run.packed_blocks()), len(list(run.refined_dir.glob("*.pt"))))
        return run

    # LayerStore's methods
    def put_packed(self, block: str, layers: dict[str, PackedLinear]) -> None:
        tensors = {key: value for name, layer in layers.items() for key, value in _packed_tensors(name, layer).items()}
        metadata = {"modules": json.dumps({name: layer.describe() for name, layer in layers.items()}, sort_keys=True)}
        with open_for_write(self.packed_dir / f"{block}.safetensors") as handle:
            write_safetensors(handle, tensors, metadata=metadata)

    def put_refined(self, key: str, matrices: list[_Matrix], candidates: tuple[torch.Tensor, list[tuple[str, torch.Tensor]]] | None = None) -> None:
        with open_for_write(self.refined_dir / f"{key}.rank{self.group.rank}.pt") as handle:
            torch.save({"matrices": matrices, "candidates": candidates}, handle)

    def refined_keys(self) -> list[str]:
        suffix = f".rank{self.group.rank}.pt"
        return sorted((path.name[: -len(suffix)] for path in self.refined_dir.glob(f"*{suffix}")), key=_block_order)

    def take_refined(self, key: str) -> list[_Matrix]:
        return self._load_refined(key)["matrices"]

    # resume and assembly
    def _load_refined(self, key: str) -> dict[str, Any]:
        path = self.refined_dir / f"{key}.rank{self.group.rank}.pt"
        with torch.serialization.safe_globals([_Matrix]):
            return torch.load(path, weights_only=True)

    def refined_candidates(self, blocks: set[str]) -> list[tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]]:
        """The sparse candidates this rank holds for ``blocks`` (a resumed run re-merges them)."""
        found = []
        for key in self.refined_keys():
            if key not in blocks:
                continue
            candidates = self._load_refined(key)["candidates"]
            if candidates is not None:
                found.append(candidates)
        return found

    def packed_blocks(self) -> set[str]:
        return {path.name[: -len(".safetensors")] for path in self.packed_dir.glob("*.safetensors")}

    def done_blocks(self) -> set[str]:
        """Blocks a resumed run need not quantize again (packed, or refined and waiting for the final round)."""
        return self.packed_blocks() | set(self.refined_keys())

    def packed_tensors(self) -> tuple[dict[str, LazyTensor], dict[str, dict[str, Any]]]:
        """Every packed tensor as a lazy tensor (read when written out), and every module's describe()."""
        from safetensors import safe_open

        tensors: dict[str, LazyTensor] = {}
        modules: dict[str, dict[str, Any]] = {}
        for path in sorted(self.packed_dir.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                modules.update(json.loads(handle.metadata()["modules"]))
            tensors.update(lazy_tensors(path))
        return tensors, modules

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _block_order(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))

