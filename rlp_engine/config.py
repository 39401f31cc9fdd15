"""Typed configuration of the RLP pipeline: one dataclass per stage plus model, data, eval and run.

A config is built from a named preset ("default" or "tiny"), then a YAML file, then dotted
command-line overrides (`ppo.kl_coef=0.01`), each layer replacing single fields. Unknown keys and
ill-typed or out-of-range values raise `ConfigError` naming the key (and the file). PPO defaults
follow AlpacaFarm (see DESIGN "RLP") except beta: kl `k1_nonneg`, beta 0.15 fixed (`ppo.kl_target`
makes it adaptive), reward whitening, gamma = lam = 1, whitened advantages, clip 0.2, value clip 0.2, vf_coef
0.1, no entropy bonus, rollout temperature 1.0, evaluation temperature 0.7. Learning rates and
step counts are sized for the tiny embedded task on CPU, not for a 7B model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlp_engine.config_arena import EnsembleConfig, GRPOConfig, OfflineConfig  # the arena's sections
from rlp_engine.config_values import CHOICES, LIMITS, PRESETS  # what each key may hold; presets


class ConfigError(ValueError):
    """A config file or override that names an unknown key or holds an ill-typed value."""


@dataclass
class ModelConfig:
    """The policy's base model: a local HF directory, a GGUF file, or (path None) a tiny Llama."""

    path: str | None = None  # directory for AutoModelForCausalLM / AutoTokenizer, or "package:NAME"
    gguf_file: str | None = None  # file name inside `path` (transformers' gguf_file=)
    hidden_size: int = 96
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    max_position_embeddings: int = 128
    dtype: str = "float32"
    attn_implementation: str = "sdpa"


@dataclass
class DataConfig:
    """Data: the embedded arithmetic task (task="arithmetic") and/or JSONL files that replace its parts."""

    # "reverse" (default) or "arithmetic": embedded tasks with a gold reward (data/task.py); "none":
    # JSONL only, no gold
    task: str = "reverse"
    # D: "policy" = two SFT samples per prompt labelled by the simulated annotator (AlpacaFarm);
    # "task" = the task's own pair generator (arithmetic); data.pref_path overrides both
    pref_source: str = "policy"
    sft_path: str | None = None  # JSONL demonstrations: instruction/input/output or prompt/response
    pref_path: str | None = None  # JSONL preferences: AlpacaFarm or prompt/chosen/rejected
    prompts_path: str | None = None  # JSONL unlabeled prompts for PPO and for P
    eval_path: str | None = None  # JSONL held-out prompts
    max_operand: int = 20
    num_sft: int = 4000
    num_pref: int = 3000  # prompts for D (pref_source=policy: identical sample pairs are dropped)
    num_unlabeled: int = 400
    num_eval: int = 256
    # share of demonstrations that go wrong (reverse: a copy of the digits; arithmetic: a corrupted
    # answer), so SFT stays imperfect
    sft_noise: float = 0.45
    label_noise: float = 0.1  # the simulated annotator flips this share of its preferences
    chat_template: bool = False  # wrap prompts with the tokenizer's chat template (instruct models)
    max_prompt_tokens: int = 64
    max_response_tokens: int = 8
    # prompts over max_prompt_tokens: "truncate" (keep the last tokens, counted in the report),
    # "drop" (skip the record, counted) or "error" (stop before training, naming file and line)
    long_prompts: str = "truncate"


@dataclass
class SFTConfig:
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    max_grad_norm: float = 1.0


@dataclass
class RewardConfig:
    """Bradley-Terry reward model on D (initialised from the SFT model plus a scalar head)."""

    # 500 steps at 3e-4 on ~1,500 labelled pairs: held-out accuracy on SFT-sample pairs 0.83 (seed 100)
    # vs 0.63-0.72 at 250 steps / 1e-3 or with 20% label noise (bench/RESULTS.md, fidelity)
    steps: int = 500
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class PPOConfig:
    """PPO from the SFT policy; critic initialised from the reward model; reference = SFT."""

    steps: int = 30  # rollout rounds
    rollout_batch_size: int = 64  # prompts per round
    mini_batch_size: int = 32
    ppo_epochs: int = 2
    lr: float = 1e-4
    max_grad_norm: float = 1.0
    kl_kind: str = "k1_nonneg"
    # beta: fixed, or the starting value when kl_target is set. Swept on tuning seeds 100-101 (bench
    # NOTES): 0.0067 (AlpacaFarm's) to 0.3 all improve gold over SFT (+0.15 to +0.17), larger beta
    # slightly more; with a weaker RM 0.0067 let PPO drift below SFT (-0.09), 0.15 held it
    kl_coef: float = 0.15
    # adaptive KL controller (Ziegler et al. 2019, TRL's AdaptiveKLController): after each rollout
    # beta *= 1 + clip(kl / kl_target - 1, -0.2, 0.2) * rollout_batch_size / kl_horizon, kl being the
    # mean summed KL per sequence (nats); None keeps beta fixed at kl_coef
    kl_target: float | None = None
    kl_horizon: int = 10000  # samples; larger moves beta more slowly
    whiten_rewards: bool = True
    gamma: float = 1.0
    lam: float = 1.0
    whiten_advantages: bool = True
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    agg: str = "token-mean"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    # train -> generate switch: the actor's weights stream into the generation model in buckets
    sync_bucket_mb: float = 64.0
    # truncated importance sampling: the policy loss of each token is weighted by
    # min(pi_trainer / pi_generator, tis_cap) when the generator's log-probs differ from the trainer's
    # (vLLM, bf16 kernels); 0 turns it off. ~1 with the built-in generator (same math).
    tis_cap: float = 2.0
    # Speed options (bench/bench_ppo.py's TRL-like column); the defaults keep the pipeline's results.
    # old_logprobs: the PPO ratio's denominator. "recompute": a teacher-forced actor pass in scoring
    # (the ratio starts at exactly 1); "generator": the rollout's own log-probs, as TRL (one actor
    # forward fewer; the same definition, equal to the recompute within fp32 rounding with the builtin
    # generator; with vLLM its kernels' log-probs, and no TIS weights: the ratio is to them already)
    old_logprobs: str = "recompute"
    # torch.optim.AdamW's implementation: "default" (torch's pick: the for-loop on CPU), "foreach",
    # "fused" (one kernel a step; on CPU it differs from the for-loop in the last bit)
    adamw_impl: str = "default"


@dataclass
class RolloutConfig:
    """PPO's rollout engine (rlp_engine.engine.rollout): "builtin" (the static-cache generator) or
    "vllm" (a colocated vLLM engine; the optional vllm extra, CUDA and a model.path directory)."""

    backend: str = "builtin"


@dataclass
class SampleConfig:
    """Stage 4: the set P of n responses per unlabeled prompt from the PPO policy."""

    n: int = 10
    num_prompts: int = 200
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class UMLConfig:
    """RLP-UML: Bradley-Terry on D + lam * multi-view information-bottleneck loss on P."""

    lam: float = 0.5
    # Not the paper's 1: that collapses the term here (the encoder's means go constant, the MI bound
    # stays at -2 ln 2), SKL summed over latent_dim outweighing the JSD bound. The default preset's
    # RLP-UML stage (on the SFT policy's samples) collapsed at beta 1 with or without warm-up, at 0.1
    # in 2 of 3 seeds, 0.05 in 1 of 3, 0.03 and 0.01 in none of 5; tests/test_uml.py's setting:
    # 0.03 in 3 of 18 runs (batch size, lr, warm-up varied), 0.01 in none of 12.
    beta: float = 0.01
    beta_warmup_steps: int = 50  # the SKL weight rises linearly from 0 to beta over these steps
    negatives: str = "all"  # "all": every other prompt's view in the batch; "roll": one (as before)
    heldout_frac: float = 0.1  # share of P's prompts kept out of L_M for the held-out MI check
    latent_dim: int = 16
    steps: int = 500  # steps and lr as the base RM's, so that a difference is the method's
    batch_size: int = 64
    ib_batch_size: int = 16  # prompts per step in the L_M term (two views each)
    lr: float = 3e-4
    max_grad_norm: float = 1.0


@dataclass
class SPGConfig:
    """RLP-SPG: synthetic pairs from self-consistency of P (confidence >= gamma)."""

    gamma: float = 0.5
    # "answer": the task's answer(response) (arithmetic: the leading integer; reverse: the stripped
    # text), "final_answer": the leading integer, "exact": the stripped text
    equivalence: str = "answer"
    steps: int = 500  # steps and lr as the base RM's
    batch_size: int = 64
    lr: float = 3e-4
    max_grad_norm: float = 1.0


@dataclass
class RLPConfig:
    """Beyond the paper: rounds > 1 samples P again from the latest RLP-SPG policy and refines the
    reward model again (rm_spg_r2, ...), each round followed by PPO from SFT (rlp_spg_r2, ...)."""

    rounds: int = 2


@dataclass
class EvalConfig:
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    # >= 200 held-out prompts x >= 16 samples: prompt-clustered standard errors of about 0.02 gold
    num_prompts: int = 256
    samples_per_prompt: int = 16  # gold/proxy means over all; pairs (1st, 2nd), (3rd, 4th) for RM accuracy
    batch_size: int = 256
    # gold-vs-KL over-optimisation curves (pipeline/curves.py): every policy-training stage saves its
    # policy after 1/n .. (n-1)/n of its steps (0: no curves; 4: 25/50/75%, the end is its export);
    # each snapshot is evaluated on the first curve_prompts eval prompts x curve_samples samples
    curve_points: int = 4
    curve_prompts: int = 64
    curve_samples: int = 4


@dataclass
class RunConfig:
    output_dir: str = "outputs/rlp"
    seed: int = 0
    device: str = "cpu"
    # torch.set_num_threads (0: torch's default). One thread: the tiny default model's matrices gain
    # little from a second one, and a shared 2-core machine running 2 threads each was measured 12x
    # slower on SFT (894 s vs 74 s) from oversubscription.
    threads: int = 1
    log_every: int = 10
    save_checkpoints: bool = True
    tensorboard: bool = True
    progress: bool = True
    # "all" (the RLP pipeline), "arena" (it and every arena method), or a comma list among the RLP
    # stages (sft, rm, ppo, oracle, uml, spg, uml_spg) and the arena's (dpo, ipo, simpo, grpo, rloo,
    # ens_mean, ens_wco, ens_uwo, rlp_ens, grpo_spg: pipeline/arena.py)
    stages: str = "all"
    backend: str = "auto"  # ops backend: "auto" (per device), or forced "torch", "cpp", "triton"
    # training layout under torchrun (single process trains plain modules): "fsdp2" (default) or
    # "deepspeed" (ZeRO-3, the optional deepspeed extra)
    train_backend: str = "fsdp2"
    # under torchrun: bound on every collective (other ranks wait at a barrier while rank 0 evaluates)
    dist_timeout_s: float = 1800.0
    # crash safety: a resumable checkpoint every N optimizer steps inside a stage (0: only at stage
    # boundaries), the last K of them kept; `train --resume` continues from the newest complete one
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # a step with a non-finite loss or gradient is skipped (and counted); more than this many in
    # one stage stops the run
    max_nonfinite_steps: int = 10


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    uml: UMLConfig = field(default_factory=UMLConfig)
    spg: SPGConfig = field(default_factory=SPGConfig)
    rlp: RLPConfig = field(default_factory=RLPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


# run.device: what the engine runs on (checked against the machine in load_config).
DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")
# Plain float syntax ("1e-4", "3.", ".5"), which YAML 1.1 (PyYAML) reads as a string without a dot.
FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(key: str, value, tp, where: str):
    """`value` checked against the annotation `tp` (int -> float widening allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if tp is float and isinstance(value, str) and FLOAT_RE.match(value.strip()):
        value = float(value)  # a YAML file's "1e-4" (PyYAML reads YAML 1.1: no dot, no float)
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{where}{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def set_field(cfg: TrainConfig, key: str, value, where: str = "") -> None:
    """Set the dotted field `key` (e.g. "ppo.kl_coef") of `cfg`, checking name, type and choices."""
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{where}{key}: keys have the form section.field (e.g. ppo.kl_coef)")
    section, name = parts
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise ConfigError(f"{where}{key}: unknown section {section!r}; expected one of {sorted(sections)}")
    sub = getattr(cfg, section)
    hints = typing.get_type_hints(type(sub))
    if name not in hints:
        raise ConfigError(f"{where}{key}: unknown key; {section} has {sorted(hints)}")
    value = _coerce(key, value, hints[name], where)
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}{key}: {value!r} is not one of {CHOICES[key]}")
    if key == "run.device" and not DEVICE_RE.match(value):
        raise ConfigError(f"{where}{key}: {value!r} is not a device; expected cpu, cuda or cuda:N")
    if key in LIMITS and not LIMITS[key][0](value):
        raise ConfigError(f"{where}{key}: {value!r} is out of range; expected {LIMITS[key][1]}")
    setattr(sub, name, value)


def _flatten(tree, where: str, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}{prefix or 'top level'}: expected a mapping, got {type(tree).__name__}")
    flat: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(_flatten(v, where, key))
        else:
            flat[key] = v
    return flat


def parse_override(text: str) -> tuple[str, object]:
    """Split "ppo.kl_coef=0.01" into ("ppo.kl_coef", 0.01); the value is parsed as YAML (null, true, 3e-4)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. ppo.kl_coef=0.01)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({err.__class__.__name__})"
        ) from err
    # YAML reads "1e-3" as a string (it wants "1.0e-3"): accept plain float syntax too.
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value) if any(c in value for c in ".eE") else value
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides=(), preset: str | None = None) -> TrainConfig:
    """Preset (`preset:` key of the file, else the argument, else "default") <- YAML file <- overrides."""
    tree: dict = {}
    where = ""
    if path is not None:
        where = f"{path}: "
        try:
            tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    file_preset = tree.pop("preset", None)
    name = file_preset or preset or "default"
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{where}preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    cfg = TrainConfig()
    for key, value in PRESETS[name].items():
        set_field(cfg, key, value)
    for key, value in _flatten(tree, where).items():
        set_field(cfg, key, value, where)
    for text in overrides:
        key, value = parse_override(text)
        set_field(cfg, key, value, "override ")
    check_together(cfg)
    return cfg


def check_together(cfg: TrainConfig) -> None:
    """Checks across fields and against this machine, once every layer is applied."""
    if cfg.ppo.kl_target is not None and not cfg.ppo.kl_coef > 0:
        raise ConfigError(
            f"ppo.kl_coef: {cfg.ppo.kl_coef!r} with ppo.kl_target set; the adaptive controller multiplies "
            "the coefficient, so it must start > 0"
        )
    p = cfg.ppo
    if p.rollout_batch_size % p.mini_batch_size:
        raise ConfigError(
            f"ppo.mini_batch_size: {p.mini_batch_size} does not divide ppo.rollout_batch_size "
            f"{p.rollout_batch_size}; every PPO epoch splits the rollout into equal minibatches"
        )
    g = cfg.grpo
    if (g.prompts_per_step * g.n) % g.mini_batch_size:
        raise ConfigError(
            f"grpo.mini_batch_size: {g.mini_batch_size} does not divide grpo.prompts_per_step * grpo.n "
            f"= {g.prompts_per_step * g.n}; every epoch splits the rollout into equal minibatches"
        )
    device = cfg.run.device
    if device.startswith("cuda"):
        import torch  # only here: a CPU config loads without torch

        if not torch.cuda.is_available():
            raise ConfigError(
                f"run.device: {device!r} but torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}); use run.device=cpu"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"run.device: {device!r} but this machine has {torch.cuda.device_count()} GPUs")
    _check_rollout(cfg)
    # Triton runs on CPU tensors only in its interpreter (set before triton is imported; the tests)
    if cfg.run.backend == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(
            "run.backend: 'triton' needs a CUDA device (run.device=cuda); on CPU use auto, cpp or torch"
        )


def _importable(name: str) -> bool:
    """Whether `import name` would find the package, without importing it (vLLM takes seconds)."""
    if name in sys.modules:
        return sys.modules[name] is not None  # None: imports of it are blocked
    return importlib.util.find_spec(name) is not None


def _check_rollout(cfg: TrainConfig) -> None:
    if cfg.rollout.backend != "vllm":
        return
    if not _importable("vllm"):
        raise ConfigError(
            "rollout.backend: 'vllm' but vLLM is not installed; pip install 'rlp-engine[vllm]' "
            "(CUDA, its own torch pin) or use rollout.backend=builtin"
        )
    if cfg.model.path is None:
        raise ConfigError(
            "rollout.backend: 'vllm' builds the policy from its Hugging Face directory; set model.path "
            "(the built-in tiny model has none) or use rollout.backend=builtin"
        )


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
