opt = gradproj.wrap(inner, model, "proma", relative_bound=0.5)
run_step(opt, group_advantages(rewards, group_size=4))
metrics = opt.metrics()
print(f"projected fraction {metrics['gradproj/proma/projected_fraction']:.3f}")
assert 0.0 < metrics["gradproj/proma/projected_fraction"] < 1.0
