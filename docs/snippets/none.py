opt = gradproj.wrap(inner, model, "none")  # installs nothing: exactly the inner optimizer
run_step(opt, group_advantages(rewards, group_size=4))  # (opt.microbatch is optional with "none")
print(opt.metrics()["gradproj/microbatches"])
