"""verl's checkpoint manager saves and loads the gradproj-wrapped optimizer: resuming from a verl
checkpoint gives the same parameters as an uninterrupted run."""

import torch

from gradproj.testing.verl_cpu import smoke

SMOKE = smoke.load_overrides(smoke.DEFAULT_OVERRIDES)


def params(worker):
    return {n: p.detach().full_tensor().clone() for n, p in worker.actor.engine.module.named_parameters()}


def test_resume_from_verl_checkpoint_equals_uninterrupted(tmp_path):
    folder = smoke.tiny_model(tmp_path / "model")
    config = smoke.compose(SMOKE + smoke.CPU_OVERRIDES + [f"actor_rollout_ref.model.path={folder}"])
    straight = smoke.actor_worker(config)
    vocab = straight.actor.engine.module.config.vocab_size

    def batches():
        return [smoke.rollout_batch(vocab, seed=s) for s in (1, 2)]

    for batch in batches():
        smoke.update_actor(straight, batch, config)
    expected = params(straight)

    first = smoke.actor_worker(config)
    smoke.update_actor(first, batches()[0], config)
    first.save_checkpoint(str(tmp_path / "ckpt"), global_step=1)
    state = first.actor.engine.optimizer.state_dict()
    assert "gradproj" in state, "the wrapper's own state travels with verl's optimizer checkpoint"

    resumed = smoke.actor_worker(config)
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    smoke.update_actor(resumed, batches()[1], config)
    got = params(resumed)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
