"""Tokenizer: faithful loading of the byte-level tokenizer.json, special-token ids, the test tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import pre_tokenizers

from model.tokenizer import (
    SPECIAL_TOKENS_IN_ORDER,
    MissingSpecialTokenError,
    SpecialTokenIds,
    TokenizerLoadError,
    _bytes_to_unicode,
    _check_faithful,
    load_tokenizer,
    special_token_ids,
    write_test_tokenizer,
)

SAMPLES = [
    "Hello world",
    "Hello , world !",
    "  two  spaces\nand\n\nnewlines\tand a tab ",
    "请描述这张图片。",
    "この画像について説明してください。",
    "emoji 😀👍🏽 and 🇫🇷 flags",
    "The cat 在沙发上, 1234567 apples.",
    "def f(x):\n    return x ** 2\n",
    "Ünïcödé àccents — dashes “quotes”",
]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    out = {}
    for layout in ("tiny", "small"):
        out[layout] = root / layout
        write_test_tokenizer(out[layout], vocab_size=1024, layout=layout)
    return out


@pytest.fixture(scope="module")
def loaded(written):
    return {layout: load_tokenizer(path) for layout, path in written.items()}


def _raw(path: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))


# -- files and layouts --------------------------------------------------------------------------
def test_files_have_the_official_shape(written):
    for path in written.values():
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert config["tokenizer_class"] == "LlamaTokenizerFast"
        assert config["bos_token"] == "<｜begin▁of▁sentence｜>"
        assert config["eos_token"] == "<｜end▁of▁sentence｜>"
        assert config["pad_token"] == "<｜▁pad▁｜>"
        assert config["add_bos_token"] is False and config["add_eos_token"] is False
        assert config["model_max_length"] == 4096 and config["legacy"] is False
        special_map = json.loads((path / "special_tokens_map.json").read_text(encoding="utf-8"))
        assert special_map["bos_token"]["content"] == config["bos_token"]
        assert special_map["eos_token"]["content"] == config["eos_token"]
        assert special_map["pad_token"]["content"] == config["pad_token"]
        assert special_map["additional_special_tokens"] == ["<|User|>", "<|Assistant|>"]
        document = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        assert document["model"]["type"] == "BPE"
        assert document["normalizer"] is None
        assert document["decoder"]["type"] == "ByteLevel"
        assert document["pre_tokenizer"]["type"] == "Sequence"
        assert document["pre_tokenizer"]["pretokenizers"][-1]["type"] == "ByteLevel"
        added = {entry["content"]: entry for entry in document["added_tokens"]}
        assert set(added) == set(SPECIAL_TOKENS_IN_ORDER)
        assert all(entry["special"] for entry in added.values())


def test_tiny_layout_round_trip(written, loaded):
    tokenizer = loaded["tiny"]
    ids = special_token_ids(tokenizer)
    assert (ids.bos, ids.eos, ids.pad) == (0, 1, 2)
    block = [
        ids.image,
        ids.ref_open,
        ids.ref_close,
        ids.det_open,
        ids.det_close,
        ids.grounding,
        ids.user,
        ids.assistant,
    ]
    assert block == list(range(ids.image, ids.image + 8))
    # the block comes right after the learnt vocab, which starts after the 256 bytes at 3..258
    assert ids.assistant == len(tokenizer) - 1 < 1024
    assert ids.image > 3 + 256
    assert tokenizer.convert_ids_to_tokens(3 + ord("A")) == "A"


def test_small_layout_round_trip(loaded):
    tokenizer = loaded["small"]
    ids = special_token_ids(tokenizer)
    assert list(vars(ids).values()) == list(range(ids.bos, ids.bos + 11))
    assert ids.assistant == len(tokenizer) - 1 < 1024
    assert ids.bos > 256  # regular vocab (bytes + merges) first
    assert tokenizer.convert_ids_to_tokens(ord("A")) == "A"


def test_base_layout_is_the_tiny_layout(tmp_path, written):
    write_test_tokenizer(tmp_path, vocab_size=1024, layout="base")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (written["tiny"] / name).read_bytes()


@pytest.mark.parametrize(
    ("layout", "vocab_size", "first", "expected"),
    [
        ("tiny", 129280, "image", SpecialTokenIds(0, 1, 2, *range(128815, 128823))),
        ("small", 102400, "bos", SpecialTokenIds(*range(100000, 100011))),
    ],
)
def test_official_sizes_use_the_official_ids(tmp_path, layout, vocab_size, first, expected):
    write_test_tokenizer(tmp_path, vocab_size=vocab_size, layout=layout)
    tokenizer = load_tokenizer(tmp_path)
    assert special_token_ids(tokenizer) == expected
    # contiguous vocabulary up to the last special token; ids above it stay unused and decode to nothing
    assert len(tokenizer) == expected.assistant + 1 <= vocab_size
    assert tokenizer.decode([vocab_size - 1]) == ""
    raw = _raw(tmp_path)
    for text in SAMPLES:
        assert tokenizer.encode(text, add_special_tokens=False) == raw.encode(text).ids
        assert max(raw.encode(text).ids) < 4096  # reserved filler ids are never produced


def test_small_vocab_sizes_fit(tmp_path):
    for vocab_size in (267, 300, 512):
        for layout in ("tiny", "small"):
            write_test_tokenizer(tmp_path / f"{layout}{vocab_size}", vocab_size=vocab_size, layout=layout)
            tokenizer = load_tokenizer(tmp_path / f"{layout}{vocab_size}")
            assert len(tokenizer) <= vocab_size
            assert max(vars(special_token_ids(tokenizer)).values()) < vocab_size
            text = "Locate the cat: 请描述这张图片 😀"
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_writer_is_deterministic(tmp_path, written):
    write_test_tokenizer(tmp_path, vocab_size=1024, layout="tiny")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (written["tiny"] / name).read_bytes()


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 267"):
        write_test_tokenizer(tmp_path, vocab_size=200)
    with pytest.raises(ValueError, match="layout must be one of"):
        write_test_tokenizer(tmp_path, vocab_size=1024, layout="huge")


def test_byte_table_is_the_byte_level_alphabet():
    table = _bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())


# -- special tokens -----------------------------------------------------------------------------
def test_special_ids_come_from_string_lookup(loaded):
    for tokenizer in loaded.values():
        ids = special_token_ids(tokenizer)
        assert list(vars(ids).values()) == tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS_IN_ORDER))
    assert special_token_ids(loaded["tiny"]) != special_token_ids(loaded["small"])


def test_special_ids_follow_the_file_not_a_table(tmp_path, written):
    # Swap the ids of <|User|> and <|Assistant|> in tokenizer.json: the lookup must follow.
    document = json.loads((written["tiny"] / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = document["model"]["vocab"]
    vocab["<|User|>"], vocab["<|Assistant|>"] = vocab["<|Assistant|>"], vocab["<|User|>"]
    for entry in document["added_tokens"]:
        if entry["content"] in ("<|User|>", "<|Assistant|>"):
            entry["id"] = vocab[entry["content"]]
    _write_variant(tmp_path, written["tiny"], document)
    original = special_token_ids(load_tokenizer(written["tiny"]))
    swapped = special_token_ids(load_tokenizer(tmp_path))
    assert (swapped.user, swapped.assistant) == (original.assistant, original.user)


def test_special_tokens_are_never_split(loaded):
    for tokenizer in loaded.values():
        ids = special_token_ids(tokenizer)
        encoded = tokenizer.encode("<image>\n<|ref|>the cat<|/ref|>", add_special_tokens=False)
        newline = tokenizer.encode("\n", add_special_tokens=False)
        cat = tokenizer.encode("the cat", add_special_tokens=False)
        assert encoded == [ids.image, *newline, ids.ref_open, *cat, ids.ref_close]
        assert tokenizer.encode("".join(SPECIAL_TOKENS_IN_ORDER), add_special_tokens=False) == list(vars(ids).values())
        glued = tokenizer.encode("x<|det|>[[1, 2, 3, 4]]<|/det|>y<|grounding|>z", add_special_tokens=False)
        assert glued.count(ids.det_open) == glued.count(ids.det_close) == glued.count(ids.grounding) == 1
        assert tokenizer.encode("<|User|>: hi", add_special_tokens=False)[0] == ids.user


def test_missing_special_token_is_a_clear_error(tmp_path, written):
    document = json.loads((written["tiny"] / "tokenizer.json").read_text(encoding="utf-8"))
    del document["model"]["vocab"]["<|grounding|>"]
    document["added_tokens"] = [e for e in document["added_tokens"] if e["content"] != "<|grounding|>"]
    _write_variant(tmp_path, written["tiny"], document)
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(KeyError, match=r"<\|grounding\|>.*missing") as caught:
        special_token_ids(tokenizer)
    assert isinstance(caught.value, MissingSpecialTokenError)


def test_special_token_not_registered_as_added_is_a_clear_error(tmp_path, written):
    document = json.loads((written["tiny"] / "tokenizer.json").read_text(encoding="utf-8"))
    document["added_tokens"] = [e for e in document["added_tokens"] if e["content"] != "<|det|>"]
    _write_variant(tmp_path, written["tiny"], document)
    with pytest.raises(MissingSpecialTokenError, match=r"<\|det\|>.*not registered"):
        special_token_ids(load_tokenizer(tmp_path))


# -- faithfulness -------------------------------------------------------------------------------
def test_encoding_equals_the_raw_tokenizers_encoding(written, loaded):
    for layout, tokenizer in loaded.items():
        raw = _raw(written[layout])
        for text in [*SAMPLES, "<image>\n<|ref|>the cat<|/ref|>", "<|User|>: hi\n\n<|Assistant|>:"]:
            expected = raw.encode(text)
            assert tokenizer.encode(text, add_special_tokens=False) == expected.ids, text
            assert tokenizer.tokenize(text) == expected.tokens, text
            # add_bos_token / add_eos_token are false, as in the official config
            assert tokenizer.encode(text) == expected.ids, text


def test_loaded_pipeline_is_the_files(written, loaded):
    for layout, tokenizer in loaded.items():
        document = json.loads((written[layout] / "tokenizer.json").read_text(encoding="utf-8"))
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        for part in ("normalizer", "pre_tokenizer", "decoder"):
            assert backend[part] == document[part]
        assert backend["model"]["vocab"] == document["model"]["vocab"]
        assert backend["model"]["merges"] == document["model"]["merges"]
        assert len(tokenizer) == _raw(written[layout]).get_vocab_size()


def test_altered_pipeline_is_detected(written):
    tokenizer = load_tokenizer(written["tiny"])
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()  # what LlamaTokenizer builds
    with pytest.raises(TokenizerLoadError, match="pre_tokenizer"):
        _check_faithful(tokenizer, written["tiny"] / "tokenizer.json")


@pytest.mark.parametrize("text", [*SAMPLES, "<｜begin▁of▁sentence｜><|User|>: <image>\n<|ref|>猫<|/ref|>😀"])
def test_decode_round_trip(loaded, text):
    for tokenizer in loaded.values():
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_decode_can_drop_special_tokens(loaded):
    tokenizer = loaded["tiny"]
    ids = tokenizer.encode("<|User|>: 你好 😀<｜end▁of▁sentence｜>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == ": 你好 😀"


# -- loader behaviour ---------------------------------------------------------------------------
def test_padding_is_left_with_the_pad_token(loaded):
    for tokenizer in loaded.values():
        ids = special_token_ids(tokenizer)
        assert tokenizer.padding_side == "left"
        assert tokenizer.pad_token == "<｜▁pad▁｜>" and tokenizer.pad_token_id == ids.pad
        assert tokenizer.bos_token_id == ids.bos and tokenizer.eos_token_id == ids.eos
        batch = tokenizer(["Hi", "Locate the cat in the image."], padding=True)
        short, long = batch["input_ids"]
        assert len(short) == len(long)
        pads = len(long) - len(tokenizer.encode("Hi"))
        assert pads > 0
        assert short[:pads] == [ids.pad] * pads
        assert batch["attention_mask"][0] == [0] * pads + [1] * (len(long) - pads)
        assert batch["attention_mask"][1] == [1] * len(long)


def test_pad_token_is_set_when_the_config_does_not_name_it(tmp_path, written):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((written["tiny"] / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == "<｜▁pad▁｜>" and tokenizer.pad_token_id == 2
    assert tokenizer.padding_side == "left"


def test_missing_tokenizer_json_is_a_clear_error(tmp_path, written):
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((written["tiny"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json") as caught:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path / "does-not-exist")


def _write_variant(out: Path, source: Path, document: dict) -> None:
    """A copy of ``source``'s tokenizer files with ``document`` as tokenizer.json."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (out / name).write_bytes((source / name).read_bytes())
    (out / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
