"""The benchmark scripts' own logic (their timings are never asserted)."""

import pytest

import torch

from benchmarks import breakdown, step_overhead, subspace_quality
from gradproj.strategies.proma import Proma


def test_strategy_variants_carry_options():
    assert step_overhead.parse_variant("proma") == ("proma", {})
    assert step_overhead.parse_variant("intra_proma:niter=0,projector=kron,energy=0.9") == (
        "intra_proma", {"niter": 0, "projector": "kron", "energy": 0.9}
    )


def test_variant_options_reach_the_strategy():
    args = step_overhead.parse(["--quick", "--strategies", "intra_proma:niter=0,rank=2"])
    model, opt, _ = step_overhead.variants(args, "lora", only="intra_proma:niter=0,rank=2")["intra_proma:niter=0,rank=2"]
    assert opt.config.options["niter"] == 0 and opt.config.options["rank"] == 2


def test_round_ratio_spread_pairs_each_round_with_its_plain_step():
    # rounds where both steps slowed down together give the same ratio: no spread
    assert step_overhead.round_ratio_spread([2.0, 4.0, 3.0], [1.0, 2.0, 1.5]) == pytest.approx((2.0, 2.0))
    q25, q75 = step_overhead.round_ratio_spread([1.0, 1.2, 1.4, 1.6, 1.8], [1.0] * 5)
    assert (q25, q75) == pytest.approx((1.2, 1.6))
    assert step_overhead.round_ratio_spread([1.1], [1.0]) == pytest.approx((1.1, 1.1))


def test_cut_short_stage_restores_the_strategy_methods(monkeypatch):
    original = Proma.__dict__["accumulate"]
    cut = breakdown._Cut(Proma, {"accumulate": breakdown._capture_only})

    def failing_step(*_args):
        assert Proma.__dict__["accumulate"] is breakdown._capture_only
        raise RuntimeError("boom")

    monkeypatch.setattr(step_overhead, "step_wrapped", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        cut(None, None, None)
    assert Proma.__dict__["accumulate"] is original


def test_captured_energy_of_a_subspace():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    assert abs(subspace_quality.captured_energy(x, eye) - 1.0) < 1e-12
    first, rest = eye[:, :2], eye[:, 2:]
    parts = subspace_quality.captured_energy(x, first) + subspace_quality.captured_energy(x, rest)
    assert abs(parts - 1.0) < 1e-12
    assert abs(subspace_quality.captured_energy(x, first) - float(x[:, :2].square().sum() / x.square().sum())) < 1e-12


def test_grid_tables_time_and_memory(tmp_path):
    from benchmarks import grid

    args = grid.parse(["--quick"])
    point = {"setup": "lora", "hidden": 32, "k": 2, "tokens": 8}
    timed = [dict(point, variant="plain", seconds=2.0, ratio=1.0), dict(point, variant="proma", seconds=2.2, ratio=1.1)]
    grid.write_markdown(timed, args, tmp_path / "time.md")
    text = (tmp_path / "time.md").read_text()
    assert "plain step (s)" in text and "| lora | 32 | 2 | 8 | 2.000 | 1.10 |" in text
    sized = [dict(point, variant="plain", peak_mib=100.0, ratio=1.0), dict(point, variant="proma", peak_mib=125.0, ratio=1.25)]
    grid.write_markdown(sized, args, tmp_path / "memory.md")
    text = (tmp_path / "memory.md").read_text()
    assert "plain peak (MiB)" in text and "| lora | 32 | 2 | 8 | 100.0 | 1.25 |" in text
    assert grid._config_argv(args, 32, 2, 8)[:2] == ["--hidden", "32"]


def test_peak_memory_counts_the_step_not_what_came_before():
    """The high-water mark is reset before the measured region: a large allocation freed before the
    reset does not count, one made after it does."""
    before_reset = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del before_reset
    assert step_overhead._reset_peak_rss()
    start = step_overhead._rss_mib()
    assert step_overhead._peak_rss_mib() - start < 32
    inside = torch.ones(64 * 2**20 // 4)
    del inside
    assert step_overhead._peak_rss_mib() - start >= 60


def test_memory_child_reports_the_peak_with_and_without_the_weights():
    """A fresh child process measures a step: the peak counts the weights, the step's own does not."""
    measured = step_overhead.peak_memory(["--quick", "--threads", "1"], "linear", "proma")
    assert set(measured) == {"peak_mib", "growth_mib"}
    assert measured["peak_mib"] > measured["growth_mib"] >= 0.0


def test_breakdown_check_costs_and_the_checks_off_stage():
    """The isolated check timings run on the benchmark's model, and the no-checks stage swaps only
    attributes that exist (the engine's checks by name: a rename must update the benchmark)."""
    args = step_overhead.parse(["--quick"])
    costs = breakdown.check_costs(args, "linear", repeats=3)
    assert costs["layers"] > 0 and costs["per_microbatch"] > 0
    for (owner, name), _ in breakdown._checks_off().items():
        assert name in owner.__dict__, (owner, name)


@pytest.mark.parametrize("setup", ["full", "lora"])
def test_moe_benchmark_builds_and_steps(setup):
    """``--arch qwen3_moe``: every parameter (or peft all-linear, experts and routers included)
    covered, one captured step runs."""
    args = step_overhead.parse(["--quick", "--arch", "qwen3_moe"])
    model, opt, step = step_overhead.variants(args, setup, only="proma")["proma"]
    assert any("experts" in n for n, p in model.named_parameters() if p.requires_grad)
    step(model, opt, step_overhead.make_data(args))


def test_accelerator_mode_runs_on_the_cpu_at_a_tiny_size(tmp_path):
    """``--device cuda``'s code path (shared model wrapped per step, interleaved rounds, bf16 autocast,
    host-sync counts) at a tiny preset on the CPU; its timings are not asserted."""
    out = tmp_path / "device.md"
    results = step_overhead.main(["--device", "cpu", "--presets", "tiny", "--quick", "--threads", "1",
                                  "--setups", "lora", "linear", "--markdown", str(out)])
    for setup in ("lora", "linear"):
        rows = results["runs"][("tiny", setup)]
        assert list(rows) == ["plain", "none", "proma", "intra_proma", "per_sequence"]
        assert rows["plain"]["ratio"] == 1.0
        # gradproj adds a bounded number of host reads per step (2 microbatches): none for "none"
        assert rows["none"]["host_syncs"] == rows["plain"]["host_syncs"]
        assert 0 < rows["proma"]["host_syncs"] - rows["plain"]["host_syncs"] <= 8
    text = out.read_text()
    assert "| tiny | lora | proma |" in text and "host syncs added" in text
