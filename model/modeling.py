"""DeepSeek-VL2 as a composition of transformers 5 parts.

What is ours: the 2×2 down-sampling projector, the tile layout (global view, separator, local
grid with a learned newline after every row), the scatter of image embeddings into the token
sequence, and the renames that let the unchanged hub checkpoints load. Vision is transformers'
``SiglipVisionModel`` (bit-exact after renaming), the language model is per variant
(``model/language.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache, PreTrainedModel, SiglipVisionModel
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Chunk, ConversionOps, WeightConverter, WeightRenaming

from .configuration import DeepseekVL2Config
from .kv_cache import growing_cache
from .language import build_language_model
from .prefix_cache import PrefixCache
from .vision_cache import VisionFeatureCache, tiles_key


class MlpProjector(nn.Module):
    """SigLIP features ``[N, 27·27, C]`` → ``[N, 14·14, D]``.

    The 27×27 grid is zero-padded on the right and bottom to 28×28, then every 2×2 block becomes
    one vector in ``F.unfold`` order: element ``c·4 + di·2 + dj`` is channel ``c`` of patch
    ``(2i+di, 2j+dj)`` (channel-major, not four concatenated patch vectors).
    """

    def __init__(self, input_dim: int, n_embed: int, depth: int, mlp_ratio: int, downsample_ratio: int) -> None:
        super().__init__()
        self.downsample_ratio = downsample_ratio
        hidden = n_embed * mlp_ratio
        modules: list[nn.Module] = [nn.Linear(input_dim * downsample_ratio**2, hidden)]
        for _ in range(1, depth - 1):
            modules += [nn.GELU(), nn.Linear(hidden, hidden)]
        modules += [nn.GELU(), nn.Linear(hidden, n_embed)]
        self.layers = nn.Sequential(*modules)

    def downsample(self, features: torch.Tensor) -> torch.Tensor:
        n, tokens, channels = features.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"expected a square patch grid, got {tokens} tokens")
        grid = features.transpose(1, 2).reshape(n, channels, side, side)
        pad = (-side) % self.downsample_ratio
        grid = F.pad(grid, (0, pad, 0, pad))
        blocks = F.unfold(grid, kernel_size=self.downsample_ratio, stride=self.downsample_ratio)
        return blocks.transpose(1, 2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(self.downsample(features))


class _DropLeadingDim(ConversionOps):
    """``vision.pos_embed`` is stored as ``[1, 729, C]``; ``nn.Embedding`` wants ``[729, C]``."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensor = next(iter(input_dict.values()))
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        return {target_patterns[0]: tensor.reshape(tensor.shape[-2:]).contiguous()}

    @property
    def reverse_op(self) -> ConversionOps:
        return _AddLeadingDim()


class _AddLeadingDim(ConversionOps):
    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensor = next(iter(input_dict.values()))
        tensor = tensor[0] if isinstance(tensor, list) else tensor
        return {target_patterns[0]: tensor.unsqueeze(0).contiguous()}

    @property
    def reverse_op(self) -> ConversionOps:
        return _DropLeadingDim()


def checkpoint_conversions() -> list:
    """Official (timm-named) vision keys → ``SiglipVisionModel`` names. Everything else matches as is."""
    return [
        WeightRenaming(r"^vision\.blocks\.(\d+)\.", r"vision.encoder.layers.\1."),
        WeightRenaming(r"^vision\.patch_embed\.proj\.", "vision.embeddings.patch_embedding."),
        WeightRenaming(r"^vision\.norm\.", "vision.post_layernorm."),
        WeightRenaming(r"^(vision\.encoder\.layers\.\d+)\.norm1\.", r"\1.layer_norm1."),
        WeightRenaming(r"^(vision\.encoder\.layers\.\d+)\.norm2\.", r"\1.layer_norm2."),
        WeightRenaming(r"^(vision\.encoder\.layers\.\d+)\.attn\.proj\.", r"\1.self_attn.out_proj."),
        WeightConverter(
            source_patterns="attn.qkv",
            target_patterns=["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            operations=[Chunk(dim=0)],
        ),
        WeightConverter(
            source_patterns="vision.pos_embed",
            target_patterns="vision.embeddings.position_embedding.weight",
            operations=[_DropLeadingDim()],
        ),
    ]


def _contiguous_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    # SigLIP's patch embeddings come out of the convolution as a transposed view ([N, 729, D] with
    # the patch axis fastest), and element-wise ops keep their input's layout: without this the
    # whole residual stream stays transposed and every LayerNorm copies it (55 copies a tile,
    # measured 9 % of a tile's time on the CPU). Same values, contiguous rows.
    return output.contiguous()


class DeepseekVL2ForCausalLM(PreTrainedModel):
    config: DeepseekVL2Config
    config_class = DeepseekVL2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = [
        "SiglipEncoderLayer",
        "DeepseekOcr2TextDecoderLayer",
        "DeepseekV2DecoderLayer",
        "DeepseekV3DecoderLayer",
    ]
    # The SigLIP attention-pool head is stored in every checkpoint but DeepSeek-VL2 never runs it.
    _keys_to_ignore_on_load_unexpected = [r"^vision\.attn_pool\."]

    def __init__(self, config: DeepseekVL2Config) -> None:
        super().__init__(config)
        text = config.text_config
        self.vision = SiglipVisionModel(config.vision_config)
        self.vision.embeddings.register_forward_hook(_contiguous_output)
        self.projector = MlpProjector(
            config.projector_input_dim,
            text.hidden_size,
            config.projector_depth,
            config.projector_mlp_ratio,
            config.downsample_ratio,
        )
        # Learned vectors written into the sequence after every row of image tokens and between the
        # global and local views (the misspelling is the checkpoint's key name).
        self.image_newline = nn.Parameter(torch.empty(text.hidden_size))
        self.view_seperator = nn.Parameter(torch.empty(text.hidden_size))
        self.language = build_language_model(text)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            std = 1.0 / math.sqrt(self.config.text_config.hidden_size)
            nn.init.normal_(self.image_newline, std=std)
            nn.init.normal_(self.view_seperator, std=std)

    # -- vision side -------------------------------------------------------------------------
    @property
    def tokens_per_tile_side(self) -> int:
        vision = self.config.vision_config
        return math.ceil((vision.image_size // vision.patch_size) / self.config.downsample_ratio)

    # Tiles through the vision tower per batch: bounds the activation peak (two 3×3 images are 20
    # tiles; SigLIP's attention at 729 tokens × 16 heads per tile adds up) at no cost in speed.
    vision_tiles_per_batch: int = 8

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[N, 3, 384, 384]`` tiles → ``[N, 196, D]`` projected features."""
        vision_dtype = self.vision.embeddings.patch_embedding.weight.dtype
        projector_dtype = self.projector.layers[0].weight.dtype
        outputs = []
        for batch in pixel_values.split(max(1, self.vision_tiles_per_batch)):
            features = self.vision(pixel_values=batch.to(vision_dtype)).last_hidden_state
            outputs.append(self.projector(features.to(projector_dtype)))
        return torch.cat(outputs)

    # Features of recent images (model/vision_cache.py) and the key/value caches of recent
    # conversations (model/prefix_cache.py); set at load. None: nothing is reused.
    vision_cache: VisionFeatureCache | None = None
    prefix_cache: PrefixCache | None = None

    def encode_image(self, tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One image's tiles (global first) → projected features, from the cache when it was seen.

        An image is encoded on its own, never batched with another image's tiles, so its features
        do not depend on what else is in the request: a cached entry equals a fresh computation.
        """
        cache = self.vision_cache
        if cache is None:
            return self.encode_tiles(tiles)
        key = tiles_key(tiles, grid)
        projected = cache.get(key)
        if projected is None:
            projected = self.encode_tiles(tiles)
            cache.put(key, projected)
        return projected

    def layout_image(self, tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """One image's projected tiles (global first) → its token sequence (global, separator, locals)."""
        side = self.tokens_per_tile_side
        width, height = grid
        dim = tiles.shape[-1]
        newline = self.image_newline.to(tiles.dtype)

        def with_row_newlines(rows: torch.Tensor) -> torch.Tensor:
            col = newline.view(1, 1, dim).expand(rows.shape[0], 1, dim)
            return torch.cat([rows, col], dim=1).reshape(-1, dim)

        global_view = with_row_newlines(tiles[0].view(side, side, dim))
        local = tiles[1 : 1 + width * height].view(height, width, side, side, dim)
        local = local.permute(0, 2, 1, 3, 4).reshape(height * side, width * side, dim)
        separator = self.view_seperator.to(tiles.dtype).view(1, dim)
        return torch.cat([global_view, separator, with_row_newlines(local)], dim=0)

    def image_embeddings(self, pixel_values: torch.Tensor, images_spatial_crop: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the concatenated image-token embeddings of all its images (possibly empty)."""
        owned: list[torch.Tensor] = []
        grids: list[list[tuple[int, int]]] = []
        for sample_tiles, crops in zip(pixel_values, images_spatial_crop, strict=True):
            sample_grids: list[tuple[int, int]] = []
            for nw, nh in crops.tolist():
                if nw == 0 or nh == 0:
                    break
                sample_grids.append((nw, nh))
            count = sum(1 + nw * nh for nw, nh in sample_grids)
            owned.append(sample_tiles[:count])
            grids.append(sample_grids)
        hidden = self.config.text_config.hidden_size
        per_sample: list[torch.Tensor] = []
        for sample_tiles, sample_grids in zip(owned, grids, strict=True):
            pieces = []
            cursor = 0
            for grid in sample_grids:
                n = 1 + grid[0] * grid[1]
                tiles = sample_tiles[cursor : cursor + n]
                pieces.append(self.layout_image(self.encode_image(tiles, grid), grid))
                cursor += n
            per_sample.append(torch.cat(pieces) if pieces else sample_tiles.new_zeros(0, hidden))
        return per_sample

    def prepare_inputs_embeds(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image placeholders overwritten, in order, by image embeddings."""
        embed = self.language.get_input_embeddings()
        embeds = embed(input_ids)
        if pixel_values is None or images_seq_mask is None or images_spatial_crop is None:
            return embeds
        if not bool(images_seq_mask.any()):
            return embeds
        per_sample = self.image_embeddings(pixel_values.to(embeds.device), images_spatial_crop)
        for row, (mask, image_embeds) in enumerate(zip(images_seq_mask, per_sample, strict=True)):
            expected = int(mask.sum())
            if expected != image_embeds.shape[0]:
                raise ValueError(
                    f"sample {row}: {expected} image placeholder tokens but {image_embeds.shape[0]} image "
                    "embeddings; the prompt and images_spatial_crop disagree"
                )
        stacked = torch.cat(per_sample).to(embeds.dtype)
        return embeds.masked_scatter(images_seq_mask.to(embeds.device).unsqueeze(-1), stacked)

    # -- language side -----------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(input_ids, pixel_values, images_seq_mask, images_spatial_crop)
        return self.language(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    # Prompt tokens per language-model forward during prefill; None = the whole prompt at once.
    # Chunks bound the activation peak (a 3×3-tile image is 2,000+ tokens through a 10,944-wide
    # dense MLP) for a few percent of speed; the official code calls this incremental prefilling.
    prefill_chunk_size: int | None = None

    def new_cache(self) -> Cache:
        """An empty key/value cache for the language model, growing in place (``model/kv_cache.py``)."""
        return growing_cache(self.language.config, getattr(self.language, "cache_values_dim_major", False))

    def prefill_cache(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        chunk_size: int | None,
        cache: Cache | None = None,
    ) -> Cache:
        """Run all prompt tokens but the last through the language model in chunks; return the cache.

        ``generate`` then starts from this cache and computes only the last token itself. Positions
        follow the attention mask, as ``generate`` numbers them (left padding starts at 0). A
        ``cache`` that already holds the prompt's first tokens (a reused prefix) is continued.
        """
        cache = cache if cache is not None else self.new_cache()
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        upto = inputs_embeds.shape[1] - 1
        first = cache.get_seq_length()
        step = chunk_size or max(upto - first, 1)  # no chunk size: the rest in one forward
        for start in range(first, upto, step):
            end = min(start + step, upto)
            self.language(
                inputs_embeds=inputs_embeds[:, start:end],
                attention_mask=attention_mask[:, :end],
                position_ids=positions[:, start:end],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        return cache

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        prefill_chunk_size: int | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Run vision once, then let the language model's ``generate`` decode from the embeddings.

        Returns only the new tokens (``[B, new]``).
        """
        device = self.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        inputs_embeds = self.prepare_inputs_embeds(input_ids, pixel_values, images_seq_mask, images_spatial_crop)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        chunk = prefill_chunk_size or self.prefill_chunk_size
        # generate() expands the batch for beams/several sequences but not a cache it is handed.
        expands = generate_kwargs.get("num_beams", 1) > 1 or generate_kwargs.get("num_return_sequences", 1) > 1
        # One unpadded prompt can continue a conversation's cache (model/prefix_cache.py).
        prefixes = self.prefix_cache
        reuse = prefixes is not None and not expands and input_ids.shape[0] == 1 and bool(attention_mask.all())
        reuse = reuse and "cache" not in generate_kwargs
        ids = input_ids[0].tolist() if reuse else []
        if reuse:
            cache = prefixes.take(ids, inputs_embeds[0])  # None: nothing worth reusing
            generate_kwargs["cache"] = self.prefill_cache(inputs_embeds, attention_mask, chunk, cache)
        elif not expands and "cache" not in generate_kwargs:
            if chunk and inputs_embeds.shape[1] > chunk:
                generate_kwargs["cache"] = self.prefill_cache(inputs_embeds, attention_mask, chunk)
            else:
                generate_kwargs["cache"] = self.new_cache()
        output = self.language.generate(
            input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs
        )
        sequences = output.sequences if hasattr(output, "sequences") else output
        new_tokens = sequences[:, input_ids.shape[1] :]
        if reuse:  # reached only when generate returned normally: every layer holds the same tokens
            generated = new_tokens[0].to(inputs_embeds.device)
            embeds = torch.cat([inputs_embeds[0], self.get_input_embeddings()(generated).to(inputs_embeds.dtype)])
            prefixes.put(ids + generated.tolist(), embeds, generate_kwargs["cache"])
        return new_tokens


register_checkpoint_conversion_mapping(DeepseekVL2ForCausalLM.__name__, checkpoint_conversions(), overwrite=True)
