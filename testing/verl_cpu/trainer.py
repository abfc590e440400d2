"""End-to-end CPU run of verl's own trainer (``python -m verl.trainer.main_ppo``) with gradproj enabled.

    python -m gradproj.testing.verl_cpu.trainer [--steps N] [--out DIR] [key=value ...]

Everything is verl 0.9's: Hydra config (``ppo_trainer.yaml`` + the overrides below), Ray, the v1
trainer and TransferQueue, its dataset and agent loop, its reward loop (rule-based reward), the
actor update (FSDP2, gloo) with gradproj's optimizer and policy loss (configuration only, the same
keys as on a GPU), the weight sync from the actor to the rollout after every update (the "naive"
checkpoint engine of a colocated actor and rollout), and its tracking (console and JSONL file).

One part is replaced, because it needs a GPU: the rollout engine. vLLM, SGLang and TensorRT-LLM
have no CPU build here, so the rollout is ``hf_cpu`` (`gradproj.testing.verl_cpu.rollout`),
Hugging Face sampling behind verl's replica interface, registered through verl's rollout registries.
Ray sees the CPU platform (`gradproj.testing.verl_cpu.platform`) in each of its worker processes
through a ``worker_process_setup_hook``.

The model is a small random Llama-shaped policy (verl's agent loop applies Qwen's chat rules to
a Qwen2 model, which need Qwen's special tokens) with gradproj's character tokenizer; the task is
addition (``"12+34="``), rewarded 1 for the exact sum and 0.1 per digit character otherwise (so a
random policy's group rewards differ and the advantages are not all zero). Prints each step's
gradproj metrics from verl's tracking file and returns them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["REWARD_SOURCE", "prepare", "override_key", "merge_overrides", "task_overrides", "cpu_overrides",
           "overrides", "run_main_ppo", "run", "main"]

#: the rule-based reward verl's reward loop imports (``reward.custom_reward_function``)
REWARD_SOURCE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """1 for the exact sum; otherwise 0.1 per digit character of the response (at most 0.5)."""
    text = solution_str.replace("<eos>", "").strip()
    if text == str(ground_truth):
        return 1.0
    return min(0.5, 0.1 * sum(ch.isdigit() for ch in text))
'''

#: a chat template for the character tokenizer: the user's message, verbatim
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"


def prepare(folder: str | os.PathLike, problems: int = 32, seed: int = 0, *, hidden: int = 64,
            layers: int = 2) -> dict[str, str]:
    """The model, the data (verl's RL parquet format) and the reward file, written to ``folder``."""
    import pandas as pd

    from gradproj.demo.adder import addition_problems
    from gradproj.testing.verl_cpu.smoke import tiny_model

    folder = Path(folder)
    model = tiny_model(folder / "model", architecture="llama", hidden=hidden, layers=layers, seed=seed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model)
    paths = {"model": str(model)}
    for split, count, offset in (("train", problems, 0), ("val", 8, 1)):
        rows = [{"data_source": "addition", "prompt": [{"role": "user", "content": q}], "ability": "math",
                 "reward_model": {"style": "rule", "ground_truth": a}, "extra_info": {"index": i}}
                for i, (q, a) in enumerate(addition_problems(count, seed + offset, max_digits=2))]
        paths[split] = str(folder / f"{split}.parquet")
        pd.DataFrame(rows).to_parquet(paths[split])
    paths["reward"] = str(folder / "reward.py")
    Path(paths["reward"]).write_text(REWARD_SOURCE)
    return paths


def override_key(override: str) -> str:
    """The config key a Hydra override sets (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*lists: list[str]) -> list[str]:
    """Hydra overrides, later lists winning per key; a key keeps its first position and its ``+``."""
    merged: dict[str, str] = {}
    for overrides_ in lists:
        for override in overrides_:
            key = override_key(override)
            if key in merged:
                prefix = merged[key][: len(merged[key]) - len(merged[key].lstrip("+"))]
                override = prefix + override.lstrip("+")
            merged[key] = override
    return list(merged.values())


def task_overrides(paths: dict[str, str], out: str | os.PathLike, steps: int = 2) -> list[str]:
    """The run's task: GRPO without a critic, the model, data and reward of `prepare`, the trainer's
    steps, tracking (console and file) and no validation or checkpoints."""
    return [
        "algorithm.adv_estimator=grpo",
        "critic.enable=False",
        f"actor_rollout_ref.model.path={paths['model']}",
        f"data.train_files={paths['train']}",
        f"data.val_files={paths['val']}",
        "data.max_prompt_length=16",
        "data.max_response_length=8",
        f"reward.custom_reward_function.path={paths['reward']}",
        "trainer.n_gpus_per_node=1",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={steps}",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=[console,file]",
        "trainer.project_name=gradproj-cpu",
        "trainer.experiment_name=e2e",
        f"trainer.default_local_dir={Path(out) / 'checkpoints'}",
        "+ray_kwargs.ray_init.include_dashboard=False",
    ]


def cpu_overrides() -> list[str]:
    """What a CPU machine needs beyond the task: the engine on the CPU (`CPU_OVERRIDES`), the
    ``hf_cpu`` rollout, verl's CPU platform in every Ray worker, and small process counts."""
    from gradproj.testing.verl_cpu.rollout import NAME
    from gradproj.testing.verl_cpu.smoke import CPU_OVERRIDES

    hook = "gradproj.testing.verl_cpu.ray_worker_setup"
    return CPU_OVERRIDES + [
        "data.dataloader_num_workers=0",
        "reward.num_workers=1",
        # one TransferQueue storage unit instead of 8: each reserves a Ray CPU (verl's guide)
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        # the rollout: verl's agent loop and replica manager, the engine replaced (see the module doc)
        f"actor_rollout_ref.rollout.name={NAME}",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "+ray_kwargs.ray_init.num_cpus=8",
        "+ray_kwargs.ray_init.num_gpus=1",  # a logical slot for verl's resource pool (see platform.py)
        f"+ray_kwargs.ray_init.runtime_env.worker_process_setup_hook={hook}",
    ]


def overrides(paths: dict[str, str], out: str | os.PathLike, steps: int = 2) -> list[str]:
    """The Hydra overrides of the CPU run: gradproj's keys, the CPU's, the task's."""
    from gradproj.testing.verl_cpu.smoke import DEFAULT_OVERRIDES, load_overrides

    return merge_overrides(load_overrides(DEFAULT_OVERRIDES), cpu_overrides(), task_overrides(paths, out, steps))


def run_main_ppo(overrides_: list[str], out: str | os.PathLike, timeout: float = 1500) -> list[dict]:
    """``python -m verl.trainer.main_ppo OVERRIDES`` in a subprocess; returns verl's tracked records.

    ``out`` receives ``main_ppo.log`` (everything verl printed), ``metrics.jsonl`` (verl's file
    tracker: one record per step) and, with the ``hf_cpu`` rollout, ``weight_syncs.jsonl`` (one line
    per weight sync the rollout server received: the trainer step and the absolute sum of the
    weights it now samples from). A run lost to verl's start-up port race (`lost_port_race`) is
    repeated once, its log kept as ``main_ppo.failed.log``.
    """
    from gradproj.testing.verl_cpu.rollout import SYNC_LOG_ENV

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log, syncs = out / "metrics.jsonl", out / "weight_syncs.jsonl"
    for stale in (log, syncs):
        stale.unlink(missing_ok=True)
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=str(log), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", RAY_DEDUP_LOGS="0",
               VERL_ENGINE_DEVICE="cuda", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env[SYNC_LOG_ENV] = str(syncs)
    for key in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides_]
    for attempt in (1, 2):
        with open(out / "main_ppo.log", "w") as stdout:
            proc = subprocess.run(cmd, env=env, stdout=stdout, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if proc.returncode == 0:
            break
        text = (out / "main_ppo.log").read_text()
        if attempt == 1 and lost_port_race(text):
            print(f"run_main_ppo: verl's process-group port was taken before it was bound (EADDRINUSE); "
                  f"the failed log is {out / 'main_ppo.failed.log'}; running again", file=sys.stderr, flush=True)
            (out / "main_ppo.failed.log").write_text(text)
            for stale in (log, syncs):
                stale.unlink(missing_ok=True)
            continue
        raise RuntimeError(f"verl's main_ppo failed (exit {proc.returncode}); log {out / 'main_ppo.log'}:\n{text[-6000:]}")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def lost_port_race(log: str) -> bool:
    """Whether a ``main_ppo`` log ends in verl 0.9.1's port race: its worker group picks the actor's
    ``MASTER_PORT`` by binding port 0 and closing the socket, and binds it only later, in
    ``init_process_group`` -- after TransferQueue, Ray and the agent-loop workers have started and
    bound ports of their own; one of them can take it first (seen once in a full tests/verl run).
    Nothing of gradproj runs before that point, so the run is repeated once."""
    return "EADDRINUSE" in log and "init_process_group" in log


def run(extra: list[str] | None = None, steps: int = 2, out: str | os.PathLike | None = None,
        timeout: float = 1500) -> list[dict]:
    """Prepare the inputs and run verl's ``main_ppo`` on the CPU (`run_main_ppo`: what ``out``
    receives); ``extra`` overrides win over the run's own."""
    out = Path(out or tempfile.mkdtemp(prefix="gradproj-verl-e2e-"))
    paths = prepare(out / "inputs")
    return run_main_ppo(merge_overrides(overrides(paths, out, steps), extra or []), out, timeout)


def main(argv: list[str] | None = None) -> list[dict]:
    """Command line: run the trainer, print gradproj's metrics of each step."""
    parser = argparse.ArgumentParser(prog="python -m gradproj.testing.verl_cpu.trainer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="training steps (default 2)")
    parser.add_argument("--out", default=None, help="folder for the inputs, the log and metrics.jsonl")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides (key=value)")
    args = parser.parse_args(argv)
    records = run(args.extra, steps=args.steps, out=args.out)
    for record in records:
        data = record.get("data", record)
        shown = {k: v for k, v in sorted(data.items()) if "gradproj" in k or k in ("critic/score/mean", "timing_s/step")}
        print(f"step {record.get('step')}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                        for k, v in shown.items()))
    return records


if __name__ == "__main__":
    main()
