"""Losses against hand-written per-token reference formulas and their analytic gradients (tinker-protocol §6.6)."""

from __future__ import annotations

import math

import pytest
import torch
from twinkle.common.wire import Datum, ForwardBackwardInput, TensorData, UserError
from twinkle.model import losses as L

N = 64


def _data(seed: int, n: int = N):
    g = torch.Generator().manual_seed(seed)
    q = -torch.rand(n, generator=g) * 4 - 0.2
    # lp spread around q so that ratios fall below, inside and above every clip range
    lp = q + torch.randn(n, generator=g) * 0.6
    adv = torch.randn(n, generator=g)
    w = torch.randn(n, generator=g) * 2  # negative weights included
    mask = (torch.rand(n, generator=g) > 0.3).float()
    return lp, q, adv, w, mask


def _grad(fn, lp, inputs, cfg):
    x = lp.clone().requires_grad_(True)
    out = fn(x, inputs, cfg)
    out.sum().backward()
    return out.detach(), x.grad


def _clip(x, lo, hi):
    return min(max(x, lo), hi)


def test_cross_entropy_value_and_grad_with_negative_weights():
    lp, _, _, w, _ = _data(1)
    val, grad = _grad(L.cross_entropy, lp, {"weights": w}, {})
    for t in range(N):
        assert val[t].item() == pytest.approx(-w[t].item() * lp[t].item(), rel=1e-6, abs=1e-7)
        assert grad[t].item() == pytest.approx(-w[t].item(), rel=1e-6)
    assert (w < 0).any()


def test_cross_entropy_missing_weights_means_one():
    lp, *_ = _data(2)
    val, grad = _grad(L.cross_entropy, lp, {}, {})
    assert torch.equal(val, -lp)
    assert torch.equal(grad, -torch.ones(N))


def test_importance_sampling():
    lp, q, adv, _, _ = _data(3)
    val, grad = _grad(L.importance_sampling, lp, {"logprobs": q, "advantages": adv}, {})
    for t in range(N):
        r = math.exp(lp[t].item() - q[t].item())
        assert val[t].item() == pytest.approx(-r * adv[t].item(), rel=1e-5, abs=1e-6)
        assert grad[t].item() == pytest.approx(-r * adv[t].item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("lo,hi", [(0.8, 1.2), (0.5, 1.5)])
def test_ppo(lo, hi):
    lp, q, adv, _, _ = _data(4)
    cfg = {"clip_low_threshold": lo, "clip_high_threshold": hi}
    val, grad = _grad(L.ppo, lp, {"logprobs": q, "advantages": adv}, cfg)
    clipped_tokens = 0
    for t in range(N):
        r, a = math.exp(lp[t].item() - q[t].item()), adv[t].item()
        unclipped, clipped = r * a, _clip(r, lo, hi) * a
        assert val[t].item() == pytest.approx(-min(unclipped, clipped), rel=1e-5, abs=1e-6)
        expected_grad = -r * a if unclipped <= clipped else 0.0
        clipped_tokens += unclipped > clipped
        assert grad[t].item() == pytest.approx(expected_grad, rel=1e-5, abs=1e-6)
    assert 0 < clipped_tokens < N  # both branches exercised


def test_cispo_stop_gradient_on_clipped_ratio():
    lp, q, adv, _, _ = _data(5)
    cfg = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    val, grad = _grad(L.cispo, lp, {"logprobs": q, "advantages": adv}, cfg)
    outside = 0
    for t in range(N):
        r, a, x = math.exp(lp[t].item() - q[t].item()), adv[t].item(), lp[t].item()
        c = _clip(r, 0.9, 1.1)
        outside += c != r
        assert val[t].item() == pytest.approx(-c * x * a, rel=1e-5, abs=1e-6)
        # d/dlp of -sg(c)*lp*A is -c*A: no gradient through the ratio, none lost when clipped
        assert grad[t].item() == pytest.approx(-c * a, rel=1e-5, abs=1e-6)
    assert outside > 0


def test_dro():
    lp, q, adv, _, _ = _data(6)
    beta = 0.3
    val, grad = _grad(L.dro, lp, {"logprobs": q, "advantages": adv}, {"beta": beta})
    for t in range(N):
        x, y, a = lp[t].item(), q[t].item(), adv[t].item()
        assert val[t].item() == pytest.approx(-(x * a - 0.5 * beta * (x - y) ** 2), rel=1e-5, abs=1e-6)
        assert grad[t].item() == pytest.approx(-(a - beta * (x - y)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("lo,hi", [(0.9997, 1.0004), (0.2, 5.0)])
def test_gspo_token_form(lo, hi):
    rows = []
    for seed in (7, 8, 9):
        rows.append(_data(seed, n=16))
    lp = torch.stack([r[0] for r in rows])
    q = torch.stack([r[1] for r in rows])
    adv = torch.stack([r[2] for r in rows])
    mask = torch.stack([r[4] for r in rows])
    cfg = {"clip_low_threshold": lo, "clip_high_threshold": hi}
    val, grad = _grad(L.gspo, lp, {"logprobs": q, "advantages": adv, "sequence_ratio_mask": mask}, cfg)
    for i in range(3):
        m = mask[i].tolist()
        s = math.exp(sum(mi * (a - b) for mi, a, b in zip(m, lp[i].tolist(), q[i].tolist())) / sum(m))
        for t in range(16):
            a = adv[i, t].item()
            unclipped, clipped = s * a, _clip(s, lo, hi) * a
            assert val[i, t].item() == pytest.approx(-m[t] * min(unclipped, clipped), rel=1e-5, abs=1e-6)
            expected = -m[t] * s * a if unclipped <= clipped else 0.0
            assert grad[i, t].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_gspo_empty_mask_contributes_nothing():
    lp, q, adv, _, _ = _data(10, n=8)
    val, grad = _grad(L.gspo, lp, {"logprobs": q, "advantages": adv, "sequence_ratio_mask": torch.zeros(8)},
                      L.LOSSES["gspo"].defaults)
    assert torch.equal(val, torch.zeros(8)) and torch.equal(grad, torch.zeros(8))


@pytest.mark.parametrize("lo,hi", [(0.5, 2.0), (0.8, 1.25)])
def test_stable_reinforce_trust_band(lo, hi):
    lp, q, adv, _, _ = _data(11)
    cfg = {"clip_low_threshold": lo, "clip_high_threshold": hi}
    val, grad = _grad(L.stable_reinforce, lp, {"logprobs": q, "advantages": adv}, cfg)
    inside = outside = 0
    for t in range(N):
        r, a, x = math.exp(lp[t].item() - q[t].item()), adv[t].item(), lp[t].item()
        w = r if lo <= r <= hi else 0.0
        inside += w != 0.0
        outside += w == 0.0
        assert val[t].item() == pytest.approx(-w * x * a, rel=1e-5, abs=1e-6)
        # the ratio is a constant weight: d/dlp = -w * A (the off-policy policy gradient inside the band)
        assert grad[t].item() == pytest.approx(-w * a, rel=1e-5, abs=1e-6)
    assert inside > 0 and outside > 0  # both sides of the band exercised


def test_stable_reinforce_reports_the_share_outside_the_band():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    q = lp - torch.log(torch.tensor([[1.0, 3.0, 0.25, 1.5]]))  # ratios 1, 3, 0.25, 1.5
    adv = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # the last token carries no signal
    spec, cfg = L.resolve_loss("stable_reinforce", None)
    inputs = {"logprobs": q, "advantages": adv}
    metrics = L.loss_metrics(spec, cfg, lp, inputs, spec.fn(lp, inputs, cfg), torch.ones(1, 4))
    assert metrics["clip_fraction:mean"] == pytest.approx(2 / 3)
    assert metrics["ratio:max"] == pytest.approx(3.0) and metrics["ratio:min"] == pytest.approx(0.25)
    assert metrics["loss:sum"] == pytest.approx(-1.0 * math.log(0.5))


def test_defaults():
    assert L.LOSSES["stable_reinforce"].defaults == {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
    assert L.LOSSES["ppo"].defaults == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    assert L.LOSSES["cispo"].defaults == {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
    assert L.LOSSES["dro"].defaults == {"beta": 0.05}
    _, cfg = L.resolve_loss("ppo", {"clip_high_threshold": 1.5})
    assert cfg == {"clip_low_threshold": 0.8, "clip_high_threshold": 1.5}


# --- validation: every error names its field -----------------------------------------------------------


def _datum(n=5, **inputs):
    base = {"target_tokens": TensorData(list(range(1, n + 1)), "int64")}
    base.update(inputs)
    return Datum(model_input=list(range(n)), loss_fn_inputs={k: v for k, v in base.items() if v is not None})


def _rl(n=5, **over):
    d = {"logprobs": TensorData([-1.0] * n), "advantages": TensorData([0.5] * n)}
    d.update(over)
    return d


@pytest.mark.parametrize(
    "inp,field,words",
    [
        (ForwardBackwardInput([_datum()], loss_fn="nope"), "loss_fn", ["unknown loss", "cross_entropy"]),
        (ForwardBackwardInput([_datum(**_rl())], loss_fn="ppo", loss_fn_config={"foo": 1.0}),
         "loss_fn_config.foo", ["clip_high_threshold"]),
        (ForwardBackwardInput([_datum()], loss_fn_config={"beta": 1.0}), "loss_fn_config.beta", ["none"]),
        (ForwardBackwardInput([_datum(**_rl())], loss_fn="dro", loss_fn_config={"beta": "x"}),
         "loss_fn_config.beta", ["finite number"]),
        (ForwardBackwardInput([_datum(**_rl())], loss_fn="ppo",
                              loss_fn_config={"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}),
         "loss_fn_config.clip_low_threshold", ["above"]),
        (ForwardBackwardInput([_datum(**_rl()), _datum(logprobs=TensorData([-1.0] * 5))], loss_fn="ppo"),
         "data[1].loss_fn_inputs.advantages", ["needs input", "length 5"]),
        (ForwardBackwardInput([_datum(weights=TensorData([1.0] * 4))]),
         "data[0].loss_fn_inputs.weights", ["expected length 5", "got length 4"]),
        (ForwardBackwardInput([_datum(**_rl(advantages=TensorData([1.0] * 7)))], loss_fn="importance_sampling"),
         "data[0].loss_fn_inputs.advantages", ["expected length 5", "got length 7"]),
        (ForwardBackwardInput([Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": TensorData([1.0, 2.0])})]),
         "data[0].loss_fn_inputs.target_tokens", ["int64"]),
        (ForwardBackwardInput([_datum(weights=TensorData([1.0] * 10, shape=[2, 5]))]),
         "data[0].loss_fn_inputs.weights", ["1-D", "[2, 5]"]),
        (ForwardBackwardInput([_datum(weights=TensorData([1.0] * 4, shape=[5]))]),
         "data[0].loss_fn_inputs.weights", ["holds 5 values", "data has 4"]),
        (ForwardBackwardInput([_datum(**_rl(advantages=TensorData([1.0, float("nan"), 1.0, 1.0, 1.0])))],
                              loss_fn="ppo"), "data[0].loss_fn_inputs.advantages", ["finite"]),
        (ForwardBackwardInput([_datum(mask=TensorData([1.0] * 5))]), "data[0].loss_fn_inputs.mask", ["takes no input"]),
        (ForwardBackwardInput([_datum(**_rl())], loss_fn="gspo"),
         "data[0].loss_fn_inputs.sequence_ratio_mask", ["needs input"]),
        (ForwardBackwardInput([]), "data", ["at least one"]),
        (ForwardBackwardInput([Datum(model_input=[], loss_fn_inputs={})]), "data[0].model_input", ["empty"]),
        (ForwardBackwardInput([Datum(model_input=[1, 99999], loss_fn_inputs={"target_tokens": TensorData([1, 2], "int64")})]),
         "data[0].model_input", ["99999", "vocabulary"]),
        (ForwardBackwardInput([_datum(), Datum(model_input=[1, 2], loss_fn_inputs={"target_tokens": TensorData([1, -3], "int64")})]),
         "data[1].loss_fn_inputs.target_tokens", ["-3"]),
        (ForwardBackwardInput([Datum(model_input=list(range(20)), loss_fn_inputs={"target_tokens": TensorData([1] * 20, "int64")})]),
         "data[0].model_input", ["20 tokens", "limit per datum is 16"]),
        (ForwardBackwardInput([Datum(model_input=[1, 2], loss_fn_inputs={})]),
         "data[0].loss_fn_inputs.target_tokens", ["needs input"]),
    ],
)
def test_validation_names_field(inp, field, words):
    with pytest.raises(UserError) as ei:
        L.validate_request(inp, vocab_size=1000, max_length=16)
    assert ei.value.field == field
    assert ei.value.status == 400
    for w in words:
        assert w in str(ei.value), str(ei.value)
    assert str(ei.value).startswith(field + ":")


def test_valid_request_converts_to_tensors():
    req = L.validate_request(
        ForwardBackwardInput([_datum(**_rl())], loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7}),
        vocab_size=1000,
    )
    assert req.spec.name == "ppo" and req.config["clip_low_threshold"] == 0.7
    assert req.inputs[0]["target_tokens"].dtype == torch.int64
    assert req.inputs[0]["advantages"].dtype == torch.float32
    assert req.lengths == [5]


def test_metrics_keys_and_merge():
    lp, q, adv, _, _ = _data(11)
    spec, cfg = L.resolve_loss("ppo", None)
    inputs = {"logprobs": q, "advantages": adv}
    m = L.loss_metrics(spec, cfg, lp, inputs, L.ppo(lp, inputs, cfg), torch.ones(N))
    assert set(m) == {"loss:sum", "ratio:mean", "ratio:min", "ratio:max", "clip_fraction:mean"}
    for key in m:
        assert key.split(":")[1] in L.REDUCTIONS
    r = torch.exp(lp - q)
    assert m["ratio:min"] == pytest.approx(float(r.min()))
    merged = L.merge_metrics([({"loss:sum": 1.0, "r:mean": 1.0, "r:min": 3.0}, 1), ({"loss:sum": 2.0, "r:mean": 4.0, "r:min": 2.0}, 3)])
    assert merged == {"loss:sum": 3.0, "r:mean": pytest.approx(3.25), "r:min": 2.0}
