"""Model ids and the built-in offline tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from twinkle.common.models import (
    TINY_MODEL_ID,
    ModelResolutionError,
    build_tiny_model,
    load_tokenizer,
    resolve_model_path,
    served_model_name,
)

TEXT = "Hello world, the model trains 12345 tokens. Café naïve\n<|im_start|>user\nhi<|im_end|>\n"


def test_served_names():
    assert served_model_name("ms://Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    assert served_model_name("hf://Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert served_model_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert served_model_name(TINY_MODEL_ID) == "tiny-qwen2"
    assert served_model_name("/data/models/my-model/") == "my-model"


def test_bad_ids_are_clear_errors(tmp_path):
    with pytest.raises(ModelResolutionError, match="unknown built-in model"):
        resolve_model_path("builtin://huge-model")
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelResolutionError, match="non-empty"):
        resolve_model_path("")


def test_local_path_resolves_to_itself(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_tiny_model_is_a_real_qwen2_with_chatml():
    path = build_tiny_model()
    assert build_tiny_model() == path  # built once, then reused
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["model_type"] == "qwen2"
    tok = load_tokenizer(TINY_MODEL_ID)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_token == "<|im_end|>"
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_tokenizer_ids_survive_a_save_and_load(tmp_path):
    """transformers 5 rebuilds a qwen2 tokenizer's pre-tokenizer on load; the ids must not change."""
    from tokenizers import Tokenizer

    tok = load_tokenizer(TINY_MODEL_ID)
    ids = tok.encode(TEXT)
    raw = Tokenizer.from_file(os.path.join(resolve_model_path(TINY_MODEL_ID), "tokenizer.json"))
    assert raw.encode(TEXT).ids == ids
    tok.save_pretrained(tmp_path)
    assert load_tokenizer(str(tmp_path)).encode(TEXT) == ids


def test_a_fresh_build_is_deterministic(tmp_path):
    """Two machines building the tiny model get the same weights and tokenizer (same fingerprint)."""
    env = {**os.environ, "TWINKLE_CACHE_DIR": str(tmp_path)}
    code = ("from twinkle.common.models import build_tiny_model; import hashlib, os; p = build_tiny_model(); "
            "print(hashlib.sha256(open(os.path.join(p, 'model.safetensors'), 'rb').read()).hexdigest(), "
            "hashlib.sha256(open(os.path.join(p, 'tokenizer.json'), 'rb').read()).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    cached = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert fresh.split() == cached.split()


def test_loading_the_tokenizer_does_not_import_torch():
    code = ("import sys; from twinkle.common.models import load_tokenizer, TINY_MODEL_ID; "
            "load_tokenizer(TINY_MODEL_ID); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
