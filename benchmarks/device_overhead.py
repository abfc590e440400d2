"""Step-time and peak-memory ratios on an accelerator, at realistic RL shapes.

    python -m benchmarks.step_overhead --device cuda                      # both presets (one GPU)
    python -m benchmarks.step_overhead --device cuda --presets qwen2.5-1.5b --setups lora
    python -m benchmarks.step_overhead --device cpu --presets tiny --quick   # the same code path, tiny (tests)
    bash benchmarks/gpu_overhead.sh                                       # set-up + the prepared run

Random models shaped like Qwen2.5-1.5B and Qwen3-8B (configs below, no hub), bf16 autocast over
float32 weights, AdamW, ``--k`` sequences x ``--tokens`` tokens per microbatch. Setups: ``lora``
(peft LoRA r=32 on every projection) and ``linear`` (every ``nn.Linear`` of the decoder). Variants:
``plain`` (``loss.backward()``), ``none`` / ``proma`` / ``intra_proma`` through ``gradproj.wrap``,
``per_sequence`` (one backward per sequence: what PROMA costs without the single pass).

All variants share one model and one AdamW (a 1.5B model's optimizer state five times over would
not be a fair fight for memory); each gradproj variant wraps it for its step and detaches after, the
wrapping outside the timed region. Rounds are interleaved (the order alternates), each variant
warmed up first. Times: CUDA events around each step (``time.perf_counter`` on the CPU); memory:
``torch.cuda.max_memory_allocated`` during the step (not measured on the CPU). Each variant's host
synchronisations per step are counted once with `gradproj.diagnostics.count_host_syncs`.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

#: Model shapes (random weights). ``layers`` may be cut by ``--layers`` (the per-layer shapes are
#: what the ratios depend on); the 8B preset keeps 12 of its 36 layers by default so that float32
#: weights, gradients, AdamW state and a staged gradient fit one 141 GB GPU with every Linear trained.
PRESETS = {
    "qwen2.5-1.5b": {"arch": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "qwen3-8b": {"arch": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 12,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                 "tie_word_embeddings": False},
    "tiny": {"arch": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 256, "tie_word_embeddings": False},
}

DEVICE_STRATEGIES = ["none", "proma", "intra_proma"]


def build_model(preset: str, setup: str, device: torch.device, layers: int | None, rank: int, checkpointing: bool):
    """A random model of ``preset`` on ``device`` (float32 weights), set up for ``setup``."""
    import transformers

    spec = dict(PRESETS[preset])
    arch = spec.pop("arch")
    if layers is not None:
        spec["num_hidden_layers"] = layers
    torch.manual_seed(0)
    if arch == "qwen3":
        config = transformers.Qwen3Config(max_position_embeddings=32768, **spec)
        cls = transformers.Qwen3ForCausalLM
    else:
        config = transformers.Qwen2Config(max_position_embeddings=32768, **spec)
        cls = transformers.Qwen2ForCausalLM
    config._attn_implementation = "sdpa"
    with device:
        model = cls(config)
    if setup == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=rank, lora_alpha=2 * rank, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ))
    else:  # every nn.Linear of the decoder (embeddings, norms and lm_head frozen)
        head = model.get_output_embeddings()
        for module in model.modules():
            trainable = isinstance(module, torch.nn.Linear) and module is not head
            for p in module.parameters(recurse=False):
                p.requires_grad_(trainable)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_data(vocab: int, microbatches: int, k: int, tokens: int, device: torch.device, seed: int = 0):
    """Microbatches of ``k`` random sequences of ``tokens`` tokens (response: the last two thirds)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(microbatches):
        ids = torch.randint(1, vocab, (k, tokens), generator=g)
        mask = torch.zeros(k, tokens - 1, dtype=torch.bool)
        mask[:, tokens // 3 :] = True
        adv = torch.randn(k, generator=g)
        data.append((ids.to(device), torch.ones_like(ids).to(device), mask.to(device), adv.to(device)))
    return data


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _logprobs(model, ids, attn, device):
    with _autocast(device):
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _loss(logp, mask, adv, scale):
    return -(adv[:, None] * logp * mask).sum() / mask.sum() * scale


def step_plain(model, opt, data, device):
    """One optimizer step: ``loss.backward()`` per microbatch."""
    for ids, attn, mask, adv in data:
        _loss(_logprobs(model, ids, attn, device), mask, adv, 1.0 / len(data)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_wrapped(model, opt, data, device):
    """One optimizer step through a gradproj-wrapped optimizer."""
    for ids, attn, mask, adv in data:
        logp = _logprobs(model, ids, attn, device)
        with opt.microbatch(logp, mask):
            _loss(logp, mask, adv, 1.0 / len(data)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def step_per_sequence(model, opt, data, device):
    """One forward per microbatch, one backward per sequence."""
    for ids, attn, mask, adv in data:
        logp = _logprobs(model, ids, attn, device)
        k = logp.shape[0]
        for i in range(k):
            (-(adv[i] * logp[i] * mask[i]).sum() / mask.sum() / len(data)).backward(retain_graph=i < k - 1)
    opt.step()
    opt.zero_grad(set_to_none=True)


class _Timer:
    """CUDA events on a GPU, ``perf_counter`` elsewhere; peak allocated memory on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def measure(self, out: dict):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            torch.cuda.synchronize()
            out["seconds"] = start.elapsed_time(end) / 1000.0
            out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            begin = time.perf_counter()
            yield
            out["seconds"] = time.perf_counter() - begin
            out["peak_gib"] = float("nan")


def _variant_step(name: str, model, inner, strategy_options: dict):
    """``(prepare, step, release)`` of one variant on the shared model and optimizer."""
    import gradproj

    if name == "plain":
        return (lambda: inner), step_plain, (lambda opt: None)
    if name == "per_sequence":
        return (lambda: inner), step_per_sequence, (lambda opt: None)
    from benchmarks.step_overhead import parse_variant

    strategy, options = parse_variant(name)
    options = {**strategy_options.get(strategy, {}), **options}
    return (lambda: gradproj.wrap(inner, model, strategy, **options)), step_wrapped, (lambda opt: opt.detach())


def time_preset(args, preset: str, setup: str, device: torch.device) -> dict:
    """Per variant: median step seconds, per-round ratio quartiles, peak GiB, host syncs per step."""
    from benchmarks.step_overhead import round_ratio_spread
    from gradproj.diagnostics.host_sync import count_host_syncs

    model = build_model(preset, setup, device, args.layers, args.rank, args.checkpointing)
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, foreach=True)
    data = make_data(model.config.vocab_size, args.microbatches, args.k, args.tokens, device)
    names = ["plain", *args.strategies, *(["per_sequence"] if args.per_sequence else [])]
    strategy_options = {"intra_proma": {"rank": args.intra_rank}}
    steps = {name: _variant_step(name, model, inner, strategy_options) for name in names}
    timer = _Timer(device)
    rows: dict = {name: {"times": [], "peaks": []} for name in names}
    label = f"{preset}/{setup}"

    def run(name: str, record: bool) -> None:
        prepare, step, release = steps[name]
        opt = prepare()
        try:
            out: dict = {}
            with timer.measure(out):
                step(model, opt, data, device)
            if record:
                rows[name]["times"].append(out["seconds"])
                rows[name]["peaks"].append(out["peak_gib"])
        finally:
            release(opt)

    for name in names:  # warm-up (kernels, allocator, optimizer state)
        run(name, record=False)
        print(f"  [{label}] warm-up {name}", file=sys.stderr, flush=True)
    for rep in range(args.repeats):
        for name in names if rep % 2 == 0 else list(reversed(names)):
            run(name, record=True)
        print(f"  [{label}] round {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
    for name in names:  # host synchronisations of one step (the counter slows it: not timed)
        prepare, step, release = steps[name]
        opt = prepare()
        try:
            with count_host_syncs() as syncs:
                step(model, opt, data, device)
        finally:
            release(opt)
        rows[name]["host_syncs"] = len(syncs)
    plain = rows["plain"]
    result = {}
    for name, row in rows.items():
        seconds = statistics.median(row["times"])
        q25, q75 = round_ratio_spread(row["times"], plain["times"])
        peak = max(row["peaks"])
        result[name] = {
            "seconds": seconds, "ratio": seconds / statistics.median(plain["times"]), "ratio_q25": q25, "ratio_q75": q75,
            "peak_gib": peak, "memory_ratio": peak / max(plain["peaks"]), "host_syncs": row["host_syncs"],
        }
    del model, inner, data, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def markdown(results: dict) -> list[str]:
    """The results as Markdown lines (a heading line, then one table)."""
    a = results["args"]
    lines = [
        f"Device: {results['device']}; torch {results['torch']}; run {results['date']}. Per microbatch {a['k']} sequences x "
        f"{a['tokens']} tokens, {a['microbatches']} microbatches per step; bf16 autocast, float32 weights, AdamW; LoRA r={a['rank']}; "
        f"intra_proma rank {a['intra_rank']}" + ("; gradient checkpointing on" if a["checkpointing"] else "")
        + f"; median of {a['repeats']} interleaved rounds. `x plain`: ratio of the median step times; `per round`: quartiles "
        "of the ratio to the plain step of the same round; `host syncs added`: operations per step that wait for the "
        "device, beyond the plain step's (counted once with gradproj.diagnostics.count_host_syncs).",
        "",
        "| model | setup | variant | step (ms) | x plain | per round (q25-q75) | peak (GiB) | x plain | host syncs added |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (preset, setup), rows in results["runs"].items():
        base = rows["plain"]["host_syncs"]
        for name, row in rows.items():
            lines.append(
                f"| {preset} | {setup} | {name} | {1000 * row['seconds']:.1f} | {row['ratio']:.3f} | "
                f"{row['ratio_q25']:.3f}-{row['ratio_q75']:.3f} | {row['peak_gib']:.2f} | {row['memory_ratio']:.3f} | "
                f"{row['host_syncs'] - base:+d} |"
            )
    return lines


def main(args) -> dict:
    """Run every preset x setup of ``args`` on ``args.device``; print (and write) the table."""
    import datetime

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results: dict = {"args": vars(args), "device": name, "torch": torch.__version__,
                     "date": datetime.date.today().isoformat(), "runs": {}}
    for preset in args.presets:
        for setup in args.setups:
            results["runs"][(preset, setup)] = time_preset(args, preset, setup, device)
    from benchmarks.step_overhead import publish

    publish(markdown(results), args.markdown)
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump({**results, "runs": {f"{p}/{s}": rows for (p, s), rows in results["runs"].items()}}, fh, indent=2)
    return results
