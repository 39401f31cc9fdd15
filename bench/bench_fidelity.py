"""Seed-to-seed fidelity of the RLP pipeline: run `rlp-engine train` once per seed and report every
policy's gold score, its paired differences against SFT and PPO, the win-rate and each reward
model's accuracy as mean ± SE across seeds (SE = sd(ddof=1) / sqrt(#seeds): the spread a rerun
with another seed shows), beside the per-seed values; per method its proxy reward, KL to SFT, wall
time and training tokens/s, and its gold-vs-KL curve (bench/fidelity_methods.py, which also states
how a method's wall time is attributed).

    python bench/bench_fidelity.py --seeds 0,1,2 --output-dir DIR [--preset NAME] [--jobs N] [key=value ...]

Each seed runs as its own process into DIR/seed_<s> (its output in DIR/seed_<s>/bench.log), `--jobs`
at a time; a seed whose report.json exists is skipped, so a killed bench continues where it stopped
(a half-finished seed resumes from its last checkpoint). Writes DIR/fidelity.json, DIR/fidelity.md
and DIR/fidelity.png (and DIR/fidelity_kl.png, gold vs KL per method, when the reports have KL) and
prints the tables. `--aggregate-only`: run nothing, summarise the seed folders' existing reports.
Tried on the 2-core CPU dev box with `--preset tiny` (about 6 s a seed there); the default preset
takes minutes of CPU a seed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity_methods import (  # noqa: E402
    _get,
    _num,
    across_seeds,
    curve_summary,
    method_summary,
    methods_table,
    plot_kl,
)

from rlp_engine.config import ConfigError, load_config, to_dict  # noqa: E402
from rlp_engine.pipeline.report import policy_name, rm_name  # noqa: E402
from rlp_engine.stats import json_safe  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASELINES = ("sft", "ppo")  # the policies every other one is paired against, seed by seed
PER_SEED = ("run.seed", "run.output_dir")  # set by the bench for each seed
# run.* keys that do not change what a run computes (rlp_engine.pipeline.run.RESUME_FREE): a
# finished seed whose config differs only in these still belongs to this bench.
RUN_FREE = {"threads", "progress", "tensorboard", "dist_timeout_s", "checkpoint_every", "keep_checkpoints"}
RUN_FREE |= {"device", "output_dir", "seed"}


def _ordered_keys(dicts) -> list[str]:
    """The keys of several dicts, in order of first appearance."""
    return list(dict.fromkeys(k for d in dicts if isinstance(d, dict) for k in d))


def _policy_summary(reports: dict[int, dict], name: str) -> dict:
    rows = [_get(r, "policies", name) for r in reports.values()]
    gold = [_num(_get(row, "gold")) for row in rows]
    out = {m: across_seeds([_get(row, m) for row in rows]) for m in ("gold", "exact", "win_rate")}
    for base in BASELINES:
        key = f"diff_vs_{base}"
        if name == base:
            out[key] = None
            continue
        base_gold = [_num(_get(r, "policies", base, "gold")) for r in reports.values()]
        # paired within each seed: the seed's whole draw (data, init, sampling) cancels in the difference
        diffs = [None if a is None or b is None else a - b for a, b in zip(gold, base_gold)]
        out[key] = across_seeds(diffs)
        # the within-seed SE of the same difference, clustered by prompt (from the run's own report)
        out[key]["within_seed_se"] = [_num(_get(row, key, "gold_se")) for row in rows]
    # proxy reward, KL to SFT, wall time, training tokens/s; the gold-vs-KL curve (fidelity_methods)
    return {**out, **method_summary(reports, name), "curve": curve_summary(reports, name)}


def _rm_summary(reports: dict[int, dict], name: str) -> dict:
    rows = [_get(r, "reward_models", name) for r in reports.values()]
    heldout = across_seeds([_get(row, "offline_accuracy") for row in rows])
    heldout["within_seed_se"] = [_num(_get(row, "offline_accuracy_se")) for row in rows]
    on = [_get(row, "on_policy_accuracy") for row in rows]
    keys = [k for k in _ordered_keys(on) if k != "pairs"]  # "pairs" is a count, not an accuracy
    return {
        "heldout_accuracy": heldout,
        "on_policy_accuracy": {k: across_seeds([_get(o, k) for o in on]) for k in keys},
    }


def summarize(reports: dict[int, dict], wall_seconds: dict[int, float] | None = None) -> dict:
    """{seed: report.json of that seed's run} -> the across-seed summary (strict-JSON-able: None for
    missing or NaN figures). Policies and reward models are those any seed's report holds, in order
    of first appearance; a figure's "n" counts the seeds that have it. wall_seconds: seed -> wall time
    of the seed's process (imports and start-up included; the report's total_seconds has the stages)."""
    seeds = list(reports)
    policies = _ordered_keys(_get(r, "policies") for r in reports.values())
    rms = _ordered_keys(_get(r, "reward_models") for r in reports.values())
    seconds = across_seeds([_get(r, "total_seconds") for r in reports.values()])
    stages = _ordered_keys(_get(r, "stage_seconds") for r in reports.values())
    seconds["stages"] = {
        s: across_seeds([_get(r, "stage_seconds", s) for r in reports.values()])["mean"] for s in stages
    }
    seconds["process"] = across_seeds([(wall_seconds or {}).get(s) for s in seeds])
    return {
        "seeds": seeds,
        "policies": {p: _policy_summary(reports, p) for p in policies},
        "reward_models": {m: _rm_summary(reports, m) for m in rms},
        "seconds": seconds,
    }


def _pm(est: dict | None, digits: int = 3, signed: bool = False, of: int | None = None) -> str:
    """ "mean ± se" of an across_seeds dict ("n/a" without a mean, the mean alone without an SE),
    followed by "(n=k)" when only k of the `of` seeds have the figure."""
    if not est or est.get("mean") is None:
        return "n/a"
    text = f"{est['mean']:+.{digits}f}" if signed else f"{est['mean']:.{digits}f}"
    text = text if est.get("se") is None else f"{text} ± {est['se']:.{digits}f}"
    return text if of is None or est.get("n", of) >= of else f"{text} (n={est['n']})"


def _seq(values, digits: int = 3) -> str:
    return ", ".join("n/a" if v is None else f"{v:.{digits}f}" for v in values or [])


def _policy_table(summary: dict) -> list[str]:
    head = ["policy", "gold ± SE (n)", "Δ gold vs SFT ± SE", "Δ gold vs PPO ± SE", "win-rate (%) ± SE"]
    head += ["gold per seed", "within-seed SE of Δ vs SFT, per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    of = len(summary["seeds"])
    for name, row in summary["policies"].items():
        gold = row["gold"]
        vs_sft = row["diff_vs_sft"]
        cells = [
            policy_name(name),
            f"{_pm(gold)} ({gold['n']})",
            "—" if vs_sft is None else _pm(vs_sft, signed=True, of=of),
            "—" if row["diff_vs_ppo"] is None else _pm(row["diff_vs_ppo"], signed=True, of=of),
            _pm(row["win_rate"], 1, of=of),
            _seq(gold["per_seed"]),
            "—" if vs_sft is None else _seq(vs_sft["within_seed_se"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rm_table(summary: dict) -> list[str]:
    rms = summary["reward_models"]
    pols = _ordered_keys(row["on_policy_accuracy"] for row in rms.values())
    label = {p: "all policies" if p == "all" else policy_name(p) for p in pols}
    head = ["reward model", "held-out accuracy ± SE"] + [f"on-policy: {label[p]} ± SE" for p in pols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rms.items():
        of = len(summary["seeds"])
        cells = [rm_name(name), _pm(row["heldout_accuracy"], of=of)]
        cells += [_pm(row["on_policy_accuracy"].get(p), of=of) for p in pols]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(summary: dict) -> str:
    """The summary as markdown: a header (date, commit, machine, command), the policy table, the
    reward-model table and the time per seed. Header fields the summary lacks are left out."""
    seeds = summary["seeds"]
    commit = summary.get("commit") or "unknown"
    if summary.get("dirty"):
        commit += " (with uncommitted changes under rlp_engine/)"
    lines = ["# RLP pipeline across seeds", ""]
    if "date" in summary:
        lines.append(f"{summary['date']}, commit {commit}, {summary.get('machine', 'unknown machine')}  ")
    if "command" in summary:
        lines.append(f"Command: `{summary['command']}`  ")
    if summary.get("aggregate_only"):  # the commit above is the aggregation's, not the runs'
        lines.append(
            "Aggregated from existing seed reports (--aggregate-only): the runs' commit is not in them  "
        )
    lines += [
        f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}). ± is the SE across seeds, "
        "sd(ddof=1) / sqrt(n); (n) counts the seeds with a value. Δ columns: per seed, the policy's gold "
        "mean minus the baseline's (paired within the seed), then mean ± SE over seeds. The within-seed "
        "SE is the run's own prompt-clustered SE of that difference.",
        "",
        *_policy_table(summary),
        "",
    ]
    if summary["reward_models"]:
        lines += [
            "Reward-model accuracy: held-out preference pairs, and gold-labelled pairs of each policy's own "
            "samples (on-policy; a seed whose samples gave no such pair has no value: (n=k)).",
            "",
            *_rm_table(summary),
            "",
        ]
    lines += [
        "Per method: proxy reward under the reward model it was trained against (SFT: the base RM), KL "
        "to the SFT policy, wall time and the training tokens/s of its own stage; mean ± SE over seeds "
        "(— where no seed's report has the figure). Wall time: the seconds of every stage the policy "
        "depends on, sft / pref / rm (shared by all) aside; a stage several methods need counts in full "
        "for each (bench/fidelity_methods.py, ATTRIBUTION).",
        "",
        *methods_table(summary),
        "",
    ]
    sec, proc = summary["seconds"], summary["seconds"].get("process") or {}
    lines.append(f"Time per seed: stages {_pm(sec, 1)} s (per seed: {_seq(sec['per_seed'], 1)} s)")
    if proc.get("n"):
        lines[-1] += f"; whole process {_pm(proc, 1)} s (per seed: {_seq(proc['per_seed'], 1)} s)"
    stages = ", ".join(f"{k} {v:.1f}" for k, v in sec.get("stages", {}).items() if v is not None)
    if stages:
        lines[-1] += "  "  # a markdown line break
        lines.append(f"Mean seconds per stage: {stages}")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Left: gold per policy, mean ± SE across seeds with the per-seed values as dots. Right: each
    reward model's held-out and on-policy (per policy) accuracy, mean ± SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, row in enumerate(summary["policies"].values()):
        g = row["gold"]
        dots = [v for v in g["per_seed"] if v is not None]
        left.scatter([i + 0.12] * len(dots), dots, s=12, color="gray", zorder=3)
        if g["mean"] is not None:
            left.errorbar(i, g["mean"], yerr=g["se"] or 0.0, fmt="o", capsize=4, color="C0")
    names = [policy_name(p) for p in summary["policies"]]
    left.set_xticks(range(len(names)), names, rotation=20, ha="right")
    left.set_ylabel("gold score")
    left.set_title(f"gold, mean ± SE over {len(summary['seeds'])} seeds (dots: seeds)")
    rms = summary["reward_models"]
    series = ["heldout"] + [
        p for p in _ordered_keys(r["on_policy_accuracy"] for r in rms.values()) if p != "all"
    ]
    width = 0.8 / max(len(series), 1)
    for j, s in enumerate(series):
        xs, ys, es = [], [], []
        for i, row in enumerate(rms.values()):
            est = row["heldout_accuracy"] if s == "heldout" else row["on_policy_accuracy"].get(s)
            if est and est["mean"] is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(est["mean"])
                es.append(est["se"] or 0.0)
        label = "held-out" if s == "heldout" else f"on {policy_name(s)}"
        right.errorbar(xs, ys, yerr=es, fmt="s" if s == "heldout" else "o", capsize=3, label=label)
    right.set_xticks(range(len(rms)), [rm_name(m) for m in rms], rotation=20, ha="right")
    right.set_ylabel("pairwise accuracy")
    right.set_title("reward models: held-out vs on-policy accuracy")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class BadInput(ValueError):
    pass


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise BadInput(f"--seeds: {text!r} is not a comma-separated list of integers (e.g. 0,1,2)") from None
    if any(s < 0 for s in seeds):
        raise BadInput(f"--seeds: {text!r}: seeds are integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise BadInput(f"--seeds: {text!r} repeats a seed")
    return seeds


def _expected_config(preset: str | None, overrides: list[str], seed: int) -> dict:
    """The config a seed's run gets, as its report.json holds it (through JSON: tuples become lists)."""
    return json.loads(
        json.dumps(to_dict(load_config(preset=preset, overrides=[*overrides, f"run.seed={seed}"])))
    )


def _config_changes(saved: dict, expected: dict) -> list[str]:
    """Keys where a finished seed's config differs from this command's (run.* keys that do not change
    the results aside)."""
    return [
        f"{section}.{key}: {_get(saved, section, key)!r} (this command: {value!r})"
        for section, fields in expected.items()
        for key, value in fields.items()
        if _get(saved, section, key) != value and not (section == "run" and key in RUN_FREE)
    ]


def validate(args) -> list[int]:
    """Every check that can fail before a run starts; raises BadInput or ConfigError (one line)."""
    seeds = _parse_seeds(args.seeds)
    out = Path(args.output_dir)
    if args.aggregate_only:
        if args.preset or args.overrides:
            raise BadInput(
                "--aggregate-only reads the seed folders as they are: drop --preset and the overrides"
            )
        missing = [str(out / f"seed_{s}" / "report.json") for s in seeds]
        missing = [m for m in missing if not Path(m).is_file()]
        if missing:
            raise BadInput(f"--aggregate-only: no report for these seeds: {', '.join(missing)}")
        return seeds
    if args.jobs < 1:
        raise BadInput(f"--jobs: {args.jobs} is not >= 1")
    for text in args.overrides:
        if text.split("=", 1)[0].strip() in PER_SEED:
            raise BadInput(
                f"override {text!r}: the bench sets {', '.join(PER_SEED)} itself (--seeds, --output-dir)"
            )
    for s in seeds:
        expected = _expected_config(args.preset, args.overrides, s)  # unknown preset / bad key=value
        done = out / f"seed_{s}" / "report.json"
        if done.is_file():
            changed = _config_changes(json.loads(done.read_text()).get("config", {}), expected)
            if changed:
                raise BadInput(
                    f"{done} was made with another config ({'; '.join(changed)}): use another --output-dir "
                    "or delete that seed's folder"
                )
    return seeds


def run_seed(seed: int, out: Path, preset: str | None, overrides: list[str]) -> tuple[int, int, float]:
    """One `rlp-engine train` process for `seed` into out/seed_<seed> -> (seed, exit code, seconds)."""
    sdir = (out / f"seed_{seed}").resolve()
    sdir.mkdir(parents=True, exist_ok=True)
    # Always name a preset: with --resume and no preset, the CLI would take the seed folder's saved
    # config.yaml as the config, whatever this command asks.
    cmd = [sys.executable, "-m", "rlp_engine.cli", "train", "--output-dir", str(sdir), "--resume"]
    cmd += ["--preset", preset or "default", f"run.seed={seed}", *overrides]
    # PYTHONSAFEPATH and cwd outside the repo: the repo's top-level kernels/ must not shadow the
    # installed `kernels` package that transformers imports.
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    print(f"[bench_fidelity] seed {seed}: started", flush=True)
    start = time.perf_counter()
    with open(sdir / "bench.log", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=sdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    secs = time.perf_counter() - start
    if rc == 0:  # the process wall time, kept for the summary of a later, resumed bench
        (sdir / "bench_seconds.json").write_text(json.dumps({"seconds": round(secs, 2)}) + "\n")
    return seed, rc, secs


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def run_all(seeds: list[int], out: Path, args) -> list[int]:
    """Run the seeds without a report.json, args.jobs at a time -> the seeds that failed."""
    todo = [s for s in seeds if not (out / f"seed_{s}" / "report.json").is_file()]
    for s in seeds:
        if s not in todo:
            print(f"[bench_fidelity] seed {s}: {out / f'seed_{s}'}/report.json exists, skipped", flush=True)
    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        print(f"[bench_fidelity] seeds {todo}, {args.jobs} at a time: {out}/seed_*/bench.log", flush=True)
        for seed, rc, secs in pool.map(lambda s: run_seed(s, out, args.preset, args.overrides), todo):
            done = rc == 0 and (out / f"seed_{seed}" / "report.json").is_file()
            print(
                f"[bench_fidelity] seed {seed}: {'done' if done else f'FAILED (exit {rc})'} in {secs:.1f} s",
                flush=True,
            )
            if not done:
                failed.append(seed)
                print(_tail(out / f"seed_{seed}" / "bench.log"), file=sys.stderr, flush=True)
    return failed


def _wall_seconds(path: Path) -> float | None:
    try:
        return float(json.loads(path.read_text())["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _stamp(summary: dict, args, argv: list[str], reports: dict) -> dict:
    """The summary with the provenance fields: command, config, commit, date, machine."""
    first = next(iter(reports.values()))
    dev = _get(first, "machine", "device")
    threads = _get(first, "machine", "threads")
    status = _git("status", "--porcelain", "--", "rlp_engine")
    return {
        **summary,
        "preset": args.preset,
        "config_overrides": list(args.overrides),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": None if status is None else bool(status),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {os.cpu_count()} cores; run device {dev}, {threads} threads",
        "command": shlex.join(["python", "bench/bench_fidelity.py", *argv]),
        "aggregate_only": bool(args.aggregate_only),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument(
        "--output-dir", required=True, help="one folder seed_<s> per seed, and the fidelity.* files"
    )
    p.add_argument("--preset", help="the pipeline's preset (default: default)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at a time (default 1)")
    p.add_argument(
        "--aggregate-only",
        action="store_true",
        help="run nothing: summarise the seed folders' existing report.json files (each must exist)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides for every seed, e.g. ppo.kl_coef=0.05")

    def error(message: str):  # one line, exit 2 (argparse's own error prints the usage too)
        print(f"bench_fidelity: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    p.error = error
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    try:
        seeds = validate(args)
    except (BadInput, ConfigError) as err:
        print(f"bench_fidelity: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    failed = [] if args.aggregate_only else run_all(seeds, out, args)
    if failed:
        print(
            f"bench_fidelity: seeds {failed} failed (logs: {out}/seed_<s>/bench.log); rerun the same command "
            "to retry them (finished seeds are kept)",
            file=sys.stderr,
        )
        return 1
    reports = {s: json.loads((out / f"seed_{s}" / "report.json").read_text()) for s in seeds}
    wall = {s: _wall_seconds(out / f"seed_{s}" / "bench_seconds.json") for s in seeds}
    summary = _stamp(summarize(reports, wall), args, argv, reports)
    (out / "fidelity.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    md = render_markdown(summary)
    (out / "fidelity.md").write_text(md)
    plot(summary, out / "fidelity.png")
    kl = plot_kl(summary, out / "fidelity_kl.png")
    print(md)
    print(f"[bench_fidelity] wrote {out}/fidelity.json, fidelity.md, fidelity.png", end="")
    print(", fidelity_kl.png" if kl else " (no fidelity_kl.png: no policy has a KL to SFT or a curve)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
