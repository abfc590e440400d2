"""A CPU rollout backend for verl 0.9's trainer: Hugging Face ``generate`` behind verl's replica API.

verl's rollout engines (vLLM, SGLang, TensorRT-LLM) need GPUs. For the end-to-end CPU run of verl's
own trainer (`gradproj.testing.verl_cpu.trainer`) this module registers one more backend, named
``hf_cpu``, through verl's extension points -- ``RolloutReplicaRegistry`` (the replica the trainer's
``LLMServerManager`` launches) and the rollout class table of ``get_rollout_class`` (the adapter in
the hybrid actor worker that receives the trained weights) -- so that everything else is verl's:
the agent loop asks the server for tokens exactly as it asks vLLM's (``generate(prompt_ids,
sampling_params, request_id)`` -> ``TokenOutput``), and after each update verl's checkpoint manager
("naive" backend) sends the actor's full weights through the adapter to the server.

The server holds a Hugging Face model on the CPU and samples one request at a time (temperature,
top-p, top-k; the sampled tokens' log-probs when asked). It is for tests, not training.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import ray
import torch
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput

__all__ = ["NAME", "SYNC_LOG_ENV", "HFServer", "HFReplica", "HFServerAdapter", "register", "server_name"]

logger = logging.getLogger(__name__)

#: the value of ``actor_rollout_ref.rollout.name`` that selects this backend
NAME = "hf_cpu"
#: environment variable: a JSONL file to which each server appends one line per weight sync
SYNC_LOG_ENV = "GRADPROJ_HF_CPU_SYNC_LOG"


def server_name(replica_rank: int) -> str:
    """The Ray actor name of replica ``replica_rank``'s server (the adapter finds it by name)."""
    return f"gradproj_hf_cpu_server_{replica_rank}"


@ray.remote(num_cpus=0)
class HFServer:
    """One replica's generation server: a Hugging Face causal LM on the CPU, token in, token out."""

    def __init__(self, config, model_config, replica_rank: int) -> None:
        from transformers import AutoModelForCausalLM
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        torch.set_num_threads(1)
        if not isinstance(model_config, HFModelConfig):  # the replica passes actor_rollout_ref.model as is
            model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        config = omega_conf_to_dataclass(config)
        self.config = config
        self.replica_rank = replica_rank
        self.model = AutoModelForCausalLM.from_pretrained(model_config.local_path, torch_dtype=torch.float32)
        self.model.eval()
        self.eos = model_config.generation_config.eos_token_id if model_config.generation_config else None
        if self.eos is None:
            self.eos = model_config.tokenizer.eos_token_id
        self.pad = model_config.tokenizer.pad_token_id
        self.global_steps: int | None = None
        self.weight_updates = 0
        self.generator = torch.Generator().manual_seed(int(config.seed) + replica_rank)

    def update_weights(self, state: dict[str, torch.Tensor], global_steps: int | None = None) -> int:
        """Load the actor's weights (full tensors, Hugging Face names); returns how many were loaded."""
        own = dict(self.model.named_parameters())
        missing = sorted(set(own) - set(state))
        unknown = sorted(set(state) - set(own))
        if missing or unknown:
            raise RuntimeError(f"weight sync: missing {missing[:5]}, unknown {unknown[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                own[name].copy_(tensor.to(own[name].dtype))
        self.global_steps = global_steps
        self.weight_updates += 1
        log = os.environ.get(SYNC_LOG_ENV)
        if log:  # what the tests check: the weights the rollout samples from are the trained ones
            with torch.no_grad():
                checksum = sum(float(p.double().abs().sum()) for p in self.model.parameters())
            with open(log, "a") as f:
                f.write(json.dumps({"replica": self.replica_rank, "global_steps": global_steps,
                                    "tensors": len(state), "abs_sum": checksum}) + "\n")
        return len(state)

    def status(self) -> dict[str, Any]:
        """How many weight syncs this server received, and the trainer step of the last one."""
        return {"weight_updates": self.weight_updates, "global_steps": self.global_steps}

    async def generate(self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
                       **ignored: Any) -> TokenOutput:
        """Sample one response to ``prompt_ids`` (verl's token-in, token-out server call)."""
        params = dict(sampling_params)
        room = self.config.max_model_len - len(prompt_ids) if self.config.max_model_len else None
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", None))
        if max_tokens is None:
            max_tokens = min(self.config.response_length,
                             self.config.prompt_length + self.config.response_length - len(prompt_ids))
        if room is not None:
            max_tokens = min(max_tokens, room)
        max_tokens = max(1, int(max_tokens))
        temperature = float(params.get("temperature", 1.0))
        top_p = float(params.get("top_p", 1.0))
        top_k = int(params.get("top_k", -1) or -1)
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        tokens: list[int] = []
        logprobs: list[float] = []
        past = None
        with torch.no_grad():
            for _ in range(max_tokens):
                out = self.model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                logp_full = torch.log_softmax(logits, -1)
                if temperature <= 0:
                    token = int(logits.argmax())
                else:
                    scaled = logits / temperature
                    if top_k > 0:
                        kth = torch.topk(scaled, min(top_k, scaled.numel())).values[-1]
                        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                    probs = torch.softmax(scaled, -1)
                    if top_p < 1.0:
                        sorted_p, order = probs.sort(descending=True)
                        drop = sorted_p.cumsum(0) - sorted_p > top_p
                        sorted_p[drop] = 0
                        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
                    token = int(torch.multinomial(probs, 1, generator=self.generator))
                tokens.append(token)
                logprobs.append(float(logp_full[token]))
                if token == self.eos:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
        stop = "completed"
        return TokenOutput(token_ids=tokens, log_probs=logprobs if params.get("logprobs") else None,
                           stop_reason=stop, extra_fields={"global_steps": self.global_steps})

    # The control calls verl's replica and checkpoint manager make; nothing to free on the CPU.
    async def wake_up(self): pass  # noqa: E704
    async def sleep(self): pass  # noqa: E704
    async def abort_all_requests(self, reject_request: bool = False): pass  # noqa: E704
    async def resume_generation(self): pass  # noqa: E704
    async def clear_kv_cache(self): pass  # noqa: E704
    async def release_kv_cache(self): pass  # noqa: E704
    async def resume_kv_cache(self): pass  # noqa: E704
    async def start_profile(self, **kwargs): pass  # noqa: E704
    async def stop_profile(self): pass  # noqa: E704


class HFReplica(RolloutReplica):
    """verl's ``RolloutReplica`` for `HFServer`: one server per replica, on the CPU."""

    def rollout_worker_use_gpu(self) -> bool:
        return False

    async def launch_servers(self):
        """Start this replica's server (a named Ray actor, so that the actor worker's adapter finds it)."""
        server = HFServer.options(name=server_name(self.replica_rank), max_concurrency=self.max_concurrency).remote(
            self.config, self.model_config, self.replica_rank)
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"ray://{server_name(self.replica_rank)}"


class HFServerAdapter(BaseRollout):
    """The rollout side of verl's hybrid worker: forwards the actor's weights to the replica's server."""

    def __init__(self, config, model_config, device_mesh, *args, **kwargs):
        super().__init__(config, model_config, device_mesh)
        world = self.config.tensor_model_parallel_size * self.config.data_parallel_size * \
            self.config.pipeline_model_parallel_size
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.replica_rank, self.is_leader = rank // world, rank % world == 0

    async def resume(self, tags: list[str]):
        pass

    async def release(self):
        pass

    async def update_weights(self, weights, wire_format: str = "named_tensors", peft_config=None, **kwargs):
        """Gather the weights (full tensors on the CPU) and send them to the server in one call."""
        if wire_format != "named_tensors":
            raise NotImplementedError(f"{NAME}: wire format {wire_format!r}")
        if peft_config is not None:
            raise NotImplementedError(f"{NAME}: LoRA adapters are synced merged only (set model.lora.merge=True)")
        state = {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().to("cpu", copy=True)
                 for name, t in weights}
        if self.is_leader:
            server = ray.get_actor(server_name(self.replica_rank))
            await server.update_weights.remote(state, kwargs.get("global_steps"))


def register() -> None:
    """Register ``hf_cpu`` with verl's replica registry and rollout class table (idempotent)."""
    RolloutReplicaRegistry.register(NAME, lambda: HFReplica)
    rollout_base._ROLLOUT_REGISTRY[(NAME, "async")] = f"{__name__}.HFServerAdapter"
