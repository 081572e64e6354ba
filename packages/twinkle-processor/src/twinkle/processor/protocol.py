"""Typed requests and responses of the Processor service.

Upstream Twinkle's processor exposed a generic ``create``/``call`` RPC that constructed arbitrary classes
from seven modules and called any decorated method with caller-chosen kwargs. This API is the opposite:
four operations (tokenize, detokenize, render a chat, encode a dataset), each a small msgspec struct with
the fields it needs and nothing else, so the same structs serve the HTTP routes (JSON) and Serve-handle
calls (pickled) and can be validated completely.

Row numbering, used by ``EncodeRequest.offset``/``limit`` and by every ``RowError``:

- ``index`` is the 0-based position of a row among the request's rows. With ``rows`` that is the list
  index; with ``jsonl`` it counts the non-blank lines (blank lines, such as a trailing newline, are not
  rows);
- ``line`` is the 1-based line number in ``jsonl`` (what an editor shows), None for ``rows``;
- ``where`` is the human form, ``"line 3"`` or ``"rows[2]"``: the ``field`` of the ``UserError`` a bad row
  raises in ``on_error="fail"`` mode.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from twinkle.common.wire import Datum, UserError

RowFormat = Literal["auto", "messages", "prompt_completion"]
TrainOn = Literal["all_assistant", "last_assistant"]
OnError = Literal["fail", "skip"]

#: Roles a ``messages`` row may use. Anything else is almost always a typo ("asistant", "bot") that a
#: permissive ChatML template would silently render as a new role.
ROLES = ("system", "user", "assistant", "tool")


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class TokenizeRequest(msgspec.Struct, frozen=True):
    """``add_special_tokens`` as in Hugging Face's ``encode`` (a BOS for tokenizers that use one)."""

    texts: list[str]
    add_special_tokens: bool = True


class TokenizeResponse(msgspec.Struct):
    tokens: list[list[int]]


class DetokenizeRequest(msgspec.Struct, frozen=True):
    tokens: list[list[int]]
    skip_special_tokens: bool = False


class DetokenizeResponse(msgspec.Struct):
    texts: list[str]


class RenderChatRequest(msgspec.Struct, frozen=True):
    """Render ``messages`` with the served model's chat template; ``add_generation_prompt`` appends the
    assistant header, which is the prompt to sample a reply from."""

    messages: list[ChatMessage]
    add_generation_prompt: bool = False


class RenderChatResponse(msgspec.Struct):
    text: str
    tokens: list[int]


class EncodeRequest(msgspec.Struct, frozen=True):
    """Encode dataset rows into training data (one ``Datum`` per row).

    Give exactly one of ``rows`` (a list of JSON objects) or ``jsonl`` (the text of a JSONL file). A row is
    ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt": str, "completion": str}``; other keys are
    ignored. ``format="auto"`` decides per row. ``max_length`` caps each row's token sequence (before the
    shift into input/target); longer rows are truncated and counted. ``train_on`` picks which assistant
    turns carry loss. Only rows ``[offset, offset + limit)`` are encoded; the service caps ``limit`` at its
    ``max_rows_per_request`` and says where to continue in ``EncodeResponse.next_offset``.
    """

    # ``list[Any]``, not ``list[dict]``: a row that is not an object is reported like any other bad row
    # (with its index, and skippable), instead of failing the whole body's decoding.
    rows: list[Any] | None = None
    jsonl: str | None = None
    format: RowFormat = "auto"
    max_length: int | None = None
    train_on: TrainOn = "all_assistant"
    on_error: OnError = "fail"
    offset: int = 0
    limit: int | None = None


class RowError(msgspec.Struct, frozen=True):
    """A row that could not be encoded. See the module docstring for ``index``/``line``/``where``."""

    index: int
    where: str
    message: str
    line: int | None = None


class EncodeStats(msgspec.Struct):
    """Counts for the encoded page: ``rows`` encoded, ``skipped`` (bad rows, skip mode), ``tokens`` (sum of
    ``model_input`` lengths), ``trained_tokens`` (targets with weight > 0), ``truncated`` rows."""

    rows: int = 0
    skipped: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0


class EncodeResponse(msgspec.Struct):
    """``data[k]`` came from row ``indices[k]``; in skip mode the bad rows are missing from ``data`` and
    listed in ``errors``. ``next_offset`` is None when no rows remain after this page."""

    data: list[Datum]
    indices: list[int]
    errors: list[RowError]
    stats: EncodeStats
    offset: int
    total_rows: int
    next_offset: int | None = None


class RowsError(UserError):
    """Some rows of an ``on_error="fail"`` request are malformed; ``errors`` lists them (the first few also
    appear in the message, and ``field`` names the first, e.g. ``line 17`` or ``rows[16]``)."""

    def __init__(self, errors: list[RowError], *, shown: int = 5) -> None:
        first = errors[:shown]
        detail = "; ".join(f"{e.where}: {e.message}" for e in first)
        more = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
        noun = "row" if len(errors) == 1 else "rows"
        super().__init__(f"{len(errors)} malformed {noun}: {detail}{more}", status=400)
        # UserError prefixes the message with ``field``; keep the list readable and still name the first row.
        self.field = first[0].where
        self.errors = errors
        self._shown = shown

    def __reduce__(self):
        # Ray pickles exceptions raised in a replica; the default ``cls(*args)`` would pass the message string.
        return (_rows_error, (self.errors, self._shown))


def _rows_error(errors: list[RowError], shown: int) -> RowsError:
    return RowsError(errors, shown=shown)
