"""Step-time and peak-memory ratios of gradproj strategies against the plain step, in one run.

    python -m benchmarks.step_overhead                       # the issue's shape, both setups
    python -m benchmarks.step_overhead --quick               # tiny shape (what CI runs)

Setups (Qwen2-shaped random model, float32, AdamW):
* ``lora``   -- peft LoRA r=16 on every projection, base frozen;
* ``linear`` -- every nn.Linear of the decoder trainable (embeddings, norms, lm_head frozen).

For each setup it times, over the same microbatches, interleaved and repeated:
* ``plain``          -- ordinary ``loss.backward()`` per microbatch + ``optimizer.step()``;
* ``<strategy>``     -- the gradproj-wrapped optimizer (``none``, ``proma``, ...);
* ``per_sequence``   -- one forward per microbatch, then one backward per sequence
  (what PROMA would cost without the single-pass capture).
and prints the median time of each divided by the plain step's median. Peak memory is the
peak RSS growth of a child process per variant (``--memory``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch


def build_model(args, setup: str, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64 or 1,
        num_key_value_heads=max(1, (args.hidden // 64) // 2), tie_word_embeddings=False,
        max_position_embeddings=max(256, args.tokens + 8),
    )
    cfg._attn_implementation = "sdpa"
    model = transformers.Qwen2ForCausalLM(cfg)
    if setup == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ))
    else:
        for module in model.modules():
            trainable = isinstance(module, torch.nn.Linear) and module is not model.lm_head
            for p in module.parameters(recurse=False):
                p.requires_grad_(trainable)
    return model


def make_data(args, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(args.microbatches):
        ids = torch.randint(1, args.vocab, (args.k, args.tokens), generator=g)
        attn = torch.ones_like(ids)
        mask = torch.zeros(args.k, args.tokens - 1, dtype=torch.bool)
        mask[:, args.tokens // 3 :] = True  # response = last two thirds
        adv = torch.randn(args.k, generator=g)
        data.append((ids, attn, mask, adv))
    return data


def logprobs(model, ids, attn):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def loss_fn(logp, mask, adv, scale):
    return -(adv[:, None] * logp * mask).sum() / mask.sum() * scale


def step_plain(model, opt, data):
    scale = 1.0 / len(data)
    for ids, attn, mask, adv in data:
        loss_fn(logprobs(model, ids, attn), mask, adv, scale).backward()
    opt.step()
    opt.zero_grad()


def step_wrapped(model, opt, data):
    scale = 1.0 / len(data)
    for ids, attn, mask, adv in data:
        logp = logprobs(model, ids, attn)
        with opt.microbatch(logp, mask):
            loss_fn(logp, mask, adv, scale).backward()
    opt.step()
    opt.zero_grad()


def step_per_sequence(model, opt, data):
    scale = 1.0 / len(data)
    for ids, attn, mask, adv in data:
        logp = logprobs(model, ids, attn)
        k = logp.shape[0]
        for i in range(k):
            loss = -(adv[i] * logp[i] * mask[i]).sum() / mask.sum() * scale
            loss.backward(retain_graph=i < k - 1)
    opt.step()
    opt.zero_grad()


def variants(args, setup):
    import gradproj

    out = {}
    for name in ["plain", *args.strategies, *(["per_sequence"] if args.per_sequence else [])]:
        model = build_model(args, setup)
        params = [p for p in model.parameters() if p.requires_grad]
        inner = torch.optim.AdamW(params, lr=1e-5)
        if name in ("plain", "per_sequence"):
            out[name] = (model, inner, step_plain if name == "plain" else step_per_sequence)
        else:
            out[name] = (model, gradproj.wrap(inner, model, name), step_wrapped)
    return out


def time_setup(args, setup):
    data = make_data(args)
    runs = variants(args, setup)
    times = {name: [] for name in runs}
    for name, (model, opt, fn) in runs.items():  # warm-up
        fn(model, opt, data)
    for rep in range(args.repeats):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            model, opt, fn = runs[name]
            start = time.perf_counter()
            fn(model, opt, data)
            times[name].append(time.perf_counter() - start)
        print(f"  [{setup}] repeat {rep + 1}/{args.repeats}", file=sys.stderr, flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    extra = {}
    for name, (model, opt, fn) in runs.items():
        if hasattr(opt, "metrics"):
            extra[name] = opt.metrics()
    return med, extra


def peak_memory(args, setup, variant):
    """Peak RSS growth (MiB) of one step of ``variant`` in a fresh child process."""
    import subprocess

    code = (
        "import sys, resource, torch; sys.argv=sys.argv[:1]+%r; "
        "from benchmarks.step_overhead import *; a=parse(sys.argv[1:]); torch.set_num_threads(a.threads); "
        "r=variants(a,%r); m,o,f=r[%r]; d=make_data(a); f(m,o,d); "
        "base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "print(base)"
    ) % (sys.argv[1:] + ["--strategies", *(s for s in args.strategies)], setup, variant)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return int(res.stdout.strip().splitlines()[-1]) / 1024.0


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", default=["lora", "linear"], choices=["lora", "linear"])
    p.add_argument("--strategies", nargs="+", default=["proma"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-per-sequence", dest="per_sequence", action="store_false")
    p.add_argument("--memory", action="store_true", help="also measure peak RSS per variant (child processes)")
    p.add_argument("--quick", action="store_true", help="tiny shape for smoke tests")
    p.add_argument("--json", help="write results to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 64, 128, 2, 256
        args.k, args.tokens, args.microbatches, args.repeats, args.rank = 4, 16, 2, 2, 4
    return args


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(args.threads)
    print(f"shape: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.microbatches} microbatches x {args.k} sequences x {args.tokens} tokens; torch {torch.__version__}, "
          f"{args.threads} threads; median of {args.repeats}")
    results = {"args": vars(args), "setups": {}}
    for setup in args.setups:
        med, metrics = time_setup(args, setup)
        rows = {name: {"seconds": t, "ratio": t / med["plain"]} for name, t in med.items()}
        if args.memory:
            base = peak_memory(args, setup, "plain")
            for name in rows:
                rows[name]["peak_rss_mib"] = base if name == "plain" else peak_memory(args, setup, name)
                rows[name]["memory_ratio"] = rows[name]["peak_rss_mib"] / base
        results["setups"][setup] = {"rows": rows, "metrics": metrics}
        print(f"\n[{setup}]  {'variant':<14}{'step s':>10}{'x plain':>10}" + (f"{'peak MiB':>10}{'x plain':>9}" if args.memory else ""))
        for name, row in rows.items():
            line = f"[{setup}]  {name:<14}{row['seconds']:>10.4f}{row['ratio']:>10.3f}"
            if args.memory:
                line += f"{row['peak_rss_mib']:>10.1f}{row['memory_ratio']:>9.3f}"
            print(line)
        if "per_sequence" in rows:
            for name in args.strategies:
                print(f"[{setup}]  {name} vs per-sequence loop: {rows[name]['seconds'] / rows['per_sequence']['seconds']:.3f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
