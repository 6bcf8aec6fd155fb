"""Conversation template and token construction (spec §5.1), batching and the ≥3-image policy."""

from __future__ import annotations

import pytest
import torch

from model.image_processing import image_token_count
from model.processing import DeepseekVL2Processor, Message, place_image_tags, render_prompt

from .test_model_forward import _gradient_image


@pytest.fixture(scope="module")
def processor(checkpoints) -> DeepseekVL2Processor:
    return DeepseekVL2Processor.from_pretrained(checkpoints["tiny"])


def test_single_turn_template():
    text = render_prompt([Message("user", "<image>\nWhat is this?", [_gradient_image(10, 10)])])
    assert text == "<|User|>: <image>\nWhat is this?\n\n<|Assistant|>:"


def test_two_turn_template():
    conversation = [
        Message("user", "<image>\nWhat is this?", [_gradient_image(10, 10)]),
        Message("assistant", "A cat."),
        Message("user", "And its color?"),
    ]
    assert render_prompt(conversation) == (
        "<|User|>: <image>\nWhat is this?\n\n<|Assistant|>: A cat.<｜end▁of▁sentence｜>"
        "<|User|>: And its color?\n\n<|Assistant|>:"
    )


def test_system_prompt_comes_first():
    text = render_prompt([Message("user", "Hi")], system_prompt="Be brief.")
    assert text == "Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>:"


def test_image_tags_are_added_or_checked():
    assert place_image_tags("Describe.", 2) == "<image>\n<image>\nDescribe."
    assert place_image_tags("a <image> b", 1) == "a <image> b"
    with pytest.raises(ValueError, match="2 <image> tags but 1 images"):
        place_image_tags("<image><image>", 1)


def test_token_construction_single_image(processor):
    image = _gradient_image(640, 480)
    inputs = processor([Message("user", "<image>\n<|ref|>the cat<|/ref|>.", [image])])
    ids = inputs["input_ids"][0].tolist()
    special = processor.special
    assert ids[0] == special.bos
    assert special.eos not in ids
    assert ids.count(special.image) == image_token_count(2, 2) == 1023
    assert int(inputs["images_seq_mask"].sum()) == 1023
    assert inputs["images_spatial_crop"].tolist() == [[[2, 2]]]
    assert inputs["pixel_values"].shape == (1, 5, 3, 384, 384)
    # the text after the image is encoded as one piece and the prompt ends with "<|Assistant|>:"
    last_image = len(ids) - 1 - ids[::-1].index(special.image)
    tail = processor.tokenizer.encode("\n<|ref|>the cat<|/ref|>.\n\n<|Assistant|>:", add_special_tokens=False)
    assert ids[last_image + 1 :] == tail
    assert processor.decode(ids[-4:]).endswith("\n\n<|Assistant|>:")
    assert special.ref_open in ids and special.ref_close in ids
    # text pieces around the image are encoded separately, exactly
    head = processor.tokenizer.encode("<|User|>: ", add_special_tokens=False)
    assert ids[1 : 1 + len(head)] == head


def test_assistant_turn_ends_with_eos_and_next_turn_follows(processor):
    conversation = [Message("user", "Hi"), Message("assistant", " Hello there. "), Message("user", "Bye")]
    ids = processor(conversation)["input_ids"][0].tolist()
    answer = processor.tokenizer.encode("Hello there.", add_special_tokens=False)
    eos_at = ids.index(processor.special.eos)
    assert ids[eos_at - len(answer) : eos_at] == answer
    user_again = processor.tokenizer.encode("<|User|>: Bye", add_special_tokens=False)
    assert ids[eos_at + 1 : eos_at + 1 + len(user_again)] == user_again


def test_three_images_turn_tiling_off(processor):
    images = [_gradient_image(1920, 1080), _gradient_image(640, 480), _gradient_image(100, 2000)]
    inputs = processor([Message("user", "Compare.", images)])
    assert inputs["images_spatial_crop"].tolist() == [[[1, 1]] * 3]
    assert int(inputs["images_seq_mask"].sum()) == 3 * 421
    assert inputs["pixel_values"].shape[1] == 6


def test_images_across_turns_count_for_the_policy(processor):
    conversation = [
        Message("user", "One.", [_gradient_image(800, 600)]),
        Message("assistant", "Ok."),
        Message("user", "Two and three.", [_gradient_image(800, 600), _gradient_image(800, 600)]),
    ]
    assert processor(conversation)["images_spatial_crop"].tolist() == [[[1, 1]] * 3]
    two = [
        *conversation[:1],
        Message("assistant", "Ok."),
        Message("user", "Two.", [_gradient_image(800, 600)]),
    ]
    assert processor(two)["images_spatial_crop"].tolist() == [[[3, 2], [3, 2]]]


def test_batch_is_left_padded(processor):
    batch = processor(
        [
            [Message("user", "Hi")],
            [Message("user", "A much longer message here", [_gradient_image(384, 384)])],
        ]
    )
    mask = batch["attention_mask"]
    assert mask.dtype == torch.bool
    assert not mask[0, 0] and mask[0, -1] and mask[1].all()
    pad = processor.special.pad
    assert batch["input_ids"][0, 0].item() == pad
    assert batch["images_spatial_crop"][0].tolist() == [[0, 0]]
    assert batch["images_spatial_crop"][1].tolist() == [[1, 1]]
    assert batch["pixel_values"].shape == (2, 2, 3, 384, 384)


def test_text_only_request_has_a_zero_tile(processor):
    inputs = processor([Message("user", "Hello")])
    assert inputs["pixel_values"].shape == (1, 1, 3, 384, 384)
    assert not inputs["images_seq_mask"].any()


def test_system_prompt_whitespace_is_stripped_as_the_official_prompt_path_does(processor):
    """The official path strips the rendered prompt: a system prompt's leading whitespace goes, and a
    whitespace-only system prompt is no system prompt at all."""
    conversation = [Message("user", "Hi")]
    plain = processor(conversation, system_prompt="Be brief.")["input_ids"][0].tolist()
    assert processor(conversation, system_prompt="  \n Be brief.")["input_ids"][0].tolist() == plain
    assert render_prompt(conversation, system_prompt="\t Be brief.") == render_prompt(conversation, "Be brief.")
    none = processor(conversation)["input_ids"][0].tolist()
    assert processor(conversation, system_prompt=" \n\t ")["input_ids"][0].tolist() == none
    assert render_prompt(conversation, system_prompt="   ") == render_prompt(conversation)
    # Trailing whitespace is inside the rendered prompt, so it stays.
    assert processor(conversation, system_prompt="Be brief. ")["input_ids"][0].tolist() != plain
