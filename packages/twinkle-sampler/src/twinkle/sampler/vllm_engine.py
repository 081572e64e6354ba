"""The ``vllm`` engine: vLLM's ``AsyncLLM`` (``AsyncLLMEngine``) with LoRA adapters as ``LoRARequest`` s.

This module imports vLLM only inside :class:`VLLMEngine`; the mapping between Twinkle and vLLM is kept in
plain functions (``vllm_engine_kwargs``, ``vllm_sampling_kwargs``, ``sample_output_from_vllm``) that need no
vLLM and are unit-tested on CPU.

Mapping (so both engines mean the same thing, see README.md):

- temperature 0 -> vLLM temperature 0.0 (greedy); top_k off -> 0; ``seed`` -> a 62-bit hash of it (vLLM gives
  sample *i* the seed ``seed + i``, which must stay inside a 64-bit generator seed);
- stop strings -> ``stop`` (with ``detokenize=True``, ``skip_special_tokens=False`` as in the torch engine);
  stop ids -> ``stop_token_ids``; ``[]`` -> ``ignore_eos=True`` with no stops;
- ``logprobs=0``: vLLM returns exactly the sampled token's logprob; the engine defaults
  ``logprobs_mode="raw_logprobs"`` (log-softmax of the raw logits, as the torch engine reports);
- ``prompt_logprobs=0`` when asked: each prompt token's own logprob, first ``None``;
- ``topk_sample_logprobs`` k -> ``logprobs=k`` and ``topk_prompt_logprobs`` k -> ``prompt_logprobs=k``: vLLM
  returns the top k (by ``rank``) beside each token's own logprob;
- ``target_prompt_logprobs`` and ``prompt_alt_tokens_k`` are refused (a ``UserError`` naming the field): vLLM
  offers no per-request way to score chosen ids or to draw at prompt positions;
- adapters: one ``LoRARequest(name, int id, path)`` per adapter *version* from the shared
  :class:`~twinkle.sampler.adapters.AdapterCache`; a re-saved checkpoint gets a new id (ids are never reused),
  so vLLM can never serve stale weights under a new request; evicted versions are ``remove_lora`` -ed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import itertools
import logging
import uuid
from typing import Any, Sequence

from twinkle.common.env import trust_remote_code
from twinkle.common.models import resolve_model_path
from twinkle.common.wire import SampledSequence, SampleOutput, SampleRequest, ServiceInfo, TopK, UserError

from .adapters import AdapterCache, adapter_files
from .engine import SamplerEngine
from .params import DEFAULT_MAX_NUM_SAMPLES, ResolvedRequest

log = logging.getLogger(__name__)

# Our defaults; anything in engine_args overrides them (except trust_remote_code, a deploy-time switch).
DEFAULT_VLLM_ARGS: dict[str, Any] = {
    "enable_lora": True,
    "max_lora_rank": 64,
    "logprobs_mode": "raw_logprobs",
    "disable_log_stats": True,
}
# Keys that configure Twinkle, not vLLM.
TWINKLE_ARGS = {"max_num_samples"}


# -- pure mapping (no vLLM import) ------------------------------------------------------------------------


def vllm_seed(seed: int | None) -> int | None:
    """A stable 62-bit seed: vLLM seeds sample *i* with ``seed + i`` and torch generators take < 2**64."""
    if seed is None:
        return None
    digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def vllm_engine_kwargs(model_path: str, engine_args: dict[str, Any] | None, max_loras: int) -> dict[str, Any]:
    """``AsyncEngineArgs`` keyword arguments: our defaults, then the deployment's ``engine_args``.

    ``max_loras`` (the sampler's adapter bound) is vLLM's per-batch LoRA slot count unless ``engine_args`` sets
    it, and ``max_cpu_loras`` is kept >= the bound, so vLLM never drops an adapter the cache still holds.
    """
    user = {k: v for k, v in (engine_args or {}).items() if k not in TWINKLE_ARGS}
    trc = trust_remote_code()
    if "trust_remote_code" in user and bool(user["trust_remote_code"]) != trc:
        raise ValueError(
            "engine_args.trust_remote_code cannot differ from TWINKLE_TRUST_REMOTE_CODE "
            f"({trc}); set the environment variable at deploy time instead"
        )
    kw: dict[str, Any] = {"model": model_path, "tokenizer": model_path, "max_loras": max_loras, **DEFAULT_VLLM_ARGS}
    kw.update(user)
    kw["trust_remote_code"] = trc
    if kw.get("enable_lora"):
        kw["max_cpu_loras"] = max(int(kw.get("max_cpu_loras") or 0), int(kw["max_loras"]), max_loras)
    return kw


def vllm_sampling_kwargs(r: ResolvedRequest) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for a resolved request."""
    return {
        "n": r.num_samples,
        "max_tokens": r.max_tokens,
        "temperature": 0.0 if r.greedy else r.temperature,
        "top_k": 0 if r.greedy else r.top_k,
        "top_p": 1.0 if r.greedy else r.top_p,
        "seed": vllm_seed(r.seed),
        "stop": list(r.stop_strings) or None,
        "stop_token_ids": list(r.stop_token_ids) or None,
        "ignore_eos": r.ignore_eos,
        "logprobs": r.topk_sample,
        "prompt_logprobs": r.topk_prompt if (r.prompt_logprobs or r.topk_prompt) else None,
        "detokenize": bool(r.stop_strings),
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
    }


def refuse_unsupported(r: ResolvedRequest) -> ResolvedRequest:
    """What only the torch engine can do."""
    if r.target_prompt is not None:
        raise UserError("the vllm sampler cannot score chosen prompt token ids; use a torch sampler",
                        field="target_prompt_logprobs")
    if r.alt_k:
        raise UserError("the vllm sampler cannot draw alternatives at prompt positions; use a torch sampler",
                        field="prompt_alt_tokens_k")
    return r


def _top(entry: Any, k: int) -> tuple[list[int], list[float]]:
    """The k best of one position of vLLM logprobs, most likely first (vLLM adds the chosen token beside
    them, with its own rank)."""
    ranked = sorted(((getattr(v, "rank", None) or 0, t, float(getattr(v, "logprob", v))) for t, v in entry.items()
                     if 1 <= (getattr(v, "rank", None) or 0) <= k))
    if len(ranked) != k:
        raise RuntimeError(f"vLLM returned {len(ranked)} of the top {k} logprobs")
    return [t for _, t, _ in ranked], [lp for _, _, lp in ranked]


def _logprob_of(entry: Any, token: int) -> float:
    """One position of vLLM logprobs: ``{token_id: Logprob(logprob=...)}``."""
    if entry is None or token not in entry:
        raise RuntimeError(f"vLLM returned no logprob for token {token}")
    lp = entry[token]
    return float(getattr(lp, "logprob", lp))


def sample_output_from_vllm(out: Any, *, prompt_logprobs: bool, topk_sample: int = 0,
                            topk_prompt: int = 0) -> SampleOutput:
    """Turn a finished ``vllm.RequestOutput`` into a ``SampleOutput`` (sequences in sample order)."""
    seqs = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        if c.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended sample {c.index} with finish_reason={c.finish_reason!r}")
        tokens = [int(t) for t in c.token_ids]
        if c.logprobs is None or len(c.logprobs) != len(tokens):
            raise RuntimeError("vLLM returned no (or misaligned) sampled-token logprobs; was logprobs=0 set?")
        lps = [_logprob_of(entry, t) for entry, t in zip(c.logprobs, tokens)]
        topk = None
        if topk_sample:
            rows = [_top(entry, topk_sample) for entry in c.logprobs]
            topk = TopK(ids=[i for i, _ in rows], logprobs=[v for _, v in rows])
        seqs.append(SampledSequence(tokens=tokens, logprobs=lps, stop_reason=c.finish_reason, topk=topk))
    result = SampleOutput(sequences=seqs)
    if prompt_logprobs or topk_prompt:
        ids = list(out.prompt_token_ids)
        raw = out.prompt_logprobs
        if raw is None or len(raw) != len(ids):
            raise RuntimeError("vLLM returned no (or misaligned) prompt logprobs; was prompt_logprobs set?")
        if prompt_logprobs:
            result.prompt_logprobs = [None] + [_logprob_of(raw[i], ids[i]) for i in range(1, len(ids))]
        if topk_prompt:
            rows = [_top(raw[i], topk_prompt) for i in range(1, len(ids))]
            result.topk_prompt = TopK(ids=[[]] + [i for i, _ in rows], logprobs=[[]] + [v for _, v in rows])
    return result


# -- the engine -------------------------------------------------------------------------------------------


class VLLMEngine(SamplerEngine):
    engine_type = "vllm"

    def __init__(
        self,
        model_id: str,
        *,
        engine_args: dict[str, Any] | None = None,
        max_loras: int = 8,
        device: str | None = None,
    ) -> None:
        try:
            import vllm
            from vllm.engine.arg_utils import AsyncEngineArgs
        except ImportError as e:
            raise RuntimeError(
                "sampler_type 'vllm' needs the vllm package (pip install 'twinkle-sampler[vllm]') on a CUDA "
                "machine; use sampler_type 'torch' elsewhere"
            ) from e
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("sampler_type 'vllm' needs a CUDA GPU; none is visible (use sampler_type 'torch')")
        if device not in (None, "cuda", "cuda:0"):
            # Placement is done by CUDA_VISIBLE_DEVICES (the planned physical rank); vLLM uses device 0 of it.
            raise ValueError(f"the vllm engine runs on the visible CUDA device; device={device!r} is not supported")
        args = dict(engine_args or {})
        super().__init__(model_id, max_loras=max_loras,
                         max_num_samples=int(args.get("max_num_samples", DEFAULT_MAX_NUM_SAMPLES)))
        self._vllm = vllm
        path = resolve_model_path(model_id)
        self.model_path = path
        kw = vllm_engine_kwargs(path, args, max_loras)
        fields = set(getattr(AsyncEngineArgs, "__dataclass_fields__", {}))
        if fields:
            unknown = set(args) - fields - TWINKLE_ARGS
            if unknown:
                raise ValueError(f"unknown vLLM engine_args: {sorted(unknown)}")
            for k in [k for k in kw if k not in fields]:  # one of our defaults this vLLM version lacks
                log.warning("this vLLM has no engine arg %r; ignoring it", k)
                kw.pop(k)
        self.engine_kwargs = kw
        self._lora_enabled = bool(kw.get("enable_lora"))
        self._engine = self._build(AsyncEngineArgs(**kw))
        cfg = getattr(self._engine, "model_config", None) or self._engine.vllm_config.model_config
        self.vocab_size = int(cfg.get_vocab_size())
        self.max_context_length = int(cfg.max_model_len)
        from transformers import AutoTokenizer, GenerationConfig

        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code())
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        try:
            gen_eos = GenerationConfig.from_pretrained(path).eos_token_id
            eos += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        except OSError:
            pass
        self.eos_token_ids = tuple(dict.fromkeys(int(e) for e in eos))
        self.tokenizer = tok
        self._lora_ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        # acquire() may block (all slots held) and loads call back into the loop: give it its own threads.
        self._adapter_pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, max_loras),
                                                                   thread_name_prefix="twinkle-vllm-lora")
        self.adapters = AdapterCache(max_loras, self._load_adapter, self._unload_adapter, name_prefix="twinkle-lora-")
        self._counters = {"requests": 0, "samples": 0, "generated_tokens": 0}

    def _build(self, engine_args: Any) -> Any:
        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:  # older layouts
            from vllm.engine.async_llm_engine import AsyncLLMEngine as AsyncLLM
        return AsyncLLM.from_engine_args(engine_args)

    # -- adapters: load = register a LoRARequest and make vLLM load it now, so errors surface as UserError --

    def _load_adapter(self, name: str, path: str) -> Any:
        if not self._lora_enabled:
            raise UserError("this sampler was started without enable_lora; it cannot serve adapters",
                            field="adapter_path")
        from vllm.lora.request import LoRARequest

        req = LoRARequest(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=path)
        assert self._loop is not None
        try:
            ok = asyncio.run_coroutine_threadsafe(self._engine.add_lora(req), self._loop).result()
        except Exception as e:  # noqa: BLE001 - vLLM raises many kinds; all mean "this checkpoint does not load"
            raise UserError(f"vLLM cannot load adapter checkpoint {path!r}: {e}", field="adapter_path") from e
        if ok is False:
            raise UserError(f"vLLM refused adapter checkpoint {path!r}", field="adapter_path")
        return req

    def _unload_adapter(self, req: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # Fire and forget: release() can run on the loop thread itself, which must not block on the loop.
        loop.call_soon_threadsafe(lambda: loop.create_task(self._engine.remove_lora(req.lora_int_id)))

    # -- sampling ---------------------------------------------------------------------------------------

    async def generate(self, requests: Sequence[SampleRequest], tokens: Any = None) -> list[SampleOutput]:
        # ``tokens`` is not called: outputs are read when a request finishes (see the class docstring)
        resolved = [refuse_unsupported(self.resolve(r)) for r in requests]
        for r in resolved:
            if r.adapter_path:
                adapter_files(r.adapter_path)  # missing / not an adapter -> UserError before any work
        self._loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(self._one(r) for r in resolved)))

    async def _one(self, r: ResolvedRequest) -> SampleOutput:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        loop = asyncio.get_running_loop()
        lease = None
        if r.adapter_path:
            lease = await loop.run_in_executor(self._adapter_pool, self.adapters.acquire, r.adapter_path)
        try:
            sp = self._vllm.SamplingParams(**vllm_sampling_kwargs(r), output_kind=RequestOutputKind.FINAL_ONLY)
            final = None
            async for out in self._engine.generate(
                TokensPrompt(prompt_token_ids=list(r.prompt)), sp, request_id=f"twinkle-{uuid.uuid4().hex}",
                lora_request=lease.handle if lease is not None else None,
            ):
                final = out
            if final is None or not final.finished:
                raise RuntimeError("vLLM ended the request without a final output")
            result = sample_output_from_vllm(final, prompt_logprobs=r.prompt_logprobs, topk_sample=r.topk_sample,
                                             topk_prompt=r.topk_prompt)
        finally:
            if lease is not None:
                lease.release()
        self._counters["requests"] += 1
        self._counters["samples"] += len(result.sequences)
        self._counters["generated_tokens"] += sum(len(s.tokens) for s in result.sequences)
        return result

    def stats(self) -> dict[str, Any]:
        out = dict(self._counters)
        out["adapters"] = dict(self.adapters.stats)
        return out

    def info(self) -> ServiceInfo:
        info = super().info()
        info.settings["engine_args"] = {k: v for k, v in self.engine_kwargs.items() if k not in ("model", "tokenizer")}
        return info

    async def close(self) -> None:
        self._engine.shutdown()
        self._adapter_pool.shutdown(wait=False)
