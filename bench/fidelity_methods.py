"""bench_fidelity's per-method figures across seeds: proxy reward, KL to the SFT policy, the method's
wall time and its training throughput (the "methods" table), and the gold-vs-KL curves of Gao et al.
(the over-optimisation plot, fidelity_kl.png). Also the across-seed helpers bench_fidelity uses.

Wall time of a method (ATTRIBUTION): the seconds of every stage its policy depends on, the stages
every method shares (sft, pref: D, rm: the base proxy RM) aside; SFT's own row is its sft stage. A
stage several methods need (sample P, the ensemble's members, rm_spg for later rounds) counts in
full for each of them, so a row reads "what this method costs on top of SFT, D and the base RM",
and the rows do not add up to the run's time. Dependencies follow pipeline/stages.py, arena.py and
ensemble.py: PPO-based RLP needs ppo (P is sampled from its policy) and sample; RLP-SPG round k needs
round k-1; the PPO-ensemble rows need the K members rm_ens_m<i>; rlp_ens needs the members,
ppo_ens_mean (its P's sampler), sample_ens and the refined members rm_ens_spg_m<i>; grpo_spg needs
RLP-SPG's reward model rm_spg (and with it sample and ppo).
Training tokens/s: the "training" phase of the policy's own stage (report["stage_throughput"]).
"""

from __future__ import annotations

import math
import re

from rlp_engine.pipeline.report import policy_name
from rlp_engine.stats import json_safe, seed_summary

BASE_STAGES = ("sft", "pref", "rm")  # shared by every method: in no method's wall time (but SFT's own)
# the stage that trains each policy, where it is not named like the policy
POLICY_STAGE = {
    "rlp_uml": "ppo_uml",
    "rlp_spg": "ppo_spg",
    "rlp_uml_spg": "ppo_uml_spg",
    "rlp_ens": "ppo_rlp_ens",
}
# panels of the gold-vs-KL figure: (title, test on the policy name); the first match takes a policy
GROUPS = (
    ("offline (on D)", lambda p: p in ("dpo", "ipo", "simpo")),
    ("online, critic-free", lambda p: p in ("grpo", "rloo", "grpo_spg")),
    ("PPO", lambda p: p in ("ppo", "ppo_oracle")),
    ("RM ensembles", lambda p: p.startswith("ppo_ens_") or p == "rlp_ens"),
    ("RLP", lambda p: p.startswith("rlp_")),
)


def _num(x) -> float | None:
    """A measured figure as a float; None for a missing or NaN one (report.json writes NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return float(x)


def _get(d, *keys):
    """d[k1][k2]... or None where any level is missing or not a dict."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def across_seeds(values: list) -> dict:
    """Per-seed values (None where a seed lacks the figure) -> {"mean", "se", "n", "per_seed"} over the
    n seeds that have it (mean and se None for n = 0; se NaN -> None for n = 1)."""
    per_seed = [_num(v) for v in values]
    have = [v for v in per_seed if v is not None]
    if not have:
        return {"mean": None, "se": None, "n": 0, "per_seed": per_seed}
    s = seed_summary(have)
    return json_safe({"mean": s["mean"], "se": s["se"], "n": len(have), "per_seed": per_seed})


def policy_stage(policy: str) -> str:
    """The stage that trains `policy` (rlp_spg_r<k>: ppo_spg_r<k>; most arena methods: its own name)."""
    m = re.fullmatch(r"rlp_spg_r(\d+)", policy)
    return f"ppo_spg_r{m.group(1)}" if m else POLICY_STAGE.get(policy, policy)


def _needs(stage: str, stages: list[str]) -> list[str]:
    """The stages whose outputs `stage` uses directly (base stages included; the caller drops them)."""
    members = [s for s in stages if re.fullmatch(r"rm_ens_m\d+", s)]
    m = re.fullmatch(r"(ppo_spg|rm_spg|sample)(?:_r(\d+))?", stage)
    if m:  # RLP-SPG rounds: round k samples P from round k-1's policy and ranks it by round k-1's RM
        kind, k = m.group(1), int(m.group(2) or 1)
        tag, prev = ("" if k == 1 else f"_r{k}"), ("" if k == 2 else f"_r{k - 1}")
        if kind == "ppo_spg":
            return [f"rm_spg{tag}"]
        if kind == "rm_spg":
            return [f"sample{tag}"] + ([f"rm_spg{prev}"] if k > 1 else [])
        return ["ppo"] if k == 1 else [f"ppo_spg{prev}"]
    m = re.fullmatch(r"rm_ens_spg_m(\d+)", stage)
    if m:
        return ["sample_ens", f"rm_ens_m{m.group(1)}"]
    table = {
        "ppo_uml": ["rm_uml"],
        "rm_uml": ["sample"],
        "ppo_uml_spg": ["rm_uml_spg"],
        "rm_uml_spg": ["rm_spg", "sample"],
        "sample_ens": ["ppo_ens_mean"],
        "ppo_rlp_ens": [s for s in stages if re.fullmatch(r"rm_ens_spg_m\d+", s)],
        "grpo_spg": ["rm_spg"],
    }
    if stage.startswith("ppo_ens_"):
        return members
    return table.get(stage, [])


def method_stages(policy: str, stages: list[str]) -> list[str] | None:
    """The stages (of a run's `stages`, in run order) whose seconds make `policy`'s wall time under the
    module's attribution rule; None when the run has no stage that trains it."""
    own = policy_stage(policy)
    if own not in stages:
        return None
    seen, todo = {own}, [own]
    while todo:
        for dep in _needs(todo.pop(), stages):
            if dep in stages and dep not in seen and dep not in BASE_STAGES:
                seen.add(dep)
                todo.append(dep)
    return [s for s in stages if s in seen]


def _wall_seconds(report: dict, policy: str) -> float | None:
    seconds = _get(report, "stage_seconds") or {}
    chosen = method_stages(policy, list(seconds))
    return None if chosen is None else sum(seconds[s] for s in chosen)


def method_summary(reports: dict[int, dict], name: str) -> dict:
    """Across seeds: proxy reward (under the RM the policy was trained against), KL to SFT (with each
    seed's own SE), wall time under the attribution rule (with its stages, from the first seed that has
    them) and the training tokens/s of the policy's stage; n = 0 where no seed has the figure."""
    rows = [_get(r, "policies", name) for r in reports.values()]
    kl = across_seeds([_get(row, "kl_to_sft") for row in rows])
    kl["within_seed_se"] = [_num(_get(row, "kl_to_sft_se")) for row in rows]
    wall = across_seeds([_wall_seconds(r, name) for r in reports.values()])
    firsts = (method_stages(name, list(_get(r, "stage_seconds") or {})) for r in reports.values())
    wall["stages"] = next((s for s in firsts if s is not None), None)
    tps = [
        _get(r, "stage_throughput", policy_stage(name), "training", "tokens_per_s") for r in reports.values()
    ]
    return {
        "proxy_reward": across_seeds([_get(row, "proxy_reward") for row in rows]),
        "kl_to_sft": kl,
        "wall_seconds": wall,
        "train_tokens_per_s": across_seeds(tps),
    }


def curve_summary(reports: dict[int, dict], name: str) -> list[dict]:
    """The policy's gold-vs-KL curve across seeds: the seeds' points matched by "fraction" (of its
    training), each {"fraction", "step", "gold", "kl_to_sft"} with gold and KL mean ± SE over the seeds
    that have the point ("n"); sorted by fraction; [] when no seed has a curve."""
    by_fraction: dict[float, dict[int, dict]] = {}
    for i, r in enumerate(reports.values()):
        for point in _get(r, "policies", name, "curve") or []:
            f = _num(_get(point, "fraction"))
            if f is not None:
                by_fraction.setdefault(round(f, 6), {})[i] = point
    out = []
    for f in sorted(by_fraction):
        pts = [by_fraction[f].get(i) for i in range(len(reports))]
        steps = {p.get("step") for p in pts if p is not None}
        out.append(
            {
                "fraction": f,
                "step": steps.pop() if len(steps) == 1 else None,  # None: the seeds' steps differ
                "gold": across_seeds([_get(p, "gold") for p in pts]),
                "kl_to_sft": across_seeds([_get(p, "kl_to_sft") for p in pts]),
            }
        )
    return out


def _pm(est: dict | None, digits: int, of: int) -> str:
    """ "mean ± se" over seeds, "—" where no seed has the figure, "(n=k)" where only k of `of` do."""
    if not est or est.get("mean") is None:
        return "—"
    text = f"{est['mean']:.{digits}f}"
    text = text if est.get("se") is None else f"{text} ± {est['se']:.{digits}f}"
    return text if est.get("n", of) >= of else f"{text} (n={est['n']})"


def methods_table(summary: dict) -> list[str]:
    """Per policy: proxy reward, KL to SFT, wall time and training tokens/s, mean ± SE over seeds."""
    head = ["policy", "proxy reward ± SE", "KL to SFT ± SE", "wall time (s) ± SE", "training tokens/s ± SE"]
    head.append("stages in the wall time")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    of = len(summary["seeds"])
    for name, row in summary["policies"].items():
        stages = (row.get("wall_seconds") or {}).get("stages")
        cells = [
            policy_name(name),
            _pm(row.get("proxy_reward"), 3, of),
            _pm(row.get("kl_to_sft"), 3, of),
            _pm(row.get("wall_seconds"), 1, of),
            _pm(row.get("train_tokens_per_s"), 0, of),
            ", ".join(stages) if stages else "—",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def group_of(policy: str) -> str:
    return next((title for title, test in GROUPS if test(policy)), "other")


def _xy(points: list[dict]) -> tuple[list, list, list, list]:
    """(kl means, gold means, kl SEs, gold SEs) of the curve points that have both means."""
    have = [p for p in points if p["kl_to_sft"]["mean"] is not None and p["gold"]["mean"] is not None]
    return (
        [p["kl_to_sft"]["mean"] for p in have],
        [p["gold"]["mean"] for p in have],
        [p["kl_to_sft"]["se"] or 0.0 for p in have],
        [p["gold"]["se"] or 0.0 for p in have],
    )


def _final_point(row: dict) -> dict | None:
    """The policy's end point (KL and gold across seeds): its kl_to_sft, else its curve's last point."""
    if row.get("kl_to_sft", {}).get("mean") is not None and row["gold"]["mean"] is not None:
        return {"kl_to_sft": row["kl_to_sft"], "gold": row["gold"]}
    curve = row.get("curve") or []
    return curve[-1] if curve and _xy(curve[-1:])[0] else None


def plot_kl(summary: dict, path) -> bool:
    """Gold vs KL to SFT, mean over seeds with SE bars on both axes: one panel per group of methods
    (GROUPS; PPO dashed grey in the others, SFT a star at KL 0) and a last panel with every method's
    end point. Returns False (and writes nothing) when no policy has a curve or a KL."""
    pols = summary["policies"]
    groups: dict[str, list[str]] = {}
    for name, row in pols.items():
        if _xy(row.get("curve") or [])[0]:
            groups.setdefault(group_of(name), []).append(name)
    ends = {n: e for n, row in pols.items() if n != "sft" and (e := _final_point(row)) is not None}
    if not groups and not ends:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = [t for t, _ in GROUPS if t in groups] + (["other"] if "other" in groups else [])
    n = len(titles) + 1
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    sft = (pols.get("sft") or {}).get("gold") or {}
    for ax, title in zip(axes.flat, titles):
        if "ppo" in pols and title != group_of("ppo") and _xy(pols["ppo"].get("curve") or [])[0]:
            x, y, _, _ = _xy(pols["ppo"]["curve"])
            ax.plot(x, y, "--", color="0.6", label="PPO (reference)")
        for name in groups[title]:
            x, y, xe, ye = _xy(pols[name]["curve"])
            ax.errorbar(x, y, xerr=xe, yerr=ye, fmt="o-", ms=3, capsize=2, label=policy_name(name))
        if sft.get("mean") is not None:
            ax.errorbar([0.0], [sft["mean"]], yerr=[sft["se"] or 0.0], fmt="*", ms=10, color="k", label="SFT")
        ax.set_title(title)
        ax.set_xlabel("KL to SFT (mean over seeds)")
        ax.set_ylabel("gold score")
        ax.legend(fontsize=7)
    last = axes.flat[len(titles)]
    colour = {t: f"C{i}" for i, t in enumerate([t for t, _ in GROUPS] + ["other"])}
    for name, e in ends.items():
        x, y, xe, ye = _xy([e])
        last.errorbar(x, y, xerr=xe, yerr=ye, fmt="o", ms=4, capsize=2, color=colour[group_of(name)])
        last.annotate(policy_name(name), (x[0], y[0]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    last.set_title("every method's end point (colour: its panel)")
    last.set_xlabel("KL to SFT (mean over seeds)")
    last.set_ylabel("gold score")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(f"gold vs KL to SFT over training, mean ± SE over {len(summary['seeds'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
