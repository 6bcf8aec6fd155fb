"""The static-shape decode step (model/cuda/static_decode.py) equals the stock decoder, on the CPU.

On a GPU the same step is captured as CUDA graphs and replayed (model/cuda/graphs.py); the graphs
replay exactly the kernels of the uncaptured step, so equality is checked here, where CI runs.
Buckets of 16, 32 and 64 slots with prompts of 9-14 tokens and 32 new ones: every run crosses
two bucket boundaries.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.configuration import load_official_config
from model.cuda import StaticDecoder, attach, detach
from model.cuda.expert_stacks import Expert4bitStack, dequantize_4bit_reference
from model.cuda.static_cache import StaticKVCache
from model.modeling import DeepseekVL2ForCausalLM

BUCKETS = (16, 32, 64)
NEW_TOKENS = 32
PAD = 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two (and other jobs share this machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load(path, dtype: torch.dtype, quantized: bool = False) -> DeepseekVL2ForCausalLM:
    """The model as a CUDA load builds it (no CPU decode kernels): the stock decoder."""
    kwargs = {}
    if quantized:
        from model.loading import bnb_config

        kwargs = {"quantization_config": bnb_config("4bit", dtype), "device_map": {"": "cpu"}}
    model = DeepseekVL2ForCausalLM.from_pretrained(path, config=load_official_config(path), dtype=dtype, **kwargs)
    model.set_attn_implementation("sdpa")
    for module in model.modules():  # bitsandbytes' AVX512 repacking is a CPU-only layout
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


_models: dict = {}


@pytest.fixture(scope="module")
def models(checkpoints):
    def get(variant: str, dtype: torch.dtype = torch.float32, quantized: bool = False):
        key = (variant, dtype, quantized)
        if key not in _models:
            _models[key] = _load(checkpoints[variant], dtype, quantized)
        return _models[key]

    yield get
    _models.clear()


def _prompt(lengths=(13,), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids, left-padded to the longest (mask 0 on the padding)."""
    generator = torch.Generator().manual_seed(seed)
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), PAD, dtype=torch.long)
    mask = torch.zeros((len(lengths), longest), dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, longest - length :] = torch.randint(10, 1000, (length,), generator=generator)
        mask[row, longest - length :] = 1
    return ids, mask


def _stock(model, ids, mask, **settings):
    with torch.inference_mode():
        out = model.language.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            output_logits=True, return_dict_in_generate=True, pad_token_id=PAD, cache=model.new_cache(), **settings,
        )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], [logits.float() for logits in out.logits]


def _buckets_used(decoder: StaticDecoder) -> list[int]:
    used, run = [], decoder.run

    def spy(batch, bucket):
        used.append(bucket)
        return run(batch, bucket)

    decoder.run = spy
    return used


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_fp32_greedy_tokens_and_logits_equal_the_stock_decoder_across_buckets(models, variant):
    model = models(variant)
    ids, mask = _prompt((13,))
    tokens, logits = _stock(model, ids, mask)
    decoder = StaticDecoder(model.language, max_batch=2, buckets=BUCKETS)
    used = _buckets_used(decoder)
    out = decoder.generate_greedy(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert torch.equal(out.tokens, tokens)
    for ours, stock in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)
    assert sorted(set(used)) == [16, 32, 64]  # 13 + 32 tokens: over two boundaries


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_fp32_left_padded_batch_of_two_equals_the_stock_decoder(models, variant):
    """Rows of 9 and 14 tokens; two rows pick 12 (token, expert) pairs out of 8 experts, so the
    step runs every expert with a dense weight map (one row gathers the chosen experts)."""
    model = models(variant)
    ids, mask = _prompt((9, 14), seed=1)
    tokens, logits = _stock(model, ids, mask)
    decoder = StaticDecoder(model.language, max_batch=2, buckets=BUCKETS)
    out = decoder.generate_greedy(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert torch.equal(out.tokens, tokens)
    for ours, stock in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_bf16_logits_within_bf16_tolerance_and_greedy_tokens_the_same(models, variant):
    """bf16: the step attends over the whole bucket (masked) where the stock decoder attends over
    exactly the tokens, so SDPA's sums may round differently in the last bit. Teacher-forced with
    the stock tokens, every step's logits stay within bf16 tolerance. Free-running, the tokens are
    the same for as long as each is decided: up to the first step whose logits differ by at
    least half the stock decoder's margin between its top two (a tie at bf16's resolution)."""
    model = models(variant, torch.bfloat16)
    ids, mask = _prompt((13,))
    tokens, logits = _stock(model, ids, mask)
    decoder = StaticDecoder(model.language, max_batch=2, buckets=BUCKETS)
    forced = [decoder.prefill(ids, attention_mask=mask).float().clone()]
    for index in range(NEW_TOKENS - 1):
        forced.append(decoder.step(tokens[:, index : index + 1]).float().clone())
    decided = NEW_TOKENS
    for index, (ours, stock) in enumerate(zip(forced, logits, strict=True)):
        torch.testing.assert_close(ours, stock, rtol=2e-2, atol=5e-2)
        difference = float((ours - stock).abs().max())
        top = stock.topk(2, dim=-1).values
        if difference > 0 and float((top[..., 0] - top[..., 1]).min()) <= 2 * difference:
            decided = min(decided, index)
    free = decoder.generate_greedy(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS).tokens
    assert torch.equal(free[:, :decided], tokens[:, :decided]), f"tokens differ before step {decided}"


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_nf4_experts_dequantize_exactly_and_decode_as_the_stock_decoder(models, variant):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional

    model = models(variant, quantized=True)
    experts = model.language.model.layers[1].mlp.experts
    expected = [bnb_functional.dequantize_4bit(e.up_proj.weight.data, e.up_proj.weight.quant_state) for e in experts]
    ids, mask = _prompt((13,), seed=2)
    tokens, logits = _stock(model, ids, mask)
    decoder = StaticDecoder(model.language, max_batch=1, buckets=BUCKETS)
    stack = decoder.experts[1]
    assert isinstance(stack, Expert4bitStack) and stack.added_bytes < 1024  # codes and scales are shared
    with torch.inference_mode():
        gate_up, _ = stack.weights(torch.arange(len(experts)))
    for index, weight in enumerate(expected):
        assert torch.equal(gate_up[index, stack.width :], weight)
    # The stock layers now read the stacks: still the same answers.
    assert torch.equal(_stock(model, ids, mask)[0], tokens)
    out = decoder.generate_greedy(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert torch.equal(out.tokens, tokens)
    for ours, stock in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


def test_the_plain_torch_4bit_dequantization_is_bitsandbytes_layout():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    for nested in (False, True):
        packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=nested)
        expected = bnb_functional.dequantize_4bit(packed, state)
        scales = (
            bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset if nested else state.absmax
        )
        ours = dequantize_4bit_reference(
            packed.view(1, -1), scales.view(1, -1), state.code, 64, (1, 96, 128), weight.dtype
        )
        assert torch.equal(ours[0], expected)


def test_a_stack_of_4bit_experts_spanning_several_second_level_blocks_equals_the_experts():
    """Experts of 256×128 (512 blocks of 64, two blocks of second-level scales per tensor): the
    stacked codes and scales dequantize to bitsandbytes' values and the fixed-shape dispatch mixes
    like RoutedExperts, gathered and with every expert."""
    bnb = pytest.importorskip("bitsandbytes")
    from model.experts import RoutedExperts

    generator = torch.Generator().manual_seed(7)
    experts = RoutedExperts(4, 128, 256, "silu", num_experts_per_tok=2)
    for expert in experts:
        for name in ("gate_proj", "up_proj", "down_proj"):
            dense = getattr(expert, name)
            linear = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32,
                                       quant_type="nf4", compress_statistics=True)  # fmt: skip
            weight = torch.randn(dense.weight.shape, generator=generator) / 16
            linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
            linear.support_avx512bf16_for_cpu = False
            setattr(expert, name, linear.to("cpu"))
    import bitsandbytes.functional as bnb_functional

    def plain(linear):
        return bnb_functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state).clone()

    expected = [(torch.cat([plain(e.gate_proj), plain(e.up_proj)]), plain(e.down_proj)) for e in experts]
    x = torch.randn(3, 128, generator=generator)
    index = torch.tensor([[0, 3], [2, 1], [3, 2]])
    weights = torch.rand(3, 2, generator=generator)
    with torch.inference_mode():
        stock = experts(x, index, weights)
        stack = Expert4bitStack(experts, torch.float32)
        gate_up, down = stack.weights(None)
        for e, (want_gate_up, want_down) in enumerate(expected):
            assert torch.equal(gate_up[e], want_gate_up) and torch.equal(down[e], want_down)
        torch.testing.assert_close(stack(x[:1], index[:1], weights[:1]), stock[:1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stack(x, index, weights), stock, rtol=1e-5, atol=1e-6)
        assert torch.equal(experts(x, index, weights), stock)  # the experts now read the stacks


def test_generate_through_attach_gives_the_stock_tokens_with_penalty_and_padding(models):
    """The generate-compatible path: generate's own loop (repetition penalty, padding mask,
    positions) with its one-token steps through the static step."""
    model = models("small")
    ids, mask = _prompt((9, 14), seed=3)
    tokens, _ = _stock(model, ids, mask, repetition_penalty=1.1)
    decoder = StaticDecoder(model.language, max_batch=2, buckets=BUCKETS)
    steps = []
    step = decoder.generate_step
    decoder.generate_step = lambda *args: steps.append(1) or step(*args)
    attach(model.language, decoder)
    try:
        with torch.inference_mode():
            out = model.language.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False, repetition_penalty=1.1, pad_token_id=PAD, cache=decoder.new_cache(),
            )  # fmt: skip
    finally:
        detach(model.language)
    assert len(steps) == NEW_TOKENS - 1  # every step after the prompt's
    assert torch.equal(out[:, ids.shape[1] :], tokens)


def test_a_prefilled_dynamic_cache_is_taken_over(models):
    """A cache the stock forward filled (a reused conversation prefix) is copied into the buffers."""
    model = models("tiny")
    ids, mask = _prompt((14,), seed=4)
    tokens, logits = _stock(model, ids, mask)
    decoder = StaticDecoder(model.language, max_batch=1, buckets=BUCKETS)
    with torch.inference_mode():
        stock_cache = model.new_cache()
        first = model.language(input_ids=ids, cache=stock_cache, use_cache=True).logits[:, -1]
        cache = decoder.new_cache(stock_cache)
        assert isinstance(cache, StaticKVCache) and decoder.length == ids.shape[1]
        assert torch.equal(first.argmax(-1), tokens[:, 0])
        steps = [decoder.step(tokens[:, index : index + 1]).float().clone() for index in range(4)]
    for ours, stock in zip(steps, logits[1:5], strict=True):
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


def test_experts_run_eagerly_split_the_step_into_segments_and_change_nothing(models):
    """Experts that run elsewhere (Small's CPU-resident ones on an 8 GiB card) cut the step into
    capturable segments around eager calls; the state crosses in static tensors."""
    model = models("small")
    ids, mask = _prompt((13,), seed=5)
    tokens, logits = _stock(model, ids, mask)
    decoder = StaticDecoder(model.language, max_batch=1, buckets=BUCKETS, eager_experts=(1,))
    assert [segment.capturable for segment in decoder.segments(1, 16)] == [True, False, True]
    out = decoder.generate_greedy(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert torch.equal(out.tokens, tokens)
    for ours, stock in zip(out.logits, logits, strict=True):
        torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)


class _NoHostReads(TorchDispatchMode):
    """Fails on every operator that reads a device value back to the host or has an output
    shape that depends on data (boolean indexing, ``nonzero``): what a CUDA graph cannot capture.
    ``tolist`` does not dispatch, so it is replaced for the duration."""

    FORBIDDEN = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero")

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(tensor):
            raise AssertionError("tolist in the static step")

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        boolean_index = name.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for arg in args if isinstance(arg, list | tuple) for i in arg
        )  # fmt: skip
        if name in self.FORBIDDEN or boolean_index:
            raise AssertionError(f"{func} in the static step")
        return func(*args, **(kwargs or {}))


def test_the_host_read_check_catches_the_stock_experts(models):
    """Control: the stock routed experts (``.tolist()`` of the chosen experts) fail the check."""
    mlp = models("tiny").language.model.layers[1].mlp
    x = torch.randn(1, mlp.experts[0].gate_proj.in_features)
    index = torch.tensor([[0, 1, 2, 3, 4, 5]])
    with torch.inference_mode(), pytest.raises(AssertionError, match="tolist"), _NoHostReads():
        mlp.experts(x, index, torch.full((1, 6), 1 / 6))
    with torch.inference_mode(), pytest.raises(AssertionError, match=r"nonzero|index"), _NoHostReads():
        x[x > 0]


@pytest.mark.parametrize("variant", ["tiny", "small"])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_the_step_never_reads_device_values_on_the_host(models, variant, quantized, batch):
    if quantized:
        pytest.importorskip("bitsandbytes")
    model = models(variant, quantized=quantized)
    decoder = StaticDecoder(model.language, max_batch=2, buckets=BUCKETS)
    ids, mask = _prompt((13,) * batch, seed=6)
    decoder.prefill(ids, attention_mask=mask)
    decoder.input_ids[:batch] = 5
    decoder.slot.fill_(decoder.length)
    with torch.inference_mode(), _NoHostReads():
        for segment in decoder.segments(batch, 16):
            assert segment.capturable
            segment.run()


def test_buckets_and_capacity():
    class _Stub:
        bucket_for = StaticDecoder.bucket_for
        buckets, capacity = BUCKETS, BUCKETS[-1]

    stub = _Stub()
    assert [stub.bucket_for(n) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="do not fit"):
        stub.bucket_for(65)


def test_install_static_decode_attaches_on_the_cpu_and_graphs_need_cuda(models):
    from model.cuda import GraphRunner, install_static_decode

    model = models("tiny")
    decoder = install_static_decode(model.language, max_batch=1, buckets=BUCKETS)
    try:
        assert model.language.static_decoder is decoder and decoder.runner is None  # nothing captured on a CPU
        with pytest.raises(ValueError, match="CUDA"):
            GraphRunner(decoder)
    finally:
        detach(model.language)
    assert "forward" not in vars(model.language)
