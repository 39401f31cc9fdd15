"""The run's report: report.md (tables of the measured figures), training_curves.png and, when the
policies have curves (pipeline/curves.py), gold_vs_kl.png."""

from __future__ import annotations

import re
from pathlib import Path

POLICY_NAMES = {
    "sft": "SFT",
    "ppo": "PPO",
    "rlp_uml": "RLP-UML",
    "rlp_spg": "RLP-SPG",
    "rlp_uml_spg": "RLP-UML+SPG",
    "ppo_oracle": "PPO (oracle: gold reward)",
    "grpo": "GRPO",
    "rloo": "RLOO",
    "dpo": "DPO",
    "ipo": "IPO",
    "simpo": "SimPO",
    "ppo_ens_mean": "PPO (RM ensemble: mean)",
    "ppo_ens_wco": "PPO (RM ensemble: WCO)",
    "ppo_ens_uwo": "PPO (RM ensemble: UWO)",
    "rlp_ens": "RLP-SPG ensemble + PPO (mean)",
    "grpo_spg": "GRPO (RLP-SPG reward model)",
}
RM_NAMES = {
    "rm": "RM (D only)",
    "rm_uml": "RM RLP-UML",
    "rm_spg": "RM RLP-SPG",
    "rm_uml_spg": "RM RLP-UML+SPG",
    "rm_ens_mean": "RM ensemble (mean)",
    "rm_ens_wco": "RM ensemble (WCO)",
    "rm_ens_uwo": "RM ensemble (UWO)",
    "rm_rlp_ens": "RM ensemble RLP-SPG (mean)",
}


def _readable(key: str, names: dict) -> str:
    """The display name of a policy or reward model; "<name>_r<k>" reads "<name> (round k)"."""
    if key in names:
        return names[key]
    m = re.fullmatch(r"(.+)_r(\d+)", key)
    return f"{_readable(m.group(1), names)} (round {m.group(2)})" if m else key


def policy_name(key: str) -> str:
    return _readable(key, POLICY_NAMES)


def rm_name(key: str) -> str:
    return _readable(key, RM_NAMES)


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "nan" if x != x else f"{x:.{digits}f}"
    return str(x)


def _pm(mean, se, digits: int = 3, signed: bool = False) -> str:
    """ "mean ± se" ("n/a" without a mean; the mean alone without an SE)."""
    if mean is None or mean != mean:
        return "n/a"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if se is None or se != se else f"{text} ± {se:.{digits}f}"


def _diff_targets(policies: dict) -> list[str]:
    """The policies some row is paired against ("diff_vs_<name>"), in order of first appearance."""
    seen = {}
    for row in policies.values():
        for key in row:
            if key.startswith("diff_vs_"):
                seen.setdefault(key[len("diff_vs_") :])
    return list(seen)


def _policy_table(report: dict) -> list[str]:
    pols = report["policies"]
    headline = "gold" if any(r.get("gold") is not None for r in pols.values()) else "win_rate"
    targets = _diff_targets(pols)
    digits = 3 if headline == "gold" else 1
    head = ["policy", "gold ± SE", "exact ± SE", "win-rate vs reference (%) ± SE"]
    head += [f"Δ {headline.replace('_', '-')} vs {policy_name(t)} ± SE" for t in targets]
    head += ["proxy reward ± SE", "KL to SFT ± SE", "response tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in pols.items():
        cells = [
            policy_name(name),
            _pm(row.get("gold"), row.get("gold_se")),
            _pm(row.get("exact"), row.get("exact_se")),
            _pm(row.get("win_rate"), row.get("win_rate_se"), 1),
        ]
        for t in targets:
            d = row.get(f"diff_vs_{t}") or {}
            cells.append(_pm(d.get(headline), d.get(f"{headline}_se"), digits, signed=True))
        cells += [
            _pm(row.get("proxy_reward"), row.get("proxy_reward_se")),
            _pm(row.get("kl_to_sft"), row.get("kl_to_sft_se")),
            _fmt(row.get("response_tokens"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ref = report.get("reference")
    if ref:
        cells = ["Reference (demonstrator)", _pm(ref.get("gold"), ref.get("gold_se"))]
        cells += [_pm(ref.get("exact"), ref.get("exact_se")), "50.0"] + [""] * len(targets) + ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _proxy_table(report: dict) -> list[str]:
    rms = list(report["reward_models"])
    lines = ["| policy | " + " | ".join(f"reward under {rm_name(r)}" for r in rms) + " |"]
    lines.append("|" + "---|" * (1 + len(rms)))
    for name, row in report["policies"].items():
        by_rm, by_se = row.get("proxy_reward_by_rm") or {}, row.get("proxy_reward_se_by_rm") or {}
        lines.append(
            "| " + " | ".join([policy_name(name)] + [_pm(by_rm.get(r), by_se.get(r)) for r in rms]) + " |"
        )
    return lines


def _rm_table(report: dict) -> list[str]:
    pols = list(report["policies"])
    head = ["reward model", "held-out acc ± SE", "on-policy acc (all) ± SE"]
    head += [f"on {policy_name(p)} ± SE" for p in pols] + ["best-of: pick is gold-best (chance)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pairs = prompts = None
    for name, row in report["reward_models"].items():
        acc, se = row.get("on_policy_accuracy") or {}, row.get("on_policy_accuracy_se") or {}
        pairs = (row.get("on_policy_pairs") or {}).get("all", acc.get("pairs"))
        cells = [rm_name(name), _pm(row.get("offline_accuracy"), row.get("offline_accuracy_se"))]
        cells += [_pm(acc.get(k), se.get(k)) for k in ["all"] + pols]
        b = row.get("best_of")
        if b:
            prompts = b.get("n_prompts")
            cells.append(f"{_pm(b.get('rate'), b.get('rate_se'))} ({_fmt(b.get('chance'))})")
        else:
            cells.append("n/a")
        lines.append("| " + " | ".join(cells) + " |")
    offline = next((r.get("offline_pairs") for r in report["reward_models"].values()), None)
    lines += [
        "",
        f"On-policy: {_fmt(pairs)} gold-labelled pairs of the policies' own samples (1st with 2nd, 3rd with "
        "4th sample of a prompt; gold ties dropped; reward ties count 1/2); accuracy per prompt, SE over "
        "prompts. Held-out: "
        + (
            f"{offline} pairs on held-out prompts, binomial SE."
            if offline
            else "preference pairs on held-out prompts."
        )
        + " Best-of: over the distinct responses all policies gave a prompt, the chance that the reward "
        "model's top pick is gold-best (in parentheses: a uniform random pick)"
        + (f", over the {prompts} prompts whose responses differ in gold." if prompts is not None else "."),
    ]
    return lines


def _eval_note(report: dict) -> list[str]:
    ev = report.get("eval") or {}
    pols = report["policies"]
    n = ev.get("n_prompts", next((r.get("n_prompts") for r in pols.values()), None))
    k = ev.get("samples_per_prompt", next((r.get("samples_per_prompt") for r in pols.values()), None))
    return [
        "",
        f"Each policy sampled once: {_fmt(k)} responses to each of {_fmt(n)} held-out prompts"
        + (f" at temperature {ev['temperature']}, seed {ev.get('seed')}" if "temperature" in ev else "")
        + ". Standard errors are clustered by prompt (a prompt's samples averaged first, SE over prompts); "
        "Δ columns are paired differences on the same prompts (SE of the per-prompt differences). "
        "Win-rate: a simulated annotator (gold reward, ties 1/2) compares each sample with a reference "
        "response. Proxy reward: under the reward model the policy was optimised against (SFT: the base "
        "RM). KL to SFT: the mean over the policy's samples of sum_t log pi(y_t) - log pi_SFT(y_t) over "
        "the response tokens (k1, at the evaluation temperature), SE clustered by prompt."
        + (" Gold against KL to SFT along training: gold_vs_kl.png." if _has_curves(report) else ""),
    ]


def _has_curves(report: dict) -> bool:
    return any(row.get("curve") for row in (report.get("policies") or {}).values())


PHASES = ("training", "generation", "scoring")


def _time_table(report: dict) -> list[str]:
    """Seconds per stage and, where the report has stage_throughput, each phase's tokens/s in it."""
    per = report.get("stage_throughput") or {}
    lines = ["| stage | seconds | " + " | ".join(f"{p} tokens/s" for p in PHASES) + " |"]
    lines.append("|---" * (2 + len(PHASES)) + "|")
    for k, v in report["stage_seconds"].items():
        rates = [_fmt((per.get(k) or {}).get(p, {}).get("tokens_per_s"), 0) for p in PHASES]
        lines.append(f"| {k} | {v:.1f} | " + " | ".join(rates) + " |")
    if "total_seconds" in report:
        lines.append(f"| total | {report['total_seconds']:.1f} |" + " |" * len(PHASES))
    return lines


def render_markdown(report: dict) -> str:
    """report.md from report.json's dict; sections whose keys are missing are left out."""
    lines = ["# rlp-engine run report", ""]
    d, model = report.get("data"), report.get("model")
    if d and model:
        lines.append(
            f"Model: {model['parameters']:,} parameters, vocab {model['vocab']}. "
            f"Data: {d['sft']} demonstrations, {d['preferences']} preferences, {d['prompts']} unlabeled "
            f"prompts, {d['eval_prompts']} held-out prompts ({d['eval_samples']} samples each at the "
            "evaluation temperature)."
        )
    if report.get("policies"):
        lines += ["", "## Policies", ""] + _policy_table(report) + _eval_note(report)
    if report.get("policies") and report.get("reward_models"):
        lines += ["", "Reward of each policy's samples under every reward model:", ""] + _proxy_table(report)
        lines += ["", "## Reward models", ""] + _rm_table(report)
    for key in [k for k in report if k == "spg" or k.startswith("spg_r")]:
        s = report[key] or {}
        if not s:
            continue
        lines += [
            "",
            f"{policy_name('rlp_' + key)}: {s['pairs']} synthetic pairs, {_fmt(s['kept'])} of prompts "
            f"kept, mean confidence {_fmt(s['confidence'])}, gold accuracy of the synthetic pairs "
            f"{_fmt(s.get('synthetic_pair_gold_acc'))} "
            f"(gold ties {_fmt(s.get('synthetic_pair_gold_ties'))}).",
        ]
    if report.get("uml"):
        u = report["uml"]
        lines += [
            "",
            f"RLP-UML information bottleneck on {u['pairs']} held-out view pairs: MI estimate "
            f"{_fmt(u['mi'])} (an uninformative critic gives -2 ln 2 = -1.386), "
            f"symmetric KL {_fmt(u['skl'])}, "
            f"encoder means' spread across inputs {_fmt(u['mu_std'])} (mean size {_fmt(u['mu_norm'])}).",
        ]
    if "stage_seconds" in report:
        lines += ["", "## Time", ""] + _time_table(report)
    if report.get("throughput"):
        lines += ["", "| phase | tokens | seconds | tokens/s |", "|---|---|---|---|"]
        for k, v in report["throughput"].items():
            lines.append(f"| {k} | {int(v['tokens'])} | {v['seconds']:.1f} | {v['tokens_per_s']:.0f} |")
    if "machine" in report:
        m = report["machine"]
        lines += ["", f"Machine: {m['platform']}, {m['threads']} threads, device {m['device']}."]
    lines.append("")
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


def _nan(x) -> float:
    return float("nan") if x is None else float(x)


def plot_gold_vs_kl(report: dict, path: Path) -> None:
    """Gold against KL to SFT along each policy's training (its "curve": SFT, snapshots, final), one
    line per policy with both SEs as error bars (the over-optimisation curve of Gao et al.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for name, row in report["policies"].items():
        points = row.get("curve") or []
        if not points:
            continue
        xs, ys = [_nan(p["kl_to_sft"]) for p in points], [_nan(p["gold"]) for p in points]
        xerr, yerr = [_nan(p["kl_to_sft_se"]) for p in points], [_nan(p["gold_se"]) for p in points]
        ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, marker="o", capsize=3, label=policy_name(name))
    ax.set_xlabel("KL to SFT (nats per response, k1 on the policy's samples)")
    ax.set_ylabel("gold reward")
    ax.set_title("Gold vs KL to SFT along training (SFT, snapshots, final policy)")
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: str | Path, report: dict, curves: dict) -> None:
    out_dir = Path(out_dir)
    (out_dir / "report.md").write_text(render_markdown(report))
    plot_curves(curves, out_dir / "training_curves.png")
    if _has_curves(report):
        plot_gold_vs_kl(report, out_dir / "gold_vs_kl.png")
