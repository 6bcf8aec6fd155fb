"""What was loaded: bytes by dtype and by module kind, and where each part lives.

``python -m model inspect --model ID_OR_PATH [--quantization 4bit] [--json]`` prints this table, so a
user can see that (for example) the routed experts really are 4-bit and what sits on the GPU.
"""

from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

KINDS = (
    ("vision", re.compile(r"^vision\.")),
    ("projector", re.compile(r"^(projector\.|image_newline$|view_seperator$)")),
    ("embeddings", re.compile(r"embed_tokens\.")),
    ("lm_head", re.compile(r"lm_head\.")),
    ("routed experts", re.compile(r"\.mlp\.experts\.")),
    ("shared experts", re.compile(r"\.mlp\.shared_experts\.")),
    ("router", re.compile(r"\.mlp\.gate\.")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("dense mlp", re.compile(r"\.mlp\.(gate|up|down)_proj\.")),
)


def module_kind(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "norms and other"


def summarize(model: nn.Module) -> dict:
    """``{"total_bytes", "by_dtype": {dtype: bytes}, "by_kind": {kind: {"bytes", "dtypes", "devices"}}}``."""
    by_dtype: dict[str, int] = defaultdict(int)
    by_kind: dict[str, dict] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "rotary_emb" in name or name.endswith("position_ids"):  # derived index tables, not weights
            continue
        size = tensor.numel() * tensor.element_size()
        dtype = str(tensor.dtype).removeprefix("torch.")
        entry = by_kind.setdefault(module_kind(name), {"bytes": 0, "dtypes": defaultdict(int), "devices": set()})
        entry["bytes"] += size
        entry["dtypes"][dtype] += size
        entry["devices"].add(str(tensor.device))
        by_dtype[dtype] += size
    kinds = {
        kind: {"bytes": e["bytes"], "dtypes": dict(e["dtypes"]), "devices": sorted(e["devices"])}
        for kind, e in sorted(by_kind.items(), key=lambda item: -item[1]["bytes"])
    }
    return {"total_bytes": sum(by_dtype.values()), "by_dtype": dict(by_dtype), "by_kind": kinds}


def format_table(summary: dict) -> str:
    lines = [f"{'part':<16} {'MB':>10}  {'MB by dtype':<34} placement"]
    for kind, entry in summary["by_kind"].items():
        dtypes = ", ".join(f"{d} {b / 1e6:.1f}" for d, b in entry["dtypes"].items())
        lines.append(f"{kind:<16} {entry['bytes'] / 1e6:>10.1f}  {dtypes:<34} {', '.join(entry['devices'])}")
    lines.append(f"{'total':<16} {summary['total_bytes'] / 1e6:>10.1f}")
    return "\n".join(lines)
