opt = gradproj.wrap(inner, model, ["isopo", "none"], variant="normalize")
run_step(opt, group_advantages(rewards, group_size=4))
print(opt.metrics()["gradproj/isopo/coefficient_ratio"])
