"""DeepSeek-VL2 tokenizer: faithful loading, special-token ids by string, and a small test tokenizer.

Loading
-------
The hub repos ship a byte-level BPE ``tokenizer.json`` (DeepSeek-V2/V3 style: a ``Sequence`` of
``Split`` regexes ending in ``ByteLevel``, a ``ByteLevel`` decoder, no normalizer) next to a
``tokenizer_config.json`` that names ``"tokenizer_class": "LlamaTokenizerFast"``. In transformers 5
``LlamaTokenizerFast`` is an alias of ``LlamaTokenizer``, whose ``__init__`` always builds its own
sentencepiece-style pipeline (``Metaspace`` pre-tokenizer, ``Replace``/``ByteFallback``/``Fuse``/
``Strip`` decoder) and keeps only the vocab and merges of the file, so the class named in the config
silently re-tokenizes byte-level text: spaces and newlines vanish (``"Hello world"`` decodes to
``"Helloworld"``), CJK text encodes to no ids at all, ``▁`` inside special tokens decodes to a space.
``AutoTokenizer`` currently sidesteps that with a heuristic (``"ByteLevel"`` appearing in the file
text, plus a warning), which is an implementation detail we do not want to depend on.

:func:`load_tokenizer` therefore loads with ``TokenizersBackend`` itself (``PreTrainedTokenizerFast``
is an alias of it in transformers 5), which builds the backend straight from ``tokenizer.json``
with ``tokenizers.Tokenizer.from_file`` — normalizer, pre-tokenizer, model, decoder and added
tokens exactly as serialized — while still reading ``tokenizer_config.json`` and
``special_tokens_map.json`` for the bos/eos/pad strings. It then checks that the backend pipeline
still equals the file's, forces ``padding_side="left"`` (as the official processor does) and
makes sure the pad token is set.

Test tokenizer
--------------
:func:`write_test_tokenizer` writes the three tokenizer files of a hub repo for a byte-level BPE
learnt (deterministically, in pure Python on top of the ``tokenizers`` pre-tokenizer) from a small
built-in English + CJK corpus. Id layouts, scaled down from the official ones:

* ``"tiny"`` (also ``"base"``): ``bos=0, eos=1, pad=2``, the 256 byte tokens at ``3..258`` (in byte
  order), the learnt merges from 259, then ``<image> … <|Assistant|>`` as 8 consecutive ids right
  after the learnt vocabulary.
* ``"small"``: the byte tokens at ``0..255``, the learnt merges from 256, then
  ``bos, eos, pad, <image> … <|Assistant|>`` as 11 consecutive ids right after them.

At the official sizes (``"tiny"`` with 129280, ``"small"`` with 102400) the block starts at the
official id instead (``<image>``\\ =128815, resp. ``bos``\\ =100000); the ids between the learnt
vocabulary and that block are filled with plain ``<reserved_N>`` vocabulary entries that no merge
produces (never emitted by encoding, decoded as their literal text), so the vocabulary stays
contiguous like the real files. In every case the ids from the last special token up to
``vocab_size - 1`` are left unused, as in the real checkpoints (129280 and 102400 are embedding
sizes, larger than the tokenizers); the model only needs ``vocab_size`` embedding rows, and the
``tokenizers`` decoder skips ids it does not know.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, TokenizersBackend

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
IMAGE_TOKEN = "<image>"

SPECIAL_TOKENS_IN_ORDER: tuple[str, ...] = (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    IMAGE_TOKEN,
    "<|ref|>",
    "<|/ref|>",
    "<|det|>",
    "<|/det|>",
    "<|grounding|>",
    "<|User|>",
    "<|Assistant|>",
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

LAYOUTS = ("tiny", "base", "small")
# (layout, official embedding size) -> id of the first token of the special block in the real files.
_OFFICIAL_BLOCK_START = {("tiny", 129280): 128815, ("small", 102400): 100000}
_MAX_MERGES = 4096  # the built-in corpus supports far fewer; this only bounds the work
_BYTE_TOKENS = 256


@dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the DeepSeek-VL2 special tokens, as found in a loaded tokenizer."""

    bos: int
    eos: int
    pad: int
    image: int
    ref_open: int
    ref_close: int
    det_open: int
    det_close: int
    grounding: int
    user: int
    assistant: int


class MissingSpecialTokenError(KeyError):
    """A DeepSeek-VL2 special token is absent from (or not registered in) the tokenizer."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class TokenizerLoadError(RuntimeError):
    """The tokenizer files are present but cannot be loaded faithfully."""


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a checkpoint directory exactly as its ``tokenizer.json`` defines it.

    Returns a transformers ``TokenizersBackend`` (alias ``PreTrainedTokenizerFast``) whose backend
    is ``tokenizer.json`` unchanged, with ``padding_side="left"`` and the pad token set.
    """
    directory = Path(path)
    tokenizer_file = directory / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        where = "directory" if directory.is_dir() else "path (not a directory)"
        raise FileNotFoundError(
            f"{TOKENIZER_FILE} not found in checkpoint {where} {str(directory)!r}: DeepSeek-VL2 needs the "
            f"byte-level BPE {TOKENIZER_FILE} from the hub repo (missing file: {tokenizer_file})"
        )
    # The class named in tokenizer_config.json (LlamaTokenizerFast) is deliberately not used: in
    # transformers 5 it rebuilds a Metaspace pipeline around the vocab. TokenizersBackend keeps the
    # file's pipeline and still reads tokenizer_config.json / special_tokens_map.json.
    tokenizer = TokenizersBackend.from_pretrained(str(directory), local_files_only=True)
    _check_faithful(tokenizer, tokenizer_file)

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.backend_tokenizer.token_to_id(PAD_TOKEN) is None:
            raise MissingSpecialTokenError(
                f"tokenizer in {str(directory)!r} has no pad token: {PAD_TOKEN!r} is neither configured "
                f"in {TOKENIZER_CONFIG_FILE} / {SPECIAL_TOKENS_MAP_FILE} nor present in {TOKENIZER_FILE}"
            )
        tokenizer.pad_token = PAD_TOKEN
    return tokenizer


_PIPELINE_PARTS = ("normalizer", "pre_tokenizer", "decoder")


def _check_faithful(tokenizer: Any, tokenizer_file: Path) -> None:
    """Fail loudly if transformers altered the pipeline serialized in ``tokenizer.json``."""
    with open(tokenizer_file, encoding="utf-8") as handle:
        expected = json.load(handle)
    actual = json.loads(tokenizer.backend_tokenizer.to_str())
    for part in _PIPELINE_PARTS:
        if actual.get(part) != expected.get(part):
            raise TokenizerLoadError(
                f"transformers changed the {part} of {tokenizer_file} while loading it (file: "
                f"{json.dumps(expected.get(part))[:200]}, loaded: {json.dumps(actual.get(part))[:200]}); "
                "tokenization would not match the checkpoint"
            )
    expected_model = expected.get("model", {}).get("type")
    if actual["model"].get("type") != expected_model:
        raise TokenizerLoadError(
            f"transformers loaded a {actual['model'].get('type')} model from {tokenizer_file}, "
            f"which declares {expected_model}"
        )


def special_token_ids(tokenizer: Any) -> SpecialTokenIds:
    """Look up the ids of :data:`SPECIAL_TOKENS_IN_ORDER` by their strings in ``tokenizer``.

    Raises :class:`MissingSpecialTokenError` (a ``KeyError``) naming the token if one is absent, or
    if it is in the vocabulary but not registered as an added token (text would split it).
    """
    vocab = tokenizer.get_vocab()  # includes the added tokens
    ids: list[int] = []
    for token in SPECIAL_TOKENS_IN_ORDER:
        token_id = vocab.get(token)
        if token_id is None:
            raise MissingSpecialTokenError(
                f"special token {token!r} is missing from the tokenizer "
                f"({getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}); "
                "it is not a DeepSeek-VL2 tokenizer or its tokenizer.json is incomplete"
            )
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise MissingSpecialTokenError(
                f"special token {token!r} (id {token_id}) is in the vocabulary but not registered as an "
                "added token, so text containing it would be split into pieces"
            )
        ids.append(token_id)
    return SpecialTokenIds(*ids)


# ---------------------------------------------------------------------------------------------
# test tokenizer
# ---------------------------------------------------------------------------------------------
# A small mixed corpus: prompt-like English, numbers and punctuation, code-ish text, Chinese and
# Japanese. Special tokens are deliberately absent (they are added tokens, never learnt).
_CORPUS = """\
Describe this image in detail. What is in the picture? Where is the cat?
Locate the cat in the image. The cat is sitting on the red sofa next to the window.
Find the dog and the ball. The dog is running after the ball in the green garden.
There are two people in the photo: a man with a hat and a woman with an umbrella.
Read the text in the image. The sign says "Open from 9:00 to 17:30, Monday to Friday."
The chart shows the sales of 2023 and 2024; sales grew by 35% in the second quarter.
Please answer the question with a single word or phrase.
Can you tell me what the person on the left is holding? She is holding a cup of coffee.
This is a photo of a city street at night, with cars, lights and tall buildings.
The table has 3 columns and 12 rows. The first row is the header.
def main():
    print("hello, world")
    return 0
Hello, world! Hello there. How are you today? I am fine, thank you.
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun.
请描述这张图片。图片中有一只猫坐在红色的沙发上。
这是一张城市街道的照片，街上有汽车和行人。
图中的人手里拿着一杯咖啡。请找出图中的狗和球。
中文和英文混合的句子：the cat 在沙发上，the dog 在花园里。
今天天气很好，我们去公园散步吧。这个问题的答案是什么？
この画像について説明してください。猫がソファの上に座っています。
東京の街の写真です。車と人がたくさんいます。
"""


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (matches ``ByteLevel.alphabet()``)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """DeepSeek-style pre-tokenization: digits in groups of <= 3, CJK runs, words, then bytes."""
    word_pattern = r" ?\p{L}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(r"[一-鿿぀-ヿ]+"), behavior="isolated", invert=False),
            pre_tokenizers.Split(Regex(word_pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )


def _learn_merges(words: Counter[str], budget: int) -> list[tuple[str, str]]:
    """Greedy BPE over byte-level words; ties go to the smallest pair, so the result is deterministic.

    Stops after ``budget`` merges that create new tokens, or when no pair occurs twice.
    """
    splits = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    made: set[str] = set()
    while len(made) < budget:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            symbols = splits[word]
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break
        merges.append(best)
        made.add(best[0] + best[1])
        for word, symbols in splits.items():
            if len(symbols) < 2:
                continue
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            splits[word] = merged
    return merges


def _build_vocab(vocab_size: int, layout: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    leading = 3 if layout != "small" else 0  # bos, eos, pad first in the tiny/base layout
    block = SPECIAL_TOKENS_IN_ORDER[leading:]
    minimum = leading + _BYTE_TOKENS + len(block)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} for layout {layout!r}, got {vocab_size}")

    pre_tokenizer = _pre_tokenizer()
    words = Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(_CORPUS))
    merges = _learn_merges(words, min(vocab_size - minimum, _MAX_MERGES))

    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS_IN_ORDER[:leading])}
    for byte, char in sorted(_bytes_to_unicode().items()):
        vocab[char] = leading + byte
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))

    start = _OFFICIAL_BLOCK_START.get((_canonical(layout), vocab_size), len(vocab))
    reserved = 0
    while len(vocab) < start:  # only at the official sizes: keep the ids contiguous
        vocab[f"<reserved_{reserved}>"] = len(vocab)
        reserved += 1
    for token in block:
        vocab[token] = len(vocab)
    assert len(vocab) <= vocab_size
    return vocab, merges


def _canonical(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return "tiny" if layout == "base" else layout


def build_test_tokenizer(vocab_size: int, layout: str = "tiny") -> Tokenizer:
    """The ``tokenizers.Tokenizer`` that :func:`write_test_tokenizer` serializes."""
    layout = _canonical(layout)
    vocab, merges = _build_vocab(vocab_size, layout)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    # Added in id order; every one is already in the BPE vocab, so it keeps that id.
    specials = sorted(SPECIAL_TOKENS_IN_ORDER, key=vocab.__getitem__)
    tokenizer.add_special_tokens(
        [AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True) for token in specials]
    )
    return tokenizer


def _token_entry(token: str) -> dict[str, Any]:
    return {"content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_test_tokenizer(out_dir: str | os.PathLike[str], *, vocab_size: int, layout: str = "tiny") -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into ``out_dir``.

    The files have the shape of the official hub files (``tokenizer_class`` ``LlamaTokenizerFast``,
    a byte-level BPE ``tokenizer.json``); see the module docstring for the id layouts.
    Deterministic, offline and fast.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_test_tokenizer(vocab_size, layout)
    tokenizer.save(str(out / TOKENIZER_FILE), pretty=False)

    config = {
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "sp_model_kwargs": {},
        "use_default_system_prompt": False,
    }
    special_map = {
        "bos_token": _token_entry(BOS_TOKEN),
        "eos_token": _token_entry(EOS_TOKEN),
        "pad_token": _token_entry(PAD_TOKEN),
        "additional_special_tokens": ["<|User|>", "<|Assistant|>"],
    }
    for name, document in ((TOKENIZER_CONFIG_FILE, config), (SPECIAL_TOKENS_MAP_FILE, special_map)):
        (out / name).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
