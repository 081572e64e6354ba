"""Turning dataset rows into training data: the pure logic, with no service, pool or event loop in it.

Everything here takes a Hugging Face tokenizer as an argument, so the same functions run in the service's
own process and in the worker processes of :mod:`twinkle.processor.workers`.

How a ``messages`` row becomes tokens and loss weights. The conversation is rendered once with the
tokenizer's chat template. For each trained assistant turn *i* the template is asked again for two prefixes:
``messages[:i]`` with the generation prompt (ends just before the reply) and ``messages[:i + 1]`` (ends
after the turn). Both must be prefixes of the full rendering; that check is what makes the spans exact
rather than guessed from string search. The trained span runs from the end of the generation prompt to the
end of the first end-of-turn token (the tokenizer's EOS) after the reply; whatever the template puts after
it (ChatML's ``"\\n"``) is not trained, because a sampler stops at EOS and never produces it.

The text is then cut at the span boundaries and each piece is tokenized on its own, so every token belongs
to exactly one piece and the mask cannot be off by one. Cutting can change a token only where BPE would
have merged across a turn boundary, and there the pieces match what the model sees at sampling time:
the prompt before a reply is exactly ``apply_chat_template(..., add_generation_prompt=True)``. Each piece
is tokenized once (one batched call per shard). Locating a reply renders the template over the turns before
it (that is what makes the span exact for any prefix-stable template), so a row costs O(messages x trained
turns) template work: ``EncodeOptions.max_messages`` and ``max_row_chars`` bound it before it starts.

``prompt``/``completion`` rows are raw text: the tokenizer's own leading special tokens (a BOS, where it
has one) + tokens(prompt) + tokens(completion) + EOS, with weight on the completion and the EOS. An EOS
already at the end of the completion is not doubled.

The training datum follows the Tinker convention: ``model_input = tokens[:-1]``, ``target_tokens =
tokens[1:]`` and ``weights[j]`` is the weight of ``target_tokens[j]``.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Sequence

import msgspec

from twinkle.common.wire import Datum, TensorData

from .protocol import ROLES, RowError, RowFormat, TrainOn

_ROLES = frozenset(ROLES)


class EncodeOptions(msgspec.Struct, frozen=True):
    """The per-request settings a worker needs (picklable, small). ``max_messages`` and ``max_row_chars``
    bound the work one row may cause before any of it is done: locating each trained reply renders the
    template over the turns before it, so a row costs O(messages x trained turns)."""

    format: RowFormat = "auto"
    max_length: int | None = None
    train_on: TrainOn = "all_assistant"
    max_messages: int = 256
    max_row_chars: int = 1_000_000


class RowSource(NamedTuple):
    """One row to encode: an item of ``rows``, or a JSONL line still as text (``line`` set), so that JSON
    parsing happens in the worker that encodes it, in parallel."""

    index: int
    line: int | None
    raw: Any

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else f"rows[{self.index}]"


class EncodedRow(NamedTuple):
    index: int
    datum: Datum
    trained_tokens: int
    truncated: bool


class InvalidRow(ValueError):
    """What is wrong with one row (or one chat): ``field`` is the path inside it, e.g. ``messages[2].role``."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


# --- choosing rows -------------------------------------------------------------------------------------


def select_rows(
    rows: Sequence[Any] | None, jsonl: str | None, offset: int, limit: int
) -> tuple[list[RowSource], int]:
    """The rows ``[offset, offset + limit)`` of a request, and how many rows it has in all.

    JSONL is split on ``"\\n"`` only: ``str.splitlines`` would also split on U+2028 and other separators
    that JSON allows, unescaped, inside strings. Blank lines are not rows but still count as lines.
    """
    if rows is not None:
        page = rows[offset : offset + limit]
        return [RowSource(offset + k, None, row) for k, row in enumerate(page)], len(rows)
    sources: list[RowSource] = []
    total = 0
    for line_no, text in _nonblank_lines(jsonl or ""):
        if offset <= total < offset + limit:
            sources.append(RowSource(total, line_no, text))
        total += 1
    return sources, total


def _nonblank_lines(text: str) -> Iterator[tuple[int, str]]:
    for k, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield k, line


# --- validation ----------------------------------------------------------------------------------------


def _parse(source: RowSource) -> dict:
    raw = source.raw
    if source.line is not None:  # a JSONL line; a string in ``rows`` is just a bad row
        try:
            raw = msgspec.json.decode(raw)
        except msgspec.DecodeError as e:
            raise InvalidRow(f"not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise InvalidRow(f"a row must be a JSON object, got {_type_name(raw)}")
    return raw


def detect_format(row: dict, fmt: RowFormat) -> str:
    """``"messages"`` or ``"prompt_completion"`` for one row; extra keys (ids, metadata) are ignored."""
    has_messages = "messages" in row
    has_pc = "prompt" in row or "completion" in row
    if fmt == "messages" or (fmt == "auto" and has_messages and not has_pc):
        if not has_messages:
            raise InvalidRow("missing (the request's format is 'messages')", "messages")
        return "messages"
    if fmt == "auto" and has_messages:
        raise InvalidRow("a row has both 'messages' and 'prompt'/'completion'; set the request's format")
    if fmt == "auto" and not has_pc:
        keys = ", ".join(repr(k) for k in sorted(row)[:10]) or "none"
        raise InvalidRow(f"expected a 'messages' list or 'prompt' and 'completion' strings; keys: {keys}")
    for key in ("prompt", "completion"):
        if key not in row:
            raise InvalidRow("missing", key)
    return "prompt_completion"


def validate_messages(messages: Any, field: str = "messages", *, max_messages: int = 256,
                      max_chars: int = 1_000_000) -> list[dict[str, str]]:
    """Check a conversation and return it as plain ``{"role", "content"}`` dicts (only those keys reach the
    template, so stray keys cannot change the rendering). Bounded: at most ``max_messages`` messages and
    ``max_chars`` characters of content."""
    if not isinstance(messages, list):
        raise InvalidRow(f"must be a list of messages, got {_type_name(messages)}", field)
    if not messages:
        raise InvalidRow("is empty", field)
    if len(messages) > max_messages:
        raise InvalidRow(f"has {len(messages)} messages; the limit is {max_messages} per row (processor setting "
                         "max_messages)", field)
    chars = 0
    out = []
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise InvalidRow(f"must be an object with 'role' and 'content', got {_type_name(m)}", where)
        if "role" not in m:
            raise InvalidRow("missing", f"{where}.role")
        role = m["role"]
        if not isinstance(role, str) or role not in _ROLES:
            raise InvalidRow(f"{role!r} is not one of {', '.join(ROLES)}", f"{where}.role")
        if "content" not in m:
            raise InvalidRow("missing", f"{where}.content")
        content = m["content"]
        if not isinstance(content, str):
            raise InvalidRow(f"must be a string, got {_type_name(content)}", f"{where}.content")
        if not content:
            raise InvalidRow("is empty", f"{where}.content")
        chars += len(content)
        if chars > max_chars:
            raise InvalidRow(f"the messages hold more than {max_chars} characters (processor setting "
                             "max_row_chars)", where)
        out.append({"role": role, "content": content})
    return out


def _validate_prompt_completion(row: dict) -> tuple[str, str]:
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str):
        raise InvalidRow(f"must be a string, got {_type_name(prompt)}", "prompt")
    if not isinstance(completion, str):
        raise InvalidRow(f"must be a string, got {_type_name(completion)}", "completion")
    if not completion:
        raise InvalidRow("is empty", "completion")
    return prompt, completion


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


# --- chat templates ------------------------------------------------------------------------------------


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``; template errors (``raise_exception``) become InvalidRow."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRow("the served model's tokenizer has no chat template; use prompt/completion rows")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds; the template's own message is the point
        raise InvalidRow(f"the chat template rejected this conversation: {e}") from None


def chat_segments(
    tokenizer: Any, messages: list[dict[str, str]], train_on: TrainOn
) -> list[tuple[str, bool]]:
    """Cut the rendered conversation into ``(text, trained)`` pieces whose concatenation is the rendering."""
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise InvalidRow("has no assistant message to train on", "messages")
    trained = assistant if train_on == "all_assistant" else assistant[-1:]
    full = render(tokenizer, messages, False)
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for i in trained:
        start, end = _assistant_span(tokenizer, messages, i, full)
        if start < pos:  # pragma: no cover - prefix-stable templates give increasing spans
            raise InvalidRow(_UNSTABLE, f"messages[{i}]")
        pieces.append((full[pos:start], False))
        pieces.append((full[start:end], True))
        pos = end
    pieces.append((full[pos:], False))
    return [p for p in pieces if p[0]]


_UNSTABLE = (
    "the chat template renders the earlier turns differently once later ones follow (it rewrites history), "
    "so the assistant reply cannot be located exactly"
)


def _assistant_span(tokenizer: Any, messages: list[dict[str, str]], i: int, full: str) -> tuple[int, int]:
    """Character span ``[start, end)`` of assistant turn ``i``'s trained text inside ``full``."""
    through = render(tokenizer, messages[: i + 1], False)
    if not full.startswith(through):
        raise InvalidRow(_UNSTABLE, f"messages[{i}]")
    content = messages[i]["content"]
    start = -1
    if i > 0:
        header = render(tokenizer, messages[:i], True)
        if through.startswith(header):
            start = len(header)
    if start < 0:
        # No generation prompt to anchor on (a conversation that opens with the assistant, or a template
        # whose generation prompt differs from its rendered turns): anchor on the reply itself.
        before = len(render(tokenizer, messages[:i], False)) if i > 0 else 0
        start = through.find(content, before)
        if start < 0:
            raise InvalidRow("the chat template changes the reply's text; cannot locate it", f"messages[{i}]")
    found = through.find(content, start)
    end = len(through)
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        k = through.find(eos, found + len(content) if found >= 0 else start)
        if k >= 0:
            end = k + len(eos)
    return start, end


# --- encoding ------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """A valid row before tokenization: pieces to tokenize, and fixed ids around them."""

    source: RowSource
    pieces: list[tuple[str, bool]]
    prefix_ids: list[int]
    append_eos: bool


def encode_rows(tokenizer: Any, sources: Sequence[RowSource], options: EncodeOptions) -> list[EncodedRow | RowError]:
    """Encode rows in order; a bad row gives a ``RowError`` in its place instead of stopping the others."""
    out: list[EncodedRow | RowError | _Plan] = []
    bos_prefix: list[int] | None = None
    for source in sources:
        try:
            row = _parse(source)
            if detect_format(row, options.format) == "messages":
                messages = validate_messages(row["messages"], max_messages=options.max_messages,
                                             max_chars=options.max_row_chars)
                out.append(_Plan(source, chat_segments(tokenizer, messages, options.train_on), [], False))
            else:
                prompt, completion = _validate_prompt_completion(row)
                if len(prompt) + len(completion) > options.max_row_chars:
                    raise InvalidRow(f"prompt and completion hold more than {options.max_row_chars} characters "
                                     "(processor setting max_row_chars)")
                if tokenizer.eos_token_id is None:
                    raise InvalidRow("the served model's tokenizer has no EOS token to end a completion")
                if bos_prefix is None:
                    bos_prefix = _leading_special_ids(tokenizer)
                out.append(_Plan(source, [(prompt, False), (completion, True)], bos_prefix, True))
        except InvalidRow as e:
            out.append(_row_error(source, str(e)))

    texts = [text for item in out if isinstance(item, _Plan) for text, _ in item.pieces]
    ids = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    result: list[EncodedRow | RowError] = []
    for item in out:
        if not isinstance(item, _Plan):
            result.append(item)
            continue
        tokens = list(item.prefix_ids)
        weights = [0.0] * len(tokens)
        for _, trained in item.pieces:
            piece = next(ids)
            tokens.extend(piece)
            weights.extend([1.0 if trained else 0.0] * len(piece))
        if item.append_eos and tokens[-1] != tokenizer.eos_token_id:
            tokens.append(tokenizer.eos_token_id)
            weights.append(1.0)
        try:
            result.append(_to_encoded(item.source.index, tokens, weights, options.max_length))
        except InvalidRow as e:
            result.append(_row_error(item.source, str(e)))
    return result


def _to_encoded(index: int, tokens: list[int], weights: list[float], max_length: int | None) -> EncodedRow:
    truncated = max_length is not None and len(tokens) > max_length
    if truncated:
        tokens, weights = tokens[:max_length], weights[:max_length]
    target_weights = weights[1:]
    trained = sum(1 for w in target_weights if w)
    if not trained:
        limit = f" within max_length={max_length}" if truncated else ""
        raise InvalidRow(f"no trained tokens{limit} (the untrained prefix is {_untrained_prefix(weights)} tokens)")
    datum = Datum(
        model_input=tokens[:-1],
        loss_fn_inputs={
            "target_tokens": TensorData(data=tokens[1:], dtype="int64"),
            "weights": TensorData(data=target_weights, dtype="float32"),
        },
    )
    return EncodedRow(index, datum, trained, truncated)


def _untrained_prefix(weights: list[float]) -> int:
    return next((k for k, w in enumerate(weights) if w), len(weights))


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids a tokenizer puts before text with ``add_special_tokens=True`` (a BOS, or nothing for Qwen).
    Found by comparison, so tokenizers that would also *append* an EOS cannot end the prompt with one."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(special) - len(plain) + 1):
        if special[k : k + len(plain)] == plain:
            return list(special[:k])
    return []


def _row_error(source: RowSource, message: str) -> RowError:
    return RowError(index=source.index, where=source.where, message=message, line=source.line)


# --- the small operations ------------------------------------------------------------------------------


def tokenize(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def detokenize(tokenizer: Any, tokens: list[list[int]], skip_special_tokens: bool) -> list[str]:
    """Ids the tokenizer does not know (a model's padded vocabulary) decode to nothing."""
    for i, seq in enumerate(tokens):
        for j, t in enumerate(seq):
            if t < 0 or t >= 2**31:
                raise InvalidRow(f"{t} is not a token id", f"tokens[{i}][{j}]")
    return [tokenizer.decode(seq, skip_special_tokens=skip_special_tokens) for seq in tokens]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> tuple[str, list[int]]:
    text = render(tokenizer, messages, add_generation_prompt)
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])
