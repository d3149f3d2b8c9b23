"""Gates, the FLOPs-weighted penalty and extraction: exact logits, exact FLOPs, budgets, errors, reloading."""

import copy

import pytest
import timm
import torch
from conftest import random_images, tiny_args
from torch import nn

from hf_kdsearch import add_gates, count_flops, extract_student, flops_weighted_l1, gate_parameters
from hf_kdsearch.gates import gate_parameter_names, gate_plan, select_units, soft_keep_fractions, unit_importance
from hf_kdsearch.models.sliced_resnet import ShortcutBlock

# name -> (create kwargs, input size, expected gate parameters)
CASES = {
    "cifar_resnet8": ({"num_classes": 10}, (3, 32, 32), 3 + 3),  # 3 blocks: a width and a depth gate each
    "cifar_wrn_16_1": ({"num_classes": 10}, (3, 32, 32), 6 + 6),
    "mnist_mlp": ({"hidden_dims": [48, 32]}, (1, 28, 28), 2),
    "mnist_cnn": ({"widths": [8, 8, 16, 16]}, (1, 28, 28), 4),
    "resnet18": ({"num_classes": 10}, (3, 64, 64), 8 + 8),
}


def make_teacher(name: str) -> nn.Module:
    kwargs, _, _ = CASES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    # Non-trivial BN statistics and affine terms (timm zero-inits the last BN of each resnet18 block).
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.1
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.eval()


def batch(name: str, n: int = 4) -> torch.Tensor:
    return torch.randn(n, *CASES[name][1], generator=torch.Generator().manual_seed(2))


def set_random_gates(model: nn.Module, zero_fraction: float = 0.5, depth_zero: float = 0.3, seed: int = 3) -> None:
    """Gates in [0.5, 1.5) with about `zero_fraction` of the channels (never all of a group) and `depth_zero` of
    the branches set exactly to 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gate_parameters(model).items():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            if "depth_gate" in name:
                if torch.rand(1, generator=g).item() < depth_zero:
                    p.zero_()
            else:
                p[torch.rand(p.shape, generator=g) < zero_fraction] = 0
                p[0] = 0.75  # keep one channel per group, so the group's width equals its nonzero gates


@pytest.mark.parametrize("name", list(CASES))
def test_gates_start_at_one_and_leave_the_logits_unchanged(name):
    teacher = make_teacher(name)
    gated = add_gates(copy.deepcopy(teacher)).eval()
    gates = gate_parameters(gated)
    assert len(gates) == CASES[name][2]
    for n, p in gates.items():
        assert "gate" in n and p.requires_grad and torch.equal(p, torch.ones_like(p))
    # Every weight keeps its state-dict key; the only new entries are the gates.
    assert set(gated.state_dict()) - set(teacher.state_dict()) == set(gates)
    assert dict(gated.named_parameters()).keys() >= gates.keys()
    x = batch(name)
    assert torch.equal(gated(x), teacher(x))


@pytest.mark.parametrize("name", list(CASES))
def test_threshold_zero_extraction_folds_gates_and_matches_the_gated_logits(name):
    teacher = make_teacher(name)
    gated = add_gates(copy.deepcopy(teacher)).eval()
    set_random_gates(gated)
    size = CASES[name][1]
    student = extract_student(gated, threshold=0.0, input_size=size).eval()
    x = batch(name)
    torch.testing.assert_close(student(x), gated(x), rtol=1e-5, atol=1e-5)
    assert not [n for n, _ in student.named_parameters() if "gate" in n]
    assert n_params(student) < n_params(teacher)

    # The analytic FLOPs model is exact against torch's counter.
    flops = count_flops(student, size)
    assert flops == select_units(gated, threshold=0.0, input_size=size).flops
    assert flops < count_flops(teacher, size)

    # Widths and removed blocks are constructor arguments: the config alone rebuilds the shape.
    rebuilt = timm.create_model(student.pretrained_cfg["architecture"], num_classes=10, **student.model_args)
    rebuilt.load_state_dict(student.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), student(x))
    plan = gate_plan(gated)
    removed = {plan.groups[n].label for n, p in gate_parameters(gated).items() if "depth" in n and p.item() == 0}
    assert len(student.model_args.get("removed_blocks", [])) == len(removed)


def test_found_widths_go_into_the_config():
    gated = add_gates(make_teacher("cifar_resnet8"))
    with torch.no_grad():
        gates = gate_parameters(gated)
        gates["stages.0.0.bn1.channel_gate"][5:] = 0  # keep 5 of 16
        gates["stages.1.0.bn2.depth_gate"].zero_()  # remove block 1.0
    student = extract_student(gated, threshold=0.0)
    assert student.model_args["block_widths"][0] == [5]
    assert student.model_args["block_widths"][2] == [64]
    assert student.model_args["removed_blocks"] == ["1.0"]
    assert not student.stages[1][0].has_branch and student.stages[0][0].conv1.out_channels == 5

    mlp = add_gates(make_teacher("mnist_mlp"))
    with torch.no_grad():
        gate_parameters(mlp)["features.4.channel_gate"][::2] = 0
    assert extract_student(mlp, threshold=0.0).model_args["hidden_dims"] == [48, 16]


def test_timm_resnet18_student_is_a_registered_kdsearch_resnet():
    gated = add_gates(make_teacher("resnet18"))
    with torch.no_grad():
        gates = gate_parameters(gated)
        gates["layer2.1.bn2.depth_gate"].zero_()
        gates["layer3.0.bn1.channel_gate"][100:] = 0
    student = extract_student(gated, threshold=0.0, input_size=(3, 64, 64)).eval()
    assert student.pretrained_cfg["architecture"] == "kdsearch_resnet"
    assert student.model_args["base"] == "resnet18" and student.model_args["removed_blocks"] == ["1.1"]
    assert student.model_args["block_widths"][2][0] == [100] and student.model_args["block_widths"][1][1] == []
    assert isinstance(student.layer2[1], ShortcutBlock)
    rebuilt = timm.create_model("kdsearch_resnet", num_classes=10, **student.model_args).eval()
    rebuilt.load_state_dict(student.state_dict())
    x = batch("resnet18", 2)
    torch.testing.assert_close(rebuilt(x), gated.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["cifar_resnet8", "mnist_mlp", "mnist_cnn", "resnet18"])
def test_budget_extraction_fills_the_budget_to_within_one_channel(name):
    teacher = make_teacher(name)
    gated = add_gates(copy.deepcopy(teacher))
    set_random_gates(gated, zero_fraction=0.0, depth_zero=0.0)
    size = CASES[name][1]
    budget = 0.3 * count_flops(teacher, size)
    student = extract_student(gated, target_flops_ratio=0.3, input_size=size)
    flops = count_flops(student, size)
    assert flops <= budget

    sel = select_units(gated, target_flops_ratio=0.3, input_size=size)
    plan = gate_plan(gated)
    assert sel.flops == flops
    base = torch.tensor(
        [
            (0.0 if sel.removed[n] else 1.0)
            if g.kind == "depth"
            else (0.0 if g.block and sel.removed[g.block] else sel.kept[n].numel() / g.size)
            for n, g in plan.groups.items()
        ],
        dtype=torch.float64,
    )
    grow = []
    for i, g in enumerate(plan.groups.values()):
        if g.kind == "width" and 0 < base[i] < 1:
            more = base.clone()
            more[i] += 1 / g.size
            grow.append(float(plan.flops_of(more)) - flops)
    # No live layer could take one more channel: the student is within one channel's worth of the budget.
    assert grow and flops + min(grow) > budget

    # Within a layer, kept channels are those with the largest gates.
    for n, gate in gate_parameters(gated).items():
        if n in sel.kept and sel.kept[n].numel() < gate.numel():
            mask = torch.zeros(gate.numel(), dtype=torch.bool)
            mask[sel.kept[n]] = True
            assert gate.detach().abs()[mask].min() >= gate.detach().abs()[~mask].max()


def test_unit_costs_are_flops_shares_and_the_penalty_gradient_is_their_sign():
    gated = add_gates(make_teacher("mnist_mlp"))  # 784-48-32-10
    plan = gate_plan(gated).measure(gated, (1, 28, 28))
    costs = plan.unit_costs()
    sizes = torch.tensor([g.size for g in plan.groups.values()], dtype=torch.float64)
    torch.testing.assert_close((costs * sizes).sum(), torch.tensor(1.0, dtype=torch.float64))
    # A first-layer unit carries 784 inputs and 32 outputs' worth of multiply-adds; a second-layer one 48 and 10.
    torch.testing.assert_close(costs[0] / costs[1], torch.tensor((784 + 32) / (48 + 10), dtype=torch.float64))

    gates = list(gate_parameters(gated).values())
    penalty = flops_weighted_l1(gates, costs.float())
    torch.testing.assert_close(penalty, torch.tensor(1.0))
    with torch.no_grad():
        gates[0][:3] = torch.tensor([-0.5, 0.0, 2.0])
    flops_weighted_l1(gates, costs.float()).backward()
    expected = torch.ones(48) * costs[0].float()
    expected[0], expected[1] = -costs[0], 0.0  # d|g|/dg = sign(g), 0 at 0
    torch.testing.assert_close(gates[0].grad, expected)

    # A branch costs as much as all its channels together.
    res = add_gates(make_teacher("cifar_resnet8"))
    rplan = gate_plan(res).measure(res, (3, 32, 32))
    c = dict(zip(rplan.groups, rplan.unit_costs().tolist()))
    assert c["stages.1.0.bn2.depth_gate"] == pytest.approx(32 * c["stages.1.0.bn1.channel_gate"])


@pytest.mark.parametrize("name", ["cifar_resnet8", "mnist_mlp"])
def test_soft_flops_of_binary_gates_are_the_extracted_students_flops(name):
    gated = add_gates(make_teacher(name))
    size = CASES[name][1]
    set_random_gates(gated, zero_fraction=0.6, depth_zero=0.5, seed=7)
    with torch.no_grad():
        for p in gate_parameters(gated).values():
            p.copy_((p != 0).float())
    plan = gate_plan(gated).measure(gated, size)
    soft = plan.flops_of(soft_keep_fractions(list(gate_parameters(gated).values())).double())
    # Equal up to the float32 rounding of the kept fractions.
    assert float(soft) == pytest.approx(count_flops(extract_student(gated, threshold=0.5, input_size=size), size))


def test_a_copy_of_a_frozen_teacher_is_thawed_by_add_gates():
    from hf_kdsearch.teacher import freeze_teacher

    teacher = freeze_teacher(make_teacher("mnist_mlp"))
    gated = add_gates(copy.deepcopy(teacher))
    assert gated.training and all(p.requires_grad for p in gated.parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_bad_input_raises_errors_that_name_the_problem():
    with pytest.raises(TypeError, match="Sequential"):
        add_gates(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"layer1\.0\.se"):
        add_gates(timm.create_model("seresnet18", num_classes=10))
    gated = add_gates(make_teacher("mnist_mlp"))
    with pytest.raises(ValueError, match="already has gates"):
        add_gates(gated)
    with pytest.raises(ValueError, match="exactly one of"):
        extract_student(gated)
    with pytest.raises(ValueError, match="exactly one of"):
        extract_student(gated, threshold=0.0, target_flops_ratio=0.5)
    with pytest.raises(ValueError, match="1.5"):
        extract_student(gated, target_flops_ratio=1.5)
    with pytest.raises(ValueError, match="smallest student.*0.0"):
        extract_student(gated, target_flops_ratio=1e-4)
    with pytest.raises(ValueError, match="no gates"):
        extract_student(make_teacher("mnist_mlp"), threshold=0.0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "gate" not in n)


@pytest.mark.parametrize("name", ["cifar_resnet8", "mnist_mlp", "resnet18"])
def test_extracted_student_saves_and_reloads_with_timm_and_transformers(name, tmp_path):
    from transformers import AutoModelForImageClassification

    from hf_kdsearch import save_student

    gated = add_gates(make_teacher(name))
    set_random_gates(gated)
    student = extract_student(gated, threshold=0.0, input_size=CASES[name][1]).eval()
    x = batch(name, 2)
    with torch.no_grad():
        expected = student(x)
        folder = save_student(student, tmp_path / name, card={"method": "search", "teacher": name})
        by_timm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        assert by_timm.model_args == student.model_args
        torch.testing.assert_close(by_timm(x), expected, rtol=0, atol=0)
        by_transformers = AutoModelForImageClassification.from_pretrained(folder).eval()
        torch.testing.assert_close(by_transformers(pixel_values=x).logits, expected, rtol=0, atol=0)


def test_add_gates_accepts_the_transformers_wrapper_of_a_supported_model(tmp_path):
    """`AutoModelForImageClassification` of a saved timm student is a `TimmWrapperForImageClassification`; the gates
    go on its `timm_model`, and search and extraction work through the wrapper."""
    from transformers import AutoModelForImageClassification

    from hf_kdsearch import save_student

    teacher = make_teacher("cifar_resnet8")
    wrapper = AutoModelForImageClassification.from_pretrained(save_student(teacher, tmp_path / "t")).eval()
    x = batch("cifar_resnet8")
    with torch.no_grad():
        before = wrapper(pixel_values=x).logits
        assert add_gates(wrapper) is wrapper
        torch.testing.assert_close(wrapper(pixel_values=x).logits, before, rtol=0, atol=0)
    names = gate_parameter_names(wrapper)
    assert len(names) == CASES["cifar_resnet8"][2] and all(n.startswith("timm_model.stages.") for n in names)
    set_random_gates(wrapper)
    student = extract_student(wrapper, threshold=0.0, input_size=CASES["cifar_resnet8"][1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(x), wrapper(pixel_values=x).logits, rtol=1e-5, atol=1e-5)


class GateProjMLP(nn.Module):
    """An ungated model with a layer whose name merely contains "gate" (as in LLaMA-style MLPs)."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, pixel_values):
        return self.fc(torch.relu(self.gate_proj(pixel_values)))


def test_weight_decay_skips_exactly_the_architecture_gates(tmp_path):
    from hf_kdsearch import ClassificationTrainer

    plain = ClassificationTrainer(model=GateProjMLP(), args=tiny_args(tmp_path, weight_decay=0.1))
    assert "gate_proj.weight" in plain.get_decay_parameter_names(plain.model)
    assert gate_parameter_names(GateProjMLP()) == set()

    gated = add_gates(make_teacher("mnist_mlp"))
    trainer = ClassificationTrainer(model=gated, args=tiny_args(tmp_path, weight_decay=0.1))
    decayed = set(trainer.get_decay_parameter_names(gated))
    gates = gate_parameter_names(gated)
    assert gates == {"features.1.channel_gate", "features.4.channel_gate"}
    assert not decayed & gates
    # Everything else keeps the Trainer's own rule: weights decay, biases do not.
    assert decayed == {n for n, _ in gated.named_parameters() if n.endswith("weight")}


def _search_trainer(tmp_path, gated, teacher):
    from hf_kdsearch import DistillationTrainer, GateSearchCallback

    cb = GateSearchCallback(target_flops_ratio=0.5, l1_weight=5.0, input_size=(1, 28, 28))
    args = tiny_args(tmp_path, max_steps=3, learning_rate=0.1, weight_decay=0.0)
    data = random_images(48, (1, 28, 28))
    return DistillationTrainer(model=gated, teacher_model=teacher, args=args, callbacks=[cb], train_dataset=data)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("weights", ["trained", "frozen"])
def test_search_moves_every_trainable_parameter_and_nothing_else(tmp_path, weights):
    """PEFT-style: after a search, each parameter that requires grad changed and every other one is bit-identical,
    the teacher's included. With frozen weights only the gates may move."""
    teacher = make_teacher("mnist_mlp")
    gated = add_gates(copy.deepcopy(teacher))
    gates = gate_parameter_names(gated)
    if weights == "frozen":
        for name, p in gated.named_parameters():
            p.requires_grad_(name in gates)
    trainable = {n for n, p in gated.named_parameters() if p.requires_grad}
    assert trainable == (gates if weights == "frozen" else set(_snapshot(gated)))
    before, teacher_before = _snapshot(gated), _snapshot(teacher)
    _search_trainer(tmp_path, gated, teacher).train()
    after = _snapshot(gated)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == trainable
    assert all(torch.equal(p, _snapshot(teacher)[n]) for n, p in teacher_before.items())


# ---- scale-free importance -------------------------------------------------------------------------------------------
def _kd(teacher):
    def loss_fn(model, x):
        with torch.no_grad():
            t = teacher(x)
        return torch.nn.functional.kl_div(model(x).log_softmax(-1), t.softmax(-1), reduction="batchmean")

    return loss_fn


def _relative_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
@pytest.mark.parametrize("layer", [0, 1, 2])  # conv1-conv3: another conv + BN follows each
def test_scaling_a_layers_gates_changes_neither_the_logits_nor_the_importance_selection(layer, eps):
    teacher = make_teacher("mnist_cnn")
    gated = add_gates(copy.deepcopy(teacher)).train()  # BatchNorm on batch statistics, as during the search
    for m in gated.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps  # BatchNorm's eps is the only term that is not scale-free: 1e-12 isolates the rest
    exact = eps < 1e-9
    set_random_gates(gated, zero_fraction=0.0)
    plan = gate_plan(gated).measure(gated, (1, 28, 28))
    xs = [torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    name = list(plan.groups)[layer]
    before_logits = gated(xs[0]).detach()
    before = unit_importance(gated, _kd(teacher), xs)
    by_importance = select_units(gated, target_flops_ratio=0.3, scores=before).kept
    by_magnitude = select_units(gated, target_flops_ratio=0.3).kept
    running = {k: v.clone() for k, v in gated.state_dict().items() if "running" in k}
    for s in (0.3, 4.0):
        scaled = copy.deepcopy(gated)
        with torch.no_grad():
            gate_parameters(scaled)[name].mul_(s)
        # Equal up to BatchNorm's eps (added to a variance that scales by s^2).
        assert _relative_change(scaled(xs[0]).detach(), before_logits) < (1e-5 if exact else 3e-3)
        after = unit_importance(scaled, _kd(teacher), xs)
        for n in before:
            assert _relative_change(after[n], before[n]) < (1e-4 if exact else 3e-2), n
        if exact:  # with eps, near-ties of this random net can flip
            kept = select_units(scaled, target_flops_ratio=0.3, scores=after).kept
            assert all(torch.equal(kept[n], by_importance[n]) for n in kept)
        # The gate magnitudes the paper ranks by do move with s: their selection changes.
        moved = select_units(scaled, target_flops_ratio=0.3).kept
        assert any(not torch.equal(moved[n], by_magnitude[n]) for n in moved)
    # The check can fail: scaling the last conv's gates, read by the head with no BN between, moves the logits.
    head = copy.deepcopy(gated)
    with torch.no_grad():
        gate_parameters(head)[list(plan.groups)[3]].mul_(0.1)
    assert _relative_change(head(xs[0]).detach(), before_logits) > 0.1
    # unit_importance leaves the running statistics as it found them.
    assert all(torch.equal(gated.state_dict()[k], v) for k, v in running.items())


def test_importance_is_the_first_order_loss_change_per_flop_share():
    teacher = make_teacher("mnist_cnn")
    gated = add_gates(copy.deepcopy(teacher)).eval()
    set_random_gates(gated, zero_fraction=0.0)
    plan = gate_plan(gated).measure(gated, (1, 28, 28))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    scores = unit_importance(gated, _kd(teacher), [x])
    name, j = list(plan.groups)[2], 3
    gate = gate_parameters(gated)[name]
    loss = _kd(teacher)(gated, x)
    (grad,) = torch.autograd.grad(loss, [gate])
    cost = float(plan.unit_costs()[2])
    assert float(scores[name][j]) == pytest.approx(abs(float(gate[j].detach() * grad[j])) / cost, rel=1e-5)
    assert all(p.grad is None for p in gated.parameters())  # only torch.autograd.grad: no .grad touched
    with pytest.raises(ValueError, match="at least one batch"):
        unit_importance(gated, _kd(teacher), [])


def test_select_units_respects_min_and_max_counts_and_exact_counts():
    gated = add_gates(make_teacher("mnist_cnn"))
    set_random_gates(gated, zero_fraction=0.0)
    size = (1, 28, 28)
    names = list(gate_plan(gated).groups)
    lo, hi = dict.fromkeys(names, 3), dict.fromkeys(names, 5)
    sel = select_units(gated, target_flops_ratio=0.4, input_size=size, min_counts=lo, max_counts=hi)
    assert all(3 <= sel.kept[n].numel() <= 5 for n in names)
    assert sel.flops <= 0.4 * sel.teacher_flops
    exact = select_units(gated, counts=dict(zip(names, [1, 2, 3, 4])), input_size=size)
    assert [exact.kept[n].numel() for n in names] == [1, 2, 3, 4]
    # the kept channels are the highest-scoring ones
    scores = {n: torch.arange(g.numel(), dtype=torch.float64) for n, g in gate_parameters(gated).items()}
    top = select_units(gated, counts=dict.fromkeys(names, 2), scores=scores, input_size=size)
    assert all(top.kept[n].tolist() == [g.numel() - 2, g.numel() - 1] for n, g in gate_parameters(gated).items())
    with pytest.raises(ValueError, match="do not fit"):
        select_units(gated, target_flops_ratio=0.1, input_size=size, min_counts=dict.fromkeys(names, 8))
    with pytest.raises(ValueError, match="exactly one of"):
        select_units(gated, counts=lo, threshold=0.0)
