opt = gradproj.wrap(inner, model, "intra_proma", rank=4, projector="complement")
run_step(opt, group_advantages(rewards, group_size=4))
metrics = opt.metrics()
print(f"projected fraction {metrics['gradproj/intra_proma/projected_fraction']:.3f}, "
      f"mean rank {metrics['gradproj/intra_proma/mean_rank']:.1f}")
assert 0.0 < metrics["gradproj/intra_proma/projected_fraction"] < 1.0
