"""OpenAI-compatible surface vs Tinker's ``sample`` for the same request, measured side by side.

    python bench/oai_bench.py [--rounds 15] [--max-tokens 64] [--json]

One in-process Tinker-compatible server (``LocalTinkerServer``, the built-in tiny model, real samplers). Each
round sends the same greedy request (a fixed prompt, ``max_tokens`` tokens, no stop) three ways, in turn:
the official tinker SDK's ``sample`` (time to its result), the official openai client's streamed
``completions.create`` (time to the first text chunk, and to the last), and its non-streamed one. Medians are
compared: goal ``openai / tinker <= 1.1``. The engines return whole sequences, so a stream's first chunk
comes once the completion is sampled: time-to-first-token is the completion's latency on both paths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tinker
    from openai import OpenAI
    from tinker import types

    from twinkle.common.models import TINY_MODEL_ID, load_tokenizer
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    prompt = "The history of the printing press begins"
    tokens = load_tokenizer(TINY_MODEL_ID).encode(prompt)
    with tempfile.TemporaryDirectory() as tmp, LocalTinkerServer(TinkerSettings(checkpoint_dir=tmp),
                                                                 TINY_MODEL_ID) as server:
        sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench")
        sampler = sc.create_sampling_client(base_model="tiny-qwen2")
        client = OpenAI(base_url=f"{server.base_url}/oai/api/v1", api_key="tml-bench", max_retries=0)
        params = types.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, stop=[])
        ask = dict(model="tiny-qwen2", prompt=prompt, max_tokens=args.max_tokens, temperature=0)

        def tinker_sample() -> float:
            t0 = time.perf_counter()
            sampler.sample(types.ModelInput.from_ints(tokens), 1, params).result()
            return time.perf_counter() - t0

        def oai_stream() -> tuple[float, float, int]:
            t0 = time.perf_counter()
            first, n = None, 0
            for chunk in client.completions.create(**ask, stream=True):
                if chunk.choices and chunk.choices[0].text:
                    first = first or time.perf_counter() - t0
                    n += 1
            return first or 0.0, time.perf_counter() - t0, n

        def oai_plain() -> float:
            t0 = time.perf_counter()
            client.completions.create(**ask)
            return time.perf_counter() - t0

        tinker_sample(), oai_stream(), oai_plain()  # warm up: tokenizers, adapters, connections
        rows = {"tinker_sample_s": [], "oai_ttft_s": [], "oai_stream_total_s": [], "oai_s": []}
        for _ in range(args.rounds):
            rows["tinker_sample_s"].append(tinker_sample())
            ttft, total, _ = oai_stream()
            rows["oai_ttft_s"].append(ttft)
            rows["oai_stream_total_s"].append(total)
            rows["oai_s"].append(oai_plain())
        sc.close("success").result()
    med = {k: statistics.median(v) for k, v in rows.items()}
    out = {
        "max_tokens": args.max_tokens, "rounds": args.rounds, **{k: round(v, 4) for k, v in med.items()},
        "ttft_ratio": round(med["oai_ttft_s"] / med["tinker_sample_s"], 3),
        "stream_ratio": round(med["oai_stream_total_s"] / med["tinker_sample_s"], 3),
        "plain_ratio": round(med["oai_s"] / med["tinker_sample_s"], 3),
        "oai_stream_tokens_per_s": round(args.max_tokens / med["oai_stream_total_s"], 1),
        "tinker_tokens_per_s": round(args.max_tokens / med["tinker_sample_s"], 1),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"greedy, {args.max_tokens} tokens, median of {args.rounds} interleaved rounds")
    print(f"  tinker sample          {med['tinker_sample_s'] * 1000:8.1f} ms  {out['tinker_tokens_per_s']} tok/s")
    print(f"  openai stream, 1st tok {med['oai_ttft_s'] * 1000:8.1f} ms  ratio {out['ttft_ratio']}")
    print(f"  openai stream, all     {med['oai_stream_total_s'] * 1000:8.1f} ms  ratio {out['stream_ratio']}  "
          f"{out['oai_stream_tokens_per_s']} tok/s")
    print(f"  openai, not streamed   {med['oai_s'] * 1000:8.1f} ms  ratio {out['plain_ratio']}  (goal <= 1.1)")


if __name__ == "__main__":
    main()
