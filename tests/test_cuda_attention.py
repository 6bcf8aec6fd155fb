"""The language model's attention on CUDA: SDPA with cuDNN's per-shape backend off, call by call.

No GPU here: the switch is a process flag that reads the same on a CPU, and the attention it wraps
is transformers' own SDPA, so the outputs must be bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from model.configuration import load_official_config
from model.cuda import attention as cuda_attention
from model.cuda.attention import use_any_length_attention
from model.modeling import DeepseekVL2ForCausalLM


def _model(path, attention: str) -> DeepseekVL2ForCausalLM:
    config = load_official_config(path)  # as load_model does: the official config.json needs converting
    model = DeepseekVL2ForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    model.set_attn_implementation(attention)
    return model.eval()


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_every_layer_attends_with_cudnn_off_and_the_same_output(checkpoints, monkeypatch, variant):
    model = _model(checkpoints[variant], "sdpa")
    ids = torch.randint(100, 1000, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.language(input_ids=ids).logits
    cudnn_flags, stock = [], cuda_attention.sdpa_attention_forward

    def spy(*args, **kwargs):
        cudnn_flags.append(torch.backends.cuda.cudnn_sdp_enabled())
        return stock(*args, **kwargs)

    # Record the flag inside each layer's attention call, then run transformers' SDPA as before.
    monkeypatch.setattr(cuda_attention, "sdpa_attention_forward", spy)
    assert use_any_length_attention(model.language)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        got = model.language(input_ids=ids).logits
    assert cudnn_flags == [False] * model.language.config.num_hidden_layers
    assert torch.backends.cuda.cudnn_sdp_enabled(), "the process-wide choice is restored after each call"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_the_flag_is_restored_when_attention_raises(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(cuda_attention, "sdpa_attention_forward", broken)
    with pytest.raises(RuntimeError, match="kernel failed"):
        cuda_attention.any_length_sdpa(None, None, None, None, None)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_another_attention_implementation_is_left_alone(checkpoints):
    model = _model(checkpoints["tiny"], "eager")
    assert not use_any_length_attention(model.language)
    assert model.language.config._attn_implementation == "eager"
