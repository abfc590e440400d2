opt = gradproj.wrap(inner, model, ["variance_scaling", "proma"], power=1.0, scope="group")
opt.set_groups(group_ids, rewards)  # the whole step's groups and rewards, before its first microbatch
centred = group_advantages(rewards, group_size=4, normalize_std=False)  # REINFORCE, group baseline
run_step(opt, centred, group_ids)  # = GRPO's std-normalised update (then PROMA's projection)
print(opt.metrics()["gradproj/variance_scaling/scale_mean"])
