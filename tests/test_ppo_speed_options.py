"""PPO's speed options (config.PPOConfig, bench/bench_ppo.py's TRL-like column): ppo.old_logprobs =
"generator" (the rollout's log-probs as the PPO ratio's denominator, as TRL) and ppo.adamw_impl
("foreach", "fused"). Each: its config key, the same math as the default within fp32 rounding
(checked against float64), and a PPO run with it that still lowers its loss. Also bench_ppo's stub of
TRL's housekeeping calls (what it replaces, and that it restores them)."""

import copy
import dataclasses
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny import tiny_preset

from rlp_engine.config import ConfigError, load_config
from rlp_engine.data.batch import SeqBatch
from rlp_engine.engine.generate import sample
from rlp_engine.engine.metrics import Throughput
from rlp_engine.models import ScalarHeadModel
from rlp_engine.models.policy import response_logprobs
from rlp_engine.recipes.ppo import init_ppo, make_experience, ppo_losses, ppo_step, train_on_experience

PROMPTS = [f"{a}+{b}=" for a in range(5) for b in range(3)]  # 15: an odd batch


@pytest.fixture(scope="module")
def tiny():
    cfg, tok, policy = tiny_preset()
    return cfg, tok, policy, ScalarHeadModel.from_causal_lm(policy)


def _state(tiny, **ppo_fields):
    """A PPOState over the fixture's policy and reward model (the same critic init in every state)."""
    cfg, tok, policy, rm = tiny
    ppo_cfg = dataclasses.replace(cfg.ppo, **ppo_fields)
    return init_ppo(policy, rm, tok, ppo_cfg, cfg.data, seed=0)


# ---------------------------------------------------------------- config


def test_config_keys_defaults_and_valid_values():
    p = load_config().ppo
    assert (p.old_logprobs, p.adamw_impl) == ("recompute", "default")  # the pipeline's results unchanged
    p = load_config(overrides=["ppo.old_logprobs=generator", "ppo.adamw_impl=fused"]).ppo
    assert (p.old_logprobs, p.adamw_impl) == ("generator", "fused")
    assert load_config(overrides=["ppo.adamw_impl=foreach"]).ppo.adamw_impl == "foreach"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("ppo.old_logprobs=vllm", r"ppo\.old_logprobs: 'vllm' is not one of \('recompute', 'generator'\)"),
        ("ppo.adamw_impl=apex", r"ppo\.adamw_impl: 'apex' is not one of \('default', 'foreach', 'fused'\)"),
        ("ppo.adamw_impl=1", r"ppo\.adamw_impl"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


# ---------------------------------------------------------------- old log-probs from the generator


def _stop_early(batch, logprobs, pad_id):
    """(batch, generator log-probs) as the generator gives them when rows 0, 3, 6, ... stop at
    response token 2 + row % 3 (random weights rarely sample eos): pad, attention 0 and log-prob 0
    after it. A causal model's log-probs of the tokens kept do not depend on the ones cut."""
    mask = batch.response_mask.clone()
    for row in range(0, len(batch), 3):
        mask[row, 2 + row % 3 :] = 0
    r = batch.response_len
    attn, ids = batch.attention_mask.clone(), batch.input_ids.clone()
    attn[:, -r:] = attn[:, -r:] * mask.long()
    ids[:, -r:] = ids[:, -r:].masked_fill(mask == 0, pad_id)
    assert (mask == 0).any() and (mask == 1).any()
    return SeqBatch(ids, attn, mask), logprobs * mask


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 5)])
def test_generator_logprobs_are_the_recompute_within_fp32_rounding(tiny, temperature, top_k):
    """The builtin generator's log-probs ("scaled": temperature-scaled, before top-k) and the
    teacher-forced recompute, both fp32, against a float64 recompute of the same tokens; with
    old_logprobs=generator the experience takes the generator's exactly, everything else unchanged."""
    cfg, tok, _, _ = tiny
    torch.manual_seed(1)
    state = _state(tiny, temperature=temperature, top_k=top_k)
    gen_state = _state(tiny, temperature=temperature, top_k=top_k, old_logprobs="generator")
    s = sample(state.actor, tok, PROMPTS, state.cfg, cfg.data)
    b, gen_lp = _stop_early(s.batch, s.logprobs, tok.pad_token_id)
    mask = b.response_mask
    f64 = copy.deepcopy(state.actor).double()
    want = response_logprobs(f64, b.input_ids, b.attention_mask, b.response_len, temperature=temperature)
    recompute = response_logprobs(
        state.actor, b.input_ids, b.attention_mask, b.response_len, temperature=temperature
    )
    for got in (gen_lp, recompute):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double() * mask, want * mask, rtol=1e-5, atol=1e-5)
    tp = Throughput()
    plain = make_experience(state, b, tp, gen_lp)
    fast = make_experience(gen_state, b, tp, gen_lp)
    assert torch.equal(fast.old_logprobs, gen_lp)
    assert fast.is_weights is None  # the ratio is to the generator already: TIS weights would be 1
    for name in ("ref_logprobs", "old_values", "scores"):
        assert torch.equal(getattr(fast, name), getattr(plain, name)), name
    for name in ("kl", "advantages", "returns"):
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), rtol=1e-4, atol=1e-4)


def test_generator_option_needs_the_generators_logprobs(tiny):
    cfg, tok, _, _ = tiny
    state = _state(tiny, old_logprobs="generator")
    s = sample(state.actor, tok, PROMPTS[:4], state.cfg, cfg.data)
    with pytest.raises(ValueError, match=r"ppo\.old_logprobs=generator needs gen_logprobs of shape"):
        make_experience(state, s.batch, Throughput())
    with pytest.raises(ValueError, match=r"gen_logprobs of shape \(4, \d+\), got \(4, 1\)"):
        make_experience(state, s.batch, Throughput(), s.logprobs[:, :1])


def test_ppo_step_with_generator_logprobs_runs_and_reports_no_gap(tiny):
    state = _state(tiny, old_logprobs="generator", adamw_impl="fused")
    tp = Throughput()
    for step in range(2):
        m = ppo_step(state, PROMPTS[:8], tp, step=step)
        assert m["gen_logprob_gap"] == 0.0 and m["tis_weight"] == 1.0
        assert all(v == v for v in m.values())  # no NaN anywhere
    assert tp.tokens["scoring"] > 0


# ---------------------------------------------------------------- AdamW implementations


def test_adamw_impl_reaches_the_optimizer(tiny):
    for impl, fused, foreach in (("default", None, None), ("foreach", None, True), ("fused", True, None)):
        opt = _state(tiny, adamw_impl=impl).optimizer
        assert isinstance(opt, torch.optim.AdamW)
        assert (opt.defaults["fused"], opt.defaults["foreach"]) == (fused, foreach), impl


def test_adamw_impls_take_the_same_steps_within_fp32_rounding():
    """Five AdamW steps on fresh random parameters and gradients (odd shapes, a 0-dim one): foreach
    bit-identical to the for-loop, fused within fp32 rounding, all against a float64 for-loop."""
    torch.manual_seed(2)
    shapes = [(7, 5), (13,), (), (3, 1, 4)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]

    def run(dtype, **impl):
        params = [p.to(dtype).clone().requires_grad_() for p in init]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0, **impl)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.to(dtype)
            opt.step()
        return [p.detach() for p in params]

    want = run(torch.float64, foreach=False)
    loop, foreach, fused = (
        run(torch.float32, foreach=False),
        run(torch.float32, foreach=True),
        run(torch.float32, fused=True),
    )
    for a, b, c, w in zip(loop, foreach, fused, want):
        assert torch.equal(a, b)
        for got in (a, c):
            torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the objective still improves


@pytest.mark.parametrize(
    "options", [{"old_logprobs": "generator"}, {"adamw_impl": "fused"}, {"adamw_impl": "foreach"}]
)
def test_ppo_update_with_the_option_lowers_its_loss_on_a_fixed_batch(tiny, options):
    cfg, tok, policy, _ = tiny
    state = _state(tiny, lr=3e-3, **options)
    torch.manual_seed(3)
    s = sample(state.actor, tok, PROMPTS, state.cfg, cfg.data)
    tp = Throughput()
    exp = make_experience(state, s.batch, tp, s.logprobs)
    everything = torch.arange(len(s.batch))
    before, _ = ppo_losses(state, exp, everything)
    for _ in range(4):
        metrics = train_on_experience(state, exp, tp)
    after, _ = ppo_losses(state, exp, everything)
    assert after.item() < before.item() - 1e-3
    assert metrics["skipped_updates"] == 0.0
    moved = any((a - b).abs().max() > 0 for a, b in zip(state.actor.parameters(), policy.parameters()))
    assert moved


# ---------------------------------------------------------------- the bench's TRL housekeeping stub


def _bench_ppo():
    bench = Path(__file__).resolve().parent.parent / "bench"
    sys.path.insert(0, str(bench))  # bench_ppo imports common from its own folder
    try:
        spec = importlib.util.spec_from_file_location("bench_ppo_under_test", bench / "bench_ppo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(bench))


def test_trl_housekeeping_stub_replaces_only_its_names_and_restores_them():
    """On a stand-in for trl's ppo_trainer module: inside the context gc.collect and empty_cache do
    nothing, every other name is untouched; on exit (an exception too) the originals are back."""
    bench = _bench_ppo()
    calls = []
    mod = types.ModuleType("fake_ppo_trainer")
    mod.gc = types.SimpleNamespace(collect=lambda: calls.append("collect") or 7)
    mod.empty_cache = lambda: calls.append("empty_cache")
    mod.torch, mod.batch_generation = torch, object()
    before = dict(vars(mod))
    assert set(bench.TRL_STUBBED) == {"gc", "empty_cache"}
    with bench.trl_housekeeping_stubbed(mod):
        assert mod.gc.collect() == 0 and mod.empty_cache() is None and calls == []
        assert mod.torch is torch and mod.batch_generation is before["batch_generation"]
    assert dict(vars(mod)) == before
    with pytest.raises(RuntimeError, match="boom"), bench.trl_housekeeping_stubbed(mod):
        raise RuntimeError("boom")
    assert dict(vars(mod)) == before
    mod.gc.collect(), mod.empty_cache()
    assert calls == ["collect", "empty_cache"]
