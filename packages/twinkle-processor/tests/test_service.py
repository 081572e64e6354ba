"""ProcessorService's async API on the tiny model, one in-process worker (``max_rows_per_request=50``)."""

from __future__ import annotations

import json
import os
import pickle

import msgspec
import pytest

from twinkle.common.wire import ServiceHealth, ServiceInfo, UserError
from twinkle.processor.protocol import (
    ChatMessage,
    DetokenizeRequest,
    EncodeRequest,
    RenderChatRequest,
    RowError,
    RowsError,
    TokenizeRequest,
)


def _pc(k: int) -> dict:
    return {"prompt": f"question {k}:", "completion": f" answer {k}."}


def _jsonl(rows: list) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


async def test_tokenize_detokenize_round_trip(service):
    texts = ["hello world", "", "数字 émigré\n\n  tabs\t", "<|im_start|>assistant\nhi<|im_end|>"]
    tokens = (await service.tokenize(TokenizeRequest(texts=texts))).tokens
    assert tokens[1] == [] and tokens[3][0] == 1
    assert (await service.detokenize(DetokenizeRequest(tokens=tokens))).texts == texts
    stripped = (await service.detokenize(DetokenizeRequest(tokens=tokens[3:], skip_special_tokens=True))).texts
    assert stripped == ["assistant\nhi"]


async def test_small_calls_are_bounded_and_checked(service):
    with pytest.raises(UserError) as e:
        await service.tokenize(TokenizeRequest(texts=["x"] * 51))
    assert e.value.field == "texts" and e.value.status == 400
    with pytest.raises(UserError) as e:
        await service.detokenize(DetokenizeRequest(tokens=[[5, -1]]))
    assert e.value.field == "tokens[0][1]"


async def test_render_chat(service, tokenizer):
    messages = [ChatMessage("user", "hi there"), ChatMessage("assistant", "hello"), ChatMessage("user", "more")]
    out = await service.render_chat(RenderChatRequest(messages=messages, add_generation_prompt=True))
    assert out.text == (
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
    )
    assert out.tokens == tokenizer(out.text, add_special_tokens=False)["input_ids"]
    with pytest.raises(UserError) as e:
        await service.render_chat(RenderChatRequest(messages=[ChatMessage("asistant", "x")]))
    assert e.value.field == "messages[0].role" and "'asistant' is not one of" in str(e.value)
    with pytest.raises(UserError) as e:
        await service.render_chat(RenderChatRequest(messages=[]))
    assert e.value.field == "messages"


async def test_encode_messages_and_prompt_completion(service):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        _pc(1),
    ]
    out = await service.encode(EncodeRequest(rows=rows))
    assert out.indices == [0, 1] and out.errors == [] and out.next_offset is None and out.total_rows == 2
    assert out.stats.rows == 2 and out.stats.tokens == sum(len(d.model_input) for d in out.data)
    assert out.stats.trained_tokens == sum(sum(d.loss_fn_inputs["weights"].data) for d in out.data)
    for d in out.data:
        assert len(d.model_input) == len(d.loss_fn_inputs["target_tokens"].data) == len(d.loss_fn_inputs["weights"].data)


async def test_jsonl_malformed_line_3_fails_naming_line_3(service):
    lines = [_pc(0), "", '{"prompt": "x", "completion": ', _pc(1)]  # line 2 is blank, line 3 is broken
    with pytest.raises(RowsError) as e:
        await service.encode(EncodeRequest(jsonl=_jsonl(lines)))
    err = e.value
    assert isinstance(err, UserError) and err.status == 400
    assert err.field == "line 3"
    assert str(err).startswith("1 malformed row: line 3: not valid JSON")
    assert err.errors == [RowError(index=1, where="line 3", message=err.errors[0].message, line=3)]
    # Ray pickles exceptions raised in a replica; the rows must survive.
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == err.errors and again.field == "line 3" and str(again) == str(err)


async def test_fail_mode_names_the_first_rows(service):
    rows = [_pc(0)] + [{"prompt": k} for k in range(8)]
    with pytest.raises(RowsError) as e:
        await service.encode(EncodeRequest(rows=rows))
    assert e.value.field == "rows[1]" and len(e.value.errors) == 8
    assert "8 malformed rows: rows[1]: completion: missing;" in str(e.value) and "(and 3 more)" in str(e.value)


async def test_skip_mode_reports_and_skips(service):
    lines = [_pc(0), "not json", {"messages": [{"role": "user", "content": 3}]}, _pc(3), {"text": "x"}]
    out = await service.encode(EncodeRequest(jsonl=_jsonl(lines), on_error="skip"))
    assert out.indices == [0, 3] and len(out.data) == 2
    assert [(e.index, e.line, e.where) for e in out.errors] == [(1, 2, "line 2"), (2, 3, "line 3"), (4, 5, "line 5")]
    assert out.errors[1].message == "messages[0].content: must be a string, got a number"
    assert out.stats.rows == 2 and out.stats.skipped == 3
    # The same with decoded JSON rows: a row that is not an object is just another bad row.
    body = msgspec.json.encode({"rows": [_pc(0), "oops", [1]], "on_error": "skip"})
    out = await service.encode(msgspec.json.decode(body, type=EncodeRequest))
    assert out.indices == [0] and [(e.where, e.message) for e in out.errors] == [
        ("rows[1]", "a row must be a JSON object, got a string"),
        ("rows[2]", "a row must be a JSON object, got a list"),
    ]


@pytest.mark.parametrize("source", ["rows", "jsonl"])
async def test_paging_returns_every_row_once(service, source):
    rows = [_pc(k) for k in range(23)]
    payload = {"rows": rows} if source == "rows" else {"jsonl": _jsonl(rows).replace("\n", "\n\n", 5)}
    whole = await service.encode(EncodeRequest(**payload))
    seen, pages, offset = [], 0, 0
    while offset is not None:
        page = await service.encode(EncodeRequest(**payload, offset=offset, limit=5))
        assert page.offset == offset and page.total_rows == 23
        seen += list(zip(page.indices, page.data))
        offset, pages = page.next_offset, pages + 1
    assert pages == 5
    assert [k for k, _ in seen] == list(range(23))
    assert [d for _, d in seen] == whole.data


async def test_page_size_is_capped_by_the_service(service):
    rows = [_pc(k) for k in range(120)]
    first = await service.encode(EncodeRequest(rows=rows, limit=1000))
    assert len(first.data) == 50 and first.next_offset == 50
    pages, request = [], EncodeRequest(rows=rows, offset=10)
    while request is not None:  # the client's walk over the pages
        pages.append(await service.encode(request))
        nxt = pages[-1].next_offset
        request = None if nxt is None else EncodeRequest(rows=rows, offset=nxt)
    assert [(p.offset, p.next_offset, len(p.data)) for p in pages] == [(10, 60, 50), (60, 110, 50), (110, None, 10)]
    end = await service.encode(EncodeRequest(rows=rows, offset=120))
    assert end.data == [] and end.next_offset is None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({}, "rows"),
        ({"rows": [], "jsonl": ""}, "rows"),
        ({"rows": [_pc(0)], "offset": -1}, "offset"),
        ({"rows": [_pc(0)], "offset": 2}, "offset"),
        ({"rows": [_pc(0)], "limit": 0}, "limit"),
        ({"rows": [_pc(0)], "max_length": 1}, "max_length"),
    ],
)
async def test_bad_encode_requests(service, kwargs, field):
    with pytest.raises(UserError) as e:
        await service.encode(EncodeRequest(**kwargs))
    assert e.value.field == field and e.value.status == 400


async def test_truncation_is_counted(service):
    long = {"prompt": "a b c", "completion": " d e f g h i j k l m n o p"}
    out = await service.encode(EncodeRequest(rows=[long, {"prompt": "a", "completion": " b"}], max_length=8))
    assert out.stats.truncated == 1 and len(out.data[0].model_input) == 7


async def test_wire_round_trip(service):
    """The structs are the HTTP bodies: a JSON request decodes into its struct, a response encodes."""
    body = json.dumps({"jsonl": _jsonl([_pc(0)]), "format": "prompt_completion", "train_on": "last_assistant"})
    request = msgspec.json.decode(body, type=EncodeRequest)
    out = await service.encode(request)
    wire = json.loads(msgspec.json.encode(out))
    assert wire == msgspec.to_builtins(out)
    datum = wire["data"][0]
    assert datum["loss_fn_inputs"]["target_tokens"]["dtype"] == "int64"
    assert datum["loss_fn_inputs"]["target_tokens"]["data"] == datum["model_input"][1:] + [2]
    with pytest.raises(msgspec.ValidationError, match=r"\$.on_error"):
        msgspec.json.decode(b'{"rows": [], "on_error": "ignore"}', type=EncodeRequest)


async def test_info_and_health(service):
    info = await service.info()
    assert isinstance(info, ServiceInfo) and (info.kind, info.backend) == ("processor", None)
    assert (info.model_name, info.eos_token, info.eos_token_id, info.vocab_size) == ("tiny-qwen2", "<|im_end|>", 2, 2168)
    assert info.has_chat_template and info.dp_size == 1 and info.max_rows_per_request == 50
    assert info.max_context_length == 2048 and info.roles == ["system", "user", "assistant", "tool"]
    assert [w.pid for w in info.workers] == [os.getpid()]  # one worker: encoding runs in this process
    health = await service.health()
    assert isinstance(health, ServiceHealth)
    assert (health.kind, health.status, health.workers, health.workers_alive) == ("processor", "ok", 1, 1)


def test_health_and_info_routes_answer_the_typed_structs(service):
    from litestar.testing import TestClient
    from twinkle.processor.app import create_processor_app

    with TestClient(create_processor_app(service)) as client:
        health = client.get("/healthz")
        info = client.get("/info")
    assert health.status_code == info.status_code == 200
    assert msgspec.convert(health.json(), ServiceHealth).kind == "processor"
    got = msgspec.convert(info.json(), ServiceInfo)
    assert (got.kind, got.model_name, got.vocab_size) == ("processor", "tiny-qwen2", 2168)
