"""The forward pass: vision parity, projector order, tile layout, routing, cached decoding."""

from __future__ import annotations

import pytest
import torch

from model.image_processing import image_token_count
from model.modeling import MlpProjector
from model.testing import VARIANTS

from .reference import official_language_logits, official_routing, official_vit
from .test_model_loading import read_checkpoint


def test_projector_unfold_order_is_channel_major_with_zero_padding():
    channels, side = 3, 27
    # feature value encodes (channel, row, col) so every slot of the output can be decoded
    rows = torch.arange(side).view(side, 1).expand(side, side)
    cols = torch.arange(side).view(1, side).expand(side, side)
    grid = torch.stack([1000 * (c + 1) + rows * 30 + cols + 1 for c in range(channels)], dim=-1).float()
    features = grid.reshape(1, side * side, channels)
    projector = MlpProjector(channels, 8, depth=2, mlp_ratio=1, downsample_ratio=2)
    blocks = projector.downsample(features)
    assert blocks.shape == (1, 14 * 14, channels * 4)
    for i, j in [(0, 0), (3, 7), (13, 0), (0, 13), (13, 13)]:
        vector = blocks[0, i * 14 + j]
        for c in range(channels):
            for di in range(2):
                for dj in range(2):
                    r, q = 2 * i + di, 2 * j + dj
                    expected = 0.0 if r >= side or q >= side else 1000 * (c + 1) + r * 30 + q + 1
                    assert vector[c * 4 + di * 2 + dj].item() == expected


def test_projector_output_shape(loaded_fp32):
    model = loaded_fp32["tiny"].model
    tiles = torch.randn(2, 3, 384, 384)
    out = model.encode_tiles(tiles)
    assert out.shape == (2, 196, model.config.text_config.hidden_size)


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (3, 2), (1, 6)])
def test_tile_layout_places_separator_and_row_newlines(loaded_fp32, grid):
    model = loaded_fp32["tiny"].model
    nw, nh = grid
    dim = model.config.text_config.hidden_size
    tiles = torch.randn(1 + nw * nh, 196, dim)
    sequence = model.layout_image(tiles, grid)
    assert sequence.shape[0] == image_token_count(nw, nh)
    newline, separator = model.image_newline, model.view_seperator
    # global view: 14 rows of 14 tokens + newline, then the separator
    for row in range(14):
        torch.testing.assert_close(sequence[row * 15 : row * 15 + 14], tiles[0, row * 14 : row * 14 + 14])
        torch.testing.assert_close(sequence[row * 15 + 14], newline)
    torch.testing.assert_close(sequence[210], separator)
    local = sequence[211:].view(nh * 14, nw * 14 + 1, dim)
    torch.testing.assert_close(local[:, -1], newline.expand(nh * 14, dim))
    # token (r, c) of the local grid comes from tile (r//14, c//14), position (r%14, c%14)
    for r, c in [(0, 0), (nh * 14 - 1, nw * 14 - 1), (nh * 7, nw * 14 - 3)]:
        tile = 1 + (r // 14) * nw + (c // 14)
        torch.testing.assert_close(local[r, c], tiles[tile, (r % 14) * 14 + c % 14])


def test_vision_tower_matches_official_vit(checkpoints, loaded_fp32):
    model = loaded_fp32["tiny"].model
    raw = read_checkpoint(checkpoints["tiny"])
    tiles = torch.rand(2, 3, 384, 384) * 2 - 1
    heads = model.config.vision_config.num_attention_heads
    with torch.no_grad():
        expected = official_vit(raw, tiles, heads)
        ours = model.vision(pixel_values=tiles).last_hidden_state
    assert ours.shape == (2, 729, model.config.vision_config.hidden_size)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_vision_layers_receive_a_contiguous_residual_stream(loaded_fp32):
    # The patch convolution's output is a transposed view; carried through the residual adds, it
    # makes every LayerNorm copy its input (measured 9 % of a tile's time on the CPU).
    model = loaded_fp32["tiny"].model
    seen = []
    hooks = [
        layer.layer_norm1.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        for layer in model.vision.encoder.layers
    ]
    try:
        with torch.no_grad():
            model.encode_tiles(torch.rand(2, 3, 384, 384))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [True] * len(model.vision.encoder.layers)


@pytest.mark.parametrize("variant", VARIANTS)
def test_routing_matches_official(variant, loaded_fp32):
    model = loaded_fp32[variant].model
    text = model.config.text_config
    captured = {}
    layer = model.language.model.layers[1].mlp

    def hook(_module, inputs, outputs):
        captured["hidden"] = inputs[0]
        captured["out"] = outputs

    handle = layer.gate.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 200, (2, 9)))
    finally:
        handle.remove()
    logits, weights, ids = captured["out"]
    method = "noaux_tc" if variant == "base" else "greedy"
    bias = layer.gate.e_score_correction_bias if variant == "base" else None
    ref_weights, ref_ids = official_routing(
        logits, top_k=text.num_experts_per_tok, method=method, bias=bias, scale=text.routed_scaling_factor
    )
    order, ref_order = ids.argsort(-1), ref_ids.argsort(-1)
    assert torch.equal(ids.gather(-1, order), ref_ids.gather(-1, ref_order))
    torch.testing.assert_close(weights.gather(-1, order), ref_weights.gather(-1, ref_order))
    sums = weights.sum(-1)
    if variant == "base":
        torch.testing.assert_close(sums, torch.full_like(sums, 2.0))
    else:
        top_mass = logits.float().softmax(-1).topk(text.num_experts_per_tok, dim=-1).values.sum(-1)
        torch.testing.assert_close(sums, top_mass)
        assert bool((sums < 1).all())


def test_a_single_token_through_the_routed_experts_equals_the_same_token_in_a_batch(loaded_fp32):
    experts = loaded_fp32["tiny"].model.language.model.layers[1].mlp.experts
    torch.manual_seed(0)
    hidden = torch.randn(5, experts[0].gate_proj.in_features)
    top_k_index = torch.stack([torch.randperm(len(experts))[:3] for _ in range(5)])
    top_k_weights = torch.rand(5, 3)
    with torch.no_grad():
        batched = experts(hidden, top_k_index, top_k_weights)  # sorted by expert, mixed with index_add
        rows = [slice(i, i + 1) for i in range(5)]
        single = torch.cat([experts(hidden[r], top_k_index[r], top_k_weights[r]) for r in rows])
    torch.testing.assert_close(single, batched, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_equals_uncached_forward(variant, loaded_fp32):
    from model.processing import Message

    loaded = loaded_fp32[variant]
    model, processor = loaded.model, loaded.processor
    image = _gradient_image(320, 240)
    inputs = processor([Message("user", "Describe <image> please.", [image])])
    embeds = model.prepare_inputs_embeds(
        inputs["input_ids"], inputs["pixel_values"], inputs["images_seq_mask"], inputs["images_spatial_crop"]
    )
    with torch.no_grad():
        out = model.language.generate(
            input_ids=inputs["input_ids"],
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"].long(),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=processor.special.pad,
        )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        assert new_tokens.shape[1] == 16
        full_ids = torch.cat([inputs["input_ids"], new_tokens], dim=1)
        full_mask = torch.cat([inputs["images_seq_mask"], torch.zeros_like(new_tokens, dtype=torch.bool)], dim=1)
        full = model(
            input_ids=full_ids,
            pixel_values=inputs["pixel_values"],
            images_seq_mask=full_mask,
            images_spatial_crop=inputs["images_spatial_crop"],
            use_cache=False,
        ).logits
    prompt_len = inputs["input_ids"].shape[1]
    for step, step_logits in enumerate(out.logits):
        torch.testing.assert_close(step_logits[0], full[0, prompt_len - 1 + step], rtol=1e-4, atol=1e-4)
    # greedy: each generated token is the argmax of the uncached logits at its position
    assert torch.equal(full[0, prompt_len - 1 : -1].argmax(-1), new_tokens[0])


def test_prefill_and_greedy_tokens_through_public_generate(loaded_fp32):
    from model.processing import Message

    for variant in VARIANTS:
        loaded = loaded_fp32[variant]
        inputs = loaded.processor([Message("user", "<|ref|>the square<|/ref|>.", [_gradient_image(500, 300)])])
        new = loaded.model.generate(
            **inputs,
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            pad_token_id=loaded.processor.special.pad,
        )
        assert new.shape == (1, 16)


@pytest.mark.parametrize("variant", VARIANTS)
def test_language_model_matches_the_official_computation(variant, checkpoints, loaded_fp32):
    """Attention (MHA/MLA, RoPE per variant), routing, expert mixing and shared experts, end to end."""
    import json

    model = loaded_fp32[variant].model
    tensors = read_checkpoint(checkpoints[variant])
    language_config = json.loads((checkpoints[variant] / "config.json").read_text())["language_config"]
    embeds = torch.randn(11, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.language(inputs_embeds=embeds[None]).logits[0]
    expected = official_language_logits(tensors, language_config, embeds)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_batched_generation_with_left_padding_equals_single_runs(loaded_fp32):
    from model.processing import Message

    loaded = loaded_fp32["small"]
    model, processor = loaded.model, loaded.processor
    short = [Message("user", "Hi <image>", [_gradient_image(200, 200)])]
    long = [
        Message("user", "A longer question about this picture, please answer <image> now", [_gradient_image(300, 500)])
    ]
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": processor.special.pad}
    batch = processor([short, long])
    assert batch["attention_mask"][0, 0].item() is False  # left padded
    with torch.no_grad():
        together = model.generate(**batch, **settings)
        alone = [model.generate(**processor(c), **settings)[0] for c in (short, long)]
    assert torch.equal(together[0], alone[0]) and torch.equal(together[1], alone[1])


def _gradient_image(width: int, height: int):
    from PIL import Image

    x = torch.linspace(0, 255, width).view(1, width).expand(height, width)
    y = torch.linspace(0, 255, height).view(height, 1).expand(height, width)
    rgb = torch.stack([x, y, 255 - x], dim=-1).to(torch.uint8).numpy()
    return Image.fromarray(rgb, "RGB")


def _left_padded_batch(processor):
    """Two image prompts of different lengths: the first row is left-padded."""
    from model.processing import Message

    return processor(
        [
            [Message("user", "Short <image>", [_gradient_image(160, 200)])],
            [Message("user", "A longer prompt, so the first row is left-padded <image>", [_gradient_image(400, 300)])],
        ]
    )


@pytest.mark.parametrize("variant", ["small", "base"])
def test_absorbed_mla_decode_equals_the_stock_path(variant, loaded_fp32):
    from model.mla import set_absorbed_mla

    loaded = loaded_fp32[variant]
    model, processor = loaded.model, loaded.processor
    batch = _left_padded_batch(processor)
    settings = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": processor.special.pad,
                "output_logits": True, "return_dict_in_generate": True}  # fmt: skip
    embeds = model.prepare_inputs_embeds(
        batch["input_ids"], batch["pixel_values"], batch["images_seq_mask"], batch["images_spatial_crop"]
    )
    runs = {}
    try:
        for absorbed in (True, False):
            set_absorbed_mla(model.language, absorbed)
            with torch.no_grad():
                runs[absorbed] = model.language.generate(
                    input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=batch["attention_mask"].long(),
                    **settings,
                )  # fmt: skip
    finally:
        set_absorbed_mla(model.language, True)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for fast, stock in zip(runs[True].logits, runs[False].logits, strict=True):
        relative = (fast - stock).norm() / stock.norm()
        assert relative < 1e-5, f"absorbed decode differs by {relative:.2e}"


def test_vision_tile_batches_do_not_change_the_result(loaded_fp32):
    model = loaded_fp32["tiny"].model
    tiles = torch.rand(5, 3, 384, 384) * 2 - 1
    with torch.no_grad():
        model.vision_tiles_per_batch = 8
        together = model.encode_tiles(tiles)
        model.vision_tiles_per_batch = 2
        in_pairs = model.encode_tiles(tiles)
    model.vision_tiles_per_batch = 8
    torch.testing.assert_close(in_pairs, together, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_gives_the_same_logits_and_tokens(variant, loaded_fp32):

    loaded = loaded_fp32[variant]
    model, processor = loaded.model, loaded.processor
    batch = _left_padded_batch(processor)
    prompt_tokens = batch["input_ids"].shape[1]
    assert prompt_tokens > 3 * 64  # several chunks, the last one partial
    mask = batch["attention_mask"].long()
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": processor.special.pad}
    with torch.no_grad():
        whole = model.generate(**batch, **settings)
        embeds = model.prepare_inputs_embeds(
            batch["input_ids"], batch["pixel_values"], batch["images_seq_mask"], batch["images_spatial_crop"]
        )
        expected = model.language(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        lengths: list[int] = []

        def record_length(module, args, kwargs):
            tokens = kwargs["inputs_embeds"] if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]
            lengths.append(tokens.shape[1])

        for chunk in (64, prompt_tokens - 1):
            lengths.clear()
            hook = model.language.register_forward_pre_hook(record_length, with_kwargs=True)
            try:
                assert torch.equal(model.generate(**batch, prefill_chunk_size=chunk, **settings), whole)
            finally:
                hook.remove()
            chunks = -(-(prompt_tokens - 1) // chunk)
            assert max(lengths) <= chunk and lengths[chunks] == 1  # generate itself ran only the last prompt token
            cache = model.prefill_cache(embeds, mask, chunk)
            assert cache.get_seq_length() == prompt_tokens - 1
            last = model.language(
                inputs_embeds=embeds[:, -1:], attention_mask=mask, position_ids=(mask.sum(-1, keepdim=True) - 1),
                cache=cache, use_cache=True,
            ).logits[:, -1]  # fmt: skip
            torch.testing.assert_close(last, expected, rtol=1e-4, atol=1e-4)
