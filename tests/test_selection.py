"""UNIX selection and mixup: the pure functions against the paper's formulas, and the callback inside the trainer."""

import copy
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import random_images, tiny_args

from hf_kdsearch import (
    DistillationCallback,
    DistillationTrainer,
    UncertaintyMixupCallback,
    apply_selection,
    count_flops,
    kd_loss,
    mixed_cross_entropy,
    num_selected,
    rank_mixup_mask,
    select_uncertain,
    uncertainty_scores,
    unix_cost_ratio,
)
from hf_kdsearch.data import TensorImageDataset, collate_tensor_batch


# ---- pure functions ------------------------------------------------------------------------------------------------
def test_mask_equals_methods_formula_at_paper_setting():
    lam = 0.37
    got = rank_mixup_mask(64, lam, boundary=0.5, slope=10.0)
    # The UNIX mask (docs/methods.md), written out with b = 32, w = 10, N = 64.
    want = [lam / (1 + math.exp(-10 * (r / 64 - (2 * 32 - 1) / (2 * 64)))) for r in range(64)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    assert got[0] < 0.01 * lam and got[-1] > 0.99 * lam  # uncertain samples stay clean, confident ones mix
    assert bool((got[1:] > got[:-1]).all())


@pytest.mark.parametrize("n", [12, 128])
def test_mask_scales_boundary_with_batch_size(n):
    got = rank_mixup_mask(n, 1.0, boundary=0.25, slope=7.0)
    b = 0.25 * n
    want = [1 / (1 + math.exp(-7 * (r / n - (2 * b - 1) / (2 * n)))) for r in range(n)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=1e-7)
    # The midpoint sits half a rank before rank b whatever N is.
    assert got[int(b) - 1] < 0.5 < got[int(b)]
    torch.testing.assert_close(rank_mixup_mask(n, 0.8, slope=0.0), torch.full((n,), 0.4))


@pytest.mark.parametrize(
    "kwargs, match",
    [({"lam": 1.5}, "lam"), ({"boundary": -0.1}, "mix_boundary"), ({"slope": float("inf")}, "mix_slope")],
)
def test_mask_rejects_bad_values(kwargs, match):
    args = {"lam": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        rank_mixup_mask(8, args.pop("lam"), **args)


def test_uncertainty_measures_on_hand_made_logits():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.3, 0.2]])
    logits = probs.clamp_min(1e-30).log() + 3.0  # any shift gives the same softmax
    entropy = uncertainty_scores(logits, "entropy")
    h3 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    torch.testing.assert_close(entropy, torch.tensor([0.0, math.log(3), h3]))
    torch.testing.assert_close(uncertainty_scores(logits, "least_confidence"), torch.tensor([0.0, 2 / 3, 0.5]))
    torch.testing.assert_close(uncertainty_scores(logits, "margin"), torch.tensor([-1.0, 0.0, -0.2]))
    for measure in ("entropy", "least_confidence", "margin"):  # uniform is the most uncertain, one-hot the least
        assert uncertainty_scores(logits, measure).argsort().tolist() == [0, 2, 1]
    # A saturated softmax has entropy 0, not 0 * log 0 = nan; bf16 logits are scored in float32.
    assert uncertainty_scores(torch.tensor([[1e4, 0.0]]), "entropy").item() == 0.0
    assert uncertainty_scores(logits.bfloat16(), "entropy").dtype == torch.float32


def test_random_measure_is_seeded_noise():
    logits = torch.zeros(1000, 5)
    a = uncertainty_scores(logits, "random", generator=torch.Generator().manual_seed(1))
    b = uncertainty_scores(logits, "random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1000,)
    assert 0.0 <= a.min() and a.max() < 1.0 and abs(a.mean().item() - 0.5) < 0.05


def test_uncertainty_rejects_bad_input():
    with pytest.raises(ValueError, match="'variance'"):
        uncertainty_scores(torch.zeros(2, 3), "variance")
    with pytest.raises(ValueError, match=r"\(2, 3, 4\)"):
        uncertainty_scores(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="at least 2 classes"):
        uncertainty_scores(torch.zeros(2, 1), "margin")


def test_cost_ratio_reproduces_reference_table():
    # (F_t / F_s, UNIX computation) from the UNIX reference README, to the 2 decimals of a percent it prints.
    # Its F_t / F_s are rounded to 2 decimals, so the computation agrees to 0.02 percentage points.
    table = [(38.17, 77.49), (174.0, 75.57), (13.56, 81.43), (27.16, 78.43), (23.49, 78.92), (8.22, 84.79)]
    table += [(3.25, 94.06), (3.93, 91.88), (3.06, 94.76), (6.12, 87.32), (2.97, 95.10), (4.14, 91.29)]
    for flops_ratio, percent in table:
        assert 100 * unix_cost_ratio(0.75, flops_ratio) == pytest.approx(percent, abs=0.025)
    assert unix_cost_ratio(0.75, None) == 0.75  # the random measure runs no scoring pass
    with pytest.raises(ValueError, match="-2"):
        unix_cost_ratio(0.75, -2.0)


def test_num_selected():
    assert num_selected(64, 0.75) == 48 and num_selected(12, 0.75) == 9 and num_selected(3, 0.01) == 1


def test_select_uncertain_keeps_top_k_in_batch_order_with_rank_weights():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.9])  # ranks: 1, 5, 3, 2, 4, 0 -> order 1, 5, 3, 2, 4, 0
    partner = torch.tensor([5, 4, 3, 2, 1, 0])
    sel = select_uncertain(scores, 4, lam=0.6, partner=partner, boundary=0.5, slope=10.0)
    assert sel.index.tolist() == [1, 2, 3, 5]  # ties keep batch order: sample 1 before sample 5
    assert sel.rank.tolist() == [0, 3, 2, 1]
    assert sel.partner.tolist() == [4, 3, 2, 0]
    torch.testing.assert_close(sel.weight, rank_mixup_mask(6, 0.6)[sel.rank])
    plain = select_uncertain(scores, 6)
    assert plain.index.tolist() == list(range(6)) and plain.weight is None and plain.partner is None
    with pytest.raises(ValueError, match="got 7"):
        select_uncertain(scores, 7)
    with pytest.raises(ValueError, match="partner"):
        select_uncertain(scores, 3, lam=0.5)


def test_apply_selection_mixes_inputs_and_labels():
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.randn(6, 2, 3, 3, generator=g), "labels": torch.arange(6) + 10, "flag": "keep"}
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8])
    sel = select_uncertain(scores, 3, lam=0.9, partner=torch.tensor([3, 0, 5, 4, 2, 1]))
    out = apply_selection(batch, sel)
    assert sel.index.tolist() == [1, 3, 5] and sel.partner.tolist() == [0, 4, 1]
    m = sel.weight.view(-1, 1, 1, 1)
    want = (1 - m) * batch["pixel_values"][[1, 3, 5]] + m * batch["pixel_values"][[0, 4, 1]]
    torch.testing.assert_close(out["pixel_values"], want)
    assert out["labels"].tolist() == [11, 13, 15] and out["mix_labels"].tolist() == [10, 14, 11]
    assert out["mix_weights"] is sel.weight and out["flag"] == "keep"
    assert torch.equal(apply_selection(batch, select_uncertain(scores, 6))["pixel_values"], batch["pixel_values"])
    with pytest.raises(ValueError, match="already mixed"):
        apply_selection({**batch, "mix_labels": batch["labels"], "mix_weights": torch.zeros(6)}, sel)
    with pytest.raises(TypeError, match="uint8"):
        apply_selection({**batch, "pixel_values": batch["pixel_values"].to(torch.uint8)}, sel)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"select_ratio": 0.0}, "select_ratio"),
        ({"select_ratio": 1.5}, "1.5"),
        ({"uncertainty": "confidence"}, "'confidence'"),
        ({"mixup_alpha": 0}, "mixup_alpha"),
        ({"teacher_flops_ratio": -1.0}, "-1.0"),
        ({"mix_boundary": 2}, "mix_boundary"),
    ],
)
def test_callback_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UncertaintyMixupCallback(**kwargs)


# ---- the callback in the trainer -----------------------------------------------------------------------------------
def _args(tmp_path, **overrides):
    settings = dict(per_device_train_batch_size=12, learning_rate=0.1, max_grad_norm=0.0, temperature=4.0, alpha=0.5)
    return tiny_args(tmp_path, **{**settings, **overrides})


def _cnn(seed, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("mnist_cnn", widths=kwargs.pop("widths", (4, 8)), pool_every=1, **kwargs)


def _mnist_like(n, seed=0):
    return random_images(n, shape=(1, 28, 28), seed=seed)


def _trainer(tmp_path, student, teacher, callbacks, dataset, **overrides):
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_args(tmp_path, **overrides),
        callbacks=callbacks,
        train_dataset=dataset,
        data_collator=collate_tensor_batch,
    )


def test_full_selection_without_mixup_is_plain_kd(tmp_path):
    """select_ratio=1, mixup=False: same parameters as plain KD, with batch norm and dropout in the student."""
    data, teacher = _mnist_like(48), _cnn(1, widths=(8, 8))
    init = _cnn(0, drop_rate=0.3)
    finals = {}
    for name, callbacks in [
        ("kd", []),
        ("full", [UncertaintyMixupCallback(select_ratio=1.0, mixup=False)]),
        ("unix", [UncertaintyMixupCallback(select_ratio=0.5, mixup=True)]),
    ]:
        student = copy.deepcopy(init)
        _trainer(tmp_path / name, student, teacher, callbacks, data, max_steps=4).train()
        finals[name] = student.state_dict()
    for key, value in finals["kd"].items():
        torch.testing.assert_close(finals["full"][key], value, msg=key)
    # The comparison can tell runs apart: training moved the weights, and real selection moves them elsewhere.
    assert not torch.allclose(finals["kd"]["fc.weight"], init.fc.weight)
    assert not torch.allclose(finals["unix"]["fc.weight"], finals["kd"]["fc.weight"])


def test_teacher_sees_only_k_samples_and_cost_is_logged(tmp_path):
    data, teacher, student = _mnist_like(32), _cnn(1, widths=(8, 8)), _cnn(0)
    teacher_sizes, student_calls = [], []
    teacher.register_forward_hook(lambda m, a, out: teacher_sizes.append(out.shape[0]))
    student.register_forward_hook(lambda m, a, out: student_calls.append((out.shape[0], torch.is_grad_enabled())))
    cb = UncertaintyMixupCallback(select_ratio=0.75, uncertainty="margin", mixup=True)
    trainer = _trainer(tmp_path, student, teacher, [cb], data, num_train_epochs=1, max_steps=-1)
    trainer.train()

    # Batches of 12, 12 and 8 (the last one short): the teacher ran on round(0.75 N) of each.
    # Its first call, on 1 sample, is count_flops measuring it for the cost estimate.
    assert teacher_sizes == [1, 9, 9, 6]
    assert (trainer.samples_seen, trainer.teacher_samples) == (32, 24)
    # The student scored every full batch without gradients, then trained on the k kept samples.
    assert student_calls == [(1, False), (12, False), (9, True), (12, False), (9, True), (8, False), (6, True)]

    flops_ratio = count_flops(teacher, (1, 28, 28)) / count_flops(student, (1, 28, 28))
    assert cb.teacher_flops_ratio == pytest.approx(flops_ratio)
    assert cb.totals == {
        "samples_seen": 32,
        "teacher_samples": 24,
        "teacher_forwards": 3,
        "scored_samples": 32,
        "teacher_fraction": 0.75,
        "cost_ratio": pytest.approx(0.75 + 1 / (flops_ratio + 2)),
        "teacher_flops_ratio": pytest.approx(flops_ratio),
    }
    logs = [h for h in trainer.state.log_history if "teacher_samples_total" in h]
    assert [h["teacher_samples_total"] for h in logs] == [9, 18, 24]
    assert [h["samples_seen_total"] for h in logs] == [12, 24, 32]
    assert [h["teacher_forwards_total"] for h in logs] == [1, 2, 3]
    assert logs[-1]["teacher_fraction"] == 0.75
    assert logs[-1]["cost_ratio"] == pytest.approx(0.75 + 1 / (flops_ratio + 2), abs=1e-6)
    assert all(h["uncertainty"] < 0 for h in logs)  # margin scores are minus a gap


def test_random_measure_skips_the_scoring_pass(tmp_path):
    data, teacher, student = _mnist_like(24), _cnn(1, widths=(8, 8)), _cnn(0)
    student_sizes = []
    student.register_forward_hook(lambda m, a, out: student_sizes.append(out.shape[0]))
    cb = UncertaintyMixupCallback(select_ratio=0.5, uncertainty="random")
    _trainer(tmp_path, student, teacher, [cb], data, max_steps=2).train()
    assert student_sizes == [6, 6]
    assert cb.totals["cost_ratio"] == 0.5 and cb.totals["teacher_samples"] == 12


def test_scoring_leaves_batch_norm_statistics_and_modes_alone(tmp_path):
    student, teacher = _cnn(0), _cnn(1, widths=(8, 8))
    cb = UncertaintyMixupCallback(select_ratio=0.5, mixup=True, teacher_flops_ratio=3.0)
    trainer = _trainer(tmp_path, student, teacher, [cb], _mnist_like(12))
    student.train()
    student.features[1].eval()  # a BN layer the user froze stays frozen (features: conv BN ReLU pool conv BN ReLU)
    modes = {name: m.training for name, m in student.named_modules()}
    buffers = {name: b.clone() for name, b in student.named_buffers()}
    assert any("running_mean" in name for name in buffers)

    batch = collate_tensor_batch([_mnist_like(12, seed=3)[i] for i in range(12)])
    out = cb.on_distill_batch(trainer, student, batch)

    assert {name: m.training for name, m in student.named_modules()} == modes
    for name, b in student.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert out["pixel_values"].shape == (6, 1, 28, 28) and out["mix_weights"].shape == (6,)
    # The control: a train-mode forward does move the statistics this test watches.
    student(batch["pixel_values"])
    assert not torch.equal(student.features[5].running_mean, buffers["features.5.running_mean"])


class _Spy(DistillationCallback):
    """Records what the model and the teacher are asked after the UNIX callback (put it after UNIX in the list)."""

    def __init__(self):
        self.batches, self.student_logits = [], []

    def on_distill_batch(self, trainer, model, inputs):
        self.batches.append({k: v.clone() for k, v in inputs.items()})

    def on_distill_loss(self, trainer, model, inputs, student_logits, teacher_logits):
        self.student_logits.append(student_logits.detach().clone())


def test_selected_samples_and_mixed_labels_reach_the_cross_entropy(tmp_path):
    """Samples are one-hot images, so every mixed input decodes into (sample, partner, m)."""
    n = 16
    images = torch.eye(784)[:n].view(n, 1, 28, 28)
    labels = torch.arange(n) % 10
    torch.manual_seed(0)
    student = timm.create_model("mnist_mlp", hidden_dims=[16])
    teacher = timm.create_model("mnist_mlp", hidden_dims=[32])
    unix, spy = UncertaintyMixupCallback(select_ratio=0.5, mixup=True, teacher_flops_ratio=2.0), _Spy()
    dataset = TensorImageDataset(images, labels)
    trainer = _trainer(tmp_path, student, teacher, [unix, spy], dataset, max_steps=1, per_device_train_batch_size=n)
    with torch.no_grad():
        scores = uncertainty_scores(student(images), "entropy")
    trainer.train()

    (batch,) = spy.batches
    flat = batch["pixel_values"].view(8, 784)
    sample_ids = []
    for row, m, mix_label, label in zip(flat, batch["mix_weights"].tolist(), batch["mix_labels"], batch["labels"]):
        nonzero = row.nonzero().flatten().tolist()
        if len(nonzero) == 1:  # paired with itself
            own = partner = nonzero[0]
        else:  # (1 - m) on the sample itself, m on its partner
            a, b = nonzero
            own, partner = (a, b) if abs(row[a] - (1 - m)) < abs(row[b] - (1 - m)) else (b, a)
            assert row[own].item() == pytest.approx(1 - m, abs=1e-6)
            assert row[partner].item() == pytest.approx(m, abs=1e-6)
        assert label.item() == labels[own].item() and mix_label.item() == labels[partner].item()
        sample_ids.append(own)
    # The kept samples are the 8 the student was most uncertain about, and their weights follow their ranks.
    order = torch.argsort(scores, descending=True, stable=True)
    assert sorted(sample_ids) == sorted(order[:8].tolist())
    ranks = [order.tolist().index(i) for i in sample_ids]
    lam = batch["mix_weights"][0].item() / rank_mixup_mask(16, 1.0)[ranks[0]].item()
    torch.testing.assert_close(batch["mix_weights"], rank_mixup_mask(16, lam)[ranks])
    assert batch["mix_weights"].max() > 0.05 and bool((batch["mix_labels"] != batch["labels"]).any())

    # The trainer's CE term is the mixed one: (1 - alpha) * ((1 - m) CE(y) + m CE(y_partner)).
    (logits,) = spy.student_logits
    expected = 0.5 * mixed_cross_entropy(logits, batch["labels"], batch["mix_labels"], batch["mix_weights"])
    plain = 0.5 * F.cross_entropy(logits, batch["labels"])
    ce_log = next(h for h in trainer.state.log_history if "loss_ce" in h)["loss_ce"]
    assert ce_log == pytest.approx(expected.item(), abs=1e-5)
    assert abs(ce_log - plain.item()) > 1e-3


def test_gradient_accumulation_selects_per_micro_batch(tmp_path):
    """One step of 2 micro-batches of 8 equals the hand-computed update: per micro-batch top-4 KD, averaged."""
    torch.manual_seed(0)
    student = timm.create_model("mnist_mlp", hidden_dims=[16])
    teacher = timm.create_model("mnist_mlp", hidden_dims=[32])
    init = copy.deepcopy(student)
    before, recorder = _Spy(), _Spy()  # before and after the selection
    unix = UncertaintyMixupCallback(select_ratio=0.5, mixup=False, teacher_flops_ratio=2.0)
    trainer = _trainer(
        tmp_path,
        student,
        teacher,
        [before, unix, recorder],
        _mnist_like(16),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=1,
        alpha=1.0,
        learning_rate=0.5,
    )
    trainer.train()
    assert len(before.batches) == 2 and [len(b["labels"]) for b in recorder.batches] == [4, 4]
    assert (trainer.samples_seen, trainer.teacher_samples, unix.totals["teacher_forwards"]) == (16, 8, 2)

    losses = []
    for micro in before.batches:
        x = micro["pixel_values"]
        with torch.no_grad():
            keep = torch.argsort(uncertainty_scores(init(x)), descending=True, stable=True)[:4]
            t = teacher(x[keep])
        losses.append(kd_loss(init(x[keep]), teacher_logits=t, temperature=4.0))
    (sum(losses) / 2).backward()
    with torch.no_grad():
        for p in init.parameters():
            p -= 0.5 * p.grad
    for (name, want), got in zip(init.named_parameters(), student.parameters()):
        torch.testing.assert_close(got, want, msg=name)


# ---- 2-process DDP -------------------------------------------------------------------------------------------------
_DDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, timm
    from hf_kdsearch import DistillationArguments, DistillationCallback, DistillationTrainer, UncertaintyMixupCallback
    from hf_kdsearch.data import TensorImageDataset, collate_tensor_batch

    class Ids(DistillationCallback):  # pixel [0, 0, 0] carries each sample's id
        def __init__(self):
            self.ids = []
        def on_distill_batch(self, trainer, model, inputs):
            self.ids.append(inputs["pixel_values"][:, 0, 0, 0].long().tolist())

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    x[:, 0, 0, 0] = torch.arange(64).float()
    data = TensorImageDataset(x, torch.randint(0, 10, (64,), generator=g))
    torch.manual_seed(0)
    student = timm.create_model("mnist_mlp", hidden_dims=[16])
    teacher = timm.create_model("mnist_mlp", hidden_dims=[32])
    teacher_sizes = []
    teacher.register_forward_hook(lambda m, a, out: teacher_sizes.append(out.shape[0]))
    ids_in, ids_out = Ids(), Ids()  # the batch before and after the selection
    unix = UncertaintyMixupCallback(select_ratio=0.5, mixup=False, teacher_flops_ratio=2.0)
    args = DistillationArguments(
        output_dir=sys.argv[1], per_device_train_batch_size=8, max_steps=3, use_cpu=True, report_to="none",
        save_strategy="no", disable_tqdm=True, logging_steps=1, optim="sgd", learning_rate=0.1, alpha=0.5,
        ddp_backend="gloo", check_teacher_accuracy=False)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, callbacks=[ids_in, unix, ids_out],
                                  train_dataset=data, data_collator=collate_tensor_batch)
    trainer.train()
    rank = trainer.args.process_index
    result = {"world": trainer.accelerator.num_processes, "seen": ids_in.ids, "kept": ids_out.ids,
              "teacher_sizes": teacher_sizes, "totals": unix.totals,
              "params": [p.detach().double().sum().item() for p in student.parameters()],
              "logs": [h for h in trainer.state.log_history if "teacher_samples_total" in h]}
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.multiprocess
def test_ddp_two_processes_each_rank_selects_from_its_own_shard(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*cmd, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    assert r0["world"] == r1["world"] == 2
    for r in (r0, r1):
        assert [len(b) for b in r["seen"]] == [8, 8, 8] and [len(b) for b in r["kept"]] == [4, 4, 4]
        assert r["teacher_sizes"] == [4, 4, 4]  # each rank's teacher ran on its own 4 of 8
        for full, kept in zip(r["seen"], r["kept"]):
            assert set(kept) <= set(full)  # selected from the rank's own shard
        # Totals are summed over ranks: 2 ranks x 3 steps x 8 samples, half of them to the teacher.
        assert r["totals"]["samples_seen"] == 48 and r["totals"]["teacher_samples"] == 24
        assert r["totals"]["teacher_forwards"] == 6 and r["totals"]["teacher_fraction"] == 0.5
    for b0, b1 in zip(r0["seen"], r1["seen"]):
        assert not set(b0) & set(b1)  # the shards are disjoint
    assert r0["params"] == pytest.approx(r1["params"], rel=1e-6)  # DDP kept the students in sync
    assert [h["teacher_samples_total"] for h in r0["logs"]] == [8, 16, 24]


# ---- resume and free scoring -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["pass", "free"])
def test_resume_from_a_checkpoint_is_the_same_run(tmp_path, scoring):
    """Train 8 steps (2 epochs) against train 6, checkpoint, resume to 8: the same weights and the same totals."""
    data, teacher, init = _mnist_like(48), _cnn(1, widths=(8, 8)), _cnn(0, drop_rate=0.3)

    def run(out, resume=None):
        student, cb = copy.deepcopy(init), UncertaintyMixupCallback(select_ratio=0.5, mixup=True, scoring=scoring)
        trainer = _trainer(out, student, teacher, [cb], data, max_steps=8, save_strategy="steps", save_steps=6)
        trainer.train(resume_from_checkpoint=resume)
        return student.state_dict(), cb.totals, trainer

    full, full_totals, _ = run(tmp_path / "full")
    resumed, resumed_totals, trainer = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-6"))
    assert trainer.samples_seen == 24  # the resumed trainer itself ran only the last 2 steps ...
    assert resumed_totals == full_totals  # ... but the totals count the whole run
    assert full_totals["samples_seen"] == 96 and full_totals["teacher_samples"] == 48
    for key, value in full.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(full["fc.weight"], init.state_dict()["fc.weight"])


def test_free_scoring_runs_the_scoring_pass_in_the_first_epoch_only(tmp_path):
    data, teacher, student = _mnist_like(24), _cnn(1, widths=(8, 8)), _cnn(0)
    calls = []
    student.register_forward_hook(lambda m, a, out: calls.append((out.shape[0], torch.is_grad_enabled())))
    cb = UncertaintyMixupCallback(select_ratio=0.5, mixup=True, scoring="free", teacher_flops_ratio=3.0)
    trainer = _trainer(tmp_path, student, teacher, [cb], data, max_steps=6)  # 3 epochs of 2 batches of 12
    trainer.train()
    # Epoch 1: scoring pass (12, no grad) then the training forward on k = 6; epochs 2 and 3: the training forward only.
    assert calls == [(12, False), (6, True)] * 2 + [(6, True)] * 4
    assert cb.totals["scored_samples"] == 24 and cb.totals["samples_seen"] == 72
    assert cb.totals["cost_ratio"] == pytest.approx(0.5 + (24 / 72) / (3.0 + 2))
    assert bool(torch.isfinite(cb._scores).all())  # every sample has a stored score after the first epoch


def test_free_scoring_needs_the_sample_index(tmp_path):
    data, teacher, student = _mnist_like(24), _cnn(1, widths=(8, 8)), _cnn(0)
    cb = UncertaintyMixupCallback(select_ratio=0.5, scoring="free")
    trainer = _trainer(tmp_path, student, teacher, [], data, max_steps=1)
    trainer.add_callback(cb)  # added after construction: the training set was not wrapped
    with pytest.raises(KeyError, match="sample_index"):
        trainer.train()
    with pytest.raises(ValueError, match="scoring must be one of"):
        UncertaintyMixupCallback(scoring="cheap")
