"""The `rlp-engine` command.

    rlp-engine train [--config FILE.yaml] [--preset NAME] [--output-dir DIR] [--resume | --restart]
                     [--print-config] [key=value ...]
    rlp-engine eval --policy DIR [--reward-model DIR] [--config FILE.yaml] [--preset NAME] [key=value ...]
    rlp-engine sample --policy DIR [-n N] [--prompt TEXT ...] [--config FILE.yaml] [--preset NAME]
                      [key=value ...]
    rlp-engine export-rm --checkpoint RUN_DIR/checkpoints/rm --out DIR [--drop-bias]
    rlp-engine --version

`train` runs the whole RLP pipeline (embedded reverse task when no config is given) and writes
DIR/report.json, DIR/report.md, DIR/training_curves.png, DIR/metrics.jsonl and checkpoints.
`train --output-dir DIR --resume` continues a killed run from its last complete checkpoint;
`train --output-dir DIR --restart` deletes the earlier run's files in DIR (only when DIR holds
config.yaml or resume/) once the inputs are checked, and starts over.
Ctrl-C (SIGINT) or SIGTERM during a training loop saves a checkpoint at the end of the current step
and exits 130 (SIGTERM: 143); a second one, or one outside a loop, exits at once with the same code;
the line printed says how to resume.
Exit codes: 0 done, 2 bad config or input (nothing written), 3 training diverged, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM).
Under torchrun (`torchrun --nproc_per_node N -m rlp_engine.cli train ...`) `train` runs as one
SPMD program over the N ranks; rank 0 writes the outputs and prints the summary.
`eval`/`sample --policy RUN_DIR/checkpoints/<stage>` use RUN_DIR/config.yaml (the task, lengths and
eval prompts the run trained with) unless --config or --preset is given; overrides apply on top.
A command whose optional packages are missing says which and how to install them, exit 2.
The metrics lines are `logging` records of the "rlp_engine" logger (INFO) that the command prints to
stdout; progress bars (training, sampling, evaluation) go to stderr when it is a terminal and
run.progress is true.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rlp_engine import __version__
from rlp_engine.config import ConfigError, dump_yaml, load_config
from rlp_engine.config_values import PRESETS

if TYPE_CHECKING:  # the checkpoint module imports torch: not at the CLI's startup
    from rlp_engine.engine.checkpoint import Hook

# The packages each command imports beyond the base install (import name -> extra that installs it).
EXTRA = {"transformers": "train", "tokenizers": "train", "safetensors": "train", "matplotlib": "train"}
EXTRA |= {"gguf": "smollm", "accelerate": "smollm"}
NEEDS = {
    "train": ("transformers", "tokenizers", "safetensors", "matplotlib"),
    "eval": ("transformers", "tokenizers", "safetensors"),
    "sample": ("transformers", "tokenizers", "safetensors"),
    "export-rm": ("transformers", "tokenizers", "safetensors"),
}
SAVED_CONFIG_HELP = (
    "; for RUN_DIR/checkpoints/<stage>, RUN_DIR/config.yaml is the config unless --config or --preset "
    "is given (either replaces it; key=value overrides apply on top of whichever is used)"
)


def _missing_package(command: str, name: str) -> str:
    extra = EXTRA.get(name, "train")
    return (
        f"rlp-engine: {command} needs the package {name!r}, which is not installed; "
        f"install the {extra} extra: pip install -e .[{extra}]"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlp-engine", description="RLHF with Reward Learning on Policy (RLP).")
    p.add_argument("--version", action="version", version=f"rlp-engine {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--config", help="YAML config file (sections: model, data, sft, rm, ppo, ...)")
        sp.add_argument("--preset", help=f"base preset: {', '.join(PRESETS)} (a file's `preset:` key wins)")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. ppo.kl_coef=0.01")

    t = sub.add_parser("train", help="run SFT -> RM -> PPO -> RLP-UML/SPG -> PPO and write a report")
    common(t)
    t.add_argument("--output-dir", help="where the report and checkpoints go (run.output_dir)")
    again = t.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output-dir from its last complete checkpoint (its config.yaml is "
        "the config unless --config/--preset are given); a fresh start when it has none",
    )
    again.add_argument(
        "--restart",
        action="store_true",
        help="discard the earlier run in --output-dir (its config.yaml, resume/, checkpoints/, metrics and "
        "report; only a directory holding config.yaml or resume/) and start over",
    )
    t.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (preset, file, overrides, --output-dir) as YAML and exit; "
        "writes nothing",
    )

    e = sub.add_parser("eval", help="gold score and proxy reward of a saved policy on held-out prompts")
    common(e)
    e.add_argument(
        "--policy", required=True, help="checkpoint directory of a policy (HF format)" + SAVED_CONFIG_HELP
    )
    e.add_argument(
        "--reward-model",
        help="checkpoint directory of a reward model (for the proxy reward), e.g. RUN_DIR/checkpoints/rm",
    )

    s = sub.add_parser("sample", help="print samples of a saved policy")
    common(s)
    s.add_argument(
        "--policy", required=True, help="checkpoint directory of a policy (HF format)" + SAVED_CONFIG_HELP
    )
    s.add_argument("--prompt", action="append", help="prompt text (repeatable); default: held-out prompts")
    s.add_argument("-n", type=int, default=1, help="samples per prompt")

    x = sub.add_parser(
        "export-rm", help="write a reward-model checkpoint as a HF AutoModelForSequenceClassification"
    )
    x.add_argument("--checkpoint", required=True, help="reward-model checkpoint, e.g. RUN_DIR/checkpoints/rm")
    x.add_argument(
        "--out", required=True, help="directory to write (config.json, model.safetensors, tokenizer)"
    )
    x.add_argument(
        "--drop-bias",
        action="store_true",
        help="export a head with a non-zero bias without it (HF's score head has none; scores shift by it)",
    )
    return p


def _export_rm(args) -> int:
    """export-rm: rlp_engine.models.export.export_checkpoint; a bad checkpoint or bias: one line, exit 2."""
    from rlp_engine.models.export import BIAS_KEY, export_checkpoint

    try:
        bias = export_checkpoint(args.checkpoint, args.out, drop_bias=args.drop_bias)
    except (ValueError, FileNotFoundError) as err:
        print(f"rlp-engine: error: {err}", file=sys.stderr)
        return 2
    dropped = f"; the head's bias {bias!r} is left out (config.json: {BIAS_KEY})" if bias else ""
    print(f"[rlp-engine] {args.out}: AutoModelForSequenceClassification, num_labels=1{dropped}")
    return 0


def _interrupted(cfg, err: BaseException) -> int:
    """Ctrl-C or SIGTERM: one line saying where the run stopped, what is saved and how to continue;
    exit 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    from rlp_engine.engine.checkpoint import CheckpointStore
    from rlp_engine.engine.interrupts import SIGINT, Interrupted

    out = cfg.run.output_dir
    if isinstance(err, Interrupted):
        where, last = f"stage {err.stage} step {err.step}", err.path
    else:
        where = "before training" if SIGINT.stage is None else f"stage {SIGINT.stage} step {SIGINT.step}"
        done = CheckpointStore(Path(out) / "resume").complete() if Path(out, "resume").is_dir() else []
        last = done[-1] if done else None
    if last is None:
        print(f"rlp-engine: interrupted at {where}; no checkpoint was written", file=sys.stderr)
    else:
        print(
            f"rlp-engine: interrupted at {where}; the last checkpoint is {last}; continue with "
            f"`rlp-engine train --output-dir {out} --resume`",
            file=sys.stderr,
        )
    return 128 + (SIGINT.signum or signal.SIGINT)


def _train(args, cfg, hook: Hook | None = None) -> int:
    from rlp_engine.pipeline.inputs import check_limits, check_paths

    if args.output_dir:
        cfg.run.output_dir = args.output_dir
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    # A missing file or model directory fails here, before the 8 s import of torch and transformers;
    # the pipeline then runs pipeline/inputs.prepare_inputs before it creates the output directory.
    check_limits(cfg.data)
    check_paths(cfg)
    from rlp_engine.engine.distributed import finish
    from rlp_engine.engine.guards import NonFiniteError
    from rlp_engine.engine.interrupts import Interrupted, save_on_sigint
    from rlp_engine.pipeline.run import run_pipeline

    try:
        with save_on_sigint():
            report = run_pipeline(cfg, resume=args.resume, hook=hook, restart=args.restart)
    except NonFiniteError as err:  # training diverged: say so, and where the last good state is
        print(f"rlp-engine: stopped: {err}", file=sys.stderr)
        print(
            f"rlp-engine: the last complete checkpoint is under {cfg.run.output_dir}/resume", file=sys.stderr
        )
        return 3
    except (Interrupted, KeyboardInterrupt) as err:
        return _interrupted(cfg, err)
    if not report:  # a rank other than 0: rank 0 reports
        return finish(0)
    print(f"[rlp-engine] report: {cfg.run.output_dir}/report.md ({report['total_seconds']:.1f} s)")
    for name, row in report["policies"].items():
        gold = "n/a" if row["gold"] is None else f"{row['gold']:.3f}"
        print(f"  {name:8s} gold {gold}  proxy {row['proxy_reward']:.3f}")
    for phase, t in report["throughput"].items():
        rate, n, secs = t["tokens_per_s"], int(t["tokens"]), t["seconds"]
        print(f"  {phase:10s} {rate:,.0f} tokens/s ({n:,} tokens in {secs:.1f} s)")
    return finish(0)  # under torchrun: exits here


def _saved_config(policy: str) -> Path | None:
    """RUN_DIR/config.yaml when `policy` is RUN_DIR/checkpoints/<stage> and the run saved one."""
    stage_dir = Path(policy).resolve()
    saved = stage_dir.parent.parent / "config.yaml"
    return saved if stage_dir.parent.name == "checkpoints" and saved.is_file() else None


def _checkpoint_kind(d: Path) -> str | None:
    """What train's RUN_DIR/checkpoints/<stage> directory `d` holds, from its file names only:
    "reward-model" (HF backbone + scalar_head.pt), "policy" (HF causal LM + tokenizer) or None."""
    from rlp_engine.models.heads import HEAD_FILE

    if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
        return None
    if (d / HEAD_FILE).is_file():
        return "reward-model"
    return "policy" if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file() else None


def _check_checkpoints(args) -> None:
    """--policy is a policy checkpoint and --reward-model a reward-model one; else one error naming
    the argument and what such a checkpoint holds, listing the checkpoints of a run directory given
    in place of one. Before the slow loads: a wrong directory fails without a traceback."""
    from rlp_engine.models.heads import HEAD_FILE
    from rlp_engine.models.paths import ModelError

    holds = {
        "policy": "config.json, model.safetensors and tokenizer.json",
        "reward-model": f"config.json, model.safetensors and {HEAD_FILE}",
    }
    for flag, path, want in (
        ("--policy", args.policy, "policy"),
        ("--reward-model", getattr(args, "reward_model", None), "reward-model"),
    ):
        if path is None:
            continue
        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"{flag}: {path} is not a directory")
        kind = _checkpoint_kind(d)
        if kind == want:
            continue
        if kind == "reward-model":
            raise ModelError(
                f"--policy: {path} is a reward-model checkpoint ({HEAD_FILE}); pass it as --reward-model "
                "and a policy checkpoint as --policy"
            )
        if kind == "policy":
            raise ModelError(
                f"--reward-model: {path} is a policy checkpoint (no {HEAD_FILE}); pass it as --policy and "
                "a reward-model checkpoint (e.g. RUN_DIR/checkpoints/rm) as --reward-model"
            )
        why = (
            f"{flag}: {path} is not a {want} checkpoint (a directory with {holds[want]}, as train writes "
            "under RUN_DIR/checkpoints/<stage>)"
        )
        if (d / "checkpoints").is_dir():
            found = [c for c in sorted((d / "checkpoints").iterdir()) if _checkpoint_kind(c) == want]
            listed = ", ".join(str(c) for c in found) or "none"
            why += f"; it is a run directory, whose {want} checkpoints are: {listed}"
        raise ModelError(why)


def _load_saved(args, cfg):
    from rlp_engine.models.heads import ScalarHeadModel
    from rlp_engine.models.loading import load_policy, load_tokenizer

    cfg.model.path, cfg.model.gguf_file = args.policy, None
    tokenizer = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model, tokenizer).to(cfg.run.device).eval()
    rm = None
    if getattr(args, "reward_model", None):
        rm = ScalarHeadModel.from_pretrained(args.reward_model).to(cfg.run.device).eval()
    return tokenizer, policy, rm


def _eval(args, cfg) -> int:
    from rlp_engine.data.build import build_data
    from rlp_engine.pipeline.evaluate import evaluate_policy

    data = build_data(cfg.data, seed=cfg.run.seed)
    tokenizer, policy, rm = _load_saved(args, cfg)
    rms = {"rm": rm} if rm is not None else {}
    bar = cfg.run.progress
    ev = evaluate_policy(policy, tokenizer, data.eval_prompts, cfg.eval, cfg.data, rms, data.gold, None, bar)
    print(json.dumps(ev.summary(), indent=2))
    return 0


def _sample(args, cfg) -> int:
    from rlp_engine.data.build import build_data
    from rlp_engine.engine.generate import sample

    tokenizer, policy, _ = _load_saved(args, cfg)
    prompts = args.prompt or build_data(cfg.data, seed=cfg.run.seed).eval_prompts[:8]
    s = sample(policy, tokenizer, prompts, cfg.eval, cfg.data, n=args.n, show_progress=cfg.run.progress)
    for p, r in zip(s.prompts, s.responses):
        print(json.dumps({"prompt": p, "response": r}))
    return 0


def main(argv=None, *, hook: Hook | None = None) -> int:
    """The command line `argv` (default sys.argv[1:]) -> exit code. `hook`: passed to `train`'s
    run_pipeline (engine/checkpoint.py's `Hook`: the tests' fault injection, tests/fault_runner.py)."""
    args = _parser().parse_args(argv)
    from rlp_engine.engine.console import log_to_console

    log_to_console()  # the library logs its metrics lines (logging, INFO); the command prints them
    if not getattr(args, "print_config", False):
        # Before any work: without this, train stopped at its very end (the plot needs matplotlib).
        missing = [name for name in NEEDS[args.command] if importlib.util.find_spec(name) is None]
        if missing:
            print(_missing_package(args.command, missing[0]), file=sys.stderr)
            return 2
    if args.command == "export-rm":  # no config: the checkpoint holds everything
        return _export_rm(args)
    if args.command == "train" and args.resume and args.output_dir and not (args.config or args.preset):
        saved = Path(args.output_dir) / "config.yaml"
        if saved.is_file():
            args.config = str(saved)  # the run's own config; overrides still apply on top
    if args.command in ("eval", "sample"):
        from rlp_engine.pipeline.inputs import INPUT_ERRORS

        try:
            _check_checkpoints(args)  # a wrong directory: one line, before the config is read
        except INPUT_ERRORS as err:
            print(f"rlp-engine: error: {err}", file=sys.stderr)
            return 2
        saved = _saved_config(args.policy)
        if saved is not None and not (args.config or args.preset):
            args.config = str(saved)  # the run's own config; overrides still apply on top
            print(
                f"[rlp-engine] config: {saved} (the run's; --config or --preset to use another)",
                file=sys.stderr,
            )
    try:
        cfg = load_config(args.config, args.overrides, preset=args.preset)
    except (ConfigError, FileNotFoundError) as err:
        print(f"rlp-engine: config error: {err}", file=sys.stderr)
        return 2
    from rlp_engine.pipeline.inputs import INPUT_ERRORS

    handlers = {"train": lambda a, c: _train(a, c, hook=hook), "eval": _eval, "sample": _sample}
    try:
        return handlers[args.command](args, cfg)
    except INPUT_ERRORS as err:  # bad config, data or model: one line, no traceback
        print(f"rlp-engine: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # one NEEDS does not list, e.g. gguf for model.gguf_file
        name = (err.name or "").partition(".")[0]
        if name not in EXTRA:
            raise
        print(_missing_package(args.command, name), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training (imports, data) or in eval/sample
        print(f"rlp-engine: interrupted ({args.command})", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
