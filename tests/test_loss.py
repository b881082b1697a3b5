"""The reward-shaped loss: exactly CE at beta = lambda = 0, and the gradient PAPER.md derives."""

import math

import pytest
import torch
import torch.nn.functional as F

from ntp_rl.losses import (
    RewardShaping,
    positive_weight,
    shaped_ntp_loss,
    shaped_ntp_loss_fused,
    shaped_ntp_loss_reference,
)

PRESETS = {  # PAPER.md section 5
    "ce": dict(beta=0.0, lambda_top=0.0, lambda_tail=0.0),
    "precision": dict(beta=-0.25, lambda_top=0.0, lambda_tail=0.0),
    "diversity": dict(beta=0.5, lambda_top=0.0, lambda_tail=0.0),
    "tail_penalty": dict(beta=0.0, lambda_top=0.0, lambda_tail=-0.1),
    "head_reward": dict(beta=0.0, lambda_top=0.1, lambda_tail=0.0),
}


def make_inputs(seed=0, batch=3, seq=11, vocab=97, scale=3.0, ignore_every=4):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, seq, vocab, generator=gen) * scale
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return logits, labels


def literal_surrogate(logits, labels, shaping):
    """PAPER.md sections 3-4 written token by token: r for every action, w = sg(p * r)."""
    total, count = logits.new_zeros(()), 0
    for z, y in zip(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)):
        if y == -100:
            continue
        log_p = torch.log_softmax(z.double(), -1)
        p = log_p.exp().detach()
        top = set(torch.topk(p, shaping.k).indices.tolist())
        weights = []
        for a in range(len(z)):
            if a == y:
                pa = p[a]
                if shaping.positive_form == "exponent":
                    r = (1 / pa) ** ((1 - pa) ** shaping.beta)
                elif shaping.positive_form == "multiplicative":
                    r = (1 / pa) * (1 - pa) ** shaping.beta
                else:  # constant
                    r = (1 - pa) ** shaping.beta
            else:
                r = shaping.lambda_top if a in top else shaping.lambda_tail
            weights.append(p[a] * r)
        total = total - (torch.stack(weights) * log_p).sum()
        count += 1
    return total / count


@pytest.mark.parametrize("path", ["reference", "chunked", "fused"])
def test_equals_cross_entropy_in_value_and_gradient(path):
    torch.manual_seed(0)
    batch, seq, hidden_size, vocab = 4, 13, 16, 101
    hidden = torch.randn(batch, seq, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :5] = -100

    logits = hidden @ weight.t()
    expected = F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100)
    exp_grads = torch.autograd.grad(expected, (hidden, weight))

    ce = RewardShaping()
    if path == "fused":
        out = shaped_ntp_loss_fused(hidden, weight, labels, ce, chunk_size=7)
    else:
        logits = hidden @ weight.t()
        fn = shaped_ntp_loss_reference if path == "reference" else lambda *a: shaped_ntp_loss(*a, chunk_size=7)
        out = fn(logits, labels, ce)
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    assert torch.allclose(out.loss, expected, atol=1e-6, rtol=0)
    for got, want in zip(grads, exp_grads):
        assert torch.allclose(got, want, atol=1e-6, rtol=0)
    assert out.stats["nll"].item() == pytest.approx(expected.item(), abs=1e-6)


def test_cross_entropy_gradient_is_p_minus_onehot():
    logits, labels = make_inputs(ignore_every=None)
    logits.requires_grad_()
    out = shaped_ntp_loss(logits, labels, RewardShaping(), chunk_size=5)
    (grad,) = torch.autograd.grad(out.loss, logits)
    n = labels.numel()
    expected = (torch.softmax(logits.detach(), -1) - F.one_hot(labels, logits.shape[-1])) / n
    assert torch.allclose(grad, expected, atol=1e-7)


@pytest.mark.parametrize("form", ["exponent", "multiplicative", "constant"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_reference_matches_the_paper_token_by_token(preset, form):
    logits, labels = make_inputs(seed=1, batch=2, seq=5, vocab=23)
    shaping = RewardShaping(k=5, positive_form=form, **PRESETS[preset])
    a = logits.double().requires_grad_()
    b = logits.double().requires_grad_()
    ref = shaped_ntp_loss_reference(a, labels, shaping)
    lit = literal_surrogate(b, labels, shaping)
    (ga,) = torch.autograd.grad(ref.loss, a)
    (gb,) = torch.autograd.grad(lit, b)
    assert ref.loss.item() == pytest.approx(lit.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(ga, gb.to(ga.dtype), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("form", ["exponent", "multiplicative", "constant"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_chunked_and_fused_gradients_match_autograd_of_the_surrogate(preset, form):
    torch.manual_seed(2)
    batch, seq, hidden_size, vocab = 3, 9, 12, 61
    shaping = RewardShaping(k=10, positive_form=form, **PRESETS[preset])
    hidden = torch.randn(batch, seq, hidden_size, dtype=torch.float64) * 2
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[1, ::3] = -100

    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = shaped_ntp_loss_reference(h_ref @ w_ref.t(), labels, shaping)
    ref_grads = torch.autograd.grad(ref.loss, (h_ref, w_ref))

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = shaped_ntp_loss_fused(h, w, labels, shaping, chunk_size=5)
    fused_grads = torch.autograd.grad(fused.loss, (h, w))

    logits = (hidden @ weight.t()).requires_grad_()
    chunked = shaped_ntp_loss(logits, labels, shaping, chunk_size=4)
    (g_logits,) = torch.autograd.grad(chunked.loss, logits)
    logits_ref = (hidden @ weight.t()).requires_grad_()
    (g_logits_ref,) = torch.autograd.grad(shaped_ntp_loss_reference(logits_ref, labels, shaping).loss, logits_ref)

    # The paths compute in fp32 whatever the input dtype, so agreement is to fp32 precision.
    assert fused.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-6)
    assert chunked.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-6)
    for got, want in zip(fused_grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert torch.allclose(g_logits, g_logits_ref, atol=1e-7, rtol=1e-4)
    for name in ref.stats:
        assert fused.stats[name].item() == pytest.approx(ref.stats[name].item(), rel=1e-5, abs=1e-6)


def test_chunk_size_does_not_change_results():
    logits, labels = make_inputs(seed=3)
    shaping = RewardShaping(beta=-0.25, lambda_tail=-0.1, k=7)
    results = []
    for chunk in (1, 5, 10_000):
        x = logits.clone().requires_grad_()
        out = shaped_ntp_loss(x, labels, shaping, chunk_size=chunk)
        (g,) = torch.autograd.grad(out.loss, x)
        results.append((out.loss, g))
    for loss, grad in results[1:]:
        assert torch.allclose(loss, results[0][0], atol=1e-6)
        assert torch.allclose(grad, results[0][1], atol=1e-8)


def test_ground_truth_inside_top_k_is_not_a_negative():
    # vocab of 3, k = 2: the target is the most likely token, so it sits in the top-k.
    logits = torch.tensor([[3.0, 2.0, -1.0]], requires_grad=True)
    labels = torch.tensor([0])
    shaping = RewardShaping(lambda_top=0.5, k=2)
    out = shaped_ntp_loss(logits, labels, shaping)
    (grad,) = torch.autograd.grad(out.loss, logits)
    p = torch.softmax(logits.detach(), -1)[0]
    w = torch.tensor([1.0, 0.5 * p[1], 0.0])  # only token 1 is a head negative
    expected = p * w.sum() - w
    assert torch.allclose(grad[0], expected, atol=1e-6)


def test_beta_orders_the_ground_truth_reward():
    log_p = torch.log(torch.tensor([0.05, 0.3, 0.7, 0.95]))
    for form in ("exponent", "multiplicative"):
        precision = positive_weight(log_p, RewardShaping(beta=-0.25, positive_form=form))
        ce = positive_weight(log_p, RewardShaping(beta=0.0, positive_form=form))
        diversity = positive_weight(log_p, RewardShaping(beta=0.5, positive_form=form))
        assert torch.equal(ce, torch.ones_like(ce))
        assert torch.all(precision > ce) and torch.all(diversity < ce)
    exponent = positive_weight(log_p, RewardShaping(beta=0.5))
    multiplicative = positive_weight(log_p, RewardShaping(beta=0.5, positive_form="multiplicative"))
    assert not torch.allclose(exponent, multiplicative)


def test_diagnostics():
    logits, labels = make_inputs(seed=4, ignore_every=None)
    out = shaped_ntp_loss(logits, labels, RewardShaping(k=10), chunk_size=8)
    p = torch.softmax(logits, -1)
    entropy = -(p * p.log()).sum(-1).mean()
    topk = p.topk(10, -1).values.sum(-1).mean()
    assert out.stats["entropy"].item() == pytest.approx(entropy.item(), rel=1e-5)
    assert out.stats["topk_mass"].item() == pytest.approx(topk.item(), rel=1e-5)
    assert (out.stats["topk_mass"] + out.stats["tail_mass"]).item() == pytest.approx(1.0, abs=1e-6)
    acc = (logits.argmax(-1) == labels).float().mean()
    assert out.stats["accuracy"].item() == pytest.approx(acc.item())
    target_prob = p.gather(-1, labels[..., None]).mean()
    assert out.stats["target_prob"].item() == pytest.approx(target_prob.item(), rel=1e-5)
    assert out.stats["num_tokens"].item() == labels.numel()


def test_no_counted_tokens_gives_zero_not_nan():
    logits = torch.randn(2, 4, 9, requires_grad=True)
    labels = torch.full((2, 4), -100)
    out = shaped_ntp_loss(logits, labels, RewardShaping(beta=-0.25))
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert out.loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert out.stats["num_tokens"].item() == 0


def test_extreme_logits_stay_finite():
    # p_target ~ 1 (beta < 0 divides by 1 - p) and p_target ~ 0 (reward 1/p).
    logits = torch.tensor([[60.0, -60.0, 0.0], [-80.0, 80.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])
    for shaping in (RewardShaping(beta=-0.25), RewardShaping(beta=0.5, positive_form="multiplicative"),
                    RewardShaping(lambda_tail=-0.1, k=1)):
        out = shaped_ntp_loss(logits, labels, shaping)
        (grad,) = torch.autograd.grad(out.loss, logits)
        assert math.isfinite(out.loss.item()) and torch.isfinite(grad).all()


def test_fused_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(5)
    hidden = torch.randn(64, 32)
    weight = torch.randn(200, 32) * 0.2
    labels = torch.randint(0, 200, (64,))
    shaping = RewardShaping(beta=-0.25, lambda_tail=-0.1, k=20)
    exact = shaped_ntp_loss_fused(hidden, weight, labels, shaping)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        approx = shaped_ntp_loss_fused(h, w, labels, shaping, chunk_size=16)
    approx.loss.backward()
    assert approx.loss.dtype == torch.float32
    assert approx.loss.item() == pytest.approx(exact.loss.item(), rel=2e-2)
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32


def test_invalid_shaping_is_refused():
    with pytest.raises(ValueError, match="positive_form"):
        RewardShaping(positive_form="additive")
    with pytest.raises(ValueError, match="k"):
        RewardShaping(k=0)
    with pytest.raises(ValueError, match="beta"):
        RewardShaping(beta=float("nan"))


def _surrogate_with_top_set(logits, label, shaping, top):
    """The surrogate of one row with an explicit top-k set: autograd gives its gradient."""
    z = logits.clone().requires_grad_()
    log_p = torch.log_softmax(z, -1)
    p = log_p.detach().exp()
    reward = torch.full_like(p, shaping.lambda_tail)
    reward[list(top)] = shaping.lambda_top
    weights = p * reward
    weights[label] = positive_weight(log_p.detach()[label], shaping)
    loss = -(weights * log_p).sum()
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


ALL_PATHS = ["reference", "chunked", "fused", "chunked-compiled", "fused-compiled"]


def _run_path(path, hidden, weight, labels, shaping, chunk_size=3):
    """Loss, stats and d loss / d logits (logits = hidden @ weight.T) for one loss path."""
    compiled = path.endswith("-compiled")
    if path.startswith("fused"):
        h = hidden.clone().requires_grad_()
        out = shaped_ntp_loss_fused(h, weight, labels, shaping, chunk_size=chunk_size, compile=compiled)
        # weight is the identity in the tie tests, so d/dh is d/dlogits.
        (grad,) = torch.autograd.grad(out.loss, h)
        return out, grad
    logits = (hidden @ weight.t()).requires_grad_()
    if path == "reference":
        out = shaped_ntp_loss_reference(logits, labels, shaping)
    else:
        out = shaped_ntp_loss(logits, labels, shaping, chunk_size=chunk_size, compile=compiled)
    (grad,) = torch.autograd.grad(out.loss, logits)
    return out, grad


@pytest.mark.parametrize("path", ALL_PATHS)
def test_tokens_tied_at_the_top_k_threshold_share_its_places(path, request):
    if path.endswith("-compiled"):
        request.getfixturevalue("compiled_loss")
    # k = 2: token 0 is in; tokens 1, 2, 3 tie for the last place. The loss and gradient are
    # the mean over the three ways to break the tie, whichever path computes them, whether
    # the target is one of the tied tokens (row 0) or not (row 1). Row 2 has no tie.
    shaping = RewardShaping(beta=-0.25, lambda_top=0.3, lambda_tail=-0.1, k=2)
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0, -1.0],
                           [3.0, 1.0, 1.0, 1.0, 0.0, -1.0],
                           [3.0, 2.0, 1.0, 0.5, 0.0, -1.0]])
    labels = torch.tensor([2, 4, 3])
    expected_loss, expected_grad = 0.0, torch.zeros_like(logits)
    for row, (z, y) in enumerate(zip(logits, labels.tolist())):
        choices = [{0, c} for c in (1, 2, 3)] if row < 2 else [{0, 1}]
        for top in choices:
            loss, grad = _surrogate_with_top_set(z, y, shaping, top)
            expected_loss += loss / len(choices) / len(labels)
            expected_grad[row] += grad / len(choices) / len(labels)

    out, grad = _run_path(path, logits, torch.eye(6), labels, shaping, chunk_size=2)
    assert out.loss.item() == pytest.approx(expected_loss.item(), abs=1e-6)
    assert torch.allclose(grad, expected_grad, atol=1e-6)
    p = torch.softmax(logits, -1)
    assert out.stats["topk_mass"].item() == pytest.approx(((p[:, 0] + p[:, 1]).mean()).item(), abs=1e-6)


@pytest.mark.parametrize("form", ["exponent", "multiplicative"])
def test_compiled_chunks_match_the_reference(form, compiled_loss):
    torch.manual_seed(7)
    shaping = RewardShaping(beta=-0.25, lambda_top=0.05, lambda_tail=-0.1, k=10, positive_form=form)
    hidden = torch.randn(3, 9, 12) * 2
    weight = torch.randn(61, 12)
    labels = torch.randint(0, 61, (3, 9))
    labels[1, ::3] = -100
    ref, ref_grad = _run_path("reference", hidden, weight, labels, shaping)
    for path in ("chunked-compiled", "fused-compiled"):
        out, _ = _run_path(path, hidden, weight, labels, shaping, chunk_size=5)
        assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-6), path
        for name in ref.stats:
            assert out.stats[name].item() == pytest.approx(ref.stats[name].item(), rel=1e-5, abs=1e-6), (path, name)
    logits = (hidden @ weight.t()).requires_grad_()
    out = shaped_ntp_loss(logits, labels, shaping, chunk_size=5, compile=True)
    (grad,) = torch.autograd.grad(out.loss, logits)
    assert torch.allclose(grad, ref_grad, atol=1e-7, rtol=1e-4)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = shaped_ntp_loss_fused(h, w, labels, shaping, chunk_size=5, compile=True)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = shaped_ntp_loss_reference(h_ref @ w_ref.t(), labels, shaping)
    for got, want in zip(torch.autograd.grad(fused.loss, (h, w)), torch.autograd.grad(reference.loss, (h_ref, w_ref))):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)


def test_compiled_fused_under_bf16_autocast_matches_eager(compiled_loss):
    torch.manual_seed(5)
    hidden = torch.randn(64, 32)
    weight = torch.randn(200, 32) * 0.2
    labels = torch.randint(0, 200, (64,))
    shaping = RewardShaping(beta=-0.25, lambda_tail=-0.1, k=20)
    results = []
    for compiled in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = shaped_ntp_loss_fused(h, w, labels, shaping, chunk_size=16, compile=compiled)
        out.loss.backward()
        results.append((out.loss.item(), h.grad, w.grad))
    (eager_loss, *eager_grads), (compiled_loss, *compiled_grads) = results
    # Both read the same bf16 logits; the gradients are rounded to bf16 before the matmuls.
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_with_bf16_weights_is_close_to_fp32(compiled, request):
    if compiled:
        request.getfixturevalue("compiled_loss")
    # bf16 parameters without autocast: the weight's gradient is summed in bf16, chunk by chunk.
    torch.manual_seed(6)
    hidden = torch.randn(96, 32)
    weight = torch.randn(300, 32) * 0.2
    labels = torch.randint(0, 300, (96,))
    shaping = RewardShaping(beta=-0.25, lambda_tail=-0.1, k=20)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    exact = shaped_ntp_loss_fused(h, w, labels, shaping, chunk_size=16)
    exact.loss.backward()
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    approx = shaped_ntp_loss_fused(hb, wb, labels, shaping, chunk_size=16, compile=compiled)
    approx.loss.backward()
    assert wb.grad.dtype == torch.bfloat16 and hb.grad.dtype == torch.bfloat16
    assert approx.loss.item() == pytest.approx(exact.loss.item(), rel=2e-2)
    for got, want in ((hb.grad, h.grad), (wb.grad, w.grad)):
        assert (got.float() - want).norm() / want.norm() < 0.02


def test_dft_preset_is_dfts_loss_in_value_and_gradient_on_every_path():
    """loss=dft against DFT written plainly: -sg(p_y) * log p_y, averaged over the tokens that count."""
    from ntp_rl.config.compose import compose

    cfg = compose("pretrain", ["loss=dft"]).loss
    assert cfg.name == "dft" and cfg.positive_form.value == "constant"
    shaping = RewardShaping.from_config(cfg)
    torch.manual_seed(3)
    hidden = torch.randn(2, 7, 8, dtype=torch.float64) * 2
    weight = torch.randn(41, 8, dtype=torch.float64)
    labels = torch.randint(0, 41, (2, 7))
    labels[0, ::2] = -100

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_p = torch.log_softmax(h @ w.t(), -1)
    counted = labels != -100
    log_p_y = log_p[counted].gather(1, labels[counted][:, None]).squeeze(1)
    plain = -(log_p_y.exp().detach() * log_p_y).mean()
    plain_grads = torch.autograd.grad(plain, (h, w))

    for path in ("reference", "chunked", "fused"):
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if path == "fused":
            loss = shaped_ntp_loss_fused(h2, w2, labels, shaping, chunk_size=3).loss
        elif path == "chunked":
            loss = shaped_ntp_loss(h2 @ w2.t(), labels, shaping, chunk_size=3).loss
        else:
            loss = shaped_ntp_loss_reference(h2 @ w2.t(), labels, shaping).loss
        grads = torch.autograd.grad(loss, (h2, w2))
        assert loss.item() == pytest.approx(plain.item(), rel=1e-6), path  # the paths compute in fp32
        for got, want in zip(grads, plain_grads):
            assert torch.allclose(got, want.to(got.dtype), rtol=1e-5, atol=1e-7), path
