"""What metrics collection costs per training step, measured side by side.

    python bench/metrics_overhead.py [--steps 40] [--json]

An in-process Tinker server (the built-in tiny model, 8×128 tokens, rank 8) runs the official SDK's supervised
step (forward_backward + optim_step) with its metrics (the HTTP middleware and the per-request observer), then
the same steps with both made no-ops, alternating blocks; medians are compared (goal: ≤ 1.02×). The observer
and the middleware are also timed alone, per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import timeit

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tinker
    from tinker import types

    from twinkle.common.models import TINY_MODEL_ID
    from twinkle.common.outcomes import Outcome
    from twinkle.server.core.metrics import Metrics
    from twinkle.server.tinker import TinkerSettings
    from twinkle.server.tinker.testing import LocalTinkerServer

    data = [types.Datum(model_input=types.ModelInput.from_ints([(7 * i + j) % 4000 + 1 for j in range(128)]),
                        loss_fn_inputs={"target_tokens": [(7 * i + j + 1) % 4000 + 1 for j in range(128)]})
            for i in range(8)]
    with tempfile.TemporaryDirectory() as tmp, LocalTinkerServer(TinkerSettings(checkpoint_dir=tmp),
                                                                 TINY_MODEL_ID) as server:
        metrics: Metrics = server.app.state.metrics
        observers = server.app.state.service.plane.observers  # the control plane tells these of each request
        at = observers.index(metrics.finished)
        observer, counter = observers[at], metrics.requests.labels
        sc = tinker.ServiceClient(base_url=server.base_url, api_key="tml-bench")
        tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=8).result()

        def step() -> float:
            t0 = time.perf_counter()
            fb = tc.forward_backward(data, "cross_entropy")
            op = tc.optim_step(types.AdamParams(learning_rate=1e-4))
            fb.result(), op.result()
            return time.perf_counter() - t0

        step()
        counted = _requests_counted(metrics)
        on, off = [], []
        for block in range(args.steps // 5):
            for enabled in ((True, False) if block % 2 == 0 else (False, True)):
                observers[at] = observer if enabled else (lambda *a: None)
                metrics.requests.labels = counter if enabled else (lambda *a: _NoCounter())
                (on if enabled else off).extend(step() for _ in range(5))
        observers[at], metrics.requests.labels = observer, counter
        requests_per_step = (_requests_counted(metrics) - counted) / len(on)  # counted in the 'on' blocks only
        sc.close("success").result()
        outcome = Outcome(owner="p-x", kind="forward_backward", created=0.0, finished=0.5, trained_tokens=1024)
        per_observe = timeit.timeit(lambda: observer(outcome), number=20000) / 20000
        per_count = timeit.timeit(lambda: counter("tinker", "optim_step", "200").inc(), number=20000) / 20000
    out = {"step_with_metrics_s": round(statistics.median(on), 4), "step_without_s": round(statistics.median(off), 4),
           "ratio": round(statistics.median(on) / statistics.median(off), 3),
           "observer_us": round(per_observe * 1e6, 2), "request_counter_us": round(per_count * 1e6, 2),
           "http_requests_per_step": round(requests_per_step, 1),
           # a step: two requests observed (forward_backward, optim_step) and its HTTP requests counted
           "share_of_step": (2 * per_observe + requests_per_step * per_count) / statistics.median(off)}
    print(json.dumps(out, indent=2) if args.json else
          f"step with metrics {out['step_with_metrics_s'] * 1000:.1f} ms, without {out['step_without_s'] * 1000:.1f} ms:"
          f" {out['ratio']}x (goal <= 1.02); observer {out['observer_us']} us/future, counter "
          f"{out['request_counter_us']} us/request; {out['share_of_step']:.4%} of a step by those")


def _requests_counted(metrics) -> float:
    return sum(sample.value for family in metrics.requests.collect() for sample in family.samples
               if sample.name.endswith("_total"))


class _NoCounter:
    def inc(self, *_: object) -> None:
        pass


if __name__ == "__main__":
    main()
