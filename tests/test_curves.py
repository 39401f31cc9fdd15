"""KL to SFT and the gold-vs-KL curves (pipeline/curves.py): the k1 estimator against a float64
computation written out by hand, the snapshot schedule, the loop's snapshots and their round trip.
The curves of a whole run are checked in tests/test_pipeline.py, their resume in tests/test_resume.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import tiny_llama

from rlp_engine.data.batch import SeqBatch
from rlp_engine.engine.layout import train_handle
from rlp_engine.models.heads import position_ids
from rlp_engine.pipeline.curves import (
    curve_stage,
    list_snapshots,
    load_snapshot,
    save_snapshot,
    sequence_kl,
    snapshot_writer,
)
from rlp_engine.recipes.scaffold import TrainContext, curve_steps, run_loop

VOCAB = 37


def _model(seed: int):
    return tiny_llama(
        seed, vocab_size=VOCAB, hidden_size=16, intermediate_size=24, max_position_embeddings=64
    )


def _batch(seed: int, b: int = 5, p: int = 4, r: int = 6) -> SeqBatch:
    """Random rows: prompts left-padded by 0..2 tokens, responses of 1..r tokens then right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, p + r), generator=g)
    attn = torch.ones(b, p + r, dtype=torch.long)
    rmask = torch.zeros(b, r)
    for i in range(b):
        pad = int(torch.randint(0, 3, (1,), generator=g))
        length = int(torch.randint(1, r + 1, (1,), generator=g))
        attn[i, :pad] = 0
        attn[i, p + length :] = 0
        rmask[i, :length] = 1.0
    ids = ids * attn  # pad id 0 off the mask
    return SeqBatch(ids, attn, rmask)


def _logprobs64(model, batch: SeqBatch, temperature: float) -> torch.Tensor:
    """Per-token log-probs [B, R] of the response tokens, float64, from the full logits."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logits = m(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids(batch.attention_mask),
        ).logits
    r = batch.response_len
    logp = torch.log_softmax(logits[:, -r - 1 : -1] / temperature, -1)
    return logp.gather(-1, batch.input_ids[:, -r:, None])[..., 0] * batch.response_mask.double()


@pytest.mark.parametrize("temperature,chunk", [(1.0, 64), (0.7, 2)])
def test_sequence_kl_matches_float64(temperature, chunk):
    policy, ref, batch = _model(1), _model(2), _batch(3)
    policy.train(), ref.eval()  # sequence_kl evaluates in eval mode and puts each mode back
    state = torch.get_rng_state()
    kl, lens = sequence_kl(policy, ref, batch, temperature, chunk)
    assert torch.equal(torch.get_rng_state(), state) and policy.training and not ref.training
    want = (_logprobs64(policy, batch, temperature) - _logprobs64(ref, batch, temperature)).sum(-1)
    assert kl.dtype == torch.float64 and kl.shape == (5,)
    assert want.abs().max() > 0.1  # different models: a KL well away from 0
    torch.testing.assert_close(kl, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lens, batch.response_mask.sum(-1).double())


def test_sequence_kl_computes_repeated_rows_once_with_the_same_values():
    policy, ref, batch = _model(1), _model(2), _batch(3)
    order = torch.tensor([4, 0, 4, 2, 0, 0, 1, 3, 4])  # every row, some several times
    kl, lens = sequence_kl(policy, ref, batch.select(order), 0.7, 2)
    want, want_lens = sequence_kl(policy, ref, batch, 0.7, 64)
    torch.testing.assert_close(kl, want[order], atol=1e-6, rtol=1e-6)
    assert torch.equal(lens, want_lens[order]) and kl[0] == kl[2] == kl[8]


def test_sequence_kl_of_a_policy_to_itself_is_zero():
    policy, batch = _model(4), _batch(5)
    kl, _ = sequence_kl(policy, copy.deepcopy(policy), batch, 0.7, 3)  # same weights, another module
    assert torch.equal(kl, torch.zeros(5, dtype=torch.float64))
    assert torch.equal(sequence_kl(policy, policy, batch, 0.7, 3)[0], torch.zeros(5, dtype=torch.float64))


def test_curve_steps():
    assert curve_steps(100, 4) == [25, 50, 75]
    assert curve_steps(10, 4) == [2, 5, 7]
    assert curve_steps(3, 4) == [1, 2]
    assert curve_steps(2, 4) == [1]  # floor(2/4) = 0 dropped, 1 and 1 once
    assert curve_steps(6, 4) == [1, 3, 4]
    assert curve_steps(1, 4) == [] and curve_steps(0, 4) == []
    assert curve_steps(100, 0) == [] and curve_steps(100, 1) == []
    assert curve_steps(7, 2) == [3]
    with pytest.raises(ValueError, match="steps and points"):
        curve_steps(10, -1)


def test_curve_stage_names():
    assert (
        curve_stage("ppo") == "ppo"
        and curve_stage("dpo") == "dpo"
        and curve_stage("ppo_ens_wco") == "ppo_ens_wco"
    )
    assert curve_stage("rlp_uml") == "ppo_uml" and curve_stage("rlp_spg_r2") == "ppo_spg_r2"
    assert curve_stage("rlp_ens") == "ppo_rlp_ens" and curve_stage("grpo_spg") == "grpo_spg"


def test_run_loop_saves_snapshots_at_the_schedule_and_they_load_back(tmp_path):
    model = _model(6)
    handle = train_handle(
        {"policy": model}, lambda ps: torch.optim.SGD(ps, lr=0.1), max_grad_norm=1.0, copy=True
    )
    batch = _batch(7)
    seen = {}

    def step_fn(step, guard):
        # a real update each step, so that every snapshot holds different weights
        from rlp_engine.models.policy import response_logprobs

        lp = response_logprobs(
            handle.parts["policy"], batch.input_ids, batch.attention_mask, batch.response_len
        )
        handle.step(-(lp * batch.response_mask).sum(), guard=guard, step=step)
        seen[step + 1] = {k: v.detach().clone() for k, v in model.named_parameters()}
        return {}

    ctx = TrainContext(stage="dpo", snapshot=snapshot_writer(tmp_path, "dpo", "policy", True), curve_points=4)
    run_loop(ctx, handle, 10, step_fn)
    snaps = list_snapshots(tmp_path / "curve" / "dpo")
    assert [m["step"] for m, _ in snaps] == [2, 5, 7]
    assert [(m["steps"], m["fraction"]) for m, _ in snaps] == [(10, 0.2), (10, 0.5), (10, 0.7)]
    template = _model(0)  # another init: every weight must come from the snapshot
    for meta, path in snaps:
        loaded = load_snapshot(template, path)
        for name, p in loaded.named_parameters():
            assert torch.equal(p, seen[meta["step"]][name]), (meta, name)
    assert not torch.equal(seen[2]["model.norm.weight"], seen[7]["model.norm.weight"])


def test_snapshot_listing_skips_unfinished_and_refuses_a_wrong_model(tmp_path):
    model = _model(8)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    save_snapshot(tmp_path, 3, 12, weights)
    (tmp_path / ".tmp-step-000006").mkdir()  # a write cut short: not listed
    (tmp_path / "step-000009").mkdir()  # no meta.json / weights: not listed
    snaps = list_snapshots(tmp_path)
    assert [m for m, _ in snaps] == [{"step": 3, "steps": 12, "fraction": 0.25}]
    assert json.loads((snaps[0][1] / "meta.json").read_text())["step"] == 3
    assert list_snapshots(tmp_path / "absent") == []
    bigger = tiny_llama(0, vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=3)
    with pytest.raises(ValueError, match="lacks"):
        load_snapshot(bigger, snaps[0][1])


@pytest.mark.parametrize(
    "override",
    ["eval.curve_points=-1", "eval.curve_prompts=0", "eval.curve_samples=0", "eval.curve_points=1.5"],
)
def test_curve_options_are_validated_naming_the_key(override):
    from rlp_engine.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])
    assert load_config(None, ["eval.curve_points=0"]).eval.curve_points == 0  # 0: curves off


def test_curve_points_zero_turns_curves_off_and_keeps_kl(tmp_path):
    from rlp_engine.cli import main

    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--output-dir", str(out), "run.stages=dpo", "run.tensorboard=false"]
    assert main([*args, "eval.curve_points=0", "run.threads=1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["policies"]) == {"sft", "ppo", "dpo"}
    assert all(
        "curve" not in row and isinstance(row["kl_to_sft"], float) for row in report["policies"].values()
    )
    assert not (out / "curve").exists() and not (out / "gold_vs_kl.png").exists()
