"""vLLM generation backend for the colocated engine (`rollout.backend=vllm`; imported lazily).

One vLLM engine per rank, in the same process as the trainer (`distributed_executor_backend=
"external_launcher"` under torchrun), created with dummy weights and sleep mode. Per iteration
(rlp_engine.engine.rollout.VLLMRollout does this):

    engine.load_weights(named_full_tensors)  # wake_up(weights) -> load_weights bucket by bucket
                                             # -> wake_up(kv_cache) -> reset_prefix_cache()
    out = engine.generate(prompt_ids, prompt_mask, cfg)
    engine.sleep()               # level 1: weights to host, KV cache dropped, memory to training

Tensor parallelism: every rank sends full tensors under their Hugging Face names; vLLM's model
loaders fuse (qkv, gate_up) and slice them for this rank themselves.

Log-probs: vLLM returns the sampled token's log-prob (`logprobs=0`); `logprobs_mode="processed"`
(default) asks for the distribution after temperature/top-k/top-p ("processed_logprobs"; with
top-k and top-p off it is the built-in generator's "scaled" one), "raw" for the model's unscaled
one. Differences from the trainer's recomputation are what PPO's truncated IS weights
(`ppo.tis_cap`) correct.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterable

import torch
from torch import nn

from rlp_engine.engine import reshard
from rlp_engine.engine.generator import GenerationOutput, SamplingConfig

log = logging.getLogger("rlp_engine.engine")

_VLLM_LOGPROB_MODES = {"processed": "processed_logprobs", "raw": "raw_logprobs"}


def import_vllm():
    """The vllm module, or an ImportError that says how to get it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise ImportError(
            "the vLLM backend needs vLLM (pip install 'rlp-engine[vllm]'; it pins its own torch and needs "
            "CUDA); use the built-in generator (rlp_engine.engine.generator) otherwise"
        ) from err


def _load_weights_on_worker(worker, weights):
    """Runs inside vLLM's worker (via collective_rpc): load one bucket of (name, tensor) pairs.
    vLLM's model loaders take HF checkpoint names and fuse/shard them (qkv, gate_up, TP) themselves."""
    worker.model_runner.model.load_weights(weights=weights)
    return len(weights)


def sampling_params(vllm, cfg: SamplingConfig, seed: int | None = None):
    """Our SamplingConfig as vllm.SamplingParams (temperature 0 is greedy; top_k -1 disables)."""
    return vllm.SamplingParams(
        n=1,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k if cfg.top_k > 0 else -1,
        max_tokens=cfg.max_new_tokens,
        stop_token_ids=list(cfg.eos_token_ids),
        logprobs=0,  # the sampled token's own log-prob only
        seed=seed,
        detokenize=False,
    )


def _prompt_lists(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    if attention_mask is None:
        return input_ids.tolist()
    return [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]


def _sampled_logprob(step: dict, token: int) -> float:
    entry = step[token]
    return float(getattr(entry, "logprob", entry))


class VLLMEngine:
    """A sleeping vLLM engine that receives training weights in buckets and generates rollouts."""

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        dtype: str = "bfloat16",
        logprobs_mode: str = "processed",
        seed: int = 0,
        external_launcher: bool = True,
        **engine_kwargs,
    ):
        if logprobs_mode not in _VLLM_LOGPROB_MODES:
            raise ValueError(
                f"VLLMEngine: unknown logprobs_mode {logprobs_mode!r}; expected {tuple(_VLLM_LOGPROB_MODES)}"
            )
        self.vllm = import_vllm()
        kwargs = dict(
            model=model,
            load_format="dummy",  # real weights arrive from the trainer with load_weights
            enable_sleep_mode=True,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            logprobs_mode=_VLLM_LOGPROB_MODES[logprobs_mode],
            skip_tokenizer_init=True,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if external_launcher:  # SPMD: this torchrun rank is the vLLM worker (no extra processes)
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(engine_kwargs)
        self.llm = self.vllm.LLM(**kwargs)
        self.asleep = False
        self.records: list[dict] = []

    def _wake(self, tags: list[str]) -> None:
        try:
            self.llm.wake_up(tags=tags)
        except TypeError:  # vLLM before tagged wake-up: everything at once
            self.llm.wake_up()

    def sleep(self, level: int = 1) -> None:
        """Free the GPU for training: level 1 keeps weights in host memory, level 2 drops them."""
        if level not in (1, 2):
            raise ValueError(f"VLLMEngine.sleep: level must be 1 or 2, got {level!r}")
        t0 = time.perf_counter()
        self.llm.sleep(level=level)
        self.asleep = True
        self.records.append({"phase": "sleep", "level": level, "seconds": time.perf_counter() - t0})

    def wake_up(self) -> None:
        """Weights and KV cache back (no weight update)."""
        t0 = time.perf_counter()
        self._wake(["weights", "kv_cache"])
        self.asleep = False
        self.records.append({"phase": "wake_up", "seconds": time.perf_counter() - t0})

    def load_bucket(self, bucket: reshard.Bucket) -> None:
        # the bucket's views are reused for the next bucket: vLLM copies them into its own weights
        self.llm.collective_rpc(_load_weights_on_worker, args=(list(bucket),))

    def sync_weights(self, src: nn.Module, bucket_mb: float = 256.0, name_map=None) -> reshard.SwitchRecord:
        """load_weights of src's full parameters (gathered one at a time when sharded)."""
        return self.load_weights(reshard.iter_full_params(src), bucket_mb, name_map)

    def load_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_mb: float = 256.0, name_map=None
    ) -> reshard.SwitchRecord:
        """(name, full tensor) pairs -> vLLM, bucket by bucket: weights woken first, KV cache only
        after the load (peak memory = weights + one bucket), prefix cache reset (old KV is for old
        weights)."""
        t0 = time.perf_counter()
        self._wake(["weights"])
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        record = reshard.sync_weights(
            None, self.load_bucket, bucket_mb, name_map, device=device, named_tensors=named_tensors
        )
        self._wake(["kv_cache"])
        self.llm.reset_prefix_cache()
        self.asleep = False
        self.records.append({"phase": "sync", "seconds": time.perf_counter() - t0, **record.as_dict()})
        return record

    def generate(
        self,
        input_ids,
        attention_mask=None,
        cfg: SamplingConfig | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> GenerationOutput:
        """Same contract as generator.Generator.generate: (B, N) tokens, log-probs, response mask."""
        if self.asleep:
            raise RuntimeError(
                "VLLMEngine.generate: the engine is asleep; call load_weights or wake_up first"
            )
        cfg = cfg if cfg is not None else SamplingConfig(**kwargs)
        prompts = [{"prompt_token_ids": ids} for ids in _prompt_lists(input_ids, attention_mask)]
        t0 = time.perf_counter()
        outputs = self.llm.generate(prompts, sampling_params(self.vllm, cfg, seed), use_tqdm=False)
        tokens, logprobs, mask = _to_tensors(outputs, cfg)
        return GenerationOutput(tokens, logprobs, mask, time.perf_counter() - t0, int(mask.sum(-1).max()))


def _to_tensors(outputs, cfg: SamplingConfig):
    n = cfg.max_new_tokens
    tokens = torch.full((len(outputs), n), cfg.pad_token_id, dtype=torch.long)
    logprobs = torch.zeros(len(outputs), n, dtype=torch.float32)
    mask = torch.zeros(len(outputs), n, dtype=torch.float32)
    for i, out in enumerate(outputs):
        completion = out.outputs[0]
        ids = list(completion.token_ids)[:n]
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1.0  # vLLM stops after the stop token and includes it
        if completion.logprobs is not None:
            logprobs[i, : len(ids)] = torch.tensor(
                [_sampled_logprob(step, tok) for step, tok in zip(completion.logprobs, ids)]
            )
    return tokens, logprobs, mask
