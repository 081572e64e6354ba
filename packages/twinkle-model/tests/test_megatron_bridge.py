"""HF <-> megatron-core bridge (``twinkle.model.megatron.bridge``) on CPU, fp32.

One spawn of gloo ranks per layout (tp=1, tp=2, pp=2; ``megatron_support/ranks.py`` installs the test-only CPU
shim in them) checks, for the tiny Qwen2, a tied-embedding Qwen2 and a Llama with its own ``head_dim``:
the HF -> megatron -> HF round trip is bit-exact, logits match HF within 1e-5 (right-padded rows included),
target logprobs from vocab-parallel logits match HF's ``log_softmax``, and the backward pass gives HF's
gradient w.r.t. the input embeddings. Config refusals run in this process.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is an optional extra (pip install twinkle-model[megatron])")

from twinkle.model.megatron.bridge import (  # noqa: E402
    UnsupportedModel,
    hf_layer_index,
    load_hf_weights,
    merge_gate_up,
    merge_qkv,
    shard_rows,
    split_gate_up,
    split_qkv,
    transformer_config,
)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "megatron_support"))
from ranks import run_ranks  # noqa: E402

MODELS = ("qwen2", "qwen2-tied", "llama")
TOL = 1e-5


# ----------------------------------------------------------------------------------- models


COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def _small_config(name: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if name == "qwen2-tied":
        return Qwen2Config(**{**COMMON, "tie_word_embeddings": True, **overrides})
    if name == "llama":  # head_dim != hidden / heads
        return LlamaConfig(**{**COMMON, "head_dim": 32, "rope_theta": 500000.0, **overrides})
    if name == "mistral":
        return MistralConfig(**{**COMMON, "head_dim": 32, **overrides})
    raise ValueError(name)


def hf_model(name: str):
    """The same HF model in every process: biases and norm weights perturbed so every mapping shows."""
    from transformers import AutoModelForCausalLM
    from twinkle.common.models import TINY_MODEL_ID, load_causal_lm

    if name == "qwen2":
        model = load_causal_lm(TINY_MODEL_ID)
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_small_config(name))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("bias") or "norm" in key:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows, the second right-padded (pad id 0): ids [2, 12] and HF's attention mask."""
    ids = torch.randint(1, vocab, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    return ids, mask


def _hf_reference(hf, ids, mask, targets):
    """HF logits, target logprobs and the gradient of their sum (real tokens) w.r.t. the input embeddings."""
    x = hf.model.embed_tokens(ids).detach().requires_grad_()
    logits = hf(inputs_embeds=x, attention_mask=mask).logits
    lp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    (lp * mask).sum().backward()
    return logits.detach(), lp.detach(), x.grad


def _roundtrip(exported, hf) -> str | None:
    """None when ``exported`` is HF's state dict bit for bit, else what differs."""
    ref = hf.state_dict()
    if list(exported) != list(ref):
        return f"keys differ: {sorted(set(exported) ^ set(ref))[:5]} / order"
    bad = [k for k in ref if exported[k].dtype != ref[k].dtype or not torch.equal(exported[k], ref[k])]
    return f"tensors differ: {bad[:5]}" if bad else None


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b).abs()[mask.bool()].max().item()


def _rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the largest reference entry (gradients sum many terms)."""
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ------------------------------------------------------------------------- rank functions


def tp_checks(rank: int) -> dict[str, dict]:
    """At the current TP layout (pp=1): round trip, logits, logprobs, input gradient; per model."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from twinkle.model.megatron import bridge

    out = {}
    for name in MODELS:
        hf = hf_model(name)
        model = bridge.build_model(hf.config)
        bridge.load_hf_weights(model, hf.state_dict(), hf.config)
        exported = bridge.export_hf_weights(model, hf.config)
        ids, mask = _batch(hf.config.vocab_size)
        targets = ids.roll(-1, dims=1)
        ref_logits, ref_lp, ref_grad = _hf_reference(hf, ids, mask, targets)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        with torch.no_grad():
            local = model(ids, pos, attention_mask=None)
            logits = gather_from_tensor_model_parallel_region(local).clone()  # at tp=1 the gather is a no-op
            lp = bridge.target_logprobs(local, targets)  # works in place: overwrites local
        x = hf.model.embed_tokens(ids).detach().requires_grad_()
        out_local = model(None, pos, attention_mask=None, decoder_input=x.transpose(0, 1))
        (bridge.target_logprobs(out_local, targets) * mask).sum().backward()
        out[name] = {
            "roundtrip": _roundtrip(exported, hf) if rank == 0 else None,
            "exported_elsewhere": exported is not None and rank != 0,
            "local_vocab": local.shape[-1],
            "logits": _max_diff(logits, ref_logits, mask),
            "logprobs": _max_diff(lp, ref_lp, mask),
            "grad": _rel_diff(x.grad, ref_grad) if x.grad is not None else None,
            "params_frozen": not any(p.requires_grad or p.grad is not None for p in model.parameters()),
        }
    return out


def pp_checks(rank: int) -> dict[str, dict]:
    """At pp=2: round trip, and logits / input gradient through megatron's pipeline schedule."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from twinkle.model.megatron import bridge

    out = {}
    for name in MODELS:
        hf = hf_model(name)
        model = bridge.build_model(hf.config)
        bridge.load_hf_weights(model, hf.state_dict(), hf.config)
        exported = bridge.export_hf_weights(model, hf.config)
        ids, mask = _batch(hf.config.vocab_size)
        targets = ids.roll(-1, dims=1)
        ref_logits, ref_lp, ref_grad = _hf_reference(hf, ids, mask, targets)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        x = hf.model.embed_tokens(ids).detach().requires_grad_()

        def run(forward_only: bool):
            def step(_data, m):
                if ps.is_pipeline_first_stage():  # the input whose gradient is checked
                    y = m(None, pos, attention_mask=None, decoder_input=x.transpose(0, 1).contiguous())
                else:
                    y = m(None, pos, attention_mask=None)
                if forward_only:
                    return y, None  # no loss function: the schedule keeps the output
                return y, lambda o: ((-bridge.target_logprobs(o, targets) * mask).sum(), {})

            with torch.set_grad_enabled(not forward_only):
                return get_forward_backward_func()(
                    forward_step_func=step, data_iterator=iter([None]), model=[model], num_microbatches=1,
                    seq_length=ids.shape[1], micro_batch_size=ids.shape[0], forward_only=forward_only)

        store = run(forward_only=True)
        run(forward_only=False)
        last, first = ps.is_pipeline_last_stage(), ps.is_pipeline_first_stage()
        out[name] = {
            "stage": (first, last),
            "roundtrip": _roundtrip(exported, hf) if rank == 0 else None,
            "exported_elsewhere": exported is not None and rank != 0,
            "logits": _max_diff(store[0], ref_logits, mask) if last else None,
            # the loss was -sum(logprobs): its input gradient is -ref_grad
            "grad": _rel_diff(-x.grad, ref_grad) if first and x.grad is not None else None,
        }
    return out


# ------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def tiny_built(tiny_model_id):
    return tiny_model_id  # built once here, not concurrently by the ranks


def _assert_tp(results: list[dict], tp: int) -> None:
    for rank, res in enumerate(results):
        for name, r in res.items():
            where = f"{name} tp={tp} rank {rank}"
            if rank == 0:
                assert r["roundtrip"] is None, f"{where}: {r['roundtrip']}"
            assert not r["exported_elsewhere"], where
            assert r["local_vocab"] * tp == hf_vocab(name), where
            assert r["logits"] < TOL, f"{where}: logits differ by {r['logits']}"
            assert r["logprobs"] < TOL, f"{where}: logprobs differ by {r['logprobs']}"
            assert r["grad"] is not None and r["grad"] < TOL, f"{where}: input gradient differs by {r['grad']}"
            assert r["params_frozen"], where


def hf_vocab(name: str) -> int:
    return 2176 if name == "qwen2" else 96


def test_tp1(tiny_built):
    _assert_tp(run_ranks(tp_checks, 1, tp=1), tp=1)


def test_tp2(tiny_built):
    _assert_tp(run_ranks(tp_checks, 2, tp=2), tp=2)


def test_pp2(tiny_built):
    first, last = run_ranks(pp_checks, 2, pp=2)
    for name in MODELS:
        assert first[name]["stage"] == (True, False) and last[name]["stage"] == (False, True)
        assert first[name]["roundtrip"] is None, f"{name}: {first[name]['roundtrip']}"
        assert not last[name]["exported_elsewhere"], name
        assert last[name]["logits"] < TOL, f"{name}: logits differ by {last[name]['logits']}"
        assert first[name]["grad"] is not None and first[name]["grad"] < TOL, f"{name}: grad {first[name]['grad']}"


@pytest.mark.parametrize("overrides, field", [
    ({"num_attention_heads": 6, "num_key_value_heads": 3}, "num_key_value_heads"),
    ({"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}, "num_key_value_heads"),
    ({"vocab_size": 97}, "vocab_size"),
    ({"intermediate_size": 129}, "intermediate_size"),
    ({"num_hidden_layers": 3, "layer_types": ["full_attention"] * 3}, "num_hidden_layers"),
    ({"use_sliding_window": True, "sliding_window": 16}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_type"),
    ({"architectures": ["Qwen3ForCausalLM"]}, "Qwen3ForCausalLM"),
])
def test_refuses_unsupported(overrides, field):
    with pytest.raises(UnsupportedModel, match=field):
        transformer_config(_small_config("qwen2-tied", **overrides), tp_size=2, pp_size=2)


def test_refuses_other_models():
    with pytest.raises(UnsupportedModel, match="attention_bias"):
        transformer_config(_small_config("llama", attention_bias=True), tp_size=1, pp_size=1)
    with pytest.raises(UnsupportedModel, match="sliding_window"):
        transformer_config(_small_config("mistral", sliding_window=16), tp_size=1, pp_size=1)
    cfg = transformer_config(_small_config("mistral", sliding_window=None), tp_size=2, pp_size=2)
    assert (cfg.kv_channels, cfg.num_query_groups, cfg.add_qkv_bias) == (32, 2, False)
    cfg = transformer_config(_small_config("qwen2-tied"), tp_size=2, pp_size=1)
    assert cfg.add_qkv_bias and cfg.layernorm_epsilon == 1e-6 and not cfg.perform_initialization


def test_load_rejects_bad_state():
    hf = hf_model("qwen2-tied")
    state = hf.state_dict()
    with pytest.raises(ValueError, match="missing keys.*model.norm.weight"):
        load_hf_weights(None, {k: v for k, v in state.items() if k != "model.norm.weight"}, hf.config)
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        load_hf_weights(None, {**state, "extra": torch.zeros(1)}, hf.config)
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf_weights(None, {**state, "model.layers.1.mlp.up_proj.weight": torch.zeros(3, 64)}, hf.config)
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_hf_weights(None, {**state, "lm_head.weight": torch.zeros(96, 64)}, hf.config)


def test_sharding_helpers():
    """split/merge are inverses, and a rank's q/k/v rows are HF's row shards (per query group order)."""
    cfg = _small_config("llama")  # 4 heads, 2 groups, head_dim 32
    q, k, v = (torch.randn(n, 5) for n in (4 * 32, 2 * 32, 2 * 32))
    for tp in (1, 2):
        for r in range(tp):
            local = merge_qkv(*(shard_rows(t, r, tp) for t in (q, k, v)), cfg, tp)
            assert local.shape == ((4 + 2 * 2) * 32 // tp, 5)
            for got, full in zip(split_qkv(local, cfg, tp), (q, k, v)):
                assert torch.equal(got, shard_rows(full, r, tp))
            act = local.t()[None]  # activations: rows on the last dim
            assert torch.equal(merge_qkv(*split_qkv(act, cfg, tp, dim=-1), cfg, tp, dim=-1), act)
    # group 0's rows: q heads 0-1, then k head 0, then v head 0
    local = merge_qkv(q, k, v, cfg, 1)
    assert torch.equal(local[:64], q[:64]) and torch.equal(local[64:96], k[:32]) and torch.equal(local[96:128], v[:32])
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    assert all(torch.equal(a, b) for a, b in zip(split_gate_up(merge_gate_up(gate, up)), (gate, up)))
    assert [hf_layer_index(s, i, 4, 2) for s in (0, 1) for i in (0, 1)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        hf_layer_index(0, 2, 4, 2)


def test_sitecustomize_installs_shim_on_megatron_import():
    """With the env var and megatron_support on PYTHONPATH, a fresh interpreter imports nothing heavy at start
    and has the shim in place once megatron.core is imported."""
    import subprocess

    support = os.path.join(os.path.dirname(__file__), "megatron_support")
    code = (
        "import sys\n"
        "assert 'sitecustomize' in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "import megatron.core.parallel_state, torch\n"
        "print(torch.cuda.current_device() if not torch.cuda.is_available() else 'cpu')\n"
    )
    env = {**os.environ, "TWINKLE_TEST_MEGATRON_CPU_SHIM": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (support, os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "cpu"
