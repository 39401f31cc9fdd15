"""The run's report: report.md (tables of the measured figures) and training_curves.png."""

from __future__ import annotations

from pathlib import Path

POLICY_NAMES = {"sft": "SFT", "ppo": "PPO", "rlp_uml": "RLP-UML", "rlp_spg": "RLP-SPG"}
RM_NAMES = {"rm": "RM (D only)", "rm_uml": "RM RLP-UML", "rm_spg": "RM RLP-SPG"}


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.{digits}f}"
    return str(x)


def _policy_table(report: dict) -> list[str]:
    rms = list(report["reward_models"])
    head = (
        "| policy | gold score | exact | proxy reward | "
        + " | ".join(f"reward under {r}" for r in rms)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + len(rms))]
    for name, row in report["policies"].items():
        by_rm = row["proxy_reward_by_rm"]
        cells = [
            POLICY_NAMES.get(name, name),
            _fmt(row["gold"]),
            _fmt(row["exact"]),
            _fmt(row["proxy_reward"]),
        ]
        cells += [_fmt(by_rm.get(r)) for r in rms]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _rm_table(report: dict) -> list[str]:
    pols = list(report["policies"])
    head = (
        "| reward model | offline acc | on-policy acc (all) | " + " | ".join(f"on {p}" for p in pols) + " |"
    )
    lines = [head, "|" + "---|" * (3 + len(pols))]
    for name, row in report["reward_models"].items():
        acc = row["on_policy_accuracy"]
        cells = [RM_NAMES.get(name, name), _fmt(row.get("offline_accuracy")), _fmt(acc["all"])]
        cells += [_fmt(acc.get(p)) for p in pols]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = (
        next(iter(report["reward_models"].values()))["on_policy_accuracy"]["pairs"]
        if report["reward_models"]
        else 0
    )
    lines.append("")
    lines.append(
        f"On-policy pairs: {pairs} gold-labelled pairs of the final policies' own samples (ties dropped)."
    )
    return lines


def render_markdown(report: dict) -> str:
    lines = ["# rlp-engine run report", ""]
    d = report["data"]
    lines.append(
        f"Model: {report['model']['parameters']:,} parameters, vocab {report['model']['vocab']}. "
        f"Data: {d['sft']} demonstrations, {d['preferences']} preferences, {d['prompts']} unlabeled prompts, "
        f"{d['eval_prompts']} held-out prompts ({d['eval_samples']} samples each at the evaluation "
        "temperature)."
    )
    lines += ["", "## Policies", ""] + _policy_table(report)
    lines += ["", "Proxy reward: under the reward model the policy was optimised against (SFT: the base RM)."]
    lines += ["", "## Reward models", ""] + _rm_table(report)
    if "spg" in report:
        s = report["spg"]
        lines += [
            "",
            f"RLP-SPG: {s['pairs']} synthetic pairs, {_fmt(s['kept'])} of prompts kept, "
            f"mean confidence {_fmt(s['confidence'])}, gold accuracy of the synthetic pairs "
            f"{_fmt(s.get('synthetic_pair_gold_acc'))}.",
        ]
    lines += ["", "## Time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in report["stage_seconds"].items()]
    lines.append(f"| total | {report['total_seconds']:.1f} |")
    lines += ["", "| phase | tokens | seconds | tokens/s |", "|---|---|---|---|"]
    for k, v in report["throughput"].items():
        lines.append(f"| {k} | {int(v['tokens'])} | {v['seconds']:.1f} | {v['tokens_per_s']:.0f} |")
    m = report["machine"]
    lines += ["", f"Machine: {m['platform']}, {m['threads']} threads, device {m['device']}.", ""]
    return "\n".join(lines)


PANELS = (
    ("SFT loss", ("sft",), "loss"),
    ("Reward model Bradley-Terry loss", ("rm", "rm_uml", "rm_spg"), "bt_loss"),
    ("PPO reward-model score (rollouts)", ("ppo", "ppo_uml", "ppo_spg"), "score"),
    ("PPO gold score (rollouts, monitoring only)", ("ppo", "ppo_uml", "ppo_spg"), "gold"),
    ("PPO KL to reference (sum per response)", ("ppo", "ppo_uml", "ppo_spg"), "kl"),
    ("Reward model accuracy on its training batches", ("rm", "rm_uml", "rm_spg"), "acc"),
)


def plot_curves(curves: dict, path: Path) -> None:
    """A 2x3 figure of the training curves (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (title, stages, key) in zip(axes.flat, PANELS):
        for stage in stages:
            points = curves.get(stage, {}).get(key, [])
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=stage)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: str | Path, report: dict, curves: dict) -> None:
    out_dir = Path(out_dir)
    (out_dir / "report.md").write_text(render_markdown(report))
    plot_curves(curves, out_dir / "training_curves.png")
