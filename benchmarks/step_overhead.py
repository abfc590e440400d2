"""Step-time and peak-memory ratios of gradproj strategies against the plain step, in one run.

    python -m benchmarks.step_overhead                       # the issue's shape, both setups
    python -m benchmarks.step_overhead --quick               # tiny shape (what CI runs)
    python -m benchmarks.step_overhead --arch qwen3_moe --setups full lora --memory   # an MoE model
    python -m benchmarks.step_overhead --device cuda         # on a GPU, realistic shapes (benchmarks.device_overhead)

Setups (Qwen2-shaped random model, float32, AdamW):
* ``lora``   -- peft LoRA r=16 on every projection, base frozen;
* ``linear`` -- every nn.Linear of the decoder trainable (embeddings, norms, lm_head frozen);
* ``full``   -- full fine-tuning: every parameter (embeddings, norms, Linears, untied lm_head; with
  ``--arch qwen3_moe`` also the routers and the fused experts).
With ``--arch qwen3_moe`` the ``lora`` setup is peft ``target_modules="all-linear"``, which puts LoRA
on the attention projections, the fused expert tensors and the routers.
``--checkpointing`` turns HF gradient checkpointing (non-reentrant) on in every variant.

For each setup it times, over the same microbatches, interleaved and repeated:
* ``plain``          -- ordinary ``loss.backward()`` per microbatch + ``optimizer.step()``;
* ``<strategy>``     -- the gradproj-wrapped optimizer (``none``, ``proma``, ...);
* ``per_sequence``   -- one forward per microbatch, then one backward per sequence
  (what PROMA would cost without the single-pass capture).
and prints the median time of each divided by the plain step's median. ``--memory`` adds the peak
RSS growth during one step, measured in a fresh child process per variant. ``--json``,
``--markdown`` and ``--plot`` write the results for the docs.
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
    common = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64 or 1,
        num_key_value_heads=max(1, (args.hidden // 64) // 2), tie_word_embeddings=False,
        max_position_embeddings=max(256, args.tokens + 8),
    )
    if args.arch == "qwen3_moe":  # fused experts (the config's default experts implementation), router
        cfg = transformers.Qwen3MoeConfig(head_dim=64, num_experts=args.experts, num_experts_per_tok=args.top_k,
                                          moe_intermediate_size=args.moe_intermediate, **common)
        cfg._attn_implementation = "sdpa"
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        cfg._attn_implementation = "sdpa"
        model = transformers.Qwen2ForCausalLM(cfg)
    if setup == "lora" and args.arch == "qwen3_moe":  # all-linear: attention, fused experts, router
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, init_lora_weights=False,
                                                 target_modules="all-linear"))
    elif setup == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ))
    elif setup == "linear":
        for module in model.modules():
            trainable = isinstance(module, torch.nn.Linear) and module is not model.lm_head
            for p in module.parameters(recurse=False):
                p.requires_grad_(trainable)
    # "full": every parameter trains (embeddings, norms, every Linear, the untied lm_head)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
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


def variants(args, setup, only=None):
    import gradproj

    out = {}
    names = ["plain", *args.strategies, *(["per_sequence"] if args.per_sequence else [])]
    for name in names if only is None else [only]:
        model = build_model(args, setup)
        params = [p for p in model.parameters() if p.requires_grad]
        inner = torch.optim.AdamW(params, lr=1e-5)
        if name in ("plain", "per_sequence"):
            out[name] = (model, inner, step_plain if name == "plain" else step_per_sequence)
        else:
            strategy, options = parse_variant(name)
            out[name] = (model, gradproj.wrap(inner, model, strategy, **options), step_wrapped)
    return out


def parse_variant(variant: str) -> tuple[str, dict]:
    """``"intra_proma:niter=0,rank=4"`` -> ``("intra_proma", {"niter": 0, "rank": 4})``."""
    name, _, rest = variant.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return name, options


def time_rounds(runs: dict, data, repeats: int, label: str) -> dict[str, list[float]]:
    """Seconds per step of each ``name -> (model, opt, step_fn)`` in every round: one warm-up step
    each, then ``repeats`` rounds over all runs, alternating the order between rounds."""
    times = {name: [] for name in runs}
    for model, opt, fn in runs.values():  # warm-up
        fn(model, opt, data)
    for rep in range(repeats):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            model, opt, fn = runs[name]
            start = time.perf_counter()
            fn(model, opt, data)
            times[name].append(time.perf_counter() - start)
        print(f"  [{label}] repeat {rep + 1}/{repeats}", file=sys.stderr, flush=True)
    return times


def time_interleaved(runs: dict, data, repeats: int, label: str) -> dict[str, float]:
    """Median seconds per step of each run (see `time_rounds`)."""
    return {name: statistics.median(ts) for name, ts in time_rounds(runs, data, repeats, label).items()}


def round_ratio_spread(times: list[float], plain: list[float]) -> tuple[float, float]:
    """Quartiles (q25, q75) of the per-round ratios ``times[i] / plain[i]`` -- how much the ratio
    moves from one round to the next on this machine (both steps ran back to back)."""
    ratios = [t / p for t, p in zip(times, plain)]
    if len(ratios) < 2:
        return ratios[0], ratios[0]
    q25, _, q75 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q25, q75


def time_setup(args, setup, rounds: dict | None = None):
    """Median step time of every variant of ``setup`` and the strategies' metrics; ``rounds``, if
    given, receives each variant's per-round seconds."""
    data = make_data(args)
    runs = variants(args, setup)
    times = time_rounds(runs, data, args.repeats, setup)
    if rounds is not None:
        rounds.update(times)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    extra = {}
    for name, (model, opt, fn) in runs.items():
        if hasattr(opt, "metrics"):
            extra[name] = opt.metrics()
    return med, extra


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    """VmHWM: the peak RSS of this process's address space since the last reset."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


#: glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so resident memory
#: would show the allocator's high-water mark, not live tensors. Children run with every block of
#: 64 KiB or more in its own mapping, returned to the system when the tensor is freed.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def memory_child(args) -> None:
    """Child process: peak memory (MiB) of one training step of one variant, as JSON on stdout.

    ``peak_mib`` is the peak resident memory during a step, less the resident memory of the
    runtime alone (Python, torch, transformers, gradproj imported; no model yet): weights,
    optimizer state, gradients, activations and gradproj's buffers -- what
    ``torch.cuda.max_memory_allocated`` reports on a GPU. ``growth_mib`` is the same peak less the
    memory with the model and data loaded (no weights): the memory the step itself needs. The
    measured step is the second (the first is a warm-up that creates the optimizer state and
    gradproj's reusable buffers, as in the timings); the peak is the address space's high-water
    mark, reset just before it (``ru_maxrss`` would not do -- it survives ``exec``, so it starts at
    the parent's RSS).
    """
    setup, variant = args.memory_child
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  -- the runtime's libraries count in neither figure
    import transformers  # noqa: F401

    import gradproj  # noqa: F401

    runtime = _rss_mib()
    model, opt, fn = variants(args, setup, only=variant)[variant]
    data = make_data(args)
    loaded = _rss_mib()
    fn(model, opt, data)
    if not _reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); peak memory needs Linux >= 4.0")
    fn(model, opt, data)
    peak = _peak_rss_mib()
    print(json.dumps({"peak_mib": peak - runtime, "growth_mib": max(peak - loaded, 0.0)}))


def peak_memory(argv, setup: str, variant: str) -> dict[str, float]:
    """``{"peak_mib", "growth_mib"}`` of a training step of ``variant``, in a fresh child process
    (see `memory_child`)."""
    import subprocess

    cmd = [sys.executable, "-m", "benchmarks.step_overhead", *argv, "--memory-child", setup, variant]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, **MEMORY_CHILD_ENV}
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _ratio(value: float, base: float) -> float:
    return value / base if base > 0 else float("nan")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setups", nargs="+", default=["lora", "linear"], choices=["lora", "linear", "full"])
    p.add_argument("--checkpointing", action="store_true", help="HF gradient checkpointing (non-reentrant) on")
    p.add_argument("--strategies", nargs="+", default=["proma", "intra_proma"],
                   help="strategies to time, with options as NAME:KEY=VALUE,... (e.g. intra_proma:niter=0)")
    p.add_argument("--arch", default="qwen2", choices=["qwen2", "qwen3_moe"],
                   help="qwen3_moe: Qwen3-MoE with fused experts (--experts, --top-k, --moe-intermediate)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-intermediate", type=int, default=256)
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
    p.add_argument("--markdown", help="write a Markdown table of the results to this file")
    p.add_argument("--plot", help="write a PNG bar chart of the ratios to this file")
    p.add_argument("--memory-child", nargs=2, metavar=("SETUP", "VARIANT"), help=argparse.SUPPRESS)
    g = p.add_argument_group("accelerator mode (benchmarks.device_overhead)", "taken with --device cuda or --presets")
    g.add_argument("--device", default="cpu", help="cuda: time on the GPU at realistic shapes (the presets)")
    g.add_argument("--presets", nargs="+", choices=["qwen2.5-1.5b", "qwen3-8b", "tiny"],
                   help="model shapes of the accelerator mode (default with --device cuda: qwen2.5-1.5b qwen3-8b)")
    g.add_argument("--intra-rank", type=int, default=8, help="intra_proma's rank in the accelerator mode")
    args = p.parse_args(argv)
    if args.device != "cpu" or args.presets:
        explicit = set(argv or [])
        args.presets = args.presets or ["qwen2.5-1.5b", "qwen3-8b"]
        if "--strategies" not in explicit:
            args.strategies = ["none", "proma", "intra_proma"]
        if "--rank" not in explicit:
            args.rank = 32
        if "--k" not in explicit:
            args.k = 8
        if "--tokens" not in explicit:
            args.tokens = 1024
        if "--microbatches" not in explicit:
            args.microbatches = 2
        if "--repeats" not in explicit:
            args.repeats = 5
        if "--layers" not in explicit:
            args.layers = None  # the preset's
        if args.quick:
            args.k, args.tokens, args.microbatches, args.repeats, args.rank, args.intra_rank = 2, 16, 2, 1, 4, 2
        return args
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab = 64, 128, 2, 256
        args.k, args.tokens, args.microbatches, args.repeats, args.rank = 4, 16, 2, 2, 4
    return args


def publish(lines: list[str], path: str | None = None) -> None:
    """Print a table (lines of Markdown) and, with ``path``, write it there for the docs."""
    print("\n".join(lines))
    if path:
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")


def write_markdown(results, path) -> None:
    """A Markdown table of the step-time (and memory) ratios, for the docs."""
    a = results["args"]
    arch = ("Qwen3-MoE-shaped" + f" ({a['experts']} experts, top-{a['top_k']}, expert intermediate {a['moe_intermediate']})"
            if a.get("arch") == "qwen3_moe" else "Qwen2-shaped")
    lines = [
        f"Shape: {arch}, hidden {a['hidden']}, intermediate {a['intermediate']}, {a['layers']} layers, "
        f"vocab {a['vocab']}; {a['microbatches']} microbatches x {a['k']} sequences x {a['tokens']} tokens; "
        + (f"LoRA rank {a['rank']}; " if "lora" in a["setups"] else "")
        + ("gradient checkpointing on; " if a.get("checkpointing") else "")
        + f"AdamW; float32; {a['threads']} threads; median of {a['repeats']} interleaved "
        f"repeats; torch {results['torch']}; run {results['date']}. `x plain step`: ratio of the median "
        "step times; `per round`: quartiles of the ratio to the plain step run in the same round.",
        "",
        "| setup | variant | step (s) | x plain step | per round (q25-q75) |"
        + (" peak memory (MiB) | x plain | step's own (MiB) | x plain |" if a["memory"] else ""),
        "|---|---|---:|---:|---:|" + ("---:|---:|---:|---:|" if a["memory"] else ""),
    ]
    for setup, data in results["setups"].items():
        for name, row in data["rows"].items():
            line = f"| {setup} | {name} | {row['seconds']:.4f} | {row['ratio']:.3f} | {row['ratio_q25']:.3f}-{row['ratio_q75']:.3f} |"
            if a["memory"]:
                line += (f" {row['peak_mib']:.1f} | {row['memory_ratio']:.3f} |"
                         f" {row['growth_mib']:.1f} | {row['growth_ratio']:.3f} |")
            lines.append(line)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def plot(results, path) -> None:
    """Bar chart of step-time ratios against the plain step, one group per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = list(results["setups"])
    names = [n for n in results["setups"][setups[0]]["rows"] if n != "plain"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        vals = [results["setups"][s]["rows"][name]["ratio"] for s in setups]
        bars = ax.bar([i + j * width for i in range(len(setups))], vals, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(setups))], setups)
    ax.set_ylabel("step time / plain step")
    ax.set_title("gradproj step overhead (CPU, same microbatches)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.memory_child:
        memory_child(args)
        return None
    torch.set_num_threads(args.threads)
    if args.presets:  # the accelerator mode: realistic shapes, CUDA events, bf16 autocast
        from benchmarks import device_overhead

        return device_overhead.main(args)
    print(f"shape: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.microbatches} microbatches x {args.k} sequences x {args.tokens} tokens; torch {torch.__version__}, "
          f"{args.threads} threads; median of {args.repeats}")
    import datetime

    results = {"args": vars(args), "setups": {}, "torch": torch.__version__, "date": datetime.date.today().isoformat()}
    child_argv = [a for a in argv if a not in ("--memory",)]
    for setup in args.setups:
        rounds: dict = {}
        med, metrics = time_setup(args, setup, rounds)
        rows = {name: {"seconds": t, "ratio": t / med["plain"]} for name, t in med.items()}
        for name, row in rows.items():
            row["ratio_q25"], row["ratio_q75"] = round_ratio_spread(rounds[name], rounds["plain"])
        if args.memory:
            base = peak_memory(child_argv, setup, "plain")
            for name in rows:
                rows[name].update(base if name == "plain" else peak_memory(child_argv, setup, name))
                rows[name]["memory_ratio"] = _ratio(rows[name]["peak_mib"], base["peak_mib"])
                rows[name]["growth_ratio"] = _ratio(rows[name]["growth_mib"], base["growth_mib"])
        results["setups"][setup] = {"rows": rows, "metrics": metrics}
        print(f"\n[{setup}]  {'variant':<14}{'step s':>10}{'x plain':>10}{'rounds q25-q75':>16}" + (f"{'peak MiB':>10}{'x plain':>9}{'growth':>9}{'x plain':>9}" if args.memory else ""))
        for name, row in rows.items():
            line = f"[{setup}]  {name:<14}{row['seconds']:>10.4f}{row['ratio']:>10.3f}{row['ratio_q25']:>9.3f}-{row['ratio_q75']:.3f}"
            if args.memory:
                line += f"{row['peak_mib']:>10.1f}{row['memory_ratio']:>9.3f}{row['growth_mib']:>9.1f}{row['growth_ratio']:>9.3f}"
            print(line)
        if "per_sequence" in rows:
            for name in args.strategies:
                print(f"[{setup}]  {name} vs per-sequence loop: {rows[name]['seconds'] / rows['per_sequence']['seconds']:.3f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    if args.markdown:
        write_markdown(results, args.markdown)
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
