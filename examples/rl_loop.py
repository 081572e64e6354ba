"""A small RL loop with the Twinkle client: sample, score with a toy reward, take a policy-gradient step.

    hatch run deploy deploy/local.yaml
    python examples/rl_loop.py --api-key tml-example [--loss ppo]

Each step samples a group of completions per prompt from the run's current weights (``run.sample`` saves
them for the sampler when they changed), scores each completion with a toy reward (the share of its letters
that are vowels), turns rewards into group-relative advantages (reward minus the group's mean), and trains on
the sampled tokens with ``importance_sampling`` (or ``ppo``/``cispo``), using the sampler's logprobs as
the behaviour policy. The mean reward should climb over the steps.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics

from twinkle_client import Datum, TwinkleClient

PROMPTS = ["Q: Say something nice.\nA:", "Q: What do you think?\nA:", "Q: Answer me.\nA:"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="server root (default $TWINKLE_SERVER_URL or :8000)")
    p.add_argument("--api-key", default=os.environ.get("TWINKLE_SERVER_TOKEN", "tml-example"))
    p.add_argument("--base-model", default=None)
    p.add_argument("--loss", default="importance_sampling", choices=["importance_sampling", "ppo", "cispo"])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--group", type=int, default=8, help="samples per prompt")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--letters", default="aeiou", help="the toy reward: the share of these among the letters")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    with TwinkleClient(args.base_url, api_key=args.api_key) as client:
        model = client.capabilities().model(args.base_model)
        prompts = client.tokenize(PROMPTS, base_model=model.name)
        run = client.create_training_run(model.name, rank=8, seed=0, user_metadata={"example": "rl"})
        print(f"training run {run.run_id}: reward = share of the completion's letters in {args.letters!r}")
        config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2} if args.loss == "ppo" else None

        for step in range(1, args.steps + 1):
            data, rewards = [], []
            for seed, prompt in enumerate(prompts):
                out = run.sample(prompt, num_samples=args.group, max_tokens=args.max_tokens, temperature=1.0,
                                 seed=step * 1000 + seed, decode=True)
                scores = [_reward(s.text or "", args.letters) for s in out.sequences]
                mean = statistics.fmean(scores)
                rewards.extend(scores)
                for s, r in zip(out.sequences, scores, strict=True):
                    if s.tokens and r != mean:  # a zero advantage teaches nothing
                        data.append(Datum.rl(prompt, s.tokens, s.logprobs, advantage=r - mean))
            if data:
                fb = run.forward_backward(data, loss_fn=args.loss, loss_fn_config=config)
                run.optim_step(learning_rate=args.lr)
                loss = f"{fb.loss:8.4f}"
            else:
                loss = "   (all equal: no step)"
            print(f"step {step:3d}  mean reward {statistics.fmean(rewards):.3f}  loss {loss}")

        ckpt = run.save("rl-final")
        print(f"saved {ckpt.uri}")


def _reward(text: str, letters: str) -> float:
    alpha = [c for c in text.lower() if c.isalpha()]
    return sum(c in letters for c in alpha) / max(1, len(alpha))


if __name__ == "__main__":
    main()
