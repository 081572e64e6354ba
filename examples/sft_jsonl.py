"""Supervised fine-tuning of a LoRA from a JSONL file, with the Twinkle client.

Start a server (CPU, the built-in tiny model), then run this script::

    hatch run deploy deploy/local.yaml
    python examples/sft_jsonl.py --api-key tml-example          # or: export TWINKLE_SERVER_TOKEN=tml-example

A JSONL row is ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "completion": ...}``
(see ``examples/data/sft.jsonl``). The server's Processor turns the rows into training data (tokens plus loss
weights on the assistant turns / completions); the run trains until its loss falls below ``--target`` of
where it started, saves a resumable state and a sampler checkpoint, and answers each prompt greedily.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from twinkle_client import TwinkleClient

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=HERE / "data" / "sft.jsonl")
    p.add_argument("--base-url", default=None, help="server root (default $TWINKLE_SERVER_URL or :8000)")
    p.add_argument("--api-key", default=os.environ.get("TWINKLE_SERVER_TOKEN", "tml-example"))
    p.add_argument("--base-model", default=None, help="a served model (default: the only one)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-epochs", type=int, default=80)
    p.add_argument("--target", type=float, default=0.05, help="stop when the loss is below this fraction of the first")
    p.add_argument("--name", default="sft-final", help="checkpoint name")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    with TwinkleClient(args.base_url, api_key=args.api_key) as client:
        model = client.capabilities().model(args.base_model)
        print(f"server at {client.root}, training {model.name} ({model.backend}, context {model.max_context_length})")

        data = []
        for page in client.encode_dataset(args.data, base_model=model.name):
            data.extend(page.data)
            print(f"encoded rows {page.offset}..{page.offset + len(page.indices) - 1} of {page.total_rows}: "
                  f"{page.stats.tokens} tokens, {page.stats.trained_tokens} trained")

        run = client.create_training_run(model.name, rank=args.rank, seed=0, user_metadata={"example": "sft"})
        print(f"training run {run.run_id}")
        first = None
        for epoch in range(1, args.max_epochs + 1):
            total = 0.0
            for i in range(0, len(data), args.batch_size):
                total += run.forward_backward(data[i:i + args.batch_size]).loss
                run.optim_step(learning_rate=args.lr)
            first = total if first is None else first
            if epoch == 1 or epoch % 5 == 0:
                print(f"epoch {epoch:3d}  loss {total:9.4f}")
            if total < args.target * first:
                print(f"epoch {epoch:3d}  loss {total:9.4f}  (below {args.target:g} of the first epoch's)")
                break

        state = run.save(args.name, overwrite=True)
        sampler = run.save(args.name, kind="sampler", overwrite=True)
        print(f"saved {state.uri} ({state.size_bytes} bytes) and {sampler.uri}")
        print(f"resume later with: client.resume({state.uri!r})")

        for line in args.data.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                prompt = client.render_chat(row["messages"][:-1], add_generation_prompt=True, base_model=model.name)
                tokens, shown, expected = prompt.tokens, row["messages"][-2]["content"], row["messages"][-1]["content"]
            else:
                tokens = client.tokenize([row["prompt"]], base_model=model.name)[0]
                shown, expected = row["prompt"], row["completion"]
            out = run.sample(tokens, checkpoint=sampler.uri, max_tokens=16, temperature=0.0, decode=True,
                             stop=None)
            answer = client.detokenize([out.sequences[0].tokens], base_model=model.name, skip_special_tokens=True)[0]
            print(f"{shown!r:45} -> {answer!r}   (trained: {expected!r})")


if __name__ == "__main__":
    main()
