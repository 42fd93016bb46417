"""Chat-template label masks, image-token expansion and truncation, token by token."""

from __future__ import annotations

import copy

import pytest

from mmbridge.data.llava import DataError
from mmbridge.data.processor import IGNORE, Processor

LLAMA3_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] | trim }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)

CONV = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "2"},
]


def make(tokenizer, n=4, max_length=512, system_prompt=None, template=None) -> Processor:
    from mmbridge.models.language import IMAGE_TOKEN

    tok = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if template:
        tok.chat_template = template
    return Processor(tok, n, 32, (0.5,) * 3, (0.5,) * 3, max_length=max_length, system_prompt=system_prompt)


def target_pieces(proc: Processor, ids, labels) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(proc.tokenizer.decode(cur))
            cur = []
    if cur:
        runs.append(proc.tokenizer.decode(cur))
    return runs


def test_chatml_labels_cover_each_assistant_turn_and_its_end_token(tokenizer):
    proc = make(tokenizer)
    enc = proc.encode(CONV, n_images=1)
    assert target_pieces(proc, enc.input_ids, enc.labels) == ["red<|im_end|>", "2<|im_end|>"]
    # everything else, system prompt and user turns included, is masked
    n_targets = sum(lab != IGNORE for lab in enc.labels)
    n_expected = len(proc.tokenizer("red<|im_end|>2<|im_end|>", add_special_tokens=False)["input_ids"])
    assert n_targets == n_expected


def test_labels_follow_another_template(tokenizer):
    proc = make(tokenizer, template=LLAMA3_TEMPLATE)
    enc = proc.encode(CONV, n_images=1)
    text = proc.tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>user: ")
    assert target_pieces(proc, enc.input_ids, enc.labels) == [" red<|endoftext|>", "2<|endoftext|>"]


def test_system_prompt_override_is_masked(tokenizer):
    proc = make(tokenizer, system_prompt="")
    enc = proc.encode(CONV, n_images=1)
    text = proc.tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")
    assert target_pieces(proc, enc.input_ids, enc.labels) == ["red<|im_end|>", "2<|im_end|>"]


def test_each_image_expands_to_exactly_n_tokens_in_order(tokenizer):
    proc = make(tokenizer, n=5)
    conv = [{"from": "human", "value": "<image> left, <image> right. Same?"}, {"from": "gpt", "value": "no"}]
    enc = proc.encode(conv, n_images=2)
    ids = enc.input_ids
    pos = [i for i, t in enumerate(ids) if t == proc.image_token_id]
    assert len(pos) == 10
    # two contiguous spans of 5, separated by text
    assert pos[:5] == list(range(pos[0], pos[0] + 5)) and pos[5:] == list(range(pos[5], pos[5] + 5))
    assert pos[5] > pos[4] + 1
    assert all(enc.labels[p] == IGNORE for p in pos)


def test_wrong_image_count_is_an_error(tokenizer):
    proc = make(tokenizer)
    with pytest.raises(DataError, match="image tokens"):
        proc.encode(CONV, n_images=2, where="rec-7")


def test_truncation_cuts_only_trailing_text(tokenizer):
    proc = make(tokenizer, n=8)
    full = proc.encode(CONV, n_images=1)
    short = make(tokenizer, n=8, max_length=len(full.input_ids) - 3).encode(CONV, n_images=1)
    assert short.truncated and len(short.input_ids) == len(full.input_ids) - 3
    assert short.input_ids == full.input_ids[: len(short.input_ids)]
    assert sum(t == proc.image_token_id for t in short.input_ids) == 8


def test_truncation_never_cuts_an_image_apart(tokenizer):
    proc = make(tokenizer, n=8)
    full = proc.encode(CONV, n_images=1)
    last_image = max(i for i, t in enumerate(full.input_ids) if t == proc.image_token_id)
    with pytest.raises(DataError, match="image"):
        make(tokenizer, n=8, max_length=last_image).encode(CONV, n_images=1, where="rec-1")


def test_prompt_ends_with_assistant_header(tokenizer):
    proc = make(tokenizer)
    ids = proc.encode_prompt(CONV[:1])
    assert proc.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    # the prompt is exactly the training sequence up to the first answer
    enc = proc.encode(CONV, n_images=1)
    assert enc.input_ids[: len(ids)] == ids and enc.labels[len(ids)] != IGNORE


def test_stop_tokens_come_from_the_template(tokenizer):
    chatml = make(tokenizer)
    assert chatml.stop_token_ids == sorted({tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id})
    other = make(tokenizer, template=LLAMA3_TEMPLATE)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in other.stop_token_ids
