"""The pipeline with run.train_backend=deepspeed: every trained stage a DeepSpeed ZeRO-3 engine, under
`torchrun --nproc_per_node 2` on CPU with gloo (tiny preset cut to SFT, reward model and PPO).

Three launches, shared by the tests through one module fixture (about 20 s each on 2 shared cores):
  fsdp2   the default layout, a loop checkpoint after every step: the reference for the weights
  zero3   deepspeed, same config, rank 1 SIGKILLed right after PPO's step-1 checkpoint (DeepSpeed's own
          files), then `--resume` on 2 ranks: loads the ZeRO-3 actor+critic engine and finishes.
The finished run's SFT and reward model were trained before the kill, its PPO across it; all three match
FSDP2's within TOL (measured: a resume that drops the loaded AdamW state ends 3.2e-4 off in PPO).
Measured once against an uninterrupted ZeRO-3 run: the resumed weights were bitwise equal.

Plus tests/ds_guard_worker.py: the numerical guard on a ZeRO-3 engine (a NaN loss on one rank, an inf
gradient on the other: both ranks skip both steps, and the rest equals plain torch without them).

Skipped when deepspeed is not importable (see tests/test_deepspeed.py for the first-run compile of its
shm comm op, cached afterwards)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from multiproc import run_ranks, run_torchrun

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install 'rlp-engine[deepspeed]')",
)

# tests/test_pipeline_dist.py's cut-down tiny preset, stopped after PPO (run.stages=ppo: sft, rm, ppo)
SMALL = [
    "sft.steps=2",
    "rm.steps=2",
    "ppo.steps=2",
    "eval.num_prompts=4",
    "eval.samples_per_prompt=1",
    "run.stages=ppo",
    "run.tensorboard=false",
    "run.threads=1",
    "run.checkpoint_every=1",
]


FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")


def _torchrun(out: Path, backend: str, fault: tuple = (), resume: bool = False, limit_s: float = 240):
    """fault: tests/fault_runner.py's options (e.g. ("--kill-at", "ppo:1", "--rank", "1"))."""
    cli = [str(FAULT_RUNNER), *fault, "--"] if fault else ["-m", "rlp_engine.cli"]
    argv = [*cli, "train", "--output-dir", str(out)]
    argv += ["--resume"] if resume else ["--preset", "tiny", *SMALL, f"run.train_backend={backend}"]
    code, output, _ = run_torchrun(argv, 2, limit_s, {"DS_ACCELERATOR": "cpu"})
    return code, output


def _launch_workers(script: Path, out: Path, n: int = 2, limit_s: float = 180) -> tuple[list[int], str]:
    """n worker processes with torchrun's environment set by hand."""
    codes, outs, _ = run_ranks([str(script), str(out), "60"], n, limit_s, {"DS_ACCELERATOR": "cpu"})
    return codes, "\n".join(outs)


def _weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / name / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds_pipeline")
    code, log = _torchrun(root / "fsdp2", "fsdp2")
    assert code == 0, f"fsdp2:\n{log[-4000:]}"
    outs = {"fsdp2": (root / "fsdp2", log)}
    out = root / "zero3"
    code, log = _torchrun(out, "deepspeed", ("--kill-at", "ppo:1", "--rank", "1"))
    assert code != 0 and "[fault_runner] kill at ppo:1: killing rank 1" in log, log[-4000:]
    assert not (out / "report.json").exists()
    latest = max((out / "resume").glob("ckpt-*"))  # what the killed run left, before the resume
    outs["killed"] = (latest, torch.load(latest / "meta.pt", weights_only=False), sorted(latest.rglob("*")))
    code, log = _torchrun(out, "deepspeed", resume=True)
    assert code == 0, f"resumed:\n{log[-4000:]}"
    outs["zero3"] = (out, log)
    return outs


def test_zero3_checkpoint_inside_ppo_is_deepspeeds_and_resumes_on_two_ranks(runs):
    """Rank 1 dies right after PPO's step-1 checkpoint: DeepSpeed's per-rank partition files of the one
    actor+critic engine (not DCP); `--resume` on 2 ranks loads them and finishes the run."""
    latest, meta, files = runs["killed"]
    assert (meta["stage"], meta["loop"]["step"], meta["world_size"]) == ("ppo", 1, 2)
    names = {p.relative_to(latest).as_posix() for p in files}
    assert {"state/layout.json", "rng-rank0.pt", "rng-rank1.pt"} <= names, names
    for r in range(2):
        for kind in ("model", "optim"):
            assert f"state/actor_critic/zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" in names, names
    assert not any(n.endswith(".distcp") for n in names)
    out, log = runs["zero3"]
    assert "stage ppo: resuming at step 1" in log, log[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["machine"]["world_size"] == 2 and report["config"]["run"]["train_backend"] == "deepspeed"
    assert set(report["policies"]) == {"sft", "ppo"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {x["stage"] for x in lines} == {"sft", "rm", "ppo"}
    for x in lines:  # every logged loss and gradient norm is finite; no step was skipped
        for key in ("loss", "grad_norm"):
            if key in x:
                assert torch.isfinite(torch.tensor(x[key])), x
        assert x.get("nonfinite_steps", 0) == 0, x


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _initial_policy() -> dict[str, torch.Tensor]:
    """The SFT stage's starting weights, built as the pipeline builds them (seeded the same)."""
    from rlp_engine.config import load_config
    from rlp_engine.pipeline.inputs import prepare_inputs
    from rlp_engine.pipeline.run import _setup

    cfg = load_config(None, SMALL, preset="tiny")
    _setup(cfg)
    return prepare_inputs(cfg).policy.state_dict()


# Measured ZeRO-3 vs FSDP2: sft 3.7e-9, rm 6.3e-7, ppo 5.0e-8 (fp32, gradients summed in another order).
# Training moved SFT 4.5e-4 from its start and PPO 4.0e-4 from SFT: the tolerance is ~1% of either.
TOL = 5e-6


def test_zero3_weights_match_fsdp2(runs):
    """Same math (gradients averaged over the 2 ranks, clipped at the global norm, AdamW, the same LR
    schedule), other code: fp32 sums in another order. The models moved by far more than the tolerance."""
    zero3, fsdp2 = runs["zero3"][0], runs["fsdp2"][0]
    for stage in ("sft", "rm", "ppo"):
        a = _weights(zero3, stage)
        assert all(torch.isfinite(t).all() for t in a.values()), stage
        assert _max_diff(a, _weights(fsdp2, stage)) < TOL, stage
    heads = [torch.load(out / "checkpoints" / "rm" / "scalar_head.pt")["head"] for out in (zero3, fsdp2)]
    assert _max_diff(*heads) < TOL
    sft, ppo = _weights(zero3, "sft"), _weights(zero3, "ppo")
    init = {k: v for k, v in _initial_policy().items() if k in sft}
    assert _max_diff(sft, init) > 50 * TOL and _max_diff(ppo, sft) > 50 * TOL
    # PPO's curve snapshot after step 1 (eval.curve_points=4 of 2 steps): the ZeRO-3 actor gathered
    # by every rank and written by rank 0 before rank 1 was killed at ppo:1 (the resume starts after it)
    from safetensors.torch import load_file

    snaps = [
        load_file(str(out / "curve" / "ppo" / "step-000001" / "model.safetensors")) for out in (zero3, fsdp2)
    ]
    assert snaps[0].keys() == sft.keys() and _max_diff(*snaps) < TOL
    assert _max_diff(snaps[0], sft) > 10 * TOL and _max_diff(snaps[0], ppo) > 10 * TOL


def test_zero3_guard_skips_nonfinite_loss_and_gradient_on_every_rank(tmp_path):
    codes, out = _launch_workers(Path(__file__).with_name("ds_guard_worker.py"), tmp_path)
    assert codes == [0, 0], out[-4000:]
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in res:
        # step 2: rank 1's NaN loss (skipped before backward), step 4: rank 0's inf gradient (skipped by
        # ZeRO-3's global norm); both ranks skip both
        assert r["applied"] == [True, True, False, True, False, True] and r["count"] == 2, r
        assert r["last_step"] == 4
        # every applied step was clipped (norm above 0.5), and ZeRO-3's norm is the whole batch's
        assert all(n > 0.5 for n in r["ref_norms"]), r["ref_norms"]
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(r["ref_norms"]), rtol=1e-5, atol=0)
        # the skipped steps left no trace (weights, AdamW state): the rest equals plain torch on whole
        # batches without them (fp32, another summation order: measured 1.5e-8); the 4 AdamW steps at lr
        # 1e-2 moved the weights by 4e-2
        torch.testing.assert_close(
            torch.tensor(r["weights"]), torch.tensor(r["ref_weights"]), rtol=0, atol=1e-6
        )
        assert "strict: 1 steps" in r["strict_raised"] and "run.max_nonfinite_steps=0" in r["strict_raised"]
    assert res[0]["weights"] == res[1]["weights"]  # both ranks gather the same
    lines = [ln for ln in out.splitlines() if ln.startswith("[rlp-engine] zero3 step")]
    assert len(lines) == 2 and lines[0].endswith("(non-finite loss on ranks [1]); skipped (1 of 5)"), lines


def test_a_zero3_checkpoint_is_refused_elsewhere_with_a_clear_error(tmp_path):
    """ZeRO-3 partition files fit one world size and one backend: other layouts are refused by name."""
    from rlp_engine.engine import checkpoint, layout
    from rlp_engine.engine.layout import zero3

    info = {
        "layout": "DeepSpeed ZeRO-3 (run.train_backend=deepspeed)",
        "world_size": 2,
        "tags": ["actor_critic"],
    }
    (tmp_path / zero3.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="written by DeepSpeed ZeRO-3.*same layout"):
        checkpoint.load_tensors(tmp_path, {"actor": torch.nn.Linear(2, 2)})  # a plain (FSDP2/1-process) run
    with pytest.raises(ValueError, match="written on 2 ranks.*this run: \\['actor_critic'\\] on 1"):
        zero3.load_engines(tmp_path, {"actor_critic": None})  # the engines, on 1 rank
    with pytest.raises(ValueError, match="not a DeepSpeed checkpoint"):
        zero3.load_engines(tmp_path / "missing", {"actor_critic": None})
    with pytest.raises(ValueError, match="run.train_backend: expected"):
        layout.uses_zero3("zero3")
    assert not layout.uses_zero3("deepspeed")  # single process: plain modules
