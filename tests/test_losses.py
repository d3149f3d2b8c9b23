"""The loss maths, checked against identities and a float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from hf_kdsearch.losses import feature_mse, kd_loss, mixed_cross_entropy, soft_target_cross_entropy


def reference_kd(s, t, T):
    p_t = F.softmax(t.double() / T, -1)
    return (T**2 * (p_t * (p_t.log() - F.log_softmax(s.double() / T, -1))).sum(-1).mean()).float()


def test_kd_of_identical_logits_is_zero():
    x = torch.randn(8, 10)
    assert kd_loss(x, teacher_logits=x.clone(), temperature=4.0).abs().item() < 1e-6


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 20.0])
def test_kd_matches_float64_reference_with_t_squared(T):
    s, t = torch.randn(16, 100) * 3, torch.randn(16, 100) * 3
    torch.testing.assert_close(kd_loss(s, teacher_logits=t, temperature=T), reference_kd(s, t, T), rtol=1e-5, atol=1e-6)


def test_t_squared_keeps_gradient_scale_at_high_temperature():
    # For large T the gradient of T^2 KL w.r.t. s tends to (s - t) / (C * N) up to centring: independent of T.
    # Seeded: the limit is approached at O(|s - t|^2 / T), so an entry near zero needs an absolute tolerance that
    # scales with the gradient, not a fixed 1e-5 (unseeded, that failed on about one draw in a hundred).
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    grads = []
    for T in (500.0, 2000.0):
        s_ = s.clone().requires_grad_()
        kd_loss(s_, teacher_logits=t, temperature=T).backward()
        grads.append(s_.grad)
    expected = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))) / (10 * 4)
    atol = 1e-2 * expected.abs().max().item()
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=atol)
    torch.testing.assert_close(grads[1], expected, rtol=2e-2, atol=atol)
    # The T^2 factor is what keeps this scale: without it the gradient would shrink by 16 from T = 500 to 2000.
    assert grads[1].abs().max() > 0.5 * expected.abs().max()


def test_kd_averages_per_sample_not_per_class():
    s, t = torch.randn(1, 10), torch.randn(1, 10)
    doubled = kd_loss(torch.cat([s, s]), teacher_logits=torch.cat([t, t]), temperature=2.0)
    torch.testing.assert_close(doubled, kd_loss(s, teacher_logits=t, temperature=2.0))


def test_kd_is_finite_with_bf16_logits_and_extreme_values():
    s = (torch.randn(8, 100) * 200).bfloat16().requires_grad_()
    t = (torch.randn(8, 100) * 200).bfloat16()
    loss = kd_loss(s, teacher_logits=t, temperature=4.0)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(s.grad.float()).all()


def test_kd_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(torch.randn(2, 10), teacher_logits=torch.randn(2, 100), temperature=4.0)


def test_soft_target_ce_equals_ce_for_one_hot():
    logits, y = torch.randn(8, 7), torch.randint(0, 7, (8,))
    torch.testing.assert_close(soft_target_cross_entropy(logits, F.one_hot(y, 7)), F.cross_entropy(logits, y))


def test_mixed_ce_endpoints_and_midpoint():
    logits, y, y2 = torch.randn(8, 5), torch.randint(0, 5, (8,)), torch.randint(0, 5, (8,))
    zeros, ones = torch.zeros(8), torch.ones(8)
    torch.testing.assert_close(mixed_cross_entropy(logits, y, y2, zeros), F.cross_entropy(logits, y))
    torch.testing.assert_close(mixed_cross_entropy(logits, y, y2, ones), F.cross_entropy(logits, y2))
    half = 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits, y2))
    torch.testing.assert_close(mixed_cross_entropy(logits, y, y2, ones / 2), half)
    with pytest.raises(ValueError, match="mix_weights"):
        mixed_cross_entropy(logits, y, y2)


def test_feature_mse_detaches_target():
    a, b = torch.randn(2, 3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    feature_mse(a, teacher_features=b).backward()
    assert a.grad is not None and b.grad is None


def test_teacher_tensors_are_keyword_only():
    # Swapped positional tensors would send the gradient into the detached side: the student would learn nothing.
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(TypeError, match="positional"):
        kd_loss(s, t, 4.0)
    with pytest.raises(TypeError, match="positional"):
        feature_mse(s, t)
