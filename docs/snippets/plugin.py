# after `pip install ./examples/gradproj-example-plugin`: the new names work like built-ins
opt = gradproj.wrap(inner, model, ["clip_coefficients", "damped"], max_abs=0.05, decay=0.5)
run_step(opt, group_advantages(rewards, group_size=4))
print(gradproj.get_registry().strategy("damped").summary)
