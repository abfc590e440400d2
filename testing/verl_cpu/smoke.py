"""CPU smoke run of verl's actor update with gradproj enabled by configuration only.

    python -m gradproj.testing.verl_cpu.smoke [--overrides FILE.yaml] [key=value ...]

verl's own ``ppo_trainer.yaml`` is composed with Hydra, with the overrides of a YAML file (default:
the CPU smoke overrides shipped with gradproj, ``smoke_overrides.yaml``) and the command line; the
actor is built by verl's ``ActorRolloutRefWorker`` (role ``actor``) from that config -- FSDP2, gloo,
world size 1 -- on a small random Qwen2-shaped model written to a temporary folder, and one
``update_actor`` runs on a hand-built GRPO rollout batch (left-padded prompts, right-padded
responses, group-normalised advantages). Prints verl's metrics, gradproj's among them.
Rollout engines (vLLM/SGLang) need GPUs, so generation is not part of the CPU run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_OVERRIDES",
    "CPU_OVERRIDES",
    "load_overrides",
    "compose",
    "tiny_model",
    "actor_worker",
    "rollout_batch",
    "update_actor",
    "main",
]

#: gradproj's CPU smoke overrides (the config keys that enable gradproj, plus small sizes)
DEFAULT_OVERRIDES = Path(__file__).with_name("smoke_overrides.yaml")

#: what only the CPU needs (no flash-attention, no bf16 autocast, no torch.compile)
CPU_OVERRIDES = [
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
    "actor_rollout_ref.actor.use_torch_compile=False",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.reduce_dtype=fp32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.buffer_dtype=fp32",
]


def load_overrides(path: str | os.PathLike) -> list[str]:
    """The Hydra overrides listed in a YAML file (a list of ``key=value`` strings under ``overrides:``)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    items = data.get("overrides") if isinstance(data, dict) else data
    if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"{path}: expected a list of 'key=value' strings under 'overrides:'")
    return items


def compose(overrides: list[str]):
    """verl's ``ppo_trainer.yaml`` composed with Hydra and ``overrides`` (an OmegaConf DictConfig)."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=list(overrides))


def tiny_model(folder: str | os.PathLike, *, hidden: int = 64, layers: int = 2, seed: int = 0, dtype=torch.float32,
               architecture: str = "qwen2") -> Path:
    """A random causal LM with gradproj's character tokenizer, saved to ``folder``.

    ``architecture`` is ``"qwen2"`` (the default) or ``"llama"``: the same shapes, one config class or
    the other. verl's agent loop picks its chat-boundary rules by ``model_type``; its Qwen rules need
    Qwen's ``<|im_end|>`` token, which the character tokenizer has not, so a run through the agent
    loop uses ``"llama"`` (verl's default rules).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from gradproj.demo.adder import build_tokenizer

    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if architecture not in classes:
        raise ValueError(f"tiny_model: architecture must be one of {sorted(classes)}, not {architecture!r}")
    config_cls, model_cls = classes[architecture]
    folder = Path(folder)
    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        architectures=[model_cls.__name__], torch_dtype=dtype,
    )
    model_cls(config).to(dtype).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def actor_worker(config):
    """verl's ``ActorRolloutRefWorker`` with role ``actor``, built from ``config`` (``init_model`` done)."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    worker = ActorRolloutRefWorker(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def rollout_batch(vocab: int, groups: int = 2, n: int = 4, prompt_len: int = 6, response_len: int = 8, seed: int = 0):
    """A GRPO-shaped rollout batch as verl's trainer hands it to the actor (a ``DataProto``).

    ``groups`` prompts with ``n`` responses each; prompts left-padded, responses right-padded, of
    random lengths; rewards random, advantages mean-centred and std-normalised per group (GRPO);
    one group gets equal rewards (advantage exactly 0, which still constrains PROMA's projection).
    """
    from verl import DataProto

    g = torch.Generator().manual_seed(seed)
    bs = groups * n
    prompts = torch.zeros(bs, prompt_len, dtype=torch.long)
    responses = torch.zeros(bs, response_len, dtype=torch.long)
    attention = torch.zeros(bs, prompt_len + response_len, dtype=torch.long)
    for group in range(groups):
        plen = int(torch.randint(2, prompt_len + 1, (1,), generator=g))
        prompt = torch.randint(4, vocab, (plen,), generator=g)
        for j in range(n):
            i = group * n + j
            rlen = int(torch.randint(1, response_len + 1, (1,), generator=g))
            prompts[i, prompt_len - plen:] = prompt
            responses[i, :rlen] = torch.randint(4, vocab, (rlen,), generator=g)
            attention[i, prompt_len - plen: prompt_len + rlen] = 1
    rewards = torch.randn(groups, n, generator=g, dtype=torch.float64)
    rewards[-1] = 1.0  # a group whose rewards are all equal: advantage 0
    centred = rewards - rewards.mean(1, keepdim=True)
    adv = (centred / (rewards.std(1, keepdim=True) + 1e-6)).reshape(bs).float()
    response_mask = attention[:, prompt_len:].clone()
    return DataProto.from_dict(
        tensors=dict(
            prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
            attention_mask=attention, position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
            response_mask=response_mask, advantages=adv[:, None] * response_mask,
        ),
        meta_info={"temperature": 1.0},
    )


def _as_tensordict(batch, **extra):
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = left_right_2_no_padding(batch.to_tensordict())
    tu.assign_non_tensor(td, **extra)
    return td


def update_actor(worker, batch, config) -> dict:
    """Old log-probs by the actor, then one ``update_actor`` as verl's trainer calls it; verl's metrics."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    actor = config.actor_rollout_ref.actor
    td = _as_tensordict(batch, calculate_entropy=False, compute_loss=False, temperature=1.0)
    out = worker.compute_log_prob(td)
    batch.batch["old_log_probs"] = no_padding_2_padding(tu.get(out, "log_probs"), td).float()
    mini = actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    td = _as_tensordict(
        batch, calculate_entropy=bool(actor.calculate_entropy), distillation_use_topk=False, distillation_only=False,
        global_batch_size=mini, mini_batch_size=mini, epochs=actor.ppo_epochs, seed=actor.data_loader_seed,
        dataloader_kwargs={"shuffle": actor.shuffle}, temperature=1.0, compute_loss=True,
    )
    output = worker.update_actor(td)
    return dict(tu.get(output, "metrics"))


def main(argv: list[str] | None = None) -> dict:
    """Command line: compose, build the actor, run one update, print the metrics."""
    parser = argparse.ArgumentParser(prog="python -m gradproj.testing.verl_cpu.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--overrides", default=str(DEFAULT_OVERRIDES), help="YAML file with a list of Hydra overrides")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides (key=value)")
    args = parser.parse_args(argv)

    from gradproj.testing.verl_cpu import start

    start()
    folder = tiny_model(tempfile.mkdtemp(prefix="gradproj-verl-smoke-"))
    overrides = load_overrides(args.overrides) + CPU_OVERRIDES + [f"actor_rollout_ref.model.path={folder}"] + args.extra
    config = compose(overrides)
    worker = actor_worker(config)
    before = {n: p.detach().full_tensor().clone() if hasattr(p, "full_tensor") else p.detach().clone()
              for n, p in worker.actor.engine.module.named_parameters()}
    from gradproj.demo.adder import build_tokenizer

    metrics = update_actor(worker, rollout_batch(len(build_tokenizer())), config)
    changed = sum(
        int(not torch.equal(before[n], p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()))
        for n, p in worker.actor.engine.module.named_parameters()
    )
    print(f"optimizer: {type(worker.actor.engine.optimizer).__name__} "
          f"(strategy {getattr(worker.actor.engine.optimizer, 'config', None)})")
    print(f"parameters changed: {changed}/{len(before)}")
    for key in sorted(metrics):
        print(f"  {key}: {metrics[key]}")
    return metrics


if __name__ == "__main__":
    main()
