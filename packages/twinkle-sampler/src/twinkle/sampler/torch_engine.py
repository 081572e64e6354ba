"""The ``torch`` engine: transformers on any device, its own batched decode loop and multi-LoRA runtime.

How a request runs:

1. ``generate`` validates it (``resolve_request``) on the caller's event loop and puts a job on a queue.
2. One dedicated compute thread (the only thread that ever touches the model) takes the first job, waits up to
   ``batch_wait_ms`` (measured from that job's arrival) for more, and takes as many pending jobs as fit:
   at most ``max_batch_size`` rows (a job is ``num_samples`` rows), at most ``max_batch_tokens`` padded prompt
   tokens, at most ``max_loras`` distinct adapters. Jobs that do not fit are first in line for the next batch.
   A queue drained by a thread, rather than an asyncio task, keeps the engine independent of any one event loop
   (a Ray Serve replica, a test's loop, a script's ``asyncio.run``) and keeps compute off all of them.
3. The batch's adapters are acquired from the :class:`AdapterCache` (loaded/reloaded in that same thread and
   pinned for the batch). Rows with different adapters run in the *same* forward passes: each row selects its
   adapter's slot in :class:`~twinkle.sampler.lora.MultiLoRA` (slot 0 = base model); see ``lora.py`` for why
   this is not peft's ``adapter_names`` path (which works, but costs layers x adapters kernels per step).
4. Prefill: each distinct prompt once, left-padded, with an attention mask and explicit position ids, into a
   ``DynamicCache``; only the last position's logits unless a job asked for prompt logprobs. The cache is then
   expanded to ``num_samples`` rows per job (``batch_select_indices``), so GRPO-style ``num_samples=16`` prefills
   the prompt once.
5. Decode: one token per row per step with the KV cache; rows that stop are dropped from the batch (cache rows
   selected away), so a long sequence does not make short ones pay.

Sampling, per row: greedy rows take ``argmax``; others scale logits by ``1/temperature``, keep the ``top_k``
largest, then the smallest set whose probability reaches ``top_p``, and invert the CDF at a uniform number drawn
from the row's own ``random.Random`` (seeded from ``(seed, sample index)``, or from the OS when no seed). The
reported logprob is always ``log_softmax`` of the *raw* logits (before temperature/top-k/top-p): what the trainer
computes, so RL importance ratios compare like with like (vLLM's ``logprobs_mode="raw_logprobs"``).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from twinkle.common.env import trust_remote_code
from twinkle.common.models import resolve_model_path
from twinkle.common.wire import SampledSequence, SampleOutput, SampleRequest, ServiceInfo, TopK

from .adapters import AdapterCache, adapter_files
from .engine import SamplerEngine, TokenSink
from .lora import MultiLoRA
from .params import DEFAULT_MAX_NUM_SAMPLES, ResolvedRequest, StopStrings

log = logging.getLogger(__name__)

ENGINE_ARGS = {
    "dtype": "auto",  # "auto" = the checkpoint's dtype; or float32 / bfloat16 / float16
    "max_batch_size": 64,  # rows (sequences) per batch
    "max_batch_tokens": 16384,  # padded prompt tokens per prefill
    "batch_wait_ms": 5.0,  # how long the first request of a batch waits for company
    "max_model_len": None,  # context window; default: the model config's max_position_embeddings
    "max_num_samples": DEFAULT_MAX_NUM_SAMPLES,
    "attn_implementation": None,  # e.g. "sdpa", "eager"; default: transformers' choice
}


@dataclass(eq=False)
class _Job:
    req: ResolvedRequest
    adapter_key: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)
    sink: Any = None  # (sample index, token, logprob) -> None, called on ``loop`` as tokens are sampled


def _deliver(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class TorchEngine(SamplerEngine):
    engine_type = "torch"

    def __init__(
        self,
        model_id: str,
        *,
        engine_args: dict[str, Any] | None = None,
        max_loras: int = 8,
        device: str | None = None,
    ) -> None:
        args = dict(ENGINE_ARGS)
        unknown = set(engine_args or {}) - set(ENGINE_ARGS)
        if unknown:
            raise ValueError(
                f"unknown engine_args for the torch sampler: {sorted(unknown)}; known: {sorted(ENGINE_ARGS)}")
        args.update(engine_args or {})
        super().__init__(model_id, max_loras=max_loras, max_num_samples=int(args["max_num_samples"]))
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._torch = torch
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = resolve_model_path(model_id)
        self.model_path = path
        trc = trust_remote_code()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trc)
        dtype = args["dtype"]
        if dtype != "auto":
            dtype = getattr(torch, str(dtype))
        kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trc}
        if args["attn_implementation"]:
            kw["attn_implementation"] = args["attn_implementation"]
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        self._base = model
        self._lora = MultiLoRA(model, max_loras)

        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(text_cfg.vocab_size)
        ctx = args["max_model_len"] or getattr(text_cfg, "max_position_embeddings", None)
        ctx = ctx or getattr(self.tokenizer, "model_max_length", None) or 2048
        self.max_context_length = int(ctx)
        eos: list[int] = []
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        for e in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [self.tokenizer.eos_token_id]:
            if e is not None and e not in eos:
                eos.append(int(e))
        self.eos_token_ids = tuple(eos)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = getattr(model.generation_config, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else (eos[0] if eos else 0))
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

        self.max_batch_size = int(args["max_batch_size"])
        self.max_batch_tokens = int(args["max_batch_tokens"])
        self.batch_wait_s = float(args["batch_wait_ms"]) / 1000.0
        self.engine_args = args

        self.adapters = AdapterCache(max_loras, self._load_adapter, self._unload_adapter, name_prefix="lora")
        self._cv = threading.Condition()
        self._pending: collections.deque[_Job] = collections.deque()
        self._closed = False
        self._counters = {"batches": 0, "rows": 0, "forward_calls": 0, "prefill_tokens": 0, "decode_steps": 0,
                          "max_batch_rows": 0, "generated_tokens": 0, "max_resident_adapters": 0, "aborted_rows": 0}
        self._batch_rows: collections.deque[int] = collections.deque(maxlen=4096)
        self._thread = threading.Thread(target=self._worker, name=f"twinkle-sampler-{self.model_name}", daemon=True)
        self._thread.start()

    # -- public ------------------------------------------------------------------------------------------

    async def generate(self, requests: Sequence[SampleRequest], tokens: TokenSink | None = None
                       ) -> list[SampleOutput]:
        resolved = [self.resolve(r) for r in requests]  # every request is valid before any is queued
        keys = []
        for r in resolved:
            # A missing/incomplete checkpoint fails here, on the caller, before it waits for a batch.
            keys.append(adapter_files(r.adapter_path)[0] if r.adapter_path else None)
        if self._closed:
            raise RuntimeError("the sampler engine is closed")
        loop = asyncio.get_running_loop()
        jobs = [_Job(r, k, loop, loop.create_future(),
                     sink=None if tokens is None else functools.partial(tokens, i))
                for i, (r, k) in enumerate(zip(resolved, keys))]
        with self._cv:
            self._pending.extend(jobs)
            self._cv.notify_all()
        return list(await asyncio.gather(*(j.future for j in jobs)))

    def stats(self) -> dict[str, Any]:
        with self._cv:
            out = dict(self._counters)
            out["batch_rows"] = list(self._batch_rows)
            out["queued"] = len(self._pending)
        out["adapters"] = dict(self.adapters.stats)
        return out

    def reset_stats(self) -> None:
        with self._cv:
            for k in self._counters:
                self._counters[k] = 0
            self._batch_rows.clear()

    def info(self) -> ServiceInfo:
        info = super().info()
        info.settings.update({"device": str(self.device), "dtype": str(self._base.dtype).replace("torch.", ""),
                              "max_batch_size": self.max_batch_size, "batch_wait_ms": self.batch_wait_s * 1000})
        return info

    async def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def close_sync(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    # -- the compute thread ------------------------------------------------------------------------------

    def _worker(self) -> None:
        torch = self._torch
        while True:
            jobs = self._next_batch()
            if jobs is None:
                break
            try:
                with torch.inference_mode():
                    self._run_jobs(jobs)
            except BaseException as e:  # noqa: BLE001 - never let the compute thread die silently
                log.exception("sampler batch failed")
                for j in jobs:
                    self._send(j, None, e)
        # Fail whatever is still queued after close.
        with self._cv:
            left = list(self._pending)
            self._pending.clear()
        for j in left:
            self._send(j, None, RuntimeError("the sampler engine was closed"))

    def _next_batch(self) -> list[_Job] | None:
        with self._cv:
            while not self._pending and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            deadline = self._pending[0].enqueued + self.batch_wait_s
            while not self._closed:
                rows = sum(j.req.num_samples for j in self._pending)
                left = deadline - time.monotonic()
                if rows >= self.max_batch_size or left <= 0:
                    break
                self._cv.wait(left)
            batch: list[_Job] = []
            rest: collections.deque[_Job] = collections.deque()
            rows = 0
            max_len = 0
            adapters: set[str] = set()
            for job in self._pending:
                if job.future.cancelled():
                    continue
                n, length = job.req.num_samples, len(job.req.prompt)
                new_adapter = job.adapter_key is not None and job.adapter_key not in adapters
                fits = not batch or (
                    rows + n <= self.max_batch_size
                    and (len(batch) + 1) * max(max_len, length) <= self.max_batch_tokens
                    and (not new_adapter or len(adapters) < self.max_loras)
                )
                if not fits:
                    rest.append(job)
                    continue
                batch.append(job)
                rows += n
                max_len = max(max_len, length)
                if job.adapter_key is not None:
                    adapters.add(job.adapter_key)
            self._pending = rest
            return batch

    def _send(self, job: _Job, result: Any, error: BaseException | None) -> None:
        try:
            job.loop.call_soon_threadsafe(_deliver, job.future, result, error)
        except RuntimeError:  # the caller's loop is gone; nobody is waiting
            pass

    def _run_jobs(self, jobs: list[_Job]) -> None:
        leases = {}
        failed: dict[str, BaseException] = {}
        try:
            for key in dict.fromkeys(j.adapter_key for j in jobs if j.adapter_key is not None):
                try:
                    leases[key] = self.adapters.acquire(key)
                except Exception as e:  # noqa: BLE001 - reported to the requests that need this adapter
                    failed[key] = e
            ok = []
            for j in jobs:
                if j.adapter_key in failed:
                    self._send(j, None, failed[j.adapter_key])
                else:
                    ok.append(j)
            if not ok:
                return
            slots = [leases[j.adapter_key].handle if j.adapter_key is not None else 0 for j in ok]
            try:
                outputs = self._generate_batch(ok, slots)
            except Exception as e:  # noqa: BLE001
                log.exception("sampler batch of %d requests failed", len(ok))
                for j in ok:
                    self._send(j, None, e)
                return
            for j, out in zip(ok, outputs):
                self._send(j, out, None)
        finally:
            for lease in leases.values():
                lease.release()

    # -- adapters (called from the compute thread only) ---------------------------------------------------

    def _load_adapter(self, name: str, path: str) -> int:
        slot = self._lora.load(path)
        with self._cv:
            n = self._lora.resident
            self._counters["max_resident_adapters"] = max(self._counters["max_resident_adapters"], n)
        log.debug("adapter %s (%s) in slot %d", name, path, slot)
        return slot

    def _unload_adapter(self, slot: int) -> None:
        self._lora.unload(slot)

    # -- the decode loop -----------------------------------------------------------------------------------

    def _new_cache(self):
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self._base.config)
        except TypeError:  # older transformers
            return DynamicCache()

    def _forward(self, input_ids, attention_mask, position_ids, cache, slots: list[int], logits_to_keep):
        kw: dict[str, Any] = {self._cache_kw: cache, "use_cache": True, "logits_to_keep": logits_to_keep}
        with self._cv:
            self._counters["forward_calls"] += 1
        self._lora.select(slots, self.device)
        try:
            return self._base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              **kw).logits
        finally:
            self._lora.clear_selection()

    def _generate_batch(self, jobs: list[_Job], slots: list[int]) -> list[SampleOutput]:
        torch = self._torch
        dev = self.device
        reqs = [j.req for j in jobs]
        lens = [len(r.prompt) for r in reqs]
        P, Lmax = len(reqs), max(lens)
        ids = torch.full((P, Lmax), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((P, Lmax), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, Lmax - lens[i]:] = torch.tensor(r.prompt, dtype=torch.long)
            attn[i, Lmax - lens[i]:] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        pos = (attn.cumsum(-1) - 1).clamp_(min=0)
        want_prompt = any(r.needs_prompt_distribution for r in reqs)
        cache = self._new_cache()
        logits = self._forward(ids, attn, pos, cache, slots, 0 if want_prompt else 1)
        last = logits[:, -1, :].float()
        prompt_outs: list[SampleOutput] = [SampleOutput(sequences=[]) for _ in reqs]
        for i, r in enumerate(reqs):
            if r.needs_prompt_distribution:
                start = Lmax - lens[i]
                self._prompt_distribution(prompt_outs[i], r, logits[i, start:Lmax - 1].float(), ids[i, start + 1:])
        del logits

        row_job = [i for i, r in enumerate(reqs) for _ in range(r.num_samples)]
        R = len(row_job)
        if R != P:
            idx = torch.tensor(row_job, device=dev)
            cache.batch_select_indices(idx)
            attn = attn[idx]
            last = last[idx]
        with self._cv:
            self._counters["batches"] += 1
            self._counters["rows"] += R
            self._counters["prefill_tokens"] += P * Lmax
            self._counters["max_batch_rows"] = max(self._counters["max_batch_rows"], R)
            self._batch_rows.append(R)

        # Per-row sampling state.
        rreq = [reqs[i] for i in row_job]
        sample_idx = [s for i, r in enumerate(reqs) for s in range(r.num_samples)]
        rngs = [None if rr.greedy else _row_rng(rr.seed, s) for rr, s in zip(rreq, sample_idx)]
        temps = torch.tensor([max(rr.temperature, 1e-5) for rr in rreq], dtype=torch.float32, device=dev)
        top_ks = torch.tensor([rr.top_k for rr in rreq], dtype=torch.long, device=dev)
        top_ps = torch.tensor([rr.top_p for rr in rreq], dtype=torch.float32, device=dev)
        row_slots = [slots[i] for i in row_job]
        next_pos = torch.tensor([lens[i] for i in row_job], dtype=torch.long, device=dev)
        eos = set(self.eos_token_ids)
        stop_ids = [set(rr.stop_token_ids) for rr in rreq]
        matchers = [StopStrings(r.stop_strings) for r in reqs]  # one per request; its rows share it
        row_stops = [matchers[i] for i in row_job]
        tokens: list[list[int]] = [[] for _ in range(R)]
        lps: list[list[float]] = [[] for _ in range(R)]
        topks = [TopK(ids=[], logprobs=[]) if rr.topk_sample else None for rr in rreq]
        reasons: list[str | None] = [None] * R
        active = list(range(R))
        aborted = 0

        while True:
            act = torch.tensor(active, device=dev) if len(active) != R else None
            tok, lp, raw = self._sample(
                last, [rreq[r] for r in active], [rngs[r] for r in active],
                temps if act is None else temps[act], top_ks if act is None else top_ks[act],
                top_ps if act is None else top_ps[act],
            )
            tok_l, lp_l = tok.tolist(), lp.tolist()
            keep: list[int] = []
            for b, r in enumerate(active):
                t = tok_l[b]
                tokens[r].append(t)
                lps[r].append(lp_l[b])
                job = jobs[row_job[r]]
                if job.sink is not None and not job.future.done():
                    job.loop.call_soon_threadsafe(job.sink, sample_idx[r], t, lp_l[b])
                if topks[r] is not None:
                    vals, idx = raw[b].topk(rreq[r].topk_sample)
                    topks[r].ids.append(idx.tolist())
                    topks[r].logprobs.append(vals.tolist())
                rr = rreq[r]
                if jobs[row_job[r]].future.cancelled():  # its caller went away (cancel_future): stop computing it
                    reasons[r] = "length"
                    aborted += 1
                elif (not rr.ignore_eos and t in eos) or t in stop_ids[r]:
                    reasons[r] = "stop"
                elif row_stops[r] and row_stops[r].completed_by_last(tokens[r], self._decode):
                    reasons[r] = "stop"
                elif len(tokens[r]) >= rr.max_tokens:
                    reasons[r] = "length"
                else:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):
                kidx = torch.tensor(keep, device=dev)
                cache.batch_select_indices(kidx)
                attn = attn[kidx]
                next_pos = next_pos[kidx]
                tok = tok[kidx]
                active = [active[b] for b in keep]
            attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=1)
            logits = self._forward(tok[:, None], attn, next_pos[:, None], cache, [row_slots[r] for r in active], 1)
            next_pos = next_pos + 1
            last = logits[:, -1, :].float()
            with self._cv:
                self._counters["decode_steps"] += 1

        with self._cv:
            self._counters["generated_tokens"] += sum(len(t) for t in tokens)
            self._counters["aborted_rows"] += aborted
        outputs = []
        r = 0
        for i, req in enumerate(reqs):
            seqs = []
            for _ in range(req.num_samples):
                seqs.append(SampledSequence(tokens=tokens[r], logprobs=lps[r], stop_reason=reasons[r],  # type: ignore[arg-type]
                                            topk=topks[r]))
                r += 1
            prompt_outs[i].sequences = seqs
            outputs.append(prompt_outs[i])
        return outputs

    def _prompt_distribution(self, out: SampleOutput, req: ResolvedRequest, logits, targets) -> None:
        """What a request asks of the model's distribution at prompt positions 1.. (``logits`` predict them,
        ``targets`` are the prompt tokens there): prompt logprobs, top-k, chosen ids, and draws."""
        torch = self._torch
        lp = torch.log_softmax(logits, dim=-1)
        if req.prompt_logprobs:
            out.prompt_logprobs = [None] + lp.gather(-1, targets[:, None])[:, 0].tolist()
        if req.topk_prompt:
            vals, idx = lp.topk(req.topk_prompt, dim=-1)
            out.topk_prompt = TopK(ids=[[]] + idx.tolist(), logprobs=[[]] + vals.tolist())
        if req.target_prompt is not None:
            want = torch.tensor(req.target_prompt, dtype=torch.long, device=lp.device).reshape(lp.shape[0], -1)
            got = lp.gather(-1, want.clamp(min=0)).masked_fill(want < 0, 0.0)
            out.target_prompt_logprobs = got.tolist()
        if req.alt_k:
            if req.greedy:
                draws = lp.argmax(dim=-1, keepdim=True).expand(-1, req.alt_k)
            else:
                rng = _row_rng(req.seed, -1)  # its own stream: the samples' draws do not depend on it
                cdf = torch.softmax(logits / req.temperature, dim=-1).double().cumsum(dim=-1)
                u = torch.tensor([[rng.random() for _ in range(req.alt_k)] for _ in range(lp.shape[0])],
                                 dtype=torch.float64, device=lp.device) * cdf[:, -1:]
                draws = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
            out.prompt_alt = TopK(ids=draws.tolist(), logprobs=lp.gather(-1, draws).tolist())

    def _decode(self, toks: Sequence[int]) -> str:
        return self.tokenizer.decode(toks, skip_special_tokens=False)

    def _sample(self, logits, rows: list[ResolvedRequest], rngs, temps, top_ks, top_ps):
        """Pick one token per row; return ``(tokens, raw_logprobs_of_tokens, raw_logprobs)``."""
        torch = self._torch
        raw = torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        samp = [b for b, rr in enumerate(rows) if not rr.greedy]
        if samp:
            dev = logits.device
            s_idx = torch.tensor(samp, device=dev) if len(samp) != len(rows) else None
            x = logits if s_idx is None else logits[s_idx]
            t = temps if s_idx is None else temps[s_idx]
            k = top_ks if s_idx is None else top_ks[s_idx]
            p = top_ps if s_idx is None else top_ps[s_idx]
            x = x / t[:, None]
            use_k = any(rows[b].top_k > 0 for b in samp)
            use_p = any(rows[b].top_p < 1.0 for b in samp)
            order = None
            if use_k or use_p:
                x, order = x.sort(dim=-1, descending=True)
                if use_k:
                    V = x.shape[-1]
                    kk = torch.where(k > 0, k, torch.full_like(k, V))
                    x = x.masked_fill(torch.arange(V, device=dev)[None, :] >= kk[:, None], float("-inf"))
            probs = torch.softmax(x, dim=-1)
            if use_p:
                before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
                probs = probs.masked_fill(before >= p[:, None], 0.0)
            cdf = probs.double().cumsum(dim=-1)
            u = torch.tensor([rngs[b].random() for b in samp], dtype=torch.float64, device=dev) * cdf[:, -1]
            choice = torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
            chosen = choice if order is None else order.gather(1, choice[:, None])[:, 0]
            if s_idx is None:
                tokens = chosen
            else:
                tokens[s_idx] = chosen
        return tokens, raw.gather(1, tokens[:, None])[:, 0], raw


def _row_rng(seed: int | None, sample: int) -> random.Random:
    if seed is None:
        return random.Random(secrets.randbits(64))
    # String seeds are hashed with SHA-512 by `random`: stable across processes, platforms and devices.
    return random.Random(f"twinkle-sampler:{seed}:{sample}")
