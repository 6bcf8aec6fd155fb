"""Per-layer MLA decode time at Small's dimensions: transformers' stock path vs absorbed.

    python -m bench.mla_decode [--contexts 256 1024 2560] [--rounds 7]

One attention layer (16 heads, hidden 2048, latent 512, rope 64, nope 128, value 128), fp32 on CPU,
one decode step against a cache of T tokens. Rounds are interleaved (stock, absorbed, stock A/A
control) and medians reported with the median of per-round ratios; outputs are compared too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import DynamicCache

from model.configuration import VL2SmallTextConfig
from model.language import build_language_model
from model.mla import set_absorbed_mla


def small_layer_model():
    config = VL2SmallTextConfig(
        vocab_size=256, hidden_size=2048, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, first_k_dense_replace=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    return build_language_model(config).eval()


def step(model, cache, token_embed, position, absorbed: bool) -> tuple[float, torch.Tensor]:
    set_absorbed_mla(model, absorbed)
    layer = model.model.layers[0].self_attn
    position_ids = torch.tensor([[position]])
    rope = model.model.rotary_emb(token_embed, position_ids)
    start = time.perf_counter()
    out, _ = layer(hidden_states=token_embed, attention_mask=None, cache=cache, position_embeddings=rope)
    elapsed = time.perf_counter() - start
    cache.crop(-1)  # drop the token just added, so every run sees the same context
    return elapsed, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2560])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = small_layer_model()
    results = []
    with torch.inference_mode():
        for context in args.contexts:
            cache = DynamicCache(config=model.config)
            prompt = torch.randn(1, context, 2048) * 0.5
            layer = model.model.layers[0].self_attn
            rope = model.model.rotary_emb(prompt, torch.arange(context)[None])
            layer(hidden_states=prompt, attention_mask=None, cache=cache, position_embeddings=rope)  # fill the cache
            token = torch.randn(1, 1, 2048) * 0.5
            times = {"stock": [], "absorbed": [], "stock_again": []}
            outputs = {}
            order = list(times)
            for round_index in range(args.rounds + 1):
                for name in order[round_index % 3 :] + order[: round_index % 3]:
                    elapsed, out = step(model, cache, token, context, absorbed=(name == "absorbed"))
                    if round_index:  # the first round warms up
                        times[name].append(elapsed)
                    outputs[name] = out
            ratios = [s / a for s, a in zip(times["stock"], times["absorbed"], strict=True)]
            control = [s / a for s, a in zip(times["stock"], times["stock_again"], strict=True)]
            diff = ((outputs["absorbed"] - outputs["stock"]).norm() / outputs["stock"].norm()).item()
            row = {
                "context": context,
                "stock_ms": round(statistics.median(times["stock"]) * 1e3, 2),
                "absorbed_ms": round(statistics.median(times["absorbed"]) * 1e3, 2),
                "speedup_median_of_ratios": round(statistics.median(ratios), 1),
                "aa_control_ratio": round(statistics.median(control), 2),
                "relative_output_difference": f"{diff:.1e}",
            }
            results.append(row)
            print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
