"""The end-to-end RLP pipeline (Algorithm 1): SFT -> reward model -> PPO -> sample P ->
RLP-UML reward model -> PPO, and RLP-SPG reward model -> PPO; then evaluation and the report.

`run_pipeline(cfg)` runs it and returns the report dict (also written to cfg.run.output_dir).

Under torchrun it is one SPMD program (`init_distributed()`; single process without torchrun):
every training stage is data-parallel (each rank takes its share of the same global batch, and
gradients are averaged by an explicit all-reduce, so every rank holds the same full weights);
rollouts and the sampling of P are split over ranks; rank 0 alone evaluates and writes metrics,
report, plots and checkpoints while the others wait. RLP_ENGINE_FAIL_AT="stage:rank" makes that
rank raise at the start of that stage (fault injection for the tests of the fail-fast path).
"""

from __future__ import annotations

import json
import os
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
from rlp_engine.engine.distributed import barrier, check_replicas, init_distributed, rank_and_world
from rlp_engine.engine.evaluate import evaluate_policy, gold_pairs, reward_model_accuracy
from rlp_engine.engine.metrics import MetricsLogger, Throughput
from rlp_engine.models.heads import ScalarHeadModel
from rlp_engine.models.loading import load_policy, load_tokenizer

STAGES = ("sft", "rm", "ppo", "uml", "spg")


class Run:
    """Shared state of one pipeline run: config, logger, throughput, stage timings, checkpoints."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world_size = rank_and_world()
        self.main = self.rank == 0  # only rank 0 writes anything under output_dir
        self.out = Path(cfg.run.output_dir)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.logger = MetricsLogger(self.out if self.main else None, tensorboard=cfg.run.tensorboard)
        self.throughput = Throughput()
        self.stage_seconds: dict[str, float] = {}
        self.device = torch.device(cfg.run.device)
        self.gold = None  # the task's gold reward, logged on PPO rollouts (never trained on)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self.say(f"stage {name} ...")
        if os.environ.get("RLP_ENGINE_FAIL_AT") == f"{name}:{self.rank}":
            raise RuntimeError(f"RLP_ENGINE_FAIL_AT: injected failure in stage {name} on rank {self.rank}")
        yield
        self.stage_seconds[name] = round(time.perf_counter() - start, 2)
        self.say(f"stage {name} done in {self.stage_seconds[name]:.1f} s")

    def say(self, text: str) -> None:
        if self.main:
            print(f"[rlp-engine] {text}", flush=True)

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
        check_replicas(model, name)  # every rank must hold the weights rank 0 is about to save
        # every rank holds the same full weights (explicit data parallelism): rank 0 saves them
        if not self.cfg.run.save_checkpoints or not self.main:
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
    cfg.run.backend ("auto": chosen per device). Under torchrun every rank calls it; rank 0 returns
    the report and writes the files, the other ranks return an empty dict."""
    info = init_distributed(timeout_s=cfg.run.dist_timeout_s)
    if info.distributed:
        _check_world(cfg, info.world_size)
        if torch.device(cfg.run.device).type == "cuda":
            cfg.run.device = str(info.device)  # one GPU per rank
    if cfg.run.backend == "auto":
        return _run_pipeline(cfg)
    with ops.backend(cfg.run.backend):
        return _run_pipeline(cfg)


def _check_world(cfg: TrainConfig, world: int) -> None:
    """Every rank needs at least one row of every global batch (and PPO equal shares)."""
    sizes = {
        "sft.batch_size": cfg.sft.batch_size,
        "rm.batch_size": cfg.rm.batch_size,
        "uml.batch_size": cfg.uml.batch_size,
        "uml.ib_batch_size": cfg.uml.ib_batch_size,
        "spg.batch_size": cfg.spg.batch_size,
        "sample.num_prompts": cfg.sample.num_prompts,
    }
    small = {k: v for k, v in sizes.items() if v < world}
    if small:
        raise ValueError(f"world size {world}: these batches give a rank no rows: {small}")
    for key, v in (
        ("ppo.rollout_batch_size", cfg.ppo.rollout_batch_size),
        ("ppo.mini_batch_size", cfg.ppo.mini_batch_size),
    ):
        if v % world:
            raise ValueError(f"world size {world}: {key}={v} must be a multiple of it")


def _run_pipeline(cfg: TrainConfig) -> dict:
    from rlp_engine.report import write_report

    _setup(cfg)
    run = Run(cfg)
    if run.main:
        (run.out / "config.yaml").write_text(dump_yaml(cfg))
    start = time.perf_counter()
    data = build_data(cfg.data, seed=cfg.run.seed)
    tokenizer = load_tokenizer(cfg.model, data.texts())
    policy = load_policy(cfg.model, tokenizer).to(run.device)
    run.gold = data.gold
    n_params = sum(p.numel() for p in policy.parameters())
    policies, rms, info = train_all(run, data, tokenizer, policy)
    with run.stage("eval"):
        # rank 0 evaluates (plain full models: no collective inside); the others wait for it
        results = evaluate_all(run, data, tokenizer, policies, rms) if run.main else {}
        barrier()
    run.logger.close()
    throughput = run.throughput.across_ranks()  # a collective: every rank, before ranks part ways
    if not run.main:
        return {}
    report = {
        **results,
        **info,
        "stage_seconds": run.stage_seconds,
        "total_seconds": round(time.perf_counter() - start, 2),
        "throughput": throughput.summary(),
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
            "world_size": run.world_size,
        },
        "config": to_dict(cfg),
    }
    (run.out / "report.json").write_text(json.dumps(report, indent=2))
    write_report(run.out, report, run.logger.curves)
    return report
