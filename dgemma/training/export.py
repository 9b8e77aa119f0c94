"""The trained model as an HF-format checkpoint (what `LLM(model=...)` and transformers load), LoRA adapters merged.

Unsharded (single, ddp), the main process writes `model.safetensors` with `save_model`. Sharded (fsdp), the model
is gathered one FSDP unit at a time (the root's tensors, then each layer): every process takes part in gathering a
unit, the main process writes it as one file `model-0000i-of-0000n.safetensors` and drops it before the next, and
`model.safetensors.index.json` maps every tensor to its file. No process ever holds more than one unit in full.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from dgemma.model.checkpoint import INDEX, ours_to_hf, save_model, write_metadata
from dgemma.training.fsdp import full, layer_groups

if TYPE_CHECKING:
    from dgemma.training.trainer import Trainer


def export_model(tr: Trainer, path: Path) -> None:
    """Write the HF checkpoint of `tr`'s model into `path` (a collective under fsdp: every process calls it)."""
    if tr.dist.sharded:
        export_sharded(tr, path)
        return
    if not tr.dist.main:
        return
    if tr.lora is not None:
        tr.lora.merge(+1)
    try:
        save_model(tr.model, path, generation_config=tr.generation_config, tokenizer_dir=tr.tokenizer_dir)
    finally:
        if tr.lora is not None:
            tr.lora.merge(-1)


def export_sharded(tr: Trainer, path: Path) -> None:
    """One file per FSDP unit, gathered in turn (see the module's docstring)."""
    groups = list(layer_groups(tr.model))
    weight_map: dict[str, str] = {}
    total = 0
    for i, (_, tensors) in enumerate(groups):
        whole = {}
        for name, t in tensors.items():
            w = full(t.detach())  # (every process gathers; only the main one keeps it past this unit)
            with torch.no_grad():
                w = tr.lora.merged(name, w) if tr.lora is not None else w
            whole[ours_to_hf(name)] = w.contiguous().cpu()
        if tr.dist.main:
            fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file(whole, str(path / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(whole, fname))
            total += sum(t.numel() * t.element_size() for t in whole.values())
        del whole
    if tr.dist.main:
        write_metadata(tr.model, path, tr.generation_config, tr.tokenizer_dir)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (path / INDEX).write_text(json.dumps(index, indent=2) + "\n")
