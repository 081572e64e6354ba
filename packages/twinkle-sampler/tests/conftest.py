"""Shared fixtures: the real built-in tiny Qwen2 model, real peft adapters, and an independent reference.

The reference never goes through the sampler: it is stock transformers/peft (``model.generate`` and plain
teacher-forced forward passes), so a sampler bug cannot hide in both sides of a comparison.
"""

from __future__ import annotations

import os

os.environ.setdefault("TWINKLE_CACHE_DIR", "/tmp/twinkle-cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from twinkle.common.models import TINY_MODEL_ID, load_causal_lm, load_tokenizer  # noqa: E402

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
EOS_BIAS = 8.0  # with the tiny model's near-flat logits this makes EOS the argmax, with p ~ 0.6


def _make_adapter(path: str, seed: int, *, rank: int = 8, std: float = 0.05, eos_bias: float | None = None) -> str:
    """Save a stock-peft LoRA adapter with random, non-zero ``lora_B`` (so adapters really differ)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_causal_lm(TINY_MODEL_ID)
    if eos_bias is None:
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_TARGETS)
    else:  # an lm_head-only adapter whose bias pushes EOS to the top: the model then *wants* to stop
        cfg = LoraConfig(r=4, lora_alpha=4, target_modules=["lm_head"], lora_bias=True)
    pm = get_peft_model(model, cfg)
    eos = load_tokenizer(TINY_MODEL_ID).eos_token_id
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name and name.endswith("weight"):
                torch.nn.init.normal_(p, std=std)
            if "lora_B" in name and name.endswith("bias"):
                p.zero_()
                p[eos] = eos_bias
    pm.save_pretrained(path)
    return path


class Reference:
    """Stock transformers/peft answers for a prompt under the base model or one adapter."""

    def __init__(self) -> None:
        self.base = load_causal_lm(TINY_MODEL_ID).eval()
        self._models: dict[tuple, torch.nn.Module] = {}

    def model(self, adapter: str | None):
        if adapter is None:
            return self.base
        key = (adapter, _version(adapter))
        if key not in self._models:
            from peft import PeftModel

            self._models[key] = PeftModel.from_pretrained(load_causal_lm(TINY_MODEL_ID), adapter).eval()
        return self._models[key]

    @torch.no_grad()
    def logits(self, adapter: str | None, ids: list[int]) -> torch.Tensor:
        return self.model(adapter)(input_ids=torch.tensor([ids])).logits[0].float()

    def teacher_forced(self, adapter: str | None, prompt: list[int], tokens: list[int]) -> list[float]:
        """log p(tokens[k] | prompt + tokens[:k]) from one forward pass over prompt + tokens."""
        lp = torch.log_softmax(self.logits(adapter, list(prompt) + list(tokens)), dim=-1)
        n = len(prompt)
        return [lp[n - 1 + k, t].item() for k, t in enumerate(tokens)]

    def prompt_logprobs(self, adapter: str | None, prompt: list[int]) -> list[float | None]:
        lp = torch.log_softmax(self.logits(adapter, prompt), dim=-1)
        return [None] + [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]

    @torch.no_grad()
    def greedy(self, adapter: str | None, prompt: list[int], max_new_tokens: int) -> list[int]:
        out = self.model(adapter).generate(
            input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens,
        )
        return out[0, len(prompt):].tolist()


def _version(path: str) -> str:
    """The reference's own notion of an adapter version: the bytes of its files (independent of the sampler)."""
    import hashlib

    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        with open(os.path.join(path, name), "rb") as f:
            h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="session")
def make_adapter():
    """``make_adapter(path, seed, rank=8, std=0.05, eos_bias=None) -> path`` (test modules cannot import
    conftest under --import-mode=importlib)."""
    return _make_adapter


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TINY_MODEL_ID)


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def adapters(adapter_dir) -> list[str]:
    """Six distinct LoRA adapters on every linear layer and lm_head."""
    return [_make_adapter(os.path.join(adapter_dir, f"user{i}"), seed=100 + i) for i in range(6)]


@pytest.fixture(scope="session")
def eos_adapter(adapter_dir) -> str:
    return _make_adapter(os.path.join(adapter_dir, "eos-lover"), seed=7, eos_bias=EOS_BIAS)


@pytest.fixture(scope="session")
def engine():
    """One torch engine for the suite (it is event-loop independent: a thread drains its queue).

    The gather window is 50 ms rather than the default 5 ms so that tests asserting "these concurrent requests
    ran as one batch" hold on a loaded CI machine, where the event loop may be descheduled between submits."""
    from twinkle.sampler.torch_engine import TorchEngine

    eng = TorchEngine(TINY_MODEL_ID, engine_args={"batch_wait_ms": 50}, max_loras=8)
    yield eng
    eng.close_sync()


@pytest.fixture(scope="session")
def service(engine):
    from twinkle.sampler import SamplerService

    return SamplerService(TINY_MODEL_ID, engine=engine)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    texts = [
        "The sun is",
        "<|im_start|>user\nWhat is the best way to learn?<|im_end|>\n<|im_start|>assistant\n",
        "def add_one(x):\n    return",
        "Seven",
        "A long time ago, in a small town near the river, there lived a man who",
        "1 2 3 4 5 6 7",
    ]
    return [tokenizer.encode(t) for t in texts]
