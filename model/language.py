"""The three language models, each a transformers 5 class that reproduces the official one.

* Tiny  → ``DeepseekOcr2TextModel`` (multi-head attention with rotate-half RoPE, DeepSeek MoE) plus
  an untied ``lm_head``; transformers ships that text model only inside DeepSeek-OCR-2, so the
  causal-LM head is ours.
* Small → ``DeepseekV2ForCausalLM`` (MLA, softmax greedy router).
* base  → ``DeepseekV3ForCausalLM`` (MLA, sigmoid ``noaux_tc`` router with correction bias, ×2.0).

Each gets its routed experts as per-expert linears (``model/experts.py``).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import (
    DeepseekOcr2TextModel,
    DeepseekOcr2TextPreTrainedModel,
)

from .configuration import TextConfig, VL2BaseTextConfig, VL2SmallTextConfig, VL2TinyTextConfig
from .experts import install_routed_experts
from .mla import install_absorbed_mla


class DecodeStep(Protocol):
    """A whole decode step computed by other means (a device package installs one at load)."""

    def applies(self, tokens: torch.Tensor | None, cache, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
        """Whether this call is a step it computes (else the stock forward runs)."""
        ...

    def __call__(self, input_ids, inputs_embeds, cache, attention_mask, position_ids) -> CausalLMOutputWithPast: ...


class VL2TinyForCausalLM(DeepseekOcr2TextPreTrainedModel, GenerationMixin):
    config: VL2TinyTextConfig
    _tied_weights_keys: dict[str, str] = {}
    # A whole-step decoder installed at load by a device package (model/cpu/: native.py, decode.py).
    decode_step: DecodeStep | None = None

    def __init__(self, config: VL2TinyTextConfig) -> None:
        super().__init__(config)
        self.model = DeepseekOcr2TextModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        tokens = input_ids if input_ids is not None else inputs_embeds
        if self.decode_step is not None and self.decode_step.applies(tokens, cache, attention_mask, kwargs):
            return self.decode_step(input_ids, inputs_embeds, cache, attention_mask, position_ids)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        return CausalLMOutputWithPast(logits=logits, cache=outputs.cache)


LANGUAGE_MODEL_CLASSES: dict[type, type] = {
    VL2TinyTextConfig: VL2TinyForCausalLM,
    VL2SmallTextConfig: DeepseekV2ForCausalLM,
    VL2BaseTextConfig: DeepseekV3ForCausalLM,
}


def build_language_model(text_config: TextConfig) -> nn.Module:
    """Instantiate the variant's causal LM with per-expert routed experts."""
    cls = LANGUAGE_MODEL_CLASSES[type(text_config)]
    lm = cls(text_config)
    install_routed_experts(lm, text_config)
    install_absorbed_mla(lm)
    return lm
