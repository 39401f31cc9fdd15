"""README's default-run figures, written from a run's report.json so that they cannot drift.

    python scripts/readme_figures.py --from-report runs/default/report.json --commit SHA
        extracts the figures README shows into bench/default_report.json (SHA: the commit the run
        was made at), then rewrites README's block
    python scripts/readme_figures.py            rewrites README's block from bench/default_report.json
    python scripts/readme_figures.py --check    exit 1 (with a diff) when README's block differs

The block lies between `<!-- figures:begin ... -->` and `<!-- figures:end -->` in README.md; nothing
else in README is touched. tests/test_readme_figures.py checks that README matches the committed JSON.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIGURES = ROOT / "bench" / "default_report.json"
BLOCK = re.compile(r"(<!-- figures:begin[^\n]*-->\n)(.*?)(<!-- figures:end -->)", re.S)

# report.json's policy keys -> the table's row names, in the table's order
POLICIES = {
    "sft": "SFT",
    "ppo": "PPO",
    "ppo_oracle": "PPO against the gold reward (oracle)",
    "rlp_uml": "RLP-UML",
    "rlp_spg": "RLP-SPG",
    "rlp_uml_spg": "RLP-UML+SPG",
    "rlp_spg_r2": "RLP-SPG, round 2",
}
# stage-name prefixes -> what the seconds sentence calls them ("each": several stages, a range)
STAGE_GROUPS = [("sft", "SFT"), ("pref", "D"), ("rm", "each RM"), ("ppo", "each PPO")]
STAGE_GROUPS += [("sample", "sampling P"), ("eval", "evaluation")]


def extract(report: dict, commit: str) -> dict:
    """The figures README shows, from a full report.json (floats kept; rounding is rendering's)."""
    policies = {}
    for name in POLICIES:
        row = report["policies"][name]
        diff = row.get("diff_vs_sft")
        policies[name] = {
            "gold": row["gold"],
            "gold_se": row["gold_se"],
            "exact": row["exact"],
            "win_rate": row["win_rate"],
            "diff_vs_sft": None if not diff else {"gold": diff["gold"], "gold_se": diff["gold_se"]},
        }
        if row.get("kl_to_sft") is not None:  # reports before the KL column lack it
            policies[name]["kl_to_sft"] = row["kl_to_sft"]
            policies[name]["kl_to_sft_se"] = row["kl_to_sft_se"]
    return {
        "commit": commit,
        "machine": report["machine"],
        "total_seconds": report["total_seconds"],
        "stage_seconds": report["stage_seconds"],
        "eval": {k: report["eval"][k] for k in ("n_prompts", "samples_per_prompt", "seed")},
        "policies": policies,
    }


def _seconds(stages: dict[str, float]) -> str:
    """'SFT 27 s, D 2 s, each RM 24-121 s, ...': stages grouped by the prefixes of STAGE_GROUPS."""
    parts = []
    for prefix, label in STAGE_GROUPS:
        secs = [s for name, s in stages.items() if name == prefix or name.startswith(prefix + "_")]
        if len(secs) == 1 or (secs and f"{min(secs):.0f}" == f"{max(secs):.0f}"):  # not "1-1 s"
            parts.append(f"{label} {secs[0]:.0f} s")
        elif secs:
            parts.append(f"{label} {min(secs):.0f}-{max(secs):.0f} s")
    return ", ".join(parts)


def render(fig: dict) -> str:
    """The block's markdown (between the markers) from extract()'s dict."""
    m, ev = fig["machine"], fig["eval"]
    kl = all("kl_to_sft" in p for p in fig["policies"].values())
    threads = f"{m['threads']} thread" + ("s" if m["threads"] != 1 else "")
    sentence = (
        f"The default run (`bash scripts/run.sh`, seed {ev['seed']}, deterministic) at commit "
        f"{fig['commit']}, "
        f"on {m['device']} ({threads}, world size {m['world_size']}): pipeline {fig['total_seconds']:.0f} s "
        f"({_seconds(fig['stage_seconds'])}; {ev['n_prompts']} held-out prompts x "
        f"{ev['samples_per_prompt']} samples per policy). Held-out gold ± prompt-clustered SE (Δ vs SFT, "
        "paired" + ("; KL to the SFT policy in nats per response" if kl else "") + "):"
    )
    head = "| policy | gold | exact | Δ gold vs SFT | win-rate vs demonstrator |" + (
        " KL to SFT |" if kl else ""
    )
    lines = [textwrap.fill(sentence, width=100, break_on_hyphens=False), "", head, "|---" * (5 + kl) + "|"]
    for name, label in POLICIES.items():
        p = fig["policies"][name]
        d = p["diff_vs_sft"]
        delta = " " if d is None else f" {d['gold']:+.3f} ± {d['gold_se']:.3f} "
        gold = f"{p['gold']:.3f} ± {p['gold_se']:.3f}"
        row = f"| {label} | {gold} | {p['exact']:.3f} |{delta}| {p['win_rate']:.1f}% |"
        if kl:  # nats per response, k1 on the policy's own samples
            row += " 0 |" if name == "sft" else f" {p['kl_to_sft']:.2f} ± {p['kl_to_sft_se']:.2f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def rewrite(readme: str, block: str) -> str:
    """`readme` with the text between the markers replaced by `block`."""
    found = BLOCK.search(readme)
    if found is None:
        raise ValueError("README.md has no `<!-- figures:begin ... -->` ... `<!-- figures:end -->` block")
    return readme[: found.start(2)] + block + readme[found.end(2) :]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-report", type=Path, help="a run's report.json: extract its figures into --figures")
    p.add_argument("--commit", help="the commit the run was made at (required with --from-report)")
    p.add_argument("--figures", type=Path, default=FIGURES, help=f"the figures JSON (default {FIGURES})")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--check", action="store_true", help="only compare README's block; exit 1 on a difference")
    args = p.parse_args(argv)
    if args.from_report is not None:
        if not args.commit:
            p.error("--from-report needs --commit (the commit the run was made at)")
        fig = extract(json.loads(args.from_report.read_text()), args.commit)
        args.figures.write_text(json.dumps(fig, indent=1) + "\n")
    readme = args.readme.read_text()
    want = rewrite(readme, render(json.loads(args.figures.read_text())))
    if args.check:
        if want == readme:
            return 0
        diff = difflib.unified_diff(readme.splitlines(), want.splitlines(), "README", "rendered", lineterm="")
        print("\n".join(diff), file=sys.stderr)
        fix = "run scripts/readme_figures.py"
        print(f"{args.readme}'s figures differ from {args.figures}: {fix}", file=sys.stderr)
        return 1
    args.readme.write_text(want)
    return 0


if __name__ == "__main__":
    sys.exit(main())
