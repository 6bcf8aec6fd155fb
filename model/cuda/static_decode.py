"""A decode step of the language model with fixed shapes: what a CUDA graph can capture.

The eager decoder launches about 1,050 kernels a token (measured on an H200, issue 24) and decides
from the data which experts to run (``.tolist()`` in ``model/experts.py``), so the GPU waits for
Python. :class:`StaticDecoder` runs the same arithmetic with every shape fixed per (batch, bucket)
and nothing read back to the host:

* **Static key/value cache.** One buffer per layer holds ``capacity = max(buckets)`` tokens
  (Tiny: keys and values per head; Small/base: MLA's compressed latent and its rope key, as the
  stock cache holds them). A step writes its token at ``slot`` (a device tensor) and attends over
  the first ``bucket`` slots, the smallest bucket that holds them; ``valid`` ([batch, capacity],
  bool) masks what is not a token of that row (left padding, slots not yet written). A graph per
  bucket thus serves every length up to it, reading all the bucket's slots.
* **Attention** is the model's own module, handed a stand-in cache that writes at ``slot`` and
  returns the bucket's views (Tiny: transformers' SDPA path, with the mask above); Small and base
  go through the absorbed MLA of ``model/mla.py`` (scores against the cached latents).
* **Routed experts** with fixed shapes: each MoE layer's experts are stacked once at construction
  ([E, 2I, H] gate+up, [E, H, I] down) and a step gathers the chosen ones (``index_select``) and
  multiplies them with ``bmm``, or, when a batch picks at least as many (token, expert) pairs as
  there are experts, runs all experts over all tokens and weighs them with a dense map. The
  per-expert ``nn.Linear`` weights are re-pointed into the stacks, so nothing is held twice.
  bitsandbytes 4-bit experts are stacked as packed codes and block scales (re-pointed the same
  way) and the chosen experts are dequantized into temporaries of the step (bitsandbytes' CUDA
  kernel on a GPU, the same arithmetic in plain torch elsewhere) before the same ``bmm``.
* **Experts computed elsewhere** (Small on an 8 GiB card keeps some layers' experts on the CPU,
  ``model/placement.py``; 8-bit experts, which are not stacked) split the step into segments:
  the GPU parts between them are capturable, those layers' experts run eagerly through their own
  modules between replays (``model/cuda/graphs.py``).

Everything else — norms, projections (bitsandbytes' layers included), router, shared experts,
``lm_head`` — is the model's own modules, called as they are.

Use::

    decoder = StaticDecoder(model.language, max_batch=1)
    out = decoder.generate_greedy(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=32)

or, for ``generate`` (sampling, repetition penalty, streaming and stopping unchanged),
:func:`attach` the decoder and pass ``cache=decoder.new_cache()``: one-token steps on that cache
go through the static step, everything else through the stock forward. One generation at a time
per decoder: its buffers are the cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

from ..mla import absorbed_attention
from .expert_stacks import ExpertStack, nbytes, route, stack_experts
from .static_cache import StaticKVCache, _SlotWriter

DEFAULT_BUCKETS = (256, 512, 1024, 2048, 4096)


# -- the decoder ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """A run of the step: ``capturable`` ones touch only device tensors and can be a CUDA graph."""

    run: Callable[[], None]
    capturable: bool


@dataclass
class GreedyOutput:
    tokens: torch.Tensor  # [B, new]: pad after a row's eos, as generate
    logits: list[torch.Tensor] | None = None  # per new token [B, vocab] fp32 (the first from the prefill)


def _module_device(module: nn.Module) -> torch.device | None:
    first = next(module.parameters(), None)
    return None if first is None else first.device


class StaticDecoder:
    """The language model's decode step over a static cache, shapes fixed per (batch, bucket).

    ``language_model``: ``VL2TinyForCausalLM``, ``DeepseekV2ForCausalLM`` or
    ``DeepseekV3ForCausalLM`` as ``model/language.py`` builds them (routed experts as per-expert
    linears; full precision or bitsandbytes 4-bit). Construction stacks each MoE layer's experts
    (re-pointing the model's expert weights into the stacks when ``share_expert_weights``) and
    allocates the cache for ``max_batch`` rows × ``max(buckets)`` tokens.
    """

    def __init__(
        self,
        language_model: nn.Module,
        *,
        max_batch: int = 1,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        share_expert_weights: bool = True,
        eager_experts: Sequence[int] = (),
    ) -> None:
        embeddings = language_model.get_input_embeddings()
        self.device = torch.device(device) if device is not None else embeddings.weight.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if embeddings.weight.device != self.device:
            raise ValueError(f"the model's embeddings are on {embeddings.weight.device}, not {self.device}")
        self.dtype = dtype or embeddings.weight.dtype
        if not buckets or any(b <= 0 for b in buckets):
            raise ValueError(f"buckets must be positive token counts, got {buckets!r}")
        self.buckets = tuple(sorted(set(int(b) for b in buckets)))
        self.capacity = self.buckets[-1]
        self.max_batch = int(max_batch)
        self.language = language_model
        self.config = language_model.config
        self.layers = language_model.model.layers
        self.num_layers = len(self.layers)
        self.mla = isinstance(self.layers[0].self_attn, v2.DeepseekV2Attention | v3.DeepseekV3Attention)
        self.runner = None  # a GraphRunner (model/cuda/graphs.py) once graphs are captured
        self.epoch = 0
        self._cache: StaticKVCache | None = None
        self._segments: dict[tuple[int, int], list[Segment]] = {}
        with torch.inference_mode(False), torch.no_grad():
            self._allocate()
            self.experts: dict[int, ExpertStack] = {}
            # MoE layers whose routed experts run eagerly through their own modules, between graph
            # segments: on another device, asked for, or not stackable (8-bit).
            self.elsewhere: dict[int, str] = {}
            for index, layer in enumerate(self.layers):
                experts = getattr(layer.mlp, "experts", None)
                if experts is None:
                    continue
                if _module_device(experts) != self.device:
                    self.elsewhere[index] = f"on {_module_device(experts)}"
                elif index in eager_experts:
                    self.elsewhere[index] = "asked for"
                else:
                    try:
                        self.experts[index] = stack_experts(experts, self.dtype, share=share_expert_weights)
                    except ValueError as exc:
                        self.elsewhere[index] = str(exc)

    def _allocate(self) -> None:
        config, batch, capacity = self.config, self.max_batch, self.capacity
        zeros = functools.partial(torch.zeros, device=self.device)
        if self.mla:
            key_shape = (batch, 1, capacity, config.kv_lora_rank)
            value_shape = (batch, 1, capacity, config.qk_rope_head_dim)
        else:
            heads = config.num_key_value_heads or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            key_shape = value_shape = (batch, heads, capacity, head_dim)
        # Zeros, not empty: a masked slot still meets a zero probability, and 0 × NaN is NaN.
        self.cache_keys = [zeros(key_shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.cache_values = [zeros(value_shape, dtype=self.dtype) for _ in range(self.num_layers)]
        self.valid = zeros((batch, capacity), dtype=torch.bool)
        self.input_ids = zeros((batch, 1), dtype=torch.long)
        self.position_ids = zeros((batch, 1), dtype=torch.long)
        self.slot = zeros((1,), dtype=torch.long)
        hidden = config.hidden_size
        self.hidden = zeros((batch, 1, hidden), dtype=self.dtype)
        self.normed = zeros((batch, 1, hidden), dtype=self.dtype)
        self.routed = zeros((batch, 1, hidden), dtype=self.dtype)
        head = self.language.get_output_embeddings()
        logits_dtype = head.weight.dtype if head.weight.dtype.is_floating_point else self.dtype
        self.logits = zeros((batch, config.vocab_size), dtype=logits_dtype)

    # -- sizes ------------------------------------------------------------------------------------
    def cache_bytes(self) -> int:
        return nbytes(*self.cache_keys, *self.cache_values)

    def memory(self) -> dict[str, int]:
        """Device bytes the decoder holds: the static cache, the step's state, expert stacks
        beyond the model's weights (0 when they are shared)."""
        state = nbytes(self.valid, self.input_ids, self.position_ids, self.slot, self.hidden, self.normed,
                        self.routed, self.logits)  # fmt: skip
        stacks = sum(stack.added_bytes for stack in self.experts.values())
        return {"cache_bytes": self.cache_bytes(), "state_bytes": state, "expert_stack_bytes": stacks}

    def bucket_for(self, tokens: int) -> int:
        """The smallest bucket holding ``tokens`` slots."""
        for bucket in self.buckets:
            if tokens <= bucket:
                return bucket
        raise ValueError(f"{tokens} tokens do not fit the static cache ({self.capacity})")

    @property
    def length(self) -> int:
        """Slots the current cache holds (the next step writes at this slot)."""
        return 0 if self._cache is None else self._cache.layers[0].length

    # -- the cache --------------------------------------------------------------------------------
    def new_cache(self, source=None) -> StaticKVCache:
        """A fresh cache over the static buffers (earlier ones stop being valid). ``source``: a
        cache (e.g. a ``DynamicCache`` of a reused prefix, unpadded) whose keys and values are
        copied in; the next :meth:`step` then continues at the position after them."""
        with torch.inference_mode(False), torch.no_grad():
            self.valid.zero_()
            self.epoch += 1
            self._cache = StaticKVCache(self)
            if source is not None:
                for layer, held in zip(self._cache.layers, source.layers, strict=True):
                    if held.get_seq_length() > 0:
                        layer.update(held.keys, held.values)
                self.position_ids[: self._cache.batch].fill_(self.length)
        return self._cache

    def reset(self) -> None:
        """Forget the current cache (after a capture, between generations)."""
        self.new_cache()
        self._cache = None

    # -- one step ---------------------------------------------------------------------------------
    def segments(self, batch: int, bucket: int) -> list[Segment]:
        """The step for ``batch`` rows attending over ``bucket`` slots, as runs of work that read
        and write only the decoder's static tensors (built once per shape)."""
        key = (batch, bucket)
        if key not in self._segments:
            self._segments[key] = self._build_segments(batch, bucket)
        return self._segments[key]

    def _build_segments(self, batch: int, bucket: int) -> list[Segment]:
        writer = _SlotWriter(self, batch, bucket)
        mask = self.valid[:batch, None, None, :bucket]
        language, hidden_size = self.language, self.config.hidden_size
        embed, rotary = language.get_input_embeddings(), language.model.rotary_emb
        norm, head = language.model.norm, language.get_output_embeddings()

        def embed_op(ctx):
            ctx["h"] = embed(self.input_ids[:batch])
            self.valid[:batch].index_fill_(1, self.slot, True)

        def attention_op(layer, ctx):
            h = ctx["h"]
            if "pe" not in ctx:
                ctx["pe"] = rotary(h, self.position_ids[:batch])
            x = layer.input_layernorm(h)
            if self.mla:
                attended, _ = absorbed_attention(layer.self_attn, x, mask, writer, ctx["pe"])
            else:
                attended, _ = layer.self_attn(hidden_states=x, position_embeddings=ctx["pe"], attention_mask=mask,
                                              cache=writer)  # fmt: skip
            h = h + attended
            ctx["h"], ctx["x"] = h, layer.post_attention_layernorm(h)

        def dense_op(layer, ctx):
            ctx["h"] = ctx["h"] + layer.mlp(ctx["x"])

        def moe_op(layer, stack, ctx):
            x = ctx["x"]
            index, weights = route(layer.mlp, x)
            routed = stack(x.view(batch, hidden_size), index, weights).view(batch, 1, hidden_size)
            ctx["h"] = ctx["h"] + (routed + layer.mlp.shared_experts(x))

        def elsewhere_op(layer):  # eager: the experts' own modules, on their device, and back
            x = self.normed[:batch]
            index, weights = route(layer.mlp, x)
            routed = layer.mlp.experts(x.view(batch, hidden_size), index, weights)
            self.routed[:batch].copy_(routed.view(batch, 1, hidden_size))

        def shared_op(layer, ctx):
            ctx["h"] = ctx["h"] + (self.routed[:batch] + layer.mlp.shared_experts(ctx["x"]))

        def logits_op(ctx):
            self.logits[:batch].copy_(head(norm(ctx["h"]))[:, -1])

        ops: list[tuple[bool, Callable]] = [(True, embed_op)]
        for index, layer in enumerate(self.layers):
            ops.append((True, functools.partial(attention_op, layer)))
            if index in self.elsewhere:
                ops += [(False, functools.partial(elsewhere_op, layer)), (True, functools.partial(shared_op, layer))]
            elif index in self.experts:
                ops.append((True, functools.partial(moe_op, layer, self.experts[index])))
            else:
                ops.append((True, functools.partial(dense_op, layer)))
        ops.append((True, logits_op))

        groups: list[tuple[bool, list[Callable]]] = []
        for capturable, op in ops:
            if groups and groups[-1][0] == capturable:
                groups[-1][1].append(op)
            else:
                groups.append((capturable, [op]))
        several = len(groups) > 1
        segments = []
        for capturable, group in groups:
            if not capturable:
                segments.append(Segment(functools.partial(_run_eager, group), capturable=False))
                continue
            segments.append(Segment(functools.partial(self._run_ops, batch, group, several), capturable=True))
        return segments

    def _run_ops(self, batch: int, ops: list[Callable], store: bool) -> None:
        """Run ``ops`` with the state held in static tensors at both ends (when the step has
        several segments; a single one starts from the embedding and ends with the logits)."""
        ctx = {"h": self.hidden[:batch], "x": self.normed[:batch]}
        for op in ops:
            op(ctx)
        if store:
            self.hidden[:batch].copy_(ctx["h"])
            self.normed[:batch].copy_(ctx["x"])

    def run(self, batch: int, bucket: int) -> None:
        """One step on the static inputs (``input_ids``, ``position_ids``, ``slot``): replayed
        graphs where captured, else the segments run as they are."""
        if self.runner is not None and self.runner.run(batch, bucket):
            return
        with _no_cudnn_attention(self.device):
            for segment in self.segments(batch, bucket):
                segment.run()

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Decode one token per row: ``input_ids`` [B, 1] at the current cache's next slot, at
        ``position_ids`` [B, 1] (default: one past the last step's). Returns logits [B, vocab]
        — a view of a static buffer that the next step overwrites. No host synchronization."""
        cache = self._cache
        if cache is None or cache.batch == 0:
            raise RuntimeError("no prompt in the static cache: prefill() or new_cache() first")
        batch, slot = input_ids.shape[0], cache.layers[0].length
        if batch != cache.batch:
            raise ValueError(f"a step of {batch} rows on a cache of {cache.batch}")
        bucket = self.bucket_for(slot + 1)
        if input_ids.data_ptr() != self.input_ids.data_ptr():
            self.input_ids[:batch].copy_(input_ids.view(batch, 1))
        if position_ids is not None:
            self.position_ids[:batch].copy_(position_ids.reshape(batch, -1)[:, -1:])
        self.slot.fill_(slot)
        self.run(batch, bucket)
        cache.advance(1)
        self.position_ids[:batch] += 1
        return self.logits[:batch]

    # -- prompts and loops ------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Run a prompt through the stock forward into a fresh static cache (in chunks of
        ``chunk_size`` tokens, if given); returns the last position's logits [B, vocab] and leaves
        the positions and the padding mask ready for :meth:`step`."""
        prompt = input_ids if input_ids is not None else inputs_embeds
        batch, length = prompt.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones((batch, length), dtype=torch.long, device=self.device)
        attention_mask = attention_mask.to(device=self.device, dtype=torch.long)
        # generate's numbering: positions count the row's tokens; padding gets 0.
        positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        cache = self.new_cache()
        step = chunk_size or length
        out = None
        for start in range(0, length, step):
            end = min(start + step, length)
            piece = {"input_ids": input_ids[:, start:end]} if input_ids is not None else {
                "inputs_embeds": inputs_embeds[:, start:end]}  # fmt: skip
            out = self.language(**piece, attention_mask=attention_mask[:, :end], position_ids=positions[:, start:end],
                                cache=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        self.valid[:batch, :length].copy_(attention_mask.bool())
        self.position_ids[:batch].copy_(attention_mask.sum(-1, keepdim=True))
        return out.logits[:, -1]

    @torch.inference_mode()
    def generate_greedy(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        output_logits: bool = False,
        chunk_size: int | None = None,
        check_every: int = 16,
    ) -> GreedyOutput:
        """Greedy decoding from a prompt, the host checking for eos only every ``check_every``
        tokens (the GPU never waits for Python in between). Tokens as ``generate`` would give
        them: after a row's eos, ``pad_token_id``; ends when every row has ended."""
        logits = self.prefill(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                              chunk_size=chunk_size)  # fmt: skip
        batch = logits.shape[0]
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        tokens, kept = [], [] if output_logits else None
        for index in range(max_new_tokens):
            if kept is not None:
                kept.append(logits.float().clone())
            token = logits.argmax(-1)
            if eos_token_id is not None:
                token = torch.where(unfinished, token, pad)
                unfinished = unfinished & (token != eos_token_id)
            tokens.append(token)
            if index == max_new_tokens - 1:
                break
            if eos_token_id is not None and (index + 1) % check_every == 0 and not bool(unfinished.any()):
                break
            self.input_ids[:batch, 0].copy_(token)
            logits = self.step(self.input_ids[:batch])
        new = torch.stack(tokens, dim=1)
        if eos_token_id is not None:  # generate stops at the step where the last row ended
            ended = (new == eos_token_id).cumsum(1).clamp(max=1).bool().all(0)
            if bool(ended.any()):
                new = new[:, : int(ended.nonzero()[0]) + 1]
                kept = None if kept is None else kept[: new.shape[1]]
        return GreedyOutput(new, kept)

    # -- generate's steps -------------------------------------------------------------------------
    def takes(self, input_ids, inputs_embeds, cache, kwargs: dict) -> bool:
        """Whether a forward call is a one-token decode step this decoder can run."""
        return (
            isinstance(cache, StaticKVCache)
            and cache.decoder is self
            and cache.current
            and inputs_embeds is None
            and input_ids is not None
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and input_ids.shape[0] == cache.batch
            and cache.layers[0].length > 0
            and cache.layers[0].length < self.capacity
            and not any(kwargs.get(flag) for flag in ("output_attentions", "output_hidden_states", "labels"))
        )

    @torch.inference_mode()
    def generate_step(self, input_ids, cache: StaticKVCache, attention_mask=None, position_ids=None) -> torch.Tensor:
        """A step as ``generate`` calls the model: the 2-D padding mask (or None) and positions (or
        None: the stock numbering, the cache's length). Returns logits [B, vocab] (a copy)."""
        batch, slot = input_ids.shape[0], cache.layers[0].length
        if attention_mask is not None and attention_mask.dim() == 2:
            seen = min(attention_mask.shape[1], slot + 1)
            self.valid[:batch, :seen].copy_(attention_mask[:, -seen:].bool())
        if position_ids is None:
            self.position_ids[:batch].fill_(slot)
        return self.step(input_ids, position_ids).clone()


def _run_eager(ops: list[Callable]) -> None:
    for op in ops:
        op()


class _no_cudnn_attention:
    """cuDNN's SDPA builds a graph per shape (``model/cuda/attention.py``): keep it out of steps
    and captures, as the stock decoder does."""

    def __init__(self, device: torch.device) -> None:
        self.on = device.type == "cuda"

    def __enter__(self):
        if self.on:
            self.was = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)

    def __exit__(self, *exc):
        if self.on:
            torch.backends.cuda.enable_cudnn_sdp(self.was)


# -- hooks for generate -----------------------------------------------------------------------------
def attach(language_model: nn.Module, decoder: StaticDecoder) -> None:
    """Route ``language_model``'s one-token steps on ``decoder``'s caches through the static step
    (graphs where captured); every other call goes to the stock forward. ``generate`` must be
    given ``cache=decoder.new_cache()``. Undo with :func:`detach`."""
    detach(language_model)
    stock = language_model.forward

    @functools.wraps(stock)  # generate reads the signature (position_ids, attention_mask)
    def forward(*args, **kwargs):
        cache = kwargs.get("cache")
        if not args and decoder.takes(kwargs.get("input_ids"), kwargs.get("inputs_embeds"), cache, kwargs):
            logits = decoder.generate_step(kwargs["input_ids"], cache, kwargs.get("attention_mask"),
                                           kwargs.get("position_ids"))  # fmt: skip
            return CausalLMOutputWithPast(logits=logits.unsqueeze(1), cache=cache)
        return stock(*args, **kwargs)

    language_model.forward = forward
    language_model.static_decoder = decoder


def detach(language_model: nn.Module) -> None:
    if "forward" in vars(language_model):
        del language_model.forward
    language_model.static_decoder = None


def decode_greedy(model: nn.Module, inputs: dict, decoder: StaticDecoder, max_new_tokens: int,
                  eos_token_id: int | None = None, pad_token_id: int | None = None,
                  output_logits: bool = False) -> GreedyOutput:  # fmt: skip
    """Greedy decoding of a processor batch (``DeepseekVL2ForCausalLM`` ``model``): vision and the
    prompt's embeddings as ``model.generate`` computes them, then :meth:`StaticDecoder.generate_greedy`."""
    with torch.inference_mode():
        device = model.get_input_embeddings().weight.device
        input_ids = inputs["input_ids"].to(device)
        embeds = model.prepare_inputs_embeds(
            input_ids, inputs.get("pixel_values"), inputs.get("images_seq_mask"), inputs.get("images_spatial_crop")
        )
    mask = inputs.get("attention_mask")
    return decoder.generate_greedy(
        inputs_embeds=embeds,
        attention_mask=None if mask is None else mask.to(device),
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        output_logits=output_logits,
        chunk_size=getattr(model, "prefill_chunk_size", None),
    )
