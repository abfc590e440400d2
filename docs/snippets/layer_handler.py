import types

import torch
import torch.nn.functional as F
from torch import nn

import gradproj
from gradproj.capture.captured_call import CapturedCall, CapturedOp, captures
from gradproj.capture.forwards import install_forward, runs_class_forward
from gradproj.capture.handlers import LayerHandler, compute_dtype
from gradproj.linalg.sequence_grads import TokenSumGrads
from gradproj.plugins import refresh_registry


class LayerScale(nn.Module):
    """A module gradproj does not cover out of the box: ``y = x * weight`` (one scale per feature)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.weight


# 1. The computation, captured: forward, input gradients, ordinary parameter gradients, and the
#    use the engine collects per call -- here (x, dy).
class ScaleOp(CapturedOp):
    n_inputs, n_params = 1, 1

    def forward(self, x, weight):
        return x * weight, (x, weight), None  # output, tensors to save, constants

    def input_grads(self, meta, saved, grad_out, needs):
        return (grad_out * saved[1] if needs[0] else None,)

    def param_grads(self, meta, saved, grad_out, needs):
        dims = tuple(range(grad_out.dim() - 1))
        return ((grad_out * saved[0]).sum(dim=dims) if needs[0] else None,)

    def use(self, meta, saved, grad_out):
        return (saved[0], grad_out)


SCALE = ScaleOp()


# 2. Which modules, how to install the captured forward, and the sequence gradients
#    s_i = sum over sequence i's tokens of dy * x.
class LayerScaleHandler(LayerHandler):
    module_types = (LayerScale,)
    parameter_names = ("weight",)
    supports_slots = True  # small: gradproj may stack it with others of the same size

    def accepts(self, module):
        return runs_class_forward(module)

    def install(self, module, layer):
        def forward(x):
            if captures(layer, module.weight):
                return CapturedCall.apply(SCALE, layer, x, module.weight)
            return x * module.weight

        return install_forward(module, forward)  # returns the function that uninstalls it

    def sequence_gradients(self, layer, uses, layout, gram, workspace=None, slots=None):
        dtype = compute_dtype(layer.module.weight.dtype)
        x = torch.cat([layout.rows(x, layer, "inputs").to(dtype) for x, _ in uses], dim=1)  # (k, T, d)
        dy = torch.cat([layout.rows(d, layer, "output gradients").to(dtype) for _, d in uses], dim=1)
        if slots and "weight" in slots:
            torch.sum(dy * x, dim=1, out=slots["weight"])
            return {}
        return {"weight": TokenSumGrads(dy * x, dy)}


# 3. Register it, as a plugin package would (entry point group "gradproj", hook
#    gradproj_layer_handlers); here in the running process.
@gradproj.hookimpl
def gradproj_layer_handlers():
    return [LayerScaleHandler()]


plugin = types.ModuleType("layer_scale_plugin")
plugin.gradproj_layer_handlers = gradproj_layer_handlers
gradproj.get_plugin_manager().register(plugin, name="layer_scale")
refresh_registry()

# Check it: with shrinkage=0, PROMA adds each microbatch's gradient unchanged, built from the
# handler's sequence gradients -- it must equal plain autograd's gradient.
torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 8), LayerScale(8), nn.Linear(8, 16)).double()
model[0].weight.requires_grad_(False)
opt = gradproj.wrap(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model, "proma", shrinkage=0.0)
ids = torch.randint(0, 16, (3, 4, 6))  # 3 microbatches of 4 sequences, 6 tokens
advantages = torch.randn(3, 4, 1, dtype=torch.float64)


def logprobs(tokens):
    logits = model(tokens[:, :-1])
    return F.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)  # (4, 5)


for m in range(3):
    logp = logprobs(ids[m])
    with opt.microbatch(logp):
        (-(advantages[m] * logp).mean()).backward()
captured = model[2].weight.grad.clone()
opt.detach()  # the model is plain again: the same microbatches with ordinary autograd
model.zero_grad()
for m in range(3):
    (-(advantages[m] * logprobs(ids[m])).mean()).backward()
assert torch.allclose(captured, model[2].weight.grad, rtol=1e-10, atol=1e-12)
print("LayerScale covered; gradient equals plain autograd's:", float((captured - model[2].weight.grad).abs().max()))
gradproj.get_plugin_manager().unregister(name="layer_scale")
refresh_registry()
