"""Peak memory of TRL's GRPO training step with and without the fused LM-head log-prob op.

    .venv/bin/python bench/bench_trl_grpo.py [--vocab 131072] [--completion 64] [--steps 2] [--threads 1]
                                             [--csv PATH | --no-csv]

Variants: "trl" = stock TRL 1.12 GRPOTrainer; "fused" = rlp_engine.integrations.trl.FusedGRPOTrainer
(the same trainer with `_get_per_token_logps_and_entropies` from ops.hf.causal_lm_logprobs). Same
tiny Llama (hidden 64, 2 layers, untied embeddings, vocab --vocab: 128k and more is the range of
Llama 3's 128,256 and Qwen's 151,646), tokenizer, prompts, reward, seed and GRPOConfig: 8
completions a step (per_device_train_batch_size 8: 2 prompts x 4 generations), --completion new
tokens (a random model rarely samples eos, so every completion has that length), beta 0.04
(reference-model log-probs), fp32 (bf16=False), CPU.

What is measured: each variant runs in its own fresh process (`--child`), which resets the kernel's
peak-RSS counter (`echo 5 > /proc/self/clear_refs`) just before `trainer.train()` and reads VmHWM
after it: peak_mb = peak resident set during train() minus the resident set when it started (the
models, tokenizer and optimizer-free trainer already loaded), i.e. the peak of what training adds:
AdamW state, gradients, activations and, for "trl", the [B, T, V] logits and their gradient. This
is peak RSS (all allocations of the process, torch's and others'), not torch's allocator statistics,
which torch does not keep on CPU. median_ms: median of TRL's logged step_time over the steps; the
first step includes the AdamW state's allocation.

Prediction (before the run): the logits of one step are B x T x V fp32 = 8 x 70 x 131072 x 4 bytes
= 294 MB at --completion 64 (T <= 6 prompt + 64 completion tokens); TRL keeps them, the
temperature-scaled copy and, in backward, their gradient, so "trl" should add 0.6-1.2 GB over
"fused", whose LM-head temporaries are a few MB (ops.fused_linear_logprobs chunks the vocabulary).
Time: the fused op recomputes the logits in backward, within 0.8-1.3x of TRL's step on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent / "tests"))  # the TRL loader and tiny-model helpers of the tests
from common import add_csv_args, add_threads_arg, print_table, save_rows, set_threads  # noqa: E402


def big_vocab_tokenizer(vocab: int):
    """One token per character of "0123456789+=", <pad>, <eos>, then fillers up to `vocab` tokens
    (sampled fillers decode to text like "w123", which the reward reads as characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {c: i for i, c in enumerate("0123456789+=")}
    words.update({"<pad>": 12, "<eos>": 13})
    words.update({f"w{i}": i for i in range(14, vocab)})
    t = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", eos_token="<eos>")
    tok.padding_side = "left"
    return tok


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args) -> None:
    """Run one variant in this process; print {"peak_mb", "base_mb", "step_ms"} as JSON."""
    import test_integrations_trl as helpers
    from transformers import AutoTokenizer

    grpo, _ = helpers.trl_grpo()
    if args.child == "fused":
        from rlp_engine.integrations.trl import FusedGRPOTrainer as cls
    else:
        cls = grpo.GRPOTrainer
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    overrides = {"per_device_train_batch_size": 8, "max_completion_length": args.completion}
    overrides |= {"max_steps": args.steps, "beta": 0.04, "temperature": 1.0}
    with tempfile.TemporaryDirectory() as out:
        trainer = helpers.make_trainer(cls, args.model_dir, out, tok, **overrides)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        base_kb = _status_kb("VmRSS")
        trainer.train()
        peak_kb = _status_kb("VmHWM")
    steps = [1e3 * x["step_time"] for x in trainer.state.log_history if "step_time" in x]
    key = "completions/mean_length"
    lengths = [x[key] for x in trainer.state.log_history if key in x]
    print(json.dumps({"peak_mb": (peak_kb - base_kb) / 1024, "base_mb": base_kb / 1024, "step_ms": steps,
                      "mean_length": lengths}))  # fmt: skip


def run_variant(variant: str, model_dir: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--model-dir", model_dir]
    cmd += ["--completion", str(args.completion), "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or 1), "HF_HUB_DISABLE_TELEMETRY": "1"}
    got = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if got.returncode != 0:
        raise RuntimeError(f"{variant} child failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=131072, help="vocabulary size (default 131072)")
    parser.add_argument("--completion", type=int, default=64, help="new tokens a completion (default 64)")
    parser.add_argument("--steps", type=int, default=2, help="GRPO steps a variant (default 2)")
    parser.add_argument("--child", choices=["trl", "fused"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    add_threads_arg(parser, default=1)
    add_csv_args(parser)
    args = parser.parse_args()
    set_threads(args)
    if args.child:
        child(args)
        return
    import test_integrations_trl as helpers

    with tempfile.TemporaryDirectory() as model_dir:
        tok = big_vocab_tokenizer(args.vocab)
        helpers.save_tiny_llama(model_dir, tok, hidden_size=64, intermediate_size=128)
        results = {v: run_variant(v, model_dir, args) for v in ("trl", "fused")}
    base = results["trl"]
    shape = f"V={args.vocab} H=64 B=8 T<={6 + args.completion} fp32 steps={args.steps}"
    rows = []
    for variant, r in results.items():
        median = statistics.median(r["step_ms"])
        rows.append({
            "variant": {"trl": "TRL GRPOTrainer", "fused": "FusedGRPOTrainer (fused LM head)"}[variant],
            "shape": shape, "median_ms": median, "min_ms": min(r["step_ms"]), "max_ms": max(r["step_ms"]),
            "reps": len(r["step_ms"]), "ratio": statistics.median(base["step_ms"]) / median,
            "peak_mb": r["peak_mb"],
        })  # fmt: skip
        print(f"{variant}: RSS before train() {r['base_mb']:.0f} MB, completion lengths {r['mean_length']}")
    print_table("TRL GRPO step, peak RSS added by train() (ratio = TRL ms / this ms)", rows)
    save_rows(args, "trl_grpo", "cpu", rows)


if __name__ == "__main__":
    main()
