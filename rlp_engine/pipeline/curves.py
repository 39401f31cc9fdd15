"""The over-optimisation curve of every trained policy (Gao et al. 2022): gold reward against KL to
the SFT policy along its training, and the KL estimator the evaluation uses for every policy.

- `sequence_kl`: the k1 estimate of KL(policy || SFT) on the policy's own samples (forward passes
  only: no RNG), per sequence; pipeline/evaluate.py reports its mean as kl_to_sft for every policy.
- Snapshots: a policy-training stage (PPO and its RLP and ensemble variants, GRPO / RLOO, DPO / IPO /
  SimPO) builds its TrainContext with `curve_context(run, stage, <its policy part>)`; the loop
  (recipes/scaffold.run_loop) then calls `snapshot_writer`'s callback after the steps of
  scaffold.curve_steps(steps, eval.curve_points): the policy's full weights (gathered on every rank,
  a collective under torchrun), written by rank 0 to <output_dir>/curve/<stage>/step-NNNNNN/
  (model.safetensors, meta.json), atomically. A resumed stage keeps the ones written before its
  checkpoint and does not write them again.
- `evaluate_curves` (the eval stage, after every other draw): each point's gold mean and KL to SFT,
  each +- its prompt-clustered SE, on the first eval.curve_prompts eval prompts x eval.curve_samples
  samples under one fixed seed (common random numbers across points; the global RNG is kept); the
  curve starts at the SFT policy (fraction 0, KL 0) and ends at the trained policy (fraction 1), both
  measured the same way as the snapshots between them (the report's row keeps the full evaluation's
  figures, on more prompts and samples).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlp_engine.data.batch import SeqBatch
from rlp_engine.engine.checkpoint import publish
from rlp_engine.engine.generate import sample
from rlp_engine.models.policy import response_logprobs
from rlp_engine.recipes.scaffold import TrainContext
from rlp_engine.stats import clustered_mean_se, json_safe

CURVE_DIR = "curve"  # under the run's output_dir: curve/<stage>/step-NNNNNN/
CURVE_SEED_OFFSET = 7  # the curve draws' seed: run.seed + this (the full evaluation's is run.seed)


@torch.no_grad()
def sequence_kl(
    policy, ref, batch: SeqBatch, temperature: float, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl [B], response lengths [B]), float64. kl: the k1 estimate of KL(policy || ref) of each
    sequence of `batch` (sampled from `policy`): the sum over its response tokens of log policy(y_t) -
    log ref(y_t), both from response_logprobs at `temperature` (the sampling distribution's, before any
    top-k / top-p). Unbiased for the sequence KL; its mean over samples is the policy's KL. Forward
    passes in eval mode (no dropout, so no RNG), `batch_size` distinct rows at a time: repeated rows
    (frequent among a prompt's samples: 485 distinct of 4096 at the default size) are computed once.
    `ref is policy`: zeros."""
    lens = batch.response_mask.sum(-1).double()
    if ref is policy:
        return torch.zeros_like(lens), lens
    key = torch.cat([batch.input_ids, batch.attention_mask], 1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    # one row index per distinct row (any occurrence: they are equal)
    first = torch.zeros(len(distinct), dtype=torch.long, device=key.device)
    rows = batch.select(first.scatter_(0, inverse, torch.arange(len(batch), device=key.device)))
    modes = [m.training for m in (policy, ref)]
    policy.eval(), ref.eval()
    try:
        kl = []
        for i in range(0, len(rows), batch_size):
            b = rows.select(slice(i, i + batch_size))
            lp = [
                response_logprobs(m, b.input_ids, b.attention_mask, b.response_len, temperature=temperature)
                for m in (policy, ref)
            ]
            kl.append(((lp[0].double() - lp[1].double()) * b.response_mask.double()).sum(-1))
    finally:
        policy.train(modes[0]), ref.train(modes[1])
    return torch.cat(kl)[inverse], lens


# ---------------------------------------------------------------- snapshots


def save_snapshot(root: Path, step: int, steps: int, weights: dict[str, torch.Tensor]) -> Path:
    """root/step-<step>/ holding model.safetensors (`weights`: full tensors by HF name) and meta.json
    ({"step", "steps", "fraction"}), written aside and renamed into place (replacing an older one)."""
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    meta = {"step": step, "steps": steps, "fraction": step / steps}
    (tmp / "meta.json").write_text(json.dumps(meta))
    publish(tmp, final)
    return final


def list_snapshots(root: Path) -> list[tuple[dict, Path]]:
    """(meta, directory) of every complete snapshot under `root`, by step (unfinished ones skipped)."""
    if not root.is_dir():
        return []
    found = [
        (json.loads((d / "meta.json").read_text()), d)
        for d in root.glob("step-*")
        if (d / "meta.json").is_file() and (d / "model.safetensors").is_file()
    ]
    return sorted(found, key=lambda x: x[0]["step"])


def load_snapshot(template: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of `template` (the SFT policy: same architecture) holding the snapshot's weights."""
    model = copy.deepcopy(template).eval()
    device = next(model.parameters()).device
    weights = load_file(str(Path(path) / "model.safetensors"), device=str(device))
    missing = [name for name, _ in model.named_parameters() if name not in weights]
    if missing:
        raise ValueError(f"load_snapshot: {path} lacks {len(missing)} parameters (first: {missing[0]!r})")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name])
    return model


def snapshot_writer(out: Path, stage: str, part: str, main: bool) -> Callable:
    """TrainContext.snapshot of stage `stage`: the handle's part `part` (its policy) gathered on every
    rank (handle.full_weights: a collective when sharded), saved by the `main` rank under
    out/curve/<stage>/."""

    def snapshot(handle, step: int, steps: int) -> None:
        weights = {name: t.detach().to("cpu", copy=True) for name, t in handle.full_weights(part)}
        if main:
            save_snapshot(Path(out) / CURVE_DIR / stage, step, steps, weights)

    return snapshot


def curve_context(run, stage, part: str, **overrides) -> TrainContext:
    """run.context(stage, **overrides) whose loop also saves the policy in its handle's part `part`
    at eval.curve_points points (module docstring); eval.curve_points 0: run.context's alone."""
    ctx = run.context(stage, **overrides)
    points = run.cfg.eval.curve_points
    if not points:
        return ctx
    snapshot = snapshot_writer(run.out, stage.name, part, run.main)
    return dataclasses.replace(ctx, snapshot=snapshot, curve_points=points)


# ---------------------------------------------------------------- evaluation


def curve_stage(policy: str) -> str:
    """The stage that trained `policy` (its snapshots' directory): "ppo_<x>" for "rlp_<x>" (rlp_uml ->
    ppo_uml, rlp_spg_r2 -> ppo_spg_r2), ppo_rlp_ens for rlp_ens; else the policy's own name (ppo,
    ppo_oracle, ppo_ens_*, dpo, ipo, simpo, grpo, rloo)."""
    if policy == "rlp_ens":
        return "ppo_rlp_ens"
    return "ppo_" + policy[len("rlp_") :] if policy.startswith("rlp_") else policy


def _point(step: int, fraction: float, gold, gold_se, kl, kl_se, n_prompts, samples) -> dict:
    return {
        "step": step,
        "fraction": fraction,
        "gold": gold,
        "gold_se": gold_se,
        "kl_to_sft": kl,
        "kl_to_sft_se": kl_se,
        "n_prompts": n_prompts,
        "samples_per_prompt": samples,
    }


def _groups(values: list, n: int) -> list[list]:
    return [values[i : i + n] for i in range(0, len(values), n)]


def _snapshot_point(model, sft, tokenizer, prompts: list[str], cfg, gold, seed: int, meta: dict) -> dict:
    """A curve point of the snapshot `model`: cfg.eval.curve_samples samples per prompt (eval
    temperature, torch seeded with `seed` inside fork_rng: the global RNG is kept), their gold and
    their KL to `sft`, each mean +- prompt-clustered SE."""
    e = dataclasses.replace(cfg.eval, samples_per_prompt=cfg.eval.curve_samples)
    dev = next(model.parameters()).device
    devices = [torch.cuda.current_device() if dev.index is None else dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        s = sample(model, tokenizer, prompts, e, cfg.data, n=e.samples_per_prompt, batch_size=e.batch_size)
    kl, _ = sequence_kl(model, sft, s.batch, e.temperature, e.batch_size)
    g = None
    if gold is not None:
        scores = [float(gold(p, r)) for p, r in zip(s.prompts, s.responses)]
        g = clustered_mean_se(_groups(scores, e.samples_per_prompt), "gold")
    k = clustered_mean_se(_groups(kl.tolist(), e.samples_per_prompt), "kl")
    return _point(
        meta["step"],
        meta["fraction"],
        g.mean if g else None,
        g.se if g else None,
        k.mean,
        k.se,
        len(prompts),
        e.samples_per_prompt,
    )


def evaluate_curves(run, data, tokenizer, policies: dict, report: dict) -> None:
    """report["policies"][p]["curve"] for every policy p whose stage saved snapshots (module
    docstring): [{"step", "fraction", "gold", "gold_se", "kl_to_sft", "kl_to_sft_se", "n_prompts",
    "samples_per_prompt"}], from SFT (step 0, KL 0) through the snapshots to the trained policy
    (fraction 1), every point on the same prompts, samples and seed; report["eval"]["curve"]: the
    settings and seed. Runs after every other draw of the evaluation."""
    cfg, e, rows = run.cfg, run.cfg.eval, report["policies"]
    if not e.curve_points or "sft" not in policies:
        return
    prompts = data.eval_prompts[: min(e.curve_prompts, e.num_prompts)]
    seed = cfg.run.seed + CURVE_SEED_OFFSET
    sft = policies["sft"]
    report["eval"]["curve"] = {
        "points": e.curve_points,
        "n_prompts": len(prompts),
        "samples": e.curve_samples,
    }
    report["eval"]["curve"]["seed"] = seed
    start = None  # SFT's point, drawn once (the first policy with snapshots needs it)
    for name, policy in policies.items():
        snaps = list_snapshots(Path(run.out) / CURVE_DIR / curve_stage(name))
        if name == "sft" or not snaps:
            continue
        if start is None:
            start = _snapshot_point(
                sft, sft, tokenizer, prompts, cfg, data.gold, seed, {"step": 0, "fraction": 0.0}
            )
        points = [start]
        for meta, path in snaps:
            model = load_snapshot(sft, path)
            points.append(_snapshot_point(model, sft, tokenizer, prompts, cfg, data.gold, seed, meta))
            del model
        end = {"step": snaps[-1][0]["steps"], "fraction": 1.0}
        points.append(_snapshot_point(policy, sft, tokenizer, prompts, cfg, data.gold, seed, end))
        rows[name]["curve"] = json_safe(points)
