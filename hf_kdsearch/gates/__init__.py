"""Architecture gates for student search, the FLOPs-weighted L1 penalty, and physical extraction of the student.

Gu & Tresp (2020), "Search for Better Students to Learn Distilled Knowledge", https://arxiv.org/abs/2001.11612:
the student is a subgraph of the teacher, chosen by putting gates on the teacher's units and pushing them to zero
with an L1 penalty under the distillation loss. The method and the papers' numbers: `docs/methods.md`.

Gates
-----
`add_gates(model)` gives the model two kinds of multiplicative gates, `nn.Parameter`s initialised to exactly 1 (so
the gated model's logits equal the teacher's bit for bit):

- `channel_gate` (width): one per output channel of a convolution or linear layer, applied right after the layer's
  batch norm (or after the linear layer itself), before the non-linearity. Applied there, a zero gate silences the
  channel completely, and the gate folds exactly into the BN's (or linear layer's) scale and shift on extraction.
- `depth_gate` (depth): one scalar per residual branch, applied to the branch's last output before the residual sum,
  so a zero gate leaves only the shortcut and the whole branch can be removed.

Channels tied together by a residual sum (the residual stream of a ResNet stage, and the stem that feeds it) stay
ungated. A shared gate would have to scale every addend of the sum and every block of the stage at once; in the
supported families the gated layers already carry nearly all FLOPs (98% of cifar_resnet20, 99% of cifar_wrn_40_2, 92%
of resnet18 at 224 px), so the budget can be met without it, and the residual stream keeps the teacher's features
aligned.

The gates live on the module they scale (`stages.0.1.bn1.channel_gate`) and act through a forward hook, so every
weight keeps its state-dict key, and the optimizer, checkpoints and DDP see the gates like any other parameter.

Supported: the CIFAR ResNet and WRN families (`models/cifar.py`), the MNIST MLP and SmallCNN (`models/mnist.py`),
and timm ResNets of plain `BasicBlock` or `Bottleneck` blocks (`resnet18`, `resnet50`, ...). Anything else raises
an error that names the module.

Penalty
-------
`lambda * sum_j c_j |g_j|`, where `c_j` is unit j's share of the teacher's FLOPs, normalised so that `sum_j c_j = 1`:
a channel's share is the FLOPs it carries in the layer that produces it and in the layers that read it; a branch's
share is the FLOPs of the whole branch. At initialisation the sum is exactly 1.

Extraction
----------
`extract_student` keeps units by `|g|` (or by given scores such as `unit_importance`, the scale-free first-order loss
change per FLOP), either above a threshold or best first until a FLOPs budget is met, folds
the kept gates into the weights, slices the weights, and builds a fresh model of the same family whose widths and
removed blocks are constructor arguments (`model.model_args`), so it saves and reloads without gates.

Modules
-------
`plan` (the `GatePlan` and its FLOPs model), `families` (per-family placement, the hooks, `add_gates`), `penalty`
(the L1 maths), `importance` (scale-free unit importance), `extract` (unit selection and the rebuilt student).
Import from `hf_kdsearch.gates`.
"""

from .extract import GateSelection, build_student, check_budget, extract_student, select_units
from .families import add_gates, gate_parameter_names, gate_parameters
from .importance import unit_importance
from .penalty import flops_weighted_l1, soft_keep_fractions

# DEPTH, GATE_ATTR, WIDTH and unwrap_model are not in __all__; search.py imports them from here.
from .plan import DEPTH, GATE_ATTR, WIDTH, GatedLayer, GateGroup, GatePlan, gate_plan, unwrap_model  # noqa: F401

__all__ = [
    "GateGroup",
    "GatedLayer",
    "GatePlan",
    "GateSelection",
    "add_gates",
    "gate_parameters",
    "gate_parameter_names",
    "flops_weighted_l1",
    "soft_keep_fractions",
    "select_units",
    "check_budget",
    "build_student",
    "extract_student",
    "gate_plan",
    "unit_importance",
]
