"""The official ``tinker`` SDK against ``deploy/local-tinker.yaml`` deployed on Ray Serve.

The same acceptance suite that runs in-process (packages/twinkle-gateway/tests/test_tinker_sdk.py) runs
here against the real deployment: Serve proxy, the gateway replica, the model and sampler replicas reached
through deployment handles, the SQLite store.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import tinker

from _cluster import REPO, base_env, free_port, terminate, wait_http, wait_launched

pytestmark = pytest.mark.acceptance

MAX_BODY = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinker-deployed")
    port = free_port()
    text = (REPO / "deploy" / "local-tinker.yaml").read_text().replace("port: 8000", f"port: {port}")
    text = "log_format: json\n" + text  # the whole suite runs with structured logs
    text = text.replace("    import_path: server\n    args:\n",
                        f"    import_path: server\n    args:\n      max_body_bytes: {MAX_BODY}\n", 1)
    cfg = root / "local-tinker.yaml"
    cfg.write_text(text)
    env = base_env(TWINKLE_CHECKPOINT_DIR=str(root / "ckpt"))
    proc = subprocess.Popen([sys.executable, "-m", "twinkle.server", "--config", str(cfg)], env=env, cwd=root,
                            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/api/v1/healthz", 300, proc)
        wait_launched(root / "server.log", 120, proc)
        yield base, env, root
    finally:
        terminate(proc, timeout_s=90)


def test_official_sdk_suite_against_the_ray_serve_deployment(deployed):
    base, env, root = deployed
    suite = REPO / "packages" / "twinkle-gateway" / "tests" / "test_tinker_sdk.py"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts="
         "--import-mode=importlib", "-o", "testpaths="],
        env={**env, "TWINKLE_TEST_BASE_URL": base, "TWINKLE_TEST_MAX_BODY_BYTES": str(MAX_BODY),
             "TWINKLE_TEST_OLD_TINKER_PYTHONS": ""},
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail + "\n--- server log ---\n" + (root / "server.log").read_text()[-6000:]
    assert " passed" in run.stdout
    print(run.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- tinker-cookbook 0.6.1, unmodified
# `hatch run test` installs it (--no-deps; its real dependencies are in hatch.toml). Each recipe runs as a user
# runs it, `python -m tinker_cookbook.recipes.…`, against the deployment above. The model is named by the
# tokenizer_id the server reports (the built-in model's directory): the cookbook passes one string both as
# base_model and to AutoTokenizer.from_pretrained.

COOKBOOK_VERSION = "0.6.1"


def _cookbook():
    cookbook = pytest.importorskip("tinker_cookbook", reason="tinker-cookbook is installed by `hatch run test`")
    from importlib.metadata import version

    assert version("tinker-cookbook") == COOKBOOK_VERSION
    return cookbook


def _run_recipe(deployed, module: str, log_path, *args: str) -> list[dict]:
    import json

    from twinkle.common.models import TINY_MODEL_ID, tokenizer_id

    _cookbook()
    base, env, root = deployed
    cmd = [sys.executable, "-m", module, f"model_name={tokenizer_id(TINY_MODEL_ID)}", f"base_url={base}",
           f"log_path={log_path}", "behavior_if_log_dir_exists=delete", *args]
    run = subprocess.run(cmd, env={**env, "TINKER_API_KEY": "tml-cookbook"}, capture_output=True, text=True,
                         timeout=600, cwd=log_path.parent)
    tail = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0, tail + "\n--- server log ---\n" + (root / "server.log").read_text()[-6000:]
    return [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _final_checkpoint(log_path) -> dict:
    import json

    rows = [json.loads(line) for line in (log_path / "checkpoints.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in rows if r.get("name") == "final"]
    assert final, rows
    return final[-1]


@pytest.mark.parametrize("loss_fn", ["stable_reinforce", "importance_sampling", "ppo"])
def test_cookbook_math_rl_arithmetic(deployed, tmp_path, loss_fn):
    """The cookbook's RL recipe: sampling with record_stability_info, provenance on every datum, the loss
    (default stable_reinforce), rewards logged for each of 3 steps, and its final checkpoint saved."""
    log_path = tmp_path / f"math-rl-{loss_fn}"
    metrics = _run_recipe(deployed, "tinker_cookbook.recipes.math_rl.train", log_path, "env=arithmetic",
                          "renderer_name=qwen3", f"loss_fn={loss_fn}", "groups_per_batch=4", "group_size=2",
                          "max_tokens=5", "lora_rank=8", "max_steps=3", "eval_every=0", "save_every=0")
    rewards = [m["env/all/reward/total"] for m in metrics if "env/all/reward/total" in m]
    assert len(rewards) == 3, metrics
    trained = [m["tokens/trained"] for m in metrics if "tokens/trained" in m]
    assert len(trained) == 3 and all(n > 0 for n in trained), metrics
    final = _final_checkpoint(log_path)
    assert final["sampler_path"].startswith("tinker://") and final["state_path"].startswith("tinker://")
    rest = tinker.RestClient(base_url=deployed[0], api_key="tml-cookbook")
    saved = {c.tinker_path for c in rest.list_user_checkpoints().result().checkpoints}
    assert {final["sampler_path"], final["state_path"]} <= saved


def test_cookbook_chat_sl_on_a_local_jsonl(deployed, tmp_path):
    import json

    data = tmp_path / "chats.jsonl"
    with data.open("w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    log_path = tmp_path / "chat-sl"
    metrics = _run_recipe(deployed, "tinker_cookbook.recipes.chat_sl.train", log_path, f"dataset={data}",
                          "renderer_name=qwen3", "batch_size=8", "lora_rank=8", "max_length=256",
                          "learning_rate=1e-3", "num_epochs=1", "eval_every=0", "save_every=0")
    losses = [m["train_mean_nll"] for m in metrics if "train_mean_nll" in m]
    assert losses and all(math.isfinite(x) for x in losses), metrics
    _final_checkpoint(log_path)


# ------------------------------------------------------------------------- OpenAI-compatible surface
# The official `openai` package (pinned in hatch.toml) at <server root>/oai/api/v1 of the same deployment.


@pytest.fixture(scope="module")
def trained_checkpoint(deployed):
    """A run trained a few steps through the Tinker SDK, saved for sampling; its tinker path."""
    from tinker import types

    base, _env, _root = deployed
    sc = tinker.ServiceClient(base_url=base, api_key="tml-oai-alice")
    tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=8, seed=0).result()
    seq = [101, 202, 303, 404, 505, 606, 707, 808]
    datum = types.Datum(model_input=types.ModelInput.from_ints(seq[:-1]),
                        loss_fn_inputs={"target_tokens": seq[1:], "weights": [1.0] * (len(seq) - 1)})
    for _ in range(5):
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=3e-3)).result()
    yield sc, tc.save_weights_for_sampler("oai").result().path
    sc.close("success").result()


def _oai(base: str, key: str = "tml-oai-alice"):
    from openai import OpenAI

    return OpenAI(base_url=f"{base}/oai/api/v1", api_key=key, max_retries=0)


def test_openai_models_and_completions_equal_tinker_sampling(deployed, trained_checkpoint):
    from tinker import types

    from twinkle.common.models import TINY_MODEL_ID, load_tokenizer

    base = deployed[0]
    sc, path = trained_checkpoint
    client = _oai(base)
    ids = [m.id for m in client.models.list().data]
    assert "tiny-qwen2" in ids and path in ids
    tokenizer = load_tokenizer(TINY_MODEL_ID)
    prompt = "The quick brown fox"
    tokens = tokenizer.encode(prompt)
    for model, sampler in (("tiny-qwen2", sc.create_sampling_client(base_model="tiny-qwen2")),
                           (path, sc.create_sampling_client(model_path=path))):
        ref = sampler.sample(types.ModelInput.from_ints(tokens), 1,
                             types.SamplingParams(max_tokens=12, temperature=0.0, stop=[])).result().sequences[0]
        got = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
        choice = got.choices[0]
        assert choice.text == tokenizer.decode(ref.tokens, skip_special_tokens=True)
        assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, ref.logprobs)) < 1e-4
        assert got.usage.prompt_tokens == len(tokens) and got.usage.completion_tokens == len(ref.tokens)
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
        assert chat.choices[0].message.role == "assistant" and chat.choices[0].logprobs.content
        assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
        # streaming reassembles to the same text, with the usage chunk last
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_openai_n_stop_ownership_and_errors(deployed, trained_checkpoint):
    import openai

    base = deployed[0]
    _sc, path = trained_checkpoint
    client = _oai(base)
    many = client.completions.create(model=path, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=5)
    assert [c.index for c in many.choices] == [0, 1, 2]
    again = client.completions.create(model=path, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3,
                                      seed=5)
    assert [c.text for c in again.choices] == [c.text for c in many.choices]  # seeded
    full = client.completions.create(model=path, prompt="Once upon a time", max_tokens=12, temperature=0).choices[0]
    stop = full.text[3:6]
    cut = client.completions.create(model=path, prompt="Once upon a time", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full.text[:full.text.find(stop)] and cut.choices[0].finish_reason == "stop"
    with pytest.raises(openai.NotFoundError) as e:  # another key's checkpoint
        _oai(base, "tml-oai-bob").completions.create(model=path, prompt="x", max_tokens=2)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=path, messages=[{"role": "user", "content": "x"}], top_p=1.5)
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == "top_p"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=path, messages=[{"role": "user", "content": "x"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert e.value.body["param"] == "tools"
    with pytest.raises(openai.AuthenticationError):
        _oai(base, "not-a-key").models.list()
    with pytest.raises(openai.BadRequestError) as e:  # refused before any tokenizer work
        client.completions.create(model=path, prompt="x" * 2_000_000, max_tokens=1)
    assert e.value.body["param"] == "prompt"


def test_the_launcher_logs_json_lines_and_start_up_progress(deployed):
    import json

    lines = [line for line in (deployed[2] / "server.log").read_text().splitlines() if line.startswith("{")]
    messages = [json.loads(line).get("message", "") for line in lines]
    assert any(m.startswith("placement plan") for m in messages)
    # While replicas start: each application's status and replica counts, before the server is up.
    progress = [i for i, m in enumerate(messages) if m.startswith("starting (")]
    up = next(i for i, m in enumerate(messages) if " is up at " in m)
    assert progress and progress[0] < up, messages[:up + 1]
    assert all(name in messages[progress[0]] for name in ("server", "models-tiny-qwen2", "sampler-tiny-qwen2"))


def test_the_server_application_answers_http_itself(deployed):
    """``ingress: gateway``: no Serve proxy in front (its route table is not there), the component apps are
    reached through the server only, and the launcher says so."""
    import httpx

    base, _, root = deployed
    assert httpx.get(f"{base}/api/v1/healthz", timeout=10).status_code == 200
    key = {"X-API-Key": "tml-ingress-check"}
    for path in ("/-/routes", "/-/healthz", "/api/v1/model/tiny-qwen2/healthz"):
        assert httpx.get(f"{base}{path}", headers=key, timeout=10).status_code == 404, path
    log = (root / "server.log").read_text()
    assert "sampler-tiny-qwen2" in log and "(through the server application)" in log


def test_metrics_at_the_server_root_count_each_keys_tokens(deployed, trained_checkpoint):
    """Scraped from loopback without a key, straight from the server application; the OpenAI requests above and a new one
    are per-key counters with latency histograms."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    base = deployed[0]

    def scrape() -> dict:
        text = httpx.get(f"{base}/metrics", timeout=60).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = scrape()
    reply = _oai(base).completions.create(model="tiny-qwen2", prompt="Hello", max_tokens=5, temperature=0)
    after = scrape()
    sampled = {k: v - before.get(k, 0.0) for k, v in after.items() if k[0] == "twinkle_tokens_total"
               and dict(k[1])["kind"] == "sampled" and v != before.get(k, 0.0)}
    assert list(sampled.values()) == [reply.usage.completion_tokens]  # one key moved, by exactly that much
    count = ("twinkle_request_seconds_count", (("kind", "sample"), ("outcome", "done")))
    assert after[count] == before.get(count, 0.0) + 1
    assert after[("twinkle_service_up", (("kind", "model"), ("model", "tiny-qwen2")))] == 1


ARTIFACTS = REPO / "build" / "test-artifacts"


def test_the_web_console_in_a_real_browser(deployed):
    """Log in with a key, watch a run train (the loss curve grows while the page is open), download a
    checkpoint, publish it; another key sees none of it. Leaves a screenshot of the run page in
    ``build/test-artifacts/console-run.png``."""
    import shutil
    import tarfile

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium: `hatch run test` installs Debian's chromium (tests/tools/ensure_chromium.py), "
                    "which could not be done on this machine")
    from tinker import types
    from twinkle.server.auth import principal_id

    base = deployed[0]
    sc = tinker.ServiceClient(base_url=base, api_key="tml-console-alice")
    try:
        tc = sc.create_lora_training_client(base_model="tiny-qwen2", rank=4, seed=1).result()
        data = [types.Datum(model_input=types.ModelInput.from_ints(list(range(30, 62))),
                            loss_fn_inputs={"target_tokens": list(range(31, 63)), "weights": [1.0] * 32})]

        def step() -> None:
            tc.forward_backward(data, "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()

        for _ in range(3):
            step()
        tc.save_state("console-ckpt").result()

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(accept_downloads=True, viewport={"width": 1100, "height": 900})
                page.goto(f"{base}/console/")
                assert "/console/login" in page.url  # signed out: sent to the login form
                page.fill("#api_key", "tml-console-alice")
                page.click("button[type=submit]")
                page.click(f"a:text-is('{tc.model_id}')")
                assert page.inner_text("#step-count") == "3"
                points = "document.getElementById('loss-line').getAttribute('points').trim().split(' ').length"
                assert page.evaluate(points) == 3

                for _ in range(3):  # the run trains on while the page is open: the curve follows
                    step()
                # (expect polls from outside the page: the console's CSP forbids evaluating strings in it)
                sync_api.expect(page.locator("#step-count")).to_have_text("6", timeout=30_000)
                assert page.evaluate(points) == 6
                assert page.locator("#steps tbody tr").count() == 6
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "console-run.png"), full_page=True)

                with page.expect_download() as download:
                    page.click("a:text-is('Download')")
                archive = download.value.path()
                with tarfile.open(archive) as tar:
                    names = tar.getnames()
                assert any(n.endswith("adapter_model.safetensors") for n in names), names

                page.click("button:text-is('Publish')")
                page.wait_for_selector("button:text-is('Unpublish')")
                rest = tinker.RestClient(base_url=base, api_key="tml-console-alice")
                listed = rest.list_checkpoints(tc.model_id).result().checkpoints
                assert [c.public for c in listed if c.checkpoint_id == "weights/console-ckpt"] == [True]

                # usage per day: the tokens this key trained in this test (its 6 steps) are on the page
                page.goto(f"{base}/console/usage")
                # (an open-mode server's users are its admins: then the page lists every key, ours by its id)
                rows = page.locator("tbody tr")
                if page.locator("th", has_text="Key").count():
                    rows = rows.filter(has_text=principal_id("tml-console-alice"))
                cells = rows.filter(has_text="training").locator("td.num").all_inner_texts()
                assert sum(int(c.replace(",", "")) for c in cells) == 6 * data[0].model_input.length, cells

                other = browser.new_page()
                other.goto(f"{base}/console/login")
                other.fill("#api_key", "tml-console-bob")
                other.click("button[type=submit]")
                assert tc.model_id not in other.content()
                assert other.goto(f"{base}/console/runs/{tc.model_id}").status == 404
            finally:
                browser.close()
    finally:
        sc.close("success").result()
