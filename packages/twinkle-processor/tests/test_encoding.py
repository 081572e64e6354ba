"""The pure encoding logic on the tiny model's real tokenizer (ChatML template, EOS ``<|im_end|>``)."""

from __future__ import annotations

import random

import pytest

from twinkle.processor.encoding import (
    EncodedRow,
    EncodeOptions,
    InvalidRow,
    RowSource,
    detokenize,
    encode_rows,
    render,
    render_chat,
    select_rows,
    tokenize,
    validate_messages,
)
from twinkle.processor.protocol import RowError

EOS = "<|im_end|>"


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _encode_one(tok, row, **options) -> EncodedRow | RowError:
    """A string is line 1 of a JSONL text; anything else is ``rows[0]``."""
    source = RowSource(0, 1 if isinstance(row, str) else None, row)
    [result] = encode_rows(tok, [source], EncodeOptions(**options))
    return result


def _full(enc: EncodedRow) -> tuple[list[int], list[float]]:
    """Undo the shift: the whole token sequence, and the weight of each token (the first has none)."""
    d = enc.datum
    targets = d.loss_fn_inputs["target_tokens"].data
    return d.model_input + targets[-1:], [0.0] + d.loss_fn_inputs["weights"].data


def _weighted_runs(tokens, weights) -> list[list[int]]:
    runs, current = [], []
    for t, w in zip(tokens, weights):
        if w:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello world"},
    {"role": "user", "content": "and now?"},
    {"role": "assistant", "content": "good day"},
]


def test_messages_hand_checked(tokenizer):
    tok = tokenizer
    start, end, nl = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids(EOS), _ids(tok, "\n")
    assert (start, end) == (1, 2) and tok.eos_token_id == end

    expected, weights = [], []
    for m in CONVERSATION:
        header = [start] + _ids(tok, m["role"]) + nl
        body = _ids(tok, m["content"]) + [end]
        trained = 1.0 if m["role"] == "assistant" else 0.0
        expected += header + body + nl
        weights += [0.0] * len(header) + [trained] * len(body) + [0.0] * len(nl)

    enc = _encode_one(tok, {"messages": CONVERSATION, "id": "ignored"})
    assert isinstance(enc, EncodedRow)
    d = enc.datum
    # The Tinker convention: input = tokens[:-1], targets = tokens[1:], weights shifted with the targets.
    assert d.model_input == expected[:-1]
    assert d.loss_fn_inputs["target_tokens"].data == expected[1:]
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert d.loss_fn_inputs["weights"].data == weights[1:]
    assert d.loss_fn_inputs["weights"].dtype == "float32"
    assert enc.trained_tokens == sum(weights) and not enc.truncated
    # Same tokens as the template applied in one go (ChatML's turn boundaries are special tokens).
    assert expected == list(tok.apply_chat_template(CONVERSATION, tokenize=True)["input_ids"])
    assert [tok.decode(r) for r in _weighted_runs(expected, weights)] == ["hello world" + EOS, "good day" + EOS]


def test_last_assistant_only(tokenizer):
    enc = _encode_one(tokenizer, {"messages": CONVERSATION}, train_on="last_assistant")
    tokens, weights = _full(enc)
    assert [tokenizer.decode(r) for r in _weighted_runs(tokens, weights)] == ["good day" + EOS]


def test_prompt_completion_hand_checked(tokenizer):
    tok = tokenizer
    enc = _encode_one(tok, {"prompt": "The sun is", "completion": " hot today."})
    prompt, completion = _ids(tok, "The sun is"), _ids(tok, " hot today.")
    expected = prompt + completion + [tok.eos_token_id]  # Qwen adds no BOS
    weights = [0.0] * len(prompt) + [1.0] * (len(completion) + 1)
    tokens, got_weights = _full(enc)
    assert tokens == expected and got_weights == weights
    assert enc.datum.loss_fn_inputs["weights"].data == weights[1:]


def test_completion_ending_with_eos_is_not_doubled(tokenizer):
    enc = _encode_one(tokenizer, {"prompt": "a", "completion": "b" + EOS})
    tokens, weights = _full(enc)
    assert tokens[-1] == tokenizer.eos_token_id and tokens[-2] != tokenizer.eos_token_id
    assert weights[-1] == 1.0


def test_truncation(tokenizer):
    row = {"prompt": "one two three", "completion": " four five six seven eight"}
    full = _encode_one(tokenizer, row)
    n = len(full.datum.model_input) + 1
    cut = _encode_one(tokenizer, row, max_length=n - 2)
    assert cut.truncated and len(cut.datum.model_input) == n - 3
    assert cut.datum.model_input == full.datum.model_input[: n - 3]
    assert cut.trained_tokens == full.trained_tokens - 2
    assert not _encode_one(tokenizer, row, max_length=n).truncated

    prompt_len = len(_ids(tokenizer, "one two three"))
    err = _encode_one(tokenizer, row, max_length=prompt_len)
    assert isinstance(err, RowError) and f"no trained tokens within max_length={prompt_len}" in err.message


@pytest.mark.parametrize(
    "row, fmt, message",
    [
        ("{not json", "auto", "not valid JSON"),
        ("[1, 2]", "auto", "a row must be a JSON object, got a list"),
        ({"text": "x"}, "auto", "expected a 'messages' list or 'prompt' and 'completion' strings; keys: 'text'"),
        ({"prompt": "x"}, "auto", "completion: missing"),
        ({"prompt": "x", "completion": "y", "messages": []}, "auto", "has both"),
        ({"prompt": "x", "completion": "y"}, "messages", "messages: missing"),
        ({"messages": [{"role": "user", "content": "x"}]}, "prompt_completion", "prompt: missing"),
        ({"messages": "hi"}, "auto", "messages: must be a list of messages, got a string"),
        ({"messages": []}, "auto", "messages: is empty"),
        ({"messages": ["hi"]}, "auto", "messages[0]: must be an object"),
        ({"messages": [{"content": "x"}]}, "auto", "messages[0].role: missing"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "auto", "messages[0].role: 'robot' is not one of"),
        ({"messages": [{"role": "user"}]}, "auto", "messages[0].content: missing"),
        ({"messages": [{"role": "user", "content": ""}]}, "auto", "messages[0].content: is empty"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"text": "a"}]}]},
            "auto",
            "messages[1].content: must be a string, got a list",
        ),
        ({"messages": [{"role": "user", "content": "q"}]}, "auto", "messages: has no assistant message"),
        ({"prompt": None, "completion": "y"}, "auto", "prompt: must be a string, got null"),
        ({"prompt": "x", "completion": ""}, "auto", "completion: is empty"),
    ],
)
def test_row_validation(tokenizer, row, fmt, message):
    err = _encode_one(tokenizer, row, format=fmt)
    assert isinstance(err, RowError), err
    assert message in err.message
    assert err.index == 0
    assert (err.where, err.line) == (("line 1", 1) if isinstance(row, str) else ("rows[0]", None))


def test_bad_rows_do_not_disturb_good_ones(tokenizer):
    sources = [RowSource(k, k + 1, raw) for k, raw in enumerate(
        ['{"prompt": "a", "completion": "b"}', "{oops", '{"prompt": "c", "completion": "d"}']
    )]
    out = encode_rows(tokenizer, sources, EncodeOptions())
    assert [type(r).__name__ for r in out] == ["EncodedRow", "RowError", "EncodedRow"]
    assert out[1].where == "line 2" and out[1].line == 2
    assert [r.index for r in out] == [0, 1, 2]


_WORDS = ["the", "sun", "is", "hot", " spaced", "\nnewline", "tabs\t", "数字", "émigré", "42", "x=1;", "  ", "!?"]


def _random_text(rng: random.Random) -> str:
    text = "".join(rng.choice(_WORDS) + rng.choice(["", " ", "\n", "  "]) for _ in range(rng.randint(1, 8)))
    return text if text else "x"


def _random_conversation(rng: random.Random) -> list[dict[str, str]]:
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": _random_text(rng)})
    for _ in range(rng.randint(1, 4)):
        messages.append({"role": "user", "content": _random_text(rng)})
        if rng.random() < 0.2:
            messages.append({"role": "tool", "content": _random_text(rng)})
        messages.append({"role": "assistant", "content": _random_text(rng)})
    if rng.random() < 0.2:
        messages.append({"role": "user", "content": _random_text(rng)})  # trailing, untrained
    return messages


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_mask_alignment_property(tokenizer, train_on):
    """For many random conversations: every weighted run decodes to exactly one trained reply + EOS, the
    tokens decode to the template's rendering, and the tokens before each reply are exactly the generation
    prompt a sampler would be given."""
    rng = random.Random(7 if train_on == "all_assistant" else 8)
    conversations = [_random_conversation(rng) for _ in range(150)]
    sources = [RowSource(k, None, {"messages": c}) for k, c in enumerate(conversations)]
    results = encode_rows(tokenizer, sources, EncodeOptions(train_on=train_on))
    for messages, enc in zip(conversations, results):
        assert isinstance(enc, EncodedRow), enc
        tokens, weights = _full(enc)
        replies = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
        trained = replies if train_on == "all_assistant" else replies[-1:]
        runs = _weighted_runs(tokens, weights)
        assert [tokenizer.decode(r) for r in runs] == [messages[k]["content"] + EOS for k in trained]
        assert tokenizer.decode(tokens) == render(tokenizer, messages, False)
        for n, k in enumerate(trained):
            prompt = _ids(tokenizer, render(tokenizer, messages[:k], True))
            assert tokens[: len(prompt)] == prompt
            assert weights[len(prompt)] == 1.0  # the reply's first token is trained...
            assert len(_weighted_runs(prompt, weights[: len(prompt)])) == n  # ...after the n earlier replies


def test_conversation_opening_with_assistant(tokenizer):
    messages = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "thanks"}]
    tokens, weights = _full(_encode_one(tokenizer, {"messages": messages}))
    assert [tokenizer.decode(r) for r in _weighted_runs(tokens, weights)] == ["Welcome!" + EOS]


def test_template_that_rewrites_history_is_reported(tokenizer):
    original = tokenizer.chat_template
    # Earlier assistant turns are replaced once a later message follows: no prefix of the conversation is
    # a prefix of its rendering, so spans cannot be exact.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[elided]{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        err = _encode_one(tokenizer, {"messages": CONVERSATION})
    finally:
        tokenizer.chat_template = original
    assert isinstance(err, RowError) and err.message.startswith("messages[2]: the chat template renders")


def test_select_rows_jsonl_lines_and_pages():
    jsonl = '{"a": 1}\r\n\n{"b": "x\u2028y"}\n   \n{"c": 3}\n'
    sources, total = select_rows(None, jsonl, 0, 10)
    assert total == 3
    assert [(s.index, s.line) for s in sources] == [(0, 1), (1, 3), (2, 5)]
    assert sources[1].raw == '{"b": "x\u2028y"}'  # not split at U+2028
    page, total = select_rows(None, jsonl, 1, 1)
    assert [(s.index, s.line, s.where) for s in page] == [(1, 3, "line 3")] and total == 3
    rows = [{"k": k} for k in range(5)]
    page, total = select_rows(rows, None, 3, 10)
    assert [(s.index, s.where) for s in page] == [(3, "rows[3]"), (4, "rows[4]")] and total == 5


def test_small_operations(tokenizer):
    texts = ["hello world", "数字 émigré\n", "<|im_start|>user"]
    ids = tokenize(tokenizer, texts, True)
    assert ids[2][0] == 1  # special tokens in text are parsed
    assert detokenize(tokenizer, ids, False) == texts
    assert detokenize(tokenizer, [[1, 5]], True) == [tokenizer.decode([5])]
    with pytest.raises(InvalidRow) as e:
        detokenize(tokenizer, [[1], [2, -3]], False)
    assert e.value.field == "tokens[1][1]"
    text, tokens = render_chat(tokenizer, validate_messages(CONVERSATION[:2]), True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokens == list(tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True)["input_ids"])


def _chat(turns: int) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(turns)]


def test_row_size_is_bounded_before_any_template_work(tokenizer, monkeypatch):
    calls = []
    real = type(tokenizer).apply_chat_template
    monkeypatch.setattr(type(tokenizer), "apply_chat_template",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    err = _encode_one(tokenizer, {"messages": _chat(6000)})
    assert isinstance(err, RowError) and "6000 messages" in err.message and "max_messages" in err.message
    assert err.message.startswith("messages") and not calls  # refused before rendering anything
    err = _encode_one(tokenizer, {"messages": _chat(4)}, max_row_chars=10)
    assert isinstance(err, RowError) and "max_row_chars" in err.message
    err = _encode_one(tokenizer, {"prompt": "x" * 20, "completion": "y"}, max_row_chars=10)
    assert isinstance(err, RowError) and "max_row_chars" in err.message


def test_a_row_at_the_limit_costs_two_renders_per_trained_turn(tokenizer, monkeypatch):
    calls = []
    real = type(tokenizer).apply_chat_template
    monkeypatch.setattr(type(tokenizer), "apply_chat_template",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    enc = _encode_one(tokenizer, {"messages": _chat(256)})
    assert isinstance(enc, EncodedRow) and enc.trained_tokens > 0
    assert len(calls) == 1 + 2 * 128  # the whole conversation once, two prefixes per assistant turn
