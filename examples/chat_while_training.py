"""Train a LoRA with the official tinker SDK and chat with its checkpoints through the official openai client
while the training goes on.

Start a server in tinker mode (CPU, the built-in tiny model), then run this script::

    hatch run deploy deploy/local-tinker.yaml
    python examples/chat_while_training.py --api-key tml-example      # or: export TWINKLE_SERVER_TOKEN=tml-example

A background thread trains on one short chat (the reply to learn is ``--reply``) and saves a sampler
checkpoint every ``--save-every`` steps; the main thread asks the newest checkpoint the same question through
``<server>/oai/api/v1/chat/completions`` (``twinkle_client.openai.openai_client``) as each one appears, and
prints the reply as it streams, until the run has learnt the reply or ``--steps`` are done.
"""

from __future__ import annotations

import argparse
import queue
import threading

from tinker import types

from twinkle_client.openai import openai_client
from twinkle_client.tinker import service_client


def train(tc, tokens: list[int], weights: list[float], steps: int, save_every: int, saved: queue.Queue) -> None:
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights[1:]})
    for step in range(1, steps + 1):
        fb = tc.forward_backward([datum], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
        loss = fb.result().metrics["loss:sum"]
        if step % save_every == 0 or step == steps:
            saved.put((step, loss, tc.save_weights_for_sampler(f"step-{step}").result().path))
    saved.put(None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="server root (default $TWINKLE_SERVER_URL or :8000)")
    p.add_argument("--api-key", default=None, help="default $TWINKLE_SERVER_TOKEN")
    p.add_argument("--base-model", default="tiny-qwen2")
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--reply", default="Paris.")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--save-every", type=int, default=10)
    args = p.parse_args()

    sc = service_client(args.base_url, args.api_key)
    client, _ = openai_client(args.base_url, args.api_key)
    tc = sc.create_lora_training_client(base_model=args.base_model, rank=16, seed=0).result()
    tokenizer = tc.get_tokenizer()  # the server's tokenizer_id: the model's directory for the built-in model
    messages = [{"role": "user", "content": args.question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": args.reply}], tokenize=False)
    prompt_len = len(tokenizer.encode(prompt))
    tokens = tokenizer.encode(full)
    weights = [0.0] * prompt_len + [1.0] * (len(tokens) - prompt_len)

    saved: queue.Queue = queue.Queue()
    trainer = threading.Thread(target=train, args=(tc, tokens, weights, args.steps, args.save_every, saved),
                               daemon=True)
    trainer.start()
    while (item := saved.get()) is not None:
        step, loss, path = item
        print(f"step {step:3d}  loss {loss:8.4f}  {path}\n  reply: ", end="", flush=True)
        stream = client.chat.completions.create(model=path, messages=messages, max_tokens=16, temperature=0,
                                                stream=True)
        reply = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices
                        and not print(chunk.choices[0].delta.content or "", end="", flush=True))
        print()
        if reply.strip() == args.reply:
            print("learnt.")
    trainer.join()
    sc.close("success").result()


if __name__ == "__main__":
    main()
