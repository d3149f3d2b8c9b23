"""GateSearchCallback inside the Trainer: the penalty's exact gradient, the lambda schedule, the report, resume, DDP."""

import copy
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import random_images, tiny_args

from hf_kdsearch import (
    DistillationTrainer,
    GateSearchCallback,
    add_gates,
    count_flops,
    extract_student,
    gate_parameters,
    save_student,
)
from hf_kdsearch.gates import gate_plan
from hf_kdsearch.hub import CARD_KEYS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (1, 8, 8)


def tiny_teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mnist_mlp", hidden_dims=[24, 16], img_size=8).eval()


def trainer_for(tmp_path, cb, *, teacher=None, gated=None, **overrides):
    teacher = teacher or tiny_teacher()
    gated = gated or add_gates(copy.deepcopy(teacher))
    args = tiny_args(tmp_path, **{"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 0.1, **overrides})
    return DistillationTrainer(
        model=gated, teacher_model=teacher, args=args, callbacks=[cb], train_dataset=random_images(64, SIZE)
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_step_moves_each_gate_by_lr_lambda_cost(tmp_path, accumulation):
    # The gated copy equals the teacher (no dropout, no BN), so the KD gradient is zero up to float rounding and the
    # only gradient on a gate is the penalty's, lambda * c_j: one plain SGD step must give g = 1 - lr * lambda * c_j,
    # also when the batch is split into accumulated micro-batches (the Trainer divides each by the number of splits).
    # gate_projection="none": the paper's plain L1 step (the default projection is tested below).
    cb = GateSearchCallback(
        target_flops_ratio=0.5, l1_weight=3.0, warmup_ratio=0.0, input_size=SIZE, gate_projection="none"
    )
    trainer = trainer_for(
        tmp_path,
        cb,
        alpha=1.0,
        max_steps=1,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        max_grad_norm=0.0,
    )
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "gate" not in n}
    trainer.train()
    gated = trainer.model
    costs = gate_plan(gated).unit_costs().float()
    for (name, gate), c in zip(gate_parameters(gated).items(), costs):
        torch.testing.assert_close(gate.detach(), torch.full_like(gate, 1 - 0.1 * 3.0 * float(c)), msg=name)
    for n, p in gated.named_parameters():
        if "gate" not in n:
            torch.testing.assert_close(p.detach(), weights[n], rtol=0, atol=1e-6, msg=n)
    log = trainer.state.log_history[0]
    assert log["gate_l1"] == pytest.approx(3.0)  # lambda * sum_j c_j |1| = lambda
    assert log["flops_ratio"] == pytest.approx(1.0)
    assert log["loss"] == pytest.approx(log["gate_l1"] + log["loss_kd"], abs=1e-4)


def test_expected_flops_penalty_moves_each_gate_by_its_marginal_flops(tmp_path):
    # penalty="expected_flops": the term is lambda * FLOPs(mean min(|g|, 1)) / FLOPs(teacher), so one SGD step moves
    # gate j of group G by lr * lambda * dFLOPs/dfrac_G / (size_G * FLOPs): the marginal cost of the channel with every
    # other group at its current width, which is not the fixed c_j of the L1 penalty.
    cb = GateSearchCallback(
        target_flops_ratio=0.5,
        l1_weight=3.0,
        warmup_ratio=0.0,
        input_size=SIZE,
        penalty="expected_flops",
        gate_projection="none",
    )
    trainer = trainer_for(tmp_path, cb, alpha=1.0, max_steps=1, per_device_train_batch_size=8, max_grad_norm=0.0)
    plan = gate_plan(trainer.model).measure(trainer.model, SIZE)
    fractions = torch.ones(len(plan.groups), dtype=torch.float64, requires_grad=True)
    (plan.flops_of(fractions) / plan.total_flops).backward()
    trainer.train()
    sizes = [g.size for g in plan.groups.values()]
    for (name, gate), d, size in zip(gate_parameters(trainer.model).items(), fractions.grad, sizes):
        expected = 1 - 0.1 * 3.0 * float(d) / size
        torch.testing.assert_close(gate.detach(), torch.full_like(gate, expected), msg=name)
    costs = gate_plan(trainer.model).unit_costs()
    assert not torch.allclose(fractions.grad / torch.tensor(sizes), costs)  # not the L1 penalty in disguise
    log = trainer.state.log_history[0]
    assert log["gate_l1"] == pytest.approx(3.0)  # lambda * expected FLOPs ratio 1 at the start
    with pytest.raises(ValueError, match="penalty must be one of"):
        GateSearchCallback(target_flops_ratio=0.5, penalty="l2")


def test_lambda_warms_up_then_grows_while_over_budget_and_shrinks_under_it(tmp_path):
    # Budget 5% is out of reach in 4 steps, so lambda grows after every step from the end of the warm-up.
    over = GateSearchCallback(target_flops_ratio=0.05, l1_weight=2.0, warmup_ratio=0.5, l1_growth=1.5, input_size=SIZE)
    trainer = trainer_for(tmp_path / "over", over)
    trainer.train()
    assert over.warmup_steps == 2
    logged = [h["gate_lambda"] for h in trainer.state.log_history if "gate_lambda" in h][:4]
    assert logged == pytest.approx([1.0, 2.0, 3.0, 4.5])  # 2*(1/2), 2*(2/2), then x1.5 after steps 2 and 3
    assert over.current_l1_weight == pytest.approx(6.75)
    ratios = [h["flops_ratio"] for h in trainer.state.log_history if "flops_ratio" in h][:4]
    assert ratios == [1.0] * 4  # no gate fell below keep_threshold in 4 steps: the selected student is the teacher

    # At budget 100% the expected FLOPs (1 at most) never exceed it: lambda falls after every step from step 2 on.
    under = GateSearchCallback(target_flops_ratio=1.0, l1_weight=2.0, warmup_ratio=0.5, l1_growth=1.5, input_size=SIZE)
    trainer_for(tmp_path / "under", under).train()
    assert under.current_l1_weight == pytest.approx(2.0 / 1.5**3)


def test_report_json_png_and_card_after_search(tmp_path):
    teacher = tiny_teacher()
    cb = GateSearchCallback(target_flops_ratio=0.3, l1_weight=5.0, input_size=SIZE, report_dir=str(tmp_path / "rep"))
    trainer = trainer_for(tmp_path, cb, teacher=teacher, max_steps=3)
    trainer.train()
    report = json.loads((tmp_path / "rep" / "search_report.json").read_text())
    assert report == json.loads(json.dumps(cb.report))
    t_flops = count_flops(teacher, SIZE)
    assert report["teacher"]["flops"] == t_flops and report["teacher"]["params"] == 24 * 65 + 16 * 25 + 10 * 17
    assert report["student"]["flops"] <= 0.3 * t_flops and report["flops_ratio"] <= 0.3
    assert [r["teacher"] for r in report["widths"]] == [24, 16]
    assert all(0 < r["student"] <= r["teacher"] for r in report["widths"])
    assert report["search"]["global_step"] == 3 and "final_l1_weight" in report["search"]
    # extract_student, ranking by the same scale-free importance, reproduces the student the report describes.
    assert report["search"]["ranking"] == "unit_importance" and set(cb.scores) == set(gate_parameters(trainer.model))
    student = extract_student(trainer.model, target_flops_ratio=0.3, input_size=SIZE, scores=cb.scores)
    assert student.model_args == report["student"]["model_args"]
    assert [r["student"] for r in report["widths"]] == student.model_args["hidden_dims"]
    # Every candidate is listed with its widths and FLOPs, uniform first, all within the budget; none scored yet.
    cands = report["candidates"]
    assert cands[0]["name"] == "uniform" and {"found", "box"} <= {n for c in cands for n in [c["name"], *c["also"]]}
    assert all(c["flops"] <= 0.3 * t_flops and c["val_score"] is None for c in cands) and report["chosen"] is None
    assert cands[0]["widths"][0] / 24 == pytest.approx(cands[0]["widths"][1] / 16, abs=0.1)  # one factor
    # choose(): scores them (here by a fake score that prefers the widest first layer), keeps the best, rewrites.
    chosen = cb.choose(lambda c: -c.width_list[0], log=None)
    assert chosen.width_list[0] == max(c["widths"][0] for c in cands)
    on_disk = json.loads((tmp_path / "rep" / "search_report.json").read_text())
    assert on_disk["chosen"] == chosen.name and all(c["val_score"] is not None for c in on_disk["candidates"])
    assert chosen.student(trainer.model).model_args["hidden_dims"] == chosen.width_list

    from matplotlib.image import imread

    png = tmp_path / "rep" / "search_widths.png"
    assert cb.report_files == [str(tmp_path / "rep" / "search_report.json"), str(png)]
    image = imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    card = cb.card(teacher="mnist_mlp 24-16")
    assert set(card) <= set(CARD_KEYS)
    assert card["widths"] == {r["layer"]: [r["teacher"], r["student"]] for r in report["widths"]}
    folder = save_student(student, tmp_path / "student", card=card, files=cb.report_files)
    readme = (folder / "README.md").read_text()
    assert "search_widths.png" in readme and "mnist_mlp 24-16" in readme


@pytest.mark.parametrize("trainer_restores", [False, True])
def test_resume_mid_search_restores_gates_and_lambda(tmp_path, trainer_restores):
    # Either way lambda comes back: from trainer_state.json by the callback itself, or (restore_callback_states_...)
    # by the Trainer, which then replaces the callback with one rebuilt from the stored state.
    def run(out, resume=None):
        cb = GateSearchCallback(
            target_flops_ratio=0.05, l1_weight=1.0, warmup_ratio=0.0, l1_growth=1.2, input_size=SIZE
        )
        trainer = trainer_for(
            out, cb, max_steps=8, save_strategy="steps", save_steps=4, logging_steps=4,
            restore_callback_states_from_checkpoint=trainer_restores,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        used = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GateSearchCallback))
        # The object the user holds sees what the callback in use saw, even when the Trainer swapped it for a copy.
        assert cb.report is not None and cb.report == used.report and cb.report_files == used.report_files
        assert cb.current_l1_weight == used.current_l1_weight and cb.warmup_steps == used.warmup_steps
        return gate_parameters(trainer.model), cb

    full_gates, full_cb = run(tmp_path / "full")
    state = json.loads((tmp_path / "full" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["GateSearchCallback"]["attributes"]["current_l1_weight"] == pytest.approx(1.2**4)
    resumed_gates, resumed_cb = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert resumed_cb.current_l1_weight == pytest.approx(full_cb.current_l1_weight) == pytest.approx(1.2**8)
    assert resumed_cb.report["search"]["global_step"] == 8
    assert resumed_cb.report_files == [
        str(tmp_path / "resumed" / "search_report.json"),
        str(tmp_path / "resumed" / "search_widths.png"),
    ]
    for name in full_gates:
        torch.testing.assert_close(resumed_gates[name], full_gates[name], msg=name)
        assert not torch.equal(full_gates[name], torch.ones_like(full_gates[name]))


def test_unwritable_report_dir_fails_before_the_first_step(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    cb = GateSearchCallback(target_flops_ratio=0.5, input_size=SIZE, report_dir=str(tmp_path / "a_file" / "report"))
    trainer = trainer_for(tmp_path, cb)
    with pytest.raises(PermissionError, match=r"cannot write its report to .*a_file/report.*writable report_dir"):
        trainer.train()
    assert trainer.state.global_step == 0  # not after the whole search
    # write_report=False needs no folder.
    trainer_for(tmp_path, GateSearchCallback(target_flops_ratio=0.5, input_size=SIZE, report_dir=cb.report_dir,
                                             write_report=False)).train()  # fmt: skip


def test_callback_rejects_bad_settings_and_ungated_models(tmp_path):
    with pytest.raises(ValueError, match="0.0"):
        GateSearchCallback(target_flops_ratio=0.0)
    with pytest.raises(ValueError, match="-1"):
        GateSearchCallback(target_flops_ratio=0.5, l1_weight=-1)
    with pytest.raises(ValueError, match="0.5"):
        GateSearchCallback(target_flops_ratio=0.5, l1_growth=0.5)
    teacher = tiny_teacher()
    cb = GateSearchCallback(target_flops_ratio=0.5, input_size=SIZE)
    with pytest.raises(ValueError, match="add_gates"):
        trainer_for(tmp_path, cb, teacher=teacher, gated=copy.deepcopy(teacher)).train()
    # The smallest student keeps one channel per layer, 3.6% of this teacher: a 1% budget fails before training.
    cb = GateSearchCallback(target_flops_ratio=0.01, input_size=SIZE)
    trainer = trainer_for(tmp_path, cb, teacher=teacher)
    with pytest.raises(ValueError, match="0.0361"):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.multiprocess
def test_gates_stay_identical_across_two_ddp_ranks(tmp_path):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        os.path.join(ROOT, "tests", "scripts", "ddp_gates.py"), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["wrapped"] == "DistributedDataParallel"
    assert ranks[0]["gates"].keys() == ranks[1]["gates"].keys()
    for name, gate in ranks[0]["gates"].items():
        assert torch.equal(gate, ranks[1]["gates"][name]), name
        assert not torch.equal(gate, torch.ones_like(gate)), name  # the gates did move
    assert ranks[0]["lambda"] == ranks[1]["lambda"] > 1.0
    # Each rank saw its own shard, yet both log the same rank-averaged numbers.
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    assert ranks[0]["log"] == ranks[1]["log"]
    steps = [h for h in ranks[0]["log"] if "loss" in h]
    assert len(steps) == 2 and all(h["gate_l1"] > 0 and 0 < h["flops_ratio"] <= 1 for h in steps)
    assert (tmp_path / "search_report.json").exists()


@pytest.mark.slow
def test_mnist_search_recipe_end_to_end(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import mnist_search

    summary = mnist_search.main(
        ["--seeds", "0", "--runs", "inherited", "--teacher_epochs", "0.5", "--search_epochs", "0.5",
         "--student_epochs", "0.5", "--output_dir", str(tmp_path)]
    )  # fmt: skip
    rows = summary["rows"]
    assert [(r["run"], r["student"]) for r in rows] == [("inherited", "searched"), ("inherited", "uniform")]
    budget = 0.25 * summary["teacher"]["flops"]
    assert all(r["flops"] <= budget for r in rows) and all(0 < r["errors"] < 2000 for r in rows)
    folder = tmp_path / "searched-student-0"
    assert {"search_widths.png", "search_report.json", "README.md"} <= {p.name for p in folder.iterdir()}
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert reloaded.model_args["hidden_dims"] == rows[0]["widths"]


# ---- the budget the controller sees, collapse, and the width candidates ---------------------------------------------
CNN_SIZE = (1, 12, 12)


def cnn_search(tmp_path, steps: int, **settings):
    torch.manual_seed(0)
    teacher = timm.create_model("mnist_cnn", widths=[8, 8, 16, 16]).eval()
    gated = add_gates(copy.deepcopy(teacher))
    for name, p in gated.named_parameters():
        p.requires_grad_("gate" in name)  # frozen weights, as the evidence recipe searches
    cb = GateSearchCallback(input_size=CNN_SIZE, write_report=False, **{"l1_weight": 5.0, "l1_growth": 1.1, **settings})
    args = tiny_args(tmp_path, max_steps=steps, per_device_train_batch_size=16, learning_rate=0.1, logging_steps=10)
    trainer = DistillationTrainer(
        model=gated, teacher_model=teacher, args=args, callbacks=[cb], train_dataset=random_images(256, CNN_SIZE)
    )
    trainer.train()
    return trainer, cb, teacher


def test_controller_reads_the_flops_of_the_student_the_selection_cuts_out(tmp_path):
    trainer, cb, teacher = cnn_search(tmp_path, 60, target_flops_ratio=0.3)
    gated = trainer.model
    ratio = float(cb.selected_flops_ratio())
    student = extract_student(gated, threshold=cb.keep_threshold, input_size=CNN_SIZE)
    assert count_flops(student, CNN_SIZE) / count_flops(teacher, CNN_SIZE) == pytest.approx(
        ratio, rel=1e-6
    )  # float32 on the device
    assert ratio < 0.6  # something was cut: the reading is not the teacher's
    # The soft estimate min(|g|, 1) the controller used to read is not that number.
    assert abs(float(cb.expected_flops_ratio()) - ratio) > 0.01
    assert cb.report["search"]["selected_flops_ratio"] == pytest.approx(ratio)


@pytest.mark.parametrize("projection", ["max", "clamp"])
def test_a_long_search_keeps_every_layer_alive_with_the_max_projection(tmp_path, projection):
    # 300 steps with lambda growing 10% a step towards an unreachable 5% budget: the penalty pushes every gate down.
    trainer, cb, _ = cnn_search(tmp_path, 300, target_flops_ratio=0.05, gate_projection=projection)
    gates = gate_parameters(trainer.model)
    assert all(0 <= float(g.detach().min()) and float(g.detach().max()) <= 1 for g in gates.values())
    alive = [int((g.detach() > cb.keep_threshold).sum()) for g in gates.values()]
    if projection == "max":
        assert all(float(g.detach().max()) == 1.0 for g in gates.values()) and min(alive) >= 1
    else:  # clamping alone lets a layer die: zero gates get no gradient through the ReLU
        assert min(alive) == 0


def gated_cnn():
    torch.manual_seed(0)
    gated = add_gates(timm.create_model("mnist_cnn", widths=[16, 16, 32, 32]))
    gate_plan(gated).measure(gated, (1, 28, 28))
    return gated


def lopsided_scores(plan):
    """Scores that love the last layers, as the magnitude ranking did: the found student starves the first ones."""
    g = torch.Generator().manual_seed(0)
    bonus = [0.0, 0.0, 5.0, 10.0]
    return {n: torch.rand(grp.size, generator=g) + b for (n, grp), b in zip(plan.groups.items(), bonus)}


def test_width_candidates_uniform_found_and_box_all_fit_the_budget():
    from hf_kdsearch.candidates import uniform_counts, width_candidates

    gated = gated_cnn()
    plan = gate_plan(gated)
    scores = lopsided_scores(plan)
    with pytest.warns(UserWarning, match="below half its uniformly thinned width"):
        cands = width_candidates(gated, 0.25, scores)
    by_name = {c.name: c for c in cands}
    assert list(by_name) == ["uniform", "found", "box"]
    uniform = uniform_counts(plan, 0.25)
    assert by_name["uniform"].width_list == list(uniform.values()) == [8, 8, 15, 15]  # one factor, 0.48
    budget = 0.25 * plan.total_flops
    for c in cands:
        assert c.flops <= budget and c.flops == count_flops(c.student(gated), (1, 28, 28))
    assert by_name["found"].width_list[3] == 32 and by_name["found"].narrow_layers
    for w, u in zip(by_name["box"].width_list, uniform.values()):
        assert 0.75 * u <= w <= 1.5 * u
    assert not by_name["box"].narrow_layers and not by_name["uniform"].narrow_layers
    # A wider uniform factor would not fit.
    wider = {n: max(1, round(0.501 * g.size)) for n, g in plan.groups.items()}
    from hf_kdsearch.candidates import _counts_flops

    assert _counts_flops(plan, wider) > budget or wider == uniform


def test_pick_candidate_never_loses_to_uniform_and_max_runs_bounds_the_cost():
    from hf_kdsearch.candidates import pick_candidate, score_candidates, width_candidates

    gated = gated_cnn()
    cands = width_candidates(gated, 0.25, lopsided_scores(gate_plan(gated)), warn=False)
    assert len(cands) == 3
    val = {"uniform": 40, "found": 40, "box": 38}
    calls = []

    def run(c):
        calls.append(c.name)
        return val[c.name]

    logged = []
    score_candidates(cands, run, max_runs=2, log=logged.append)
    assert calls == [c.name for c in cands[:2]] and cands[0].name == "uniform"  # uniform first, then at most 2
    assert "not scored" in logged[-2] and "2 of 3" in logged[-1]
    assert pick_candidate(cands).name == "uniform"  # a tie goes to uniform; box was never run
    score_candidates(cands, run, log=None)
    assert pick_candidate(cands).name == "box"
    val["box"] = 45
    score_candidates(cands, run, log=None)
    assert pick_candidate(cands).name == "uniform"
    with pytest.raises(ValueError, match="max_runs"):
        score_candidates(cands, run, max_runs=0)
