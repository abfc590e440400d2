"""The demo's embedded default policy: a tiny character-level Llama that adds multi-digit numbers.

Nothing is downloaded: the tokenizer is built from 19 characters and the model is trained from
scratch by supervised learning on ``"a+b="`` -> ``"c"`` until greedy decoding solves roughly a
third of a held-out set (about a minute on 2 CPU cores), which leaves room for RL to improve it.
The result is deterministic by seed and cached on disk (``$GRADPROJ_CACHE`` or
``~/.cache/gradproj``), so later runs load it in a second.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = [
    "AdderPolicyConfig",
    "build_tokenizer",
    "sample_problem",
    "addition_problems",
    "greedy_accuracy",
    "adder_policy",
    "cache_dir",
]

CHARS = list("0123456789+-*=") + [" "]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_VERSION = 1


@dataclass(frozen=True)
class AdderPolicyConfig:
    """How the default policy is built (every field is part of the cache key)."""

    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    max_digits: int = 3
    batch: int = 128
    lr: float = 1e-3
    target_accuracy: float = 0.33
    eval_every: int = 50
    eval_problems: int = 300
    max_steps: int = 4000


def cache_dir() -> Path:
    """Where gradproj caches what it builds (``$GRADPROJ_CACHE``, else ``~/.cache/gradproj``)."""
    return Path(os.environ.get("GRADPROJ_CACHE", Path.home() / ".cache" / "gradproj"))


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` (one token per character, left padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        padding_side="left",
    )


def sample_problem(rng: random.Random, max_digits: int = 3) -> tuple[str, str]:
    """``("a+b=", "c")`` with operands of 1 to ``max_digits`` digits."""
    a = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
    b = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
    return f"{a}+{b}=", str(a + b)


def addition_problems(count: int, seed: int, max_digits: int = 3) -> list[tuple[str, str]]:
    """``count`` problems from a seeded generator."""
    rng = random.Random(seed)
    return [sample_problem(rng, max_digits) for _ in range(count)]


def _training_batch(tok, rng: random.Random, n: int, max_digits: int):
    seqs, labels = [], []
    for _ in range(n):
        prompt, answer = sample_problem(rng, max_digits)
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)  # loss on the answer only
    width = max(map(len, seqs))
    ids = torch.full((n, width), tok.pad_token_id)
    lab = torch.full((n, width), -100)
    att = torch.zeros((n, width), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):  # right padding for teacher forcing
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(s)] = 1
    return ids, att, lab


@torch.no_grad()
def greedy_accuracy(model, tok, problems: list[tuple[str, str]], max_new_tokens: int = 6, batch: int = 256) -> float:
    """Fraction of ``problems`` whose greedy completion (up to EOS) equals the answer."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(t.strip() == answer for t, (_, answer) in zip(texts, chunk))
    model.train(was_training)
    return correct / max(len(problems), 1)


def _train(config: AdderPolicyConfig, out: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=config.hidden, intermediate_size=4 * config.hidden,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    held_out = addition_problems(config.eval_problems, seed=10_000 + config.seed, max_digits=config.max_digits)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    start, accuracy, step = time.time(), 0.0, 0
    bar = tqdm(total=config.max_steps, desc="training the default policy (once)", disable=not progress)
    model.train()
    while step < config.max_steps:
        ids, att, lab = _training_batch(tok, rng, config.batch, config.max_digits)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % config.eval_every == 0:
            accuracy = greedy_accuracy(model, tok, held_out)
            bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{accuracy:.2f}")
            if accuracy >= config.target_accuracy:
                break
    bar.close()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"version": _VERSION, "config": asdict(config), "steps": step, "accuracy": accuracy,
            "seconds": round(time.time() - start, 1)}
    (out / "gradproj_policy.json").write_text(json.dumps(info, indent=1))
    return info


def adder_policy(config: AdderPolicyConfig | None = None, progress: bool = True, cache: Path | None = None) -> Path:
    """The folder of the default policy for ``config``: trained now, or loaded from the cache.

    Returns a Hugging Face folder (model and tokenizer) that ``from_pretrained`` loads.
    """
    config = config or AdderPolicyConfig()
    root = Path(cache) if cache is not None else cache_dir()
    key = "-".join(f"{k}{v}" for k, v in asdict(config).items())
    folder = root / f"adder-policy-v{_VERSION}" / key
    marker = folder / "gradproj_policy.json"
    if marker.exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=folder.parent))
    try:
        _train(config, tmp, progress)
        if not marker.exists():  # another process may have finished first
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
