"""Should the server ask the SDK to zstd-compress forward_backward bodies (``proto_compress_fwdbwd``)?

    python bench/fwdbwd_compression.py [--datums 64] [--seq 512] [--json]

Builds the bodies the official SDK sends (its own ``forward_backward_request_to_proto``) for a supervised batch
(cross_entropy: target_tokens + weights, prompt masked) and an RL batch as tinker-cookbook builds it
(target_tokens, logprobs, advantages, provenance spans), then measures side by side: body bytes raw and
zstd-compressed (the SDK's default level), the SDK's compress time, the server's decompress time
(``ZstdRequestMiddleware``), and the link speed below which compressing saves time:
``saved bytes / (compress + decompress time)``. Token ids come from the built-in tiny model's vocabulary
(4096) and from a 150k vocabulary (a real model's ids need more bytes).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import zstandard
from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto


def _batch(kind: str, datums: int, seq: int, vocab: int, rng: random.Random) -> bytes:
    data = []
    for i in range(datums):
        prompt = seq // 4
        tokens = [rng.randrange(vocab) for _ in range(seq + 1)]
        inputs: dict = {"target_tokens": tokens[1:]}
        if kind == "sl":
            inputs["weights"] = [0.0] * (prompt - 1) + [1.0] * (seq - prompt + 1)
        else:
            sampled = seq - prompt + 1
            inputs["logprobs"] = [0.0] * (prompt - 1) + [-rng.expovariate(1.0) for _ in range(sampled)]
            inputs["advantages"] = [0.0] * (prompt - 1) + [rng.choice((-1.0, 1.0)) * 0.5] * sampled
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)
        if kind == "rl":
            sid = f"seq-{i:016x}"
            datum = datum.with_provenance(
                model_input=[types.PromptProvenanceSpan(sequence_id=sid, length=prompt),
                             types.SampledProvenanceSpan(sequence_id=sid, length=seq - prompt)],
                loss_fn_inputs=[types.PromptProvenanceSpan(sequence_id=sid, offset=1, length=prompt - 1),
                                types.SampledProvenanceSpan(sequence_id=sid, length=seq - prompt + 1)])
        data.append(datum)
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn="cross_entropy" if kind == "sl" else "importance_sampling"),
        model_id="sess-x:train:0", seq_id=1)
    return forward_backward_request_to_proto(request).SerializeToString()


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datums", type=int, default=64)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rng = random.Random(0)
    rows = []
    for kind in ("sl", "rl"):
        for vocab in (4096, 151_936):
            body = _batch(kind, args.datums, args.seq, vocab, rng)
            packed = zstandard.ZstdCompressor().compress(body)
            compress_ms = _median_ms(lambda: zstandard.ZstdCompressor().compress(body), args.repeat)
            decompress_ms = _median_ms(
                lambda: zstandard.ZstdDecompressor().stream_reader(packed).read(len(body) + 1), args.repeat)
            saved = len(body) - len(packed)
            cost_s = (compress_ms + decompress_ms) / 1000
            rows.append({
                "batch": kind, "vocab": vocab, "raw_bytes": len(body), "zstd_bytes": len(packed),
                "ratio": round(len(packed) / len(body), 3), "compress_ms": round(compress_ms, 2),
                "decompress_ms": round(decompress_ms, 2),
                "break_even_mbit_s": round(saved * 8 / cost_s / 1e6, 1) if cost_s > 0 and saved > 0 else None,
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.datums} datums x {args.seq} tokens")
    print(f"{'batch':5} {'vocab':>7} {'raw KiB':>9} {'zstd KiB':>9} {'ratio':>6} {'comp ms':>8} {'dec ms':>7} "
          f"{'helps below Mbit/s':>19}")
    for r in rows:
        print(f"{r['batch']:5} {r['vocab']:>7} {r['raw_bytes'] / 1024:>9.1f} {r['zstd_bytes'] / 1024:>9.1f} "
              f"{r['ratio']:>6} {r['compress_ms']:>8} {r['decompress_ms']:>7} {str(r['break_even_mbit_s']):>19}")


if __name__ == "__main__":
    main()
