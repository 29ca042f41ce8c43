"""``cppo export``: a training checkpoint -> a standalone Hugging Face checkpoint.

    cppo export runs/base/lightning_logs/version_0/checkpoints/last.ckpt exported/

The checkpoint keeps only the trained weights (LoRA adapters, or the unfrozen weights) and the
module's arguments; the rest is reloaded from its ``model_name_or_path``. LoRA is merged into the
base weights, and the processor is saved under its transformers class name, so that
``AutoModelForImageTextToText.from_pretrained(output)`` needs nothing from this package.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cppo_lightning.checkpoints import UnreadableCheckpoint, current_umask, load_checkpoint_file
from cppo_lightning.module import CPPOModule

_DTYPES = ("float32", "bfloat16", "float16")


def _read_checkpoint(checkpoint: str | Path, mmap: bool = False) -> dict[str, Any]:
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: give the .ckpt that `cppo fit` wrote (e.g. "
            "<log_dir>/checkpoints/last.ckpt)."
        )
    # mmap: tensors are read only when touched (settings need none of the weights or the
    # optimizer state).
    try:
        state = load_checkpoint_file(path, weights_only=False, mmap=mmap)
    except UnreadableCheckpoint as error:
        raise ValueError(
            f"{str(path)!r} does not load as a checkpoint ({error}): it is truncated or "
            "corrupt, or not a file torch.save wrote."
        ) from error
    if not isinstance(state, dict) or "hyper_parameters" not in state or "state_dict" not in state:
        raise ValueError(f"{str(path)!r} is not a checkpoint written by `cppo fit`.")
    return state


def checkpoint_settings(checkpoint: str | Path) -> dict[str, Any]:
    """The module settings a ``cppo fit`` checkpoint was written with, plus its ``global_step``
    (the file is memory-mapped: its tensors are not read)."""
    state = _read_checkpoint(checkpoint, mmap=True)
    return {**state["hyper_parameters"], "global_step": int(state.get("global_step", 0))}


def load_fit_checkpoint(checkpoint: str | Path, dtype: str | None = None) -> CPPOModule:
    """A :class:`CPPOModule` with the trained weights of a ``cppo fit`` checkpoint (no frozen
    reference is built; LoRA adapters stay unmerged).

    Args:
        checkpoint: A ``.ckpt`` written by ``cppo fit`` (ModelCheckpoint).
        dtype: Weight dtype; the training dtype when None.
    """
    state = _read_checkpoint(checkpoint)
    accepted = inspect.signature(CPPOModule.__init__).parameters
    hparams: dict[str, Any] = {k: v for k, v in state["hyper_parameters"].items() if k in accepted}
    hparams["kl_coef"] = 0.0  # no frozen reference copy is needed
    if dtype is not None:
        hparams["dtype"] = dtype
    module = CPPOModule(**hparams)
    module.on_load_checkpoint(state)  # loads the base model; fails if trained weights are missing
    module.load_state_dict(state["state_dict"], strict=False)
    return module


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the policy of a ``cppo fit`` checkpoint (LoRA merged) and its processor to ``output``.

    The export is written to a temporary folder next to ``output`` and renamed into place, so
    ``output`` is never left half-written; a folder that is already there is replaced only after
    the new export is complete.

    Args:
        checkpoint: A ``.ckpt`` written by ``cppo fit`` (ModelCheckpoint).
        output: Folder to write (created). A non-empty one is refused unless ``overwrite``.
        dtype: Weight dtype of the export; the training dtype when None.
        overwrite: Replace the contents of a non-empty ``output``.
    """
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{str(output)!r} is a file: give a folder to export to.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{str(output)!r} is not empty: give a new folder, or pass --overwrite to replace "
            "its contents."
        )
    module = load_fit_checkpoint(checkpoint, dtype)
    write_folder(output, lambda staging: module.save_pretrained(str(staging)))
    return output


def write_folder(output: str | Path, write: Callable[[Path], None]) -> Path:
    """Have ``write`` fill a temporary folder next to ``output``, then rename it into place:
    ``output`` is whole or absent (or, when it was there before, the old one until the new one
    is complete). A ``write`` that fails (e.g. the disk fills) leaves neither ``output`` nor the
    temporary folder. The folder and what is in it get the permissions of any folder and file
    this process creates (``0o777`` and ``0o666`` less the umask), not ``mkdtemp``'s private
    ``0o700`` (nor the ``0o600`` transformers gives ``model.safetensors``)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        write(staging)
        umask = current_umask()
        for folder, _, files in os.walk(staging):
            os.chmod(folder, 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            output.rename(old / output.name)
            staging.rename(output)
            shutil.rmtree(old)
        else:
            staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return output


def main(args: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="cppo export",
        description="Write the policy of a `cppo fit` checkpoint as a standalone Hugging Face "
        "checkpoint (LoRA merged) that transformers loads without cppo-lightning.",
    )
    parser.add_argument("checkpoint", help="the .ckpt written by `cppo fit`")
    parser.add_argument("output", help="folder to write the Hugging Face checkpoint to")
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="weight dtype to save")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the contents of a non-empty output"
    )
    parsed = parser.parse_args(args)
    try:
        output = export_checkpoint(parsed.checkpoint, parsed.output, parsed.dtype, parsed.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(f"exported to {output}")
    return output
