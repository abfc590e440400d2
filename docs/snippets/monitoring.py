opt = gradproj.wrap(inner, model, "proma", kl_estimate=True)
advantages = group_advantages(rewards, group_size=4)
for step in range(1, 4):
    run_step(opt, advantages)
    metrics = opt.metrics()
    kl = metrics.get("gradproj/kl_estimate/per_token")  # the previous update's; none at step 1
    print(f"step {step}: entropy {metrics['gradproj/entropy']:.3f} nats/token, "
          f"per-step KL {'-' if kl is None else f'{kl:.2e}'}")
