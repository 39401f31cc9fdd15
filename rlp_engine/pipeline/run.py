"""The end-to-end RLP pipeline (Algorithm 1): SFT -> reward model -> PPO -> sample P ->
RLP-UML reward model -> PPO, and RLP-SPG reward model -> PPO; then evaluation and the report.

`run_pipeline(cfg)` runs it and returns the report dict (also written to cfg.run.output_dir).

Under torchrun it is one SPMD program (`init_distributed()`; single process without torchrun):
every training stage trains sharded (FSDP2, or DeepSpeed ZeRO-3 with run.train_backend=deepspeed),
each rank on its share of the same global batch, and hands full weights back at its end; rollouts
and the sampling of P are split over ranks; rank 0 alone evaluates and writes metrics, report, plots
and the HF exports while the others wait; every rank writes its part of the resumable checkpoints
(engine/checkpoint.py); the stages themselves are in pipeline/stages.py.
`run_pipeline(cfg, resume, hook=...)`: the hook (engine/checkpoint.py's `Hook`) is called at each
stage's start and the training loops' step and checkpoint points; the tests inject faults through
it (tests/fault_runner.py). Each rank's device is `Run.device` (one GPU per rank under torchrun);
the config is not changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from rlp_engine import ops
from rlp_engine.config import ConfigError, TrainConfig, dump_yaml, to_dict
from rlp_engine.engine.checkpoint import CheckpointStore, Hook, LoopCheckpoint, publish
from rlp_engine.engine.distributed import barrier, check_replicas, init_distributed, rank_and_world
from rlp_engine.engine.interrupts import SIGINT, Interrupted
from rlp_engine.engine.metrics import MetricsLogger, Throughput
from rlp_engine.pipeline.evaluate import evaluate_all
from rlp_engine.pipeline.inputs import prepare_inputs
from rlp_engine.pipeline.stages import stage_names, train_all
from rlp_engine.recipes.scaffold import TrainContext


class Stage:
    """What `Run.stage(name)` yields. `done`: the stage finished in an earlier process of this run
    (resumed): its body must skip the work and `keep` loads its saved outputs instead. `ckpt`: the
    checkpoint handle to pass to the stage's training loop."""

    def __init__(self, run: Run, name: str, done: bool, ckpt: LoopCheckpoint | None):
        self.run, self.name, self.done, self.ckpt = run, name, done, ckpt
        self.results: dict = run.finished[name]["results"] if done else {}

    def keep(
        self, modules: dict[str, torch.nn.Module], results: dict | None = None, export=None, tokenizer=None
    ):
        """The stage's outputs. Finished earlier: load the saved models into `modules` (in place) and
        return the saved results. Else: save the models as the stage's artifact (atomic, for resume),
        `export` as an HF checkpoint under checkpoints/<name>, and return `results`."""
        if self.done:
            self.run.store.load_artifact(self.name, modules)
            return self.results
        self.run.store.save_artifact(self.name, modules)
        if export is not None:
            self.run.save(self.name, export, tokenizer)
        self.results = results or {}
        return self.results


class Run:
    """Shared state of one pipeline run: config, logger, throughput, stage timings, checkpoints.

    `resume`: (path, meta) of the checkpoint to continue from (None: a fresh run). Stages it lists as
    finished are replayed by loading their outputs; a stage it was inside continues from its step.
    `device`: this rank's device (cfg.run.device, or its GPU under torchrun). `hook`: see
    run_pipeline."""

    def __init__(
        self,
        cfg: TrainConfig,
        store: CheckpointStore,
        resume: tuple[Path, dict] | None = None,
        *,
        device: torch.device | None = None,
        hook: Hook | None = None,
    ):
        self.cfg = cfg
        self.hook = hook
        self.rank, self.world_size = rank_and_world()
        self.main = self.rank == 0  # only rank 0 writes anything under output_dir
        self.out = Path(cfg.run.output_dir)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.resume = resume
        meta = resume[1] if resume else {}
        # stage -> {"results": small picklable outputs, "seconds": wall time}, in pipeline order
        self.finished: dict[str, dict] = dict(meta.get("finished", {}))
        self.logger = self._logger(meta.get("metrics_bytes"))
        self.throughput = Throughput()
        for kind in ("tokens", "seconds"):
            getattr(self.throughput, kind).update(meta.get("throughput", {}).get(kind, {}))
        self.stage_seconds: dict[str, float] = {}
        # stage -> {"tokens": {phase: n}, "seconds": {phase: s}}: this rank's share of self.throughput
        # that the stage added, as Throughput.counts() (the report's stage_throughput_summary)
        self.stage_throughput: dict[str, dict] = {}
        self.device = torch.device(cfg.run.device) if device is None else device
        self.gold = None  # the task's gold reward, logged on PPO rollouts (never trained on)
        self.heldout_pairs = None  # gold-labelled pairs of SFT samples on the eval prompts
        # what arena stages of this run hand each other (pipeline/ensemble.py: the members it trained)
        self.shared: dict = {}

    def _logger(self, metrics_bytes: int | None) -> MetricsLogger:
        """The metrics logger; on resume metrics.jsonl is first cut back to what the checkpoint had
        seen (lines logged after it are logged again, identically) and the curves reloaded from it."""
        records = []
        if self.main and metrics_bytes is not None:
            path = self.out / "metrics.jsonl"
            with open(path, "r+b") as f:
                f.truncate(metrics_bytes)
            records = [json.loads(line) for line in path.read_text().splitlines()]
            shutil.rmtree(self.out / "tb", ignore_errors=True)  # rewritten below from the records
        logger = MetricsLogger(
            self.out if self.main else None, tensorboard=self.cfg.run.tensorboard, console=self.main
        )
        logger.replay(records)
        return logger

    def meta(self) -> dict:
        """The pipeline's part of every checkpoint's meta (rank 0's view)."""
        metrics = self.out / "metrics.jsonl"
        return {
            "config": to_dict(self.cfg),
            "world_size": self.world_size,
            "finished": dict(self.finished),
            "metrics_bytes": metrics.stat().st_size if self.main and metrics.exists() else 0,
            "throughput": {"tokens": dict(self.throughput.tokens), "seconds": dict(self.throughput.seconds)},
        }

    @contextmanager
    def stage(self, name: str, checkpoint: bool = True):
        """Time the stage `name` and yield its `Stage`. checkpoint=False (evaluation): never saved,
        a resumed run does it again."""
        if name in self.finished:
            self.say(f"stage {name}: finished before, loading its outputs")
            yield Stage(self, name, True, None)
            self.stage_seconds[name] = self.finished[name]["seconds"]
            # a run resumed from a checkpoint written before stage throughput was kept: none
            self.stage_throughput[name] = self.finished[name].get("throughput", Throughput().counts())
            path, meta = self.resume
            if meta.get("stage") is None and list(self.finished)[-1] == name:
                self.store.restore(path)  # the RNG state the uninterrupted run had at this point
            return
        start = time.perf_counter()
        SIGINT.stage, SIGINT.step = name, 0  # for the message of a Ctrl-C outside a training loop
        inside = self.resume if self.resume and self.resume[1].get("stage") == name else None
        self.say(
            f"stage {name} ..."
            if inside is None
            else f"stage {name}: resuming at step {inside[1]['loop']['step']}"
        )
        if self.hook is not None:
            self.hook("stage_start", name, inside[1]["loop"]["step"] if inside else 0)
        before = inside[1]["stage_elapsed"] if inside else 0.0
        # the aggregate throughput when the stage began (resumed inside it: as its checkpoint saved it)
        start_counts = inside[1].get("stage_throughput_start") if inside else None
        counts_at_start = start_counts or self.throughput.counts()
        ckpt = LoopCheckpoint(
            self.store,
            name,
            self.cfg.run.checkpoint_every,
            lambda: {
                **self.meta(),
                "stage_elapsed": before + time.perf_counter() - start,
                "stage_throughput_start": counts_at_start,
            },
            resume_from=inside,
            hook=self.hook,
        )
        handle = Stage(self, name, False, ckpt if checkpoint else None)
        yield handle
        self.stage_seconds[name] = round(before + time.perf_counter() - start, 2)
        self.stage_throughput[name] = self.throughput.since(counts_at_start)
        if checkpoint:
            self.finished[name] = {
                "results": handle.results,
                "seconds": self.stage_seconds[name],
                "throughput": self.stage_throughput[name],
            }
            path = self.store.save({**self.meta(), "stage": None})  # stage boundary: outputs, RNG, progress
            if SIGINT.requested:  # Ctrl-C after the loop's last step boundary: stop at this one
                raise Interrupted(name, SIGINT.step, path)
        self.say(f"stage {name} done in {self.stage_seconds[name]:.1f} s")

    def say(self, text: str) -> None:
        if self.main:
            print(f"[rlp-engine] {text}", flush=True)

    def context(self, stage: Stage, **overrides) -> TrainContext:
        """The TrainContext of a training stage (its name, checkpoint handle, this run's logger,
        throughput and run.* settings); `overrides` replace fields (PPO logs every step)."""
        r = self.cfg.run
        ctx = TrainContext(
            stage=stage.name,
            seed=r.seed,
            log_every=r.log_every,
            show_progress=r.progress,
            logger=self.logger,
            throughput=self.throughput,
            ckpt=stage.ckpt,
            max_nonfinite_steps=r.max_nonfinite_steps,
            train_backend=r.train_backend,  # "deepspeed": ZeRO-3 engines under torchrun
        )
        return dataclasses.replace(ctx, **overrides)

    def save(self, name: str, model, tokenizer=None) -> None:
        """HF export of `model` to checkpoints/<name> (written aside, then renamed into place)."""
        check_replicas(model, name)  # every rank must hold the weights rank 0 is about to save
        # every rank holds the same full weights (explicit data parallelism): rank 0 saves them
        if not self.cfg.run.save_checkpoints or not self.main:
            return
        from transformers.utils import logging as hf_logging

        path = self.out / "checkpoints" / name
        tmp = path.with_name(f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Writing model shards" bar per checkpoint is noise
        try:
            model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        publish(tmp, path)


def stage_throughput_summary(run: Run, phases: list[str]) -> dict[str, dict]:
    """report["stage_throughput"]: per stage, what Throughput.summary() gives for the whole run
    (tokens, seconds, tokens_per_s per phase), for the phases the stage ran. Under torchrun every rank
    calls it (one across_ranks collective per stage, over the same `phases` on every rank: tokens
    summed over ranks, seconds the slowest rank's, as the aggregate)."""
    out = {}
    for name, counts in run.stage_throughput.items():
        summary = Throughput.from_counts(counts, phases).across_ranks().summary()
        out[name] = {p: v for p, v in summary.items() if v["seconds"] > 0 or v["tokens"] > 0}
    return out


def _setup(cfg: TrainConfig) -> None:
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)


def run_pipeline(
    cfg: TrainConfig, resume: bool = False, *, hook: Hook | None = None, restart: bool = False
) -> dict:
    """Run every stage, evaluate, and write report.json, report.md, the curves' PNG, metrics.jsonl
    (and TensorBoard events) and the per-stage checkpoints under cfg.run.output_dir. The ops run on
    cfg.run.backend ("auto": chosen per device). Under torchrun every rank calls it; rank 0 returns
    the report and writes the files, the other ranks return an empty dict.

    Resumable checkpoints go to output_dir/resume every run.checkpoint_every steps and at every stage
    boundary. `resume=True` continues from the newest complete one (a fresh start when there is
    none); without it an output_dir that holds checkpoints is refused, so no run is overwritten, unless
    `restart=True`: the earlier run's files are deleted (after the input checks) and it starts over.
    report.json is written last: its presence means the run finished.

    `hook(event, stage, step)` (engine/checkpoint.py's `Hook`), when given, is called on every rank at
    each stage's start ("stage_start") and at the training loops' "step_done" and "saving" points:
    the tests' fault injection. cfg is not changed: each rank's device is the Run's."""
    info = init_distributed(timeout_s=cfg.run.dist_timeout_s)
    device = torch.device(cfg.run.device)
    if info.distributed:
        _check_world(cfg, info.world_size)
        if device.type == "cuda":
            device = info.device  # one GPU per rank
    if cfg.run.backend == "auto":
        return _run_pipeline(cfg, resume, device, hook, restart)
    with ops.backend(cfg.run.backend):
        return _run_pipeline(cfg, resume, device, hook, restart)


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
        raise ConfigError(f"world size {world}: these batches give a rank no rows: {small}")
    for key, v in (
        ("ppo.rollout_batch_size", cfg.ppo.rollout_batch_size),
        ("ppo.mini_batch_size", cfg.ppo.mini_batch_size),
    ):
        if v % world:
            raise ConfigError(f"world size {world}: {key}={v} must be a multiple of it")


# run.* keys a resumed run may change: they do not change what is computed
RESUME_FREE = {
    "output_dir",
    "threads",
    "progress",
    "tensorboard",
    "dist_timeout_s",
    "checkpoint_every",
    "keep_checkpoints",
    "device",
}


def check_resumable(cfg: TrainConfig, saved: dict) -> None:
    """Refuse to continue a run with a config that changes what it computes (naming the keys)."""
    now, defaults = to_dict(cfg), to_dict(TrainConfig())

    def was(section: str, key: str):
        # a key added since that run was written took its default value there
        return saved.get(section, {}).get(key, defaults[section][key])

    changed = [
        f"{section}.{key}: {was(section, key)!r} -> {value!r}"
        for section, fields in now.items()
        for key, value in fields.items()
        if was(section, key) != value and not (section == "run" and key in RESUME_FREE)
    ]
    if changed:
        raise ConfigError(
            "--resume: the config differs from the checkpoint's in keys that change the results: "
            + "; ".join(changed)
            + ". To continue that run, pass only --output-dir and --resume (its config.yaml is used; "
            "drop --config, --preset and these overrides); to run this config, pass --restart instead of "
            "--resume (discards that run) or choose another --output-dir"
        )


# Everything a run writes in its output_dir, deleted by --restart in this order: config.yaml and
# resume/ (what makes a directory a run's, see check_restartable) last, so that a restart killed
# halfway leaves a directory --restart still accepts.
RUN_FILES = ("report.json", "report.md", "training_curves.png", "gold_vs_kl.png", "metrics.jsonl", "tb")
RUN_FILES += ("checkpoints", "curve", "resume", "config.yaml")


def check_restartable(out: Path) -> None:
    """--restart deletes the run in `out`: allowed when `out` is missing, empty or looks like an
    rlp-engine run directory (config.yaml or resume/); anything else is refused, touching nothing."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not (out.is_dir() and ((out / "config.yaml").is_file() or (out / "resume").is_dir())):
        raise ConfigError(
            f"--restart: {out} is not an rlp-engine run directory (no config.yaml or resume/), so nothing "
            "in it is deleted; choose another --output-dir"
        )


def discard_run(cfg: TrainConfig) -> CheckpointStore:
    """--restart, after every input check: delete the earlier run's RUN_FILES in output_dir (rank 0;
    other files stay) and return the then empty checkpoint store."""
    out = Path(cfg.run.output_dir)
    barrier()  # every rank has checked the directory (open_store) before any of it goes
    if rank_and_world()[0] == 0:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    barrier()
    return CheckpointStore(out / "resume", keep=cfg.run.keep_checkpoints)


def open_store(
    cfg: TrainConfig, resume: bool, restart: bool = False
) -> tuple[CheckpointStore, tuple[Path, dict] | None]:
    """The run directory's checkpoint store and the checkpoint to continue from (None: fresh).
    `restart`: the earlier run is not read (discard_run deletes it once the inputs are checked)."""
    out = Path(cfg.run.output_dir)
    if restart and resume:
        raise ConfigError(
            "--restart and --resume exclude each other: --resume continues the run, --restart discards it"
        )
    if restart:
        check_restartable(out)
    store = CheckpointStore(out / "resume", keep=cfg.run.keep_checkpoints)
    latest = None if restart else store.latest()
    if latest is None:
        return store, None
    if not resume:
        raise ConfigError(
            f"run.output_dir: {out} holds checkpoints of an earlier run ({latest[0].name}); pass --resume to "
            "continue it, --restart to discard it and start over, or choose another --output-dir"
        )
    check_resumable(cfg, latest[1]["config"])
    return store, latest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run_pipeline(
    cfg: TrainConfig, resume: bool, device: torch.device, hook: Hook | None, restart: bool = False
) -> dict:
    from rlp_engine.pipeline.report import write_report

    _setup(cfg)
    stage_names(cfg)  # a bad run.stages fails here, before any work
    store, latest = open_store(cfg, resume, restart)
    inputs = prepare_inputs(cfg)  # every input check and load, before anything is written
    if restart:
        store = discard_run(cfg)
    data, tokenizer = inputs.data, inputs.tokenizer
    run = Run(cfg, store, latest, device=device, hook=hook)
    if latest is not None:
        run.say(f"resuming from {latest[0]} (finished: {', '.join(run.finished) or 'none'})")
    if run.main:
        _write_atomic(run.out / "config.yaml", dump_yaml(cfg))
    # wall time of this process plus that of the stages finished by earlier ones (resume)
    start = time.perf_counter() - sum(f["seconds"] for f in run.finished.values())
    policy = inputs.policy.to(run.device)
    run.gold = data.gold
    n_params = sum(p.numel() for p in policy.parameters())
    policies, rms, info = train_all(run, data, tokenizer, policy)
    with run.stage("eval", checkpoint=False):
        # rank 0 evaluates (plain full models: no collective inside); the others wait for it
        results = evaluate_all(run, data, tokenizer, policies, rms) if run.main else {}
        barrier()
    run.logger.close()
    throughput = run.throughput.across_ranks()  # a collective: every rank, before ranks part ways
    per_stage = stage_throughput_summary(run, sorted(run.throughput.seconds))  # collectives too
    if not run.main:
        return {}
    report = {
        **results,
        **info,
        "stage_seconds": run.stage_seconds,
        "total_seconds": round(time.perf_counter() - start, 2),
        "throughput": throughput.summary(),
        "stage_throughput": per_stage,
        "model": {"parameters": n_params, "vocab": len(tokenizer)},
        "data": {
            "sft": len(data.sft),
            "preferences": len(data.preferences),
            "prompts": len(data.prompts),
            "eval_prompts": len(data.eval_prompts[: cfg.eval.num_prompts]),
            "eval_samples": cfg.eval.samples_per_prompt,
            "gold": data.gold is not None,
            # prompts over data.max_prompt_tokens, per data set, handled as data.long_prompts says
            "long_prompts": inputs.counts,
        },
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "device": str(run.device),  # this rank's (rank 0's): cuda:0 under torchrun
            "world_size": run.world_size,
        },
        "config": to_dict(cfg),
    }
    write_report(run.out, report, run.logger.curves)
    _write_atomic(run.out / "report.json", json.dumps(report, indent=2))  # last: the run is complete
    return report
