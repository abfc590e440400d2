"""``GradProjGRPOTrainer``: TRL's GRPOTrainer with a gradproj strategy accumulating the microbatches.

How it plugs in (TRL 1.16, see ``../shared/notes/trl``):

* ``create_optimizer`` wraps the optimizer TRL builds (or the one passed as ``optimizers=``) with
  `gradproj.wrap`, *after* PEFT has been applied, around the model TRL trains;
* ``_get_per_token_logps_and_entropies`` keeps the log-prob tensor of the training forward;
  ``compute_loss`` opens ``opt.microbatch(logp, completion_mask)`` around TRL's own loss, and
  ``training_step`` closes it after TRL's backward. Every ``loss_type`` TRL offers is on-policy
  ``sum_i c_i sum_t logp[i, t]`` when the likelihood ratio is 1, so the per-sequence coefficients
  are read from the loss's own gradient (and checked to be constant per row) -- no loss-type table;
* when the output embedding is trained (full fine-tuning), TRL's fused LM head -- which multiplies
  by ``lm_head.weight`` outside the module -- is replaced by an ordinary forward for the training
  log-probs, so the covered ``lm_head`` sees its gradient;
* gradproj's metrics are appended to TRL's (``gradproj/...``) at every optimizer step; the wrapped
  optimizer's state rides in TRL checkpoints (``optimizer.pt``, loaded with ``weights_only=True``);
* ``sgrpo=`` (`SGRPOSelection`, with or without gradproj) trains on S-GRPO's token selection: each
  training rollout batch's selection is drawn once, where TRL builds the batch
  (``_generate_and_score_completions``), and stored as the batch's ``tool_mask`` -- TRL's loss mask
  is ``completion_mask * tool_mask`` while ``completion_mask`` alone stays the attention mask -- so
  every use of the batch (each microbatch, each of ``num_iterations``) and gradproj's microbatch mask
  see the same selection.

``gradproj=None`` and ``sgrpo=None`` leave GRPOTrainer unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from trl import GRPOTrainer

import gradproj
from gradproj import GradProjOptimizer
from gradproj.config import GradProjConfig
from gradproj.errors import ConfigError, CoverageError, ProtocolError
from gradproj.integrations.torch.token_selection import SGRPOSelection, as_sgrpo_selection, sgrpo_token_mask

__all__ = ["GradProjGRPOMixin", "GradProjGRPOTrainer", "SGRPOSelection", "check_grpo_config", "check_sgrpo_config",
           "as_gradproj_config"]


def check_sgrpo_config(args) -> None:
    """Refuse GRPO settings under which the loss would not be S-GRPO's on the selected tokens.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    problems = []
    if args.loss_type != "grpo":
        problems.append(
            f"loss_type={args.loss_type!r} does not average each completion over its own tokens (S-GRPO's "
            "1/|T_i| per completion, then the mean over completions): bnpo and dr_grpo normalise over the batch or "
            "max_completion_length, dapo/cispo/vespo by TRL's count of all completion tokens, luspo sums per "
            "completion, sapo replaces the clipped GRPO objective; set loss_type='grpo'"
        )
    if args.top_entropy_quantile < 1.0:
        problems.append(
            f"top_entropy_quantile={args.top_entropy_quantile} selects tokens a second time, on top of S-GRPO's "
            "selection; set it to 1.0"
        )
    if problems:
        raise ConfigError("GRPOConfig is incompatible with sgrpo= (S-GRPO's token selection): " + "; ".join(problems))


def as_gradproj_config(value: Any) -> GradProjConfig | None:
    """``None``, a `GradProjConfig`, a strategy name/list, or a dict -> a config (or ``None``)."""
    if value is None or isinstance(value, GradProjConfig):
        return value
    if isinstance(value, (str, list, tuple)):
        return GradProjConfig(strategy=list(value) if isinstance(value, tuple) else value)
    if isinstance(value, dict):
        return GradProjConfig.from_dict(value)
    raise ConfigError(f"gradproj= must be a GradProjConfig, a strategy name or a dict, got {type(value).__name__}")


def check_grpo_config(args, config: GradProjConfig) -> None:
    """Refuse GRPO settings under which the strategy's assumptions fail (one coefficient per sequence).

    Raises:
        ConfigError: naming the setting and the fix.
    """
    resolved = config.resolve()
    if not resolved.needs_capture and not resolved.microbatch_transforms:
        return  # plain accumulation accepts any loss
    name = "+".join(config.strategies)
    problems = []
    if args.beta != 0.0:
        problems.append(
            f"beta={args.beta} adds a per-token KL penalty to the loss; set beta=0.0 (KL-free: no reference model, "
            "the strategy is the proximal term)"
        )
    if args.num_iterations != 1:
        problems.append(
            f"num_iterations={args.num_iterations} reuses rollouts after an update, so the likelihood ratio is not 1 "
            "and clipping varies per token; set num_iterations=1"
        )
    ga = args.gradient_accumulation_steps
    spg = args.steps_per_generation or ga
    if ga % (spg * max(args.num_iterations, 1)):
        # TRL's own test for an off-policy step (it then computes old log-probs): some optimizer step
        # would use completions generated before the previous step
        problems.append(
            f"steps_per_generation={spg} does not divide gradient_accumulation_steps={ga}, so some optimizer steps "
            "train on completions generated before an earlier step (off-policy; the ratio is not 1). Set "
            "steps_per_generation to gradient_accumulation_steps (the default) or a divisor of it (generation_batch_size "
            "sets it too)"
        )
    if getattr(args, "deepspeed", None):
        problems.append(
            "DeepSpeed steps the optimizer inside its backward, before gradproj has added the microbatch to the "
            "running gradient, and owns the optimizer; use DDP or FSDP2 (accelerate) instead of deepspeed="
        )
    optim = str(getattr(args, "optim", "") or "")
    if "lomo" in optim or "layerwise" in optim:
        problems.append(
            f"optim={optim!r} updates the parameters during the backward (per layer), before gradproj has "
            "projected the microbatch; choose an optimizer that steps once per optimizer step (adamw_torch, ...)"
        )
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        problems.append("an entropy bonus (entropy_coef / use_adaptive_entropy) adds a gradient outside the log-probs; disable it")
    if args.top_entropy_quantile < 1.0:
        problems.append(
            f"top_entropy_quantile={args.top_entropy_quantile} masks tokens inside a completion; set it to 1.0"
        )
    if args.use_vllm and args.vllm_importance_sampling_correction:
        problems.append("vLLM importance-sampling correction weights tokens individually; set vllm_importance_sampling_correction=False")
    if resolved.transforms:
        problems.append(
            f"coefficient transforms ({', '.join(s.name for s in resolved.specs if s.role == 'transform')}) are not "
            "wired into TRL yet; use TRL's scale_rewards for the std normalisation"
        )
    if problems:
        raise ConfigError(f"GRPOConfig is incompatible with gradproj strategy {name!r}: " + "; ".join(problems))


def _find_gradproj(optimizer) -> GradProjOptimizer | None:
    """The GradProjOptimizer in a chain of optimizer wrappers (``.optimizer``), if any."""
    for _ in range(4):
        if optimizer is None or isinstance(optimizer, GradProjOptimizer):
            return optimizer
        optimizer = optimizer.__dict__.get("optimizer")
    return None


class GradProjGRPOMixin:
    """Mixin for ``GRPOTrainer`` (put it first): ``gradproj=`` selects the strategy."""

    def __init__(self, *args, gradproj: GradProjConfig | str | list | dict | None = None,
                 sgrpo: SGRPOSelection | dict | None = None, **kwargs) -> None:
        self._gp_config = as_gradproj_config(gradproj)
        self._gp_sgrpo = as_sgrpo_selection(sgrpo)
        self._gp_optimizer: GradProjOptimizer | None = None
        self._gp_block = None
        self._gp_logps: torch.Tensor | None = None
        self._gp_unfused = False
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if self._gp_config is not None and grpo_args is not None:
            check_grpo_config(grpo_args, self._gp_config)
        if self._gp_sgrpo is not None and grpo_args is not None:
            check_sgrpo_config(grpo_args)
        super().__init__(*args, **kwargs)
        if self._gp_sgrpo is not None:
            check_sgrpo_config(self.args)
        if self._gp_config is None:
            return
        check_grpo_config(self.args, self._gp_config)
        if self.beta == 0.0 and self.ref_model is not None:
            raise ConfigError("beta=0 but TRL built a reference model; this TRL version is not supported")
        if self.aux_loss_enabled and self._gp_config.needs_capture():
            raise ConfigError(
                "the model adds a MoE router load-balancing loss outside the log-probs; set router_aux_loss_coef=0.0"
            )
        if getattr(self, "is_deepspeed_enabled", False) and self._gp_config.needs_capture():
            raise ConfigError(
                "DeepSpeed (from the accelerate config) steps the optimizer inside its backward, before gradproj has "
                "added the microbatch to the running gradient; use DDP or FSDP2 instead"
            )

    # -- optimizer -------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """TRL's optimizer (or the one passed as ``optimizers=``), wrapped by gradproj."""
        optimizer = super().create_optimizer(model)
        if self._gp_config is None:
            return optimizer
        existing = _find_gradproj(self.optimizer)  # e.g. inside accelerate's AcceleratedOptimizer on a second train()
        if existing is None:
            try:
                self.optimizer = existing = gradproj.wrap(self.optimizer, self.model, self._gp_config)
            except CoverageError as err:  # the advice in TRL's terms: TRL users never call wrap()
                raise CoverageError(
                    f"{err} -- With TRL: freeze those parameters on the model before building the trainer, pass "
                    "gradproj=GradProjConfig(..., exclude=['<glob>']) (or `exclude:` in the recipe's gradproj: section), "
                    "or give peft_config target modules gradproj covers (DoRA and LoRA on embeddings are not supported)"
                ) from None
        self._gp_optimizer = existing
        head = self.model.get_output_embeddings()
        self._gp_unfused = head is not None and self._gp_optimizer.covers(head.weight)
        return self.optimizer

    @property
    def gradproj_optimizer(self) -> GradProjOptimizer | None:
        """The `gradproj.GradProjOptimizer` (``None`` before training starts or without gradproj)."""
        return self._gp_optimizer

    # -- S-GRPO's token selection --------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        """TRL's rollout batch; with ``sgrpo=``, a training batch's loss mask becomes S-GRPO's selection."""
        output = super()._generate_and_score_completions(inputs)
        if self._gp_sgrpo is not None and self.model.training:
            self._gp_select_tokens(output)
        return output

    def _gp_select_tokens(self, output: dict) -> None:
        """Draw the selection over the model's completion tokens and store it as ``tool_mask``: TRL's
        loss mask is ``completion_mask * tool_mask``, and ``completion_mask`` stays the attention mask."""
        completion_mask = output["completion_mask"]
        response = completion_mask.bool()
        if output.get("tool_mask") is not None:  # tool results are not the model's tokens
            response = response & output["tool_mask"].bool()
        selection = self._gp_sgrpo
        within = self._step % max(self.current_gradient_accumulation_steps, 1)
        generator = selection.generator(self.accelerator.process_index, self.state.global_step, within)
        selected = sgrpo_token_mask(response, selection.alpha, selection.p, selection.k, generator=generator)
        output["tool_mask"] = selected.to(completion_mask.dtype)
        fraction = selected.sum() / response.sum().clamp(min=1)
        self._metrics["train"]["sgrpo/selected_fraction"].append(float(fraction))

    # -- log-probs and the microbatch block --------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):
        if self._gp_unfused and torch.is_grad_enabled() and not any(v is not None for v in kwargs.values()):
            logps, entropies, aux = self._gp_unfused_logps(model, input_ids, attention_mask, logits_to_keep, compute_entropy)
        else:
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size, compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss, **kwargs,
            )
        if torch.is_grad_enabled():
            self._gp_logps = logps
        return logps, entropies, aux

    def _gp_unfused_logps(self, model, input_ids, attention_mask, logits_to_keep, compute_entropy):
        """Completion log-probs through the ordinary forward (the LM head module runs, so it is captured)."""
        with self.accelerator.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1).logits
        logits = logits[:, :-1] / self.temperature
        logp_all = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
        logps = logp_all.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
        logps = logps.masked_fill(attention_mask[:, -logits_to_keep:] == 0, 0.0)
        entropies = -(logp_all.exp() * logp_all).sum(-1).detach() if compute_entropy else None
        return logps, entropies, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's loss; with gradproj, the microbatch block is opened around its backward."""
        self._gp_logps = None
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        opt = self._gp_optimizer
        if opt is not None and model.training and torch.is_grad_enabled():
            stale = [key for key in ("old_per_token_logps", "importance_sampling_ratio") if inputs.get(key) is not None]
            if stale and opt.captures:
                raise ConfigError(
                    f"gradproj: TRL handed this step {', '.join(stale)}: its completions come from an older policy "
                    "(num_iterations, steps_per_generation or vLLM importance sampling), which gradproj refuses; "
                    "set num_iterations=1, steps_per_generation=gradient_accumulation_steps and "
                    "vllm_importance_sampling_correction=False"
                )
            if self._gp_logps is None:
                raise ProtocolError("gradproj: TRL computed the loss without the training log-probs (unsupported TRL code path)")
            mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                mask = mask * inputs["tool_mask"]
            self._gp_block = opt.begin_microbatch(self._gp_logps, mask.bool())
        self._gp_logps = None
        return loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step (compute_loss + backward), then the microbatch block closes: ``.grad`` is updated."""
        if self._gp_optimizer is None:
            return super().training_step(model, inputs, num_items_in_batch)
        try:
            output = super().training_step(model, inputs, num_items_in_batch)
        except BaseException as err:
            block, self._gp_block = self._gp_block, None
            if block is not None:
                with contextlib.suppress(BaseException):  # the original error is the one to report
                    block.close(err)
            raise
        block, self._gp_block = self._gp_block, None
        if block is not None:
            block.close()
        if self.accelerator.sync_gradients:  # the last microbatch of the optimizer step
            for key, value in self._gp_optimizer.running_metrics().items():
                self._metrics["train"][key].append(value)
        return output


class GradProjGRPOTrainer(GradProjGRPOMixin, GRPOTrainer):
    """``GRPOTrainer(..., gradproj=GradProjConfig(strategy="proma"), sgrpo=SGRPOSelection(...))``.

    Every GRPOTrainer argument works as usual (``peft_config=`` included: the optimizer is wrapped
    after PEFT is applied). Settings that break the single-pass capture (``beta > 0``,
    ``num_iterations > 1``, off-policy steps, entropy bonuses, token masks) are refused with a
    `gradproj.ConfigError` naming the fix; ``gradproj=None`` is plain GRPOTrainer.
    ``sgrpo=SGRPOSelection(alpha, p, k, seed)`` (or a dict) trains on S-GRPO's token selection, with
    or without gradproj (``loss_type="grpo"``; others are refused).
    """
