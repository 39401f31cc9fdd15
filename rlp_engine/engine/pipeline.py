"""The end-to-end RLP pipeline (Algorithm 1): SFT -> reward model -> PPO -> sample P ->
RLP-UML reward model -> PPO, and RLP-SPG reward model -> PPO; then evaluation and the report.

`run_pipeline(cfg)` runs it and returns the report dict (also written to cfg.run.output_dir).
"""

from __future__ import annotations

import json
import platform
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rlp_engine import ops
from rlp_engine.algos.ppo import ppo
from rlp_engine.algos.reward import preference_accuracy, train_reward_model
from rlp_engine.algos.rlp import rlp_spg, rlp_uml, sample_policy
from rlp_engine.algos.sft import sft
from rlp_engine.config import TrainConfig, dump_yaml, to_dict
from rlp_engine.data.build import TaskData, build_data
from rlp_engine.engine.evaluate import evaluate_policy, gold_pairs, reward_model_accuracy
from rlp_engine.engine.metrics import MetricsLogger, Throughput
from rlp_engine.models.heads import ScalarHeadModel
from rlp_engine.models.loading import load_policy, load_tokenizer

STAGES = ("sft", "rm", "ppo", "uml", "spg")


class Run:
    """Shared state of one pipeline run: config, logger, throughput, stage timings, checkpoints."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(self.out, tensorboard=cfg.run.tensorboard)
        self.throughput = Throughput()
        self.stage_seconds: dict[str, float] = {}
        self.device = torch.device(cfg.run.device)
        self.gold = None  # the task's gold reward, logged on PPO rollouts (never trained on)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        print(f"[rlp-engine] stage {name} ...", flush=True)
        yield
        self.stage_seconds[name] = round(time.perf_counter() - start, 2)
        print(f"[rlp-engine] stage {name} done in {self.stage_seconds[name]:.1f} s", flush=True)

    def ppo_kwargs(self, stage: str) -> dict:
        # PPO runs few, costly iterations: every one is logged.
        return {**self.train_kwargs(stage), "gold": self.gold, "log_every": 1}

    def train_kwargs(self, stage: str) -> dict:
        r = self.cfg.run
        return dict(
            logger=self.logger,
            throughput=self.throughput,
            seed=r.seed,
            log_every=r.log_every,
            show_progress=r.progress,
            stage=stage,
        )

    def save(self, name: str, model, tokenizer=None) -> None:
        if not self.cfg.run.save_checkpoints:
            return
        from transformers.utils import logging as hf_logging

        path = self.out / "checkpoints" / name
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint is noise
        try:
            model.save_pretrained(path)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)
        finally:
            if bars:
                hf_logging.enable_progress_bar()


def _setup(cfg: TrainConfig) -> None:
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)


def _stages(cfg: TrainConfig) -> set[str]:
    if cfg.run.stages == "all":
        return set(STAGES)
    chosen = {s.strip() for s in cfg.run.stages.split(",") if s.strip()}
    unknown = chosen - set(STAGES)
    if unknown:
        raise ValueError(f"run.stages: unknown stages {sorted(unknown)}; expected a subset of {STAGES}")
    return chosen | {"sft", "rm", "ppo"}  # RLP refines the reward model of a PPO run


def train_all(run: Run, data: TaskData, tokenizer, policy) -> tuple[dict, dict, dict]:
    """Stages 1-6. Returns (policies, reward models, extra info) keyed by name."""
    cfg = run.cfg
    stages = _stages(cfg)
    with run.stage("sft"):
        sft(policy, tokenizer, data.sft, cfg.sft, cfg.data, **run.train_kwargs("sft"))
        policy.eval()
        run.save("sft", policy, tokenizer)
    with run.stage("rm"):
        rm = ScalarHeadModel.from_causal_lm(policy).to(run.device)
        train_reward_model(rm, tokenizer, data.preferences, cfg.rm, cfg.data, **run.train_kwargs("rm"))
        rm.eval().requires_grad_(False)
        run.save("rm", rm, tokenizer)
    policies, rms, info = {"sft": policy}, {"rm": rm}, {}
    prompts = data.prompts
    with run.stage("ppo"):
        policies["ppo"] = ppo(policy, rm, tokenizer, prompts, cfg.ppo, cfg.data, **run.ppo_kwargs("ppo"))
        run.save("ppo", policies["ppo"], tokenizer)
    if not stages & {"uml", "spg"}:
        return policies, rms, info
    with run.stage("sample"):
        samples = sample_policy(
            policies["ppo"],
            tokenizer,
            prompts[: cfg.sample.num_prompts],
            cfg.sample,
            cfg.data,
            run.throughput,
        )
    if "uml" in stages:
        with run.stage("rm_uml"):
            rms["rm_uml"] = rlp_uml(
                policy, tokenizer, data.preferences, samples, cfg.uml, cfg.data, **run.train_kwargs("rm_uml")
            ).requires_grad_(False)
            run.save("rm_uml", rms["rm_uml"], tokenizer)
        with run.stage("ppo_uml"):
            policies["rlp_uml"] = ppo(
                policy,
                rms["rm_uml"],
                tokenizer,
                prompts,
                cfg.ppo,
                cfg.data,
                **run.ppo_kwargs("ppo_uml"),
            )
            run.save("ppo_uml", policies["rlp_uml"], tokenizer)
    if "spg" in stages:
        with run.stage("rm_spg"):
            rm_spg, synthetic, stats = rlp_spg(
                policy,
                rm,
                tokenizer,
                data.preferences,
                samples,
                cfg.spg,
                cfg.data,
                **run.train_kwargs("rm_spg"),
            )
            rms["rm_spg"] = rm_spg.requires_grad_(False)
            if data.gold is not None and synthetic:
                right = sum(
                    data.gold(p.prompt, p.chosen) > data.gold(p.prompt, p.rejected) for p in synthetic
                )
                stats["synthetic_pair_gold_acc"] = right / len(synthetic)
            info["spg"] = stats
            run.save("rm_spg", rm_spg, tokenizer)
        with run.stage("ppo_spg"):
            policies["rlp_spg"] = ppo(
                policy, rm_spg, tokenizer, prompts, cfg.ppo, cfg.data, **run.ppo_kwargs("ppo_spg")
            )
            run.save("ppo_spg", policies["rlp_spg"], tokenizer)
    return policies, rms, info


# Which reward model each policy was optimised against (its "proxy reward").
PROXY_OF = {"sft": "rm", "ppo": "rm", "rlp_uml": "rm_uml", "rlp_spg": "rm_spg"}


def evaluate_all(run: Run, data: TaskData, tokenizer, policies: dict, rms: dict) -> dict:
    cfg = run.cfg
    evals, report_policies = {}, {}
    for name, pol in policies.items():
        evals[name] = evaluate_policy(pol, tokenizer, data.eval_prompts, cfg.eval, cfg.data, rms, data.gold)
        summary = evals[name].summary()
        summary["proxy_reward"] = summary["proxy_reward_by_rm"].get(PROXY_OF[name])
        report_policies[name] = summary
    pairs = {name: gold_pairs(ev) for name, ev in evals.items()}
    rm_report = {
        name: {"on_policy_accuracy": acc}
        for name, acc in reward_model_accuracy(rms, tokenizer, pairs, cfg.data).items()
    }
    if data.task is not None:
        # Off-policy accuracy: fresh pairs from the preference generator, labelled by gold (no noise).
        heldout = data.task.preferences(256, 0.0, cfg.run.seed + 1000)
        for name, rm in rms.items():
            rm_report[name]["offline_accuracy"] = preference_accuracy(rm, tokenizer, heldout, cfg.data)
    return {"policies": report_policies, "reward_models": rm_report}


def run_pipeline(cfg: TrainConfig) -> dict:
    """Run every stage, evaluate, and write report.json, report.md, the curves' PNG, metrics.jsonl
    (and TensorBoard events) and the per-stage checkpoints under cfg.run.output_dir. The ops run on
    cfg.run.backend ("auto": chosen per device)."""
    if cfg.run.backend == "auto":
        return _run_pipeline(cfg)
    with ops.backend(cfg.run.backend):
        return _run_pipeline(cfg)


def _run_pipeline(cfg: TrainConfig) -> dict:
    from rlp_engine.report import write_report

    _setup(cfg)
    run = Run(cfg)
    (run.out / "config.yaml").write_text(dump_yaml(cfg))
    start = time.perf_counter()
    data = build_data(cfg.data, seed=cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model, data.texts())
    policy = load_policy(cfg.model, tokenizer).to(run.device)
    run.gold = data.gold
    n_params = sum(p.numel() for p in policy.parameters())
    policies, rms, info = train_all(run, data, tokenizer, policy)
    with run.stage("eval"):
        results = evaluate_all(run, data, tokenizer, policies, rms)
    run.logger.close()
    report = {
        **results,
        **info,
        "stage_seconds": run.stage_seconds,
        "total_seconds": round(time.perf_counter() - start, 2),
        "throughput": run.throughput.summary(),
        "model": {"parameters": n_params, "vocab": len(tokenizer)},
        "data": {
            "sft": len(data.sft),
            "preferences": len(data.preferences),
            "prompts": len(data.prompts),
            "eval_prompts": len(data.eval_prompts[: cfg.eval.num_prompts]),
            "eval_samples": cfg.eval.samples_per_prompt,
            "gold": data.gold is not None,
        },
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "device": cfg.run.device,
        },
        "config": to_dict(cfg),
    }
    (run.out / "report.json").write_text(json.dumps(report, indent=2))
    write_report(run.out, report, run.logger.curves)
    return report
