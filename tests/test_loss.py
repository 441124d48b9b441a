"""The usage loss, the distillation term and the gradients they send to the decision networks."""
import math

import pytest
import torch

import adavit
from adavit.losses.usage import keep_rates
from _adavit_reference import TINY, Config


def _hand_made() -> adavit.Decisions:
    """Two images, three blocks (block 0 ungated for heads and sub-blocks), three tokens (class + 2), two heads.

    patch means: 12 of 18 entries kept (class entries included)            -> 2/3
    block means: image 0 [1,0] [0,0], image 1 [0,1] [1,1]                  -> 4/8 = 1/2
    head means:  image 0 block 2 has MSA and FFN off and is left out;
                 image 0 block 1 [1,0], image 1 block 1 [1,1], block 2 [1,0] -> 4/6 = 2/3
    """
    patch = torch.tensor([[[1., 1., 0.], [1., 0., 0.], [1., 1., 1.]],
                          [[1., 1., 0.], [1., 1., 0.], [1., 0., 1.]]])
    head = torch.tensor([[[1., 1.], [1., 0.], [0., 0.]],
                         [[1., 1.], [1., 1.], [1., 0.]]])
    block = torch.tensor([[[1., 1.], [1., 0.], [0., 0.]],
                          [[1., 1.], [0., 1.], [1., 1.]]])
    gated = torch.tensor([False, True, True])
    return adavit.Decisions(patch, head, block, torch.tensor([True, True, True]), gated, gated.clone())


def test_keep_rates_by_hand() -> None:
    rates = keep_rates(_hand_made())
    assert rates['patch'].item() == pytest.approx(2 / 3)
    assert rates['block'].item() == pytest.approx(1 / 2)
    assert rates['head'].item() == pytest.approx(2 / 3)


def test_patch_rate_covers_only_patch_gated_blocks() -> None:
    d = _hand_made()
    d.patch_gated = torch.tensor([True, True, False])
    assert keep_rates(d)['patch'].item() == pytest.approx(7 / 12)  # blocks 0 and 1: 3 + 4 of 12


@pytest.mark.parametrize('form, budgets, weights, expected', [
    # released: 2|2/3 - 1/2| (head) + 2|1/2 - 1/2| (block) + 2 (2/3 - 1/2)^2 (patch) = 1/3 + 0 + 1/18
    ('released', (0.5, 0.5, 0.5), (2.0, 2.0, 2.0), 7 / 18),
    # squared: 2 (1/6)^2 + 0 + 2 (1/6)^2
    ('squared', (0.5, 0.5, 0.5), (2.0, 2.0, 2.0), 1 / 9),
    # (patch, head, block) order of budgets and weights: 1 (2/3 - .4)^2 + 2 |2/3 - .6| + 3 |1/2 - .3|
    ('released', (0.4, 0.6, 0.3), (1.0, 2.0, 3.0), (2 / 3 - 0.4) ** 2 + 2 * (2 / 3 - 0.6) + 3 * 0.2),
    ('squared', (0.4, 0.6, 0.3), (1.0, 2.0, 3.0), (2 / 3 - 0.4) ** 2 + 2 * (2 / 3 - 0.6) ** 2 + 3 * 0.2 ** 2),
])
def test_usage_loss_by_hand(form: str, budgets, weights, expected: float) -> None:
    loss, rates = adavit.usage_loss(_hand_made(), budgets=budgets, weights=weights, form=form)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert set(rates) == {'patch', 'head', 'block'}


def test_usage_loss_default_is_released() -> None:
    loss, _ = adavit.usage_loss(_hand_made())
    assert loss.item() == pytest.approx(7 / 18, abs=1e-6)


def test_usage_loss_rejects_unknown_form() -> None:
    with pytest.raises(adavit.ConfigError, match='released'):
        adavit.usage_loss(_hand_made(), form='cubic')
    with pytest.raises(adavit.ConfigError):
        adavit.AdaViTLoss(form='cubic')


def test_head_rate_with_every_block_off_is_finite() -> None:
    d = _hand_made()
    d.block = torch.zeros_like(d.block)
    rate = keep_rates(d)['head']
    assert torch.isfinite(rate)


def test_adavit_loss_adds_cross_entropy_and_distillation() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 2.0]])
    target = torch.tensor([2, 0])
    # Cross-entropy by hand: mean of -log softmax at the targets.
    ce = -(3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))
           + 0.5 - math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(0.0))) / 2
    temperature = 2.0
    kl = 0.0
    for s_row, t_row in zip(logits.tolist(), teacher.tolist()):
        zs = sum(math.exp(v / temperature) for v in s_row)
        zt = sum(math.exp(v / temperature) for v in t_row)
        for s, t in zip(s_row, t_row):
            pt, ps = math.exp(t / temperature) / zt, math.exp(s / temperature) / zs
            kl += pt * math.log(pt / ps)
    distill = kl / 2 * temperature ** 2
    assert adavit.distillation_loss(logits, teacher, temperature).item() == pytest.approx(distill, rel=1e-5)

    plain = adavit.AdaViTLoss()
    total, parts = plain(logits, target, _hand_made())
    assert total.item() == pytest.approx(ce + 7 / 18, rel=1e-5)
    assert parts['task'].item() == pytest.approx(ce, rel=1e-5)
    assert parts['usage'].item() == pytest.approx(7 / 18, rel=1e-5)
    assert 'distill' not in parts
    assert parts['keep_patch'].item() == pytest.approx(2 / 3)

    with_teacher = adavit.AdaViTLoss(distill_weight=0.5, distill_temperature=temperature)
    total, parts = with_teacher(logits, target, _hand_made(), teacher_logits=teacher)
    assert total.item() == pytest.approx(ce + 7 / 18 + 0.5 * distill, rel=1e-5)
    assert parts['distill'].item() == pytest.approx(distill, rel=1e-5)
    with pytest.raises(adavit.ConfigError, match='teacher'):
        with_teacher(logits, target, _hand_made())


def _training_step(model: adavit.AdaViT, batch: int = 4) -> dict:
    model.train()
    x = torch.randn(batch, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    target = torch.randint(0, model.num_classes, (batch,))
    logits, decisions = model(x, return_decisions=True)
    total, parts = adavit.AdaViTLoss()(logits, target, decisions)
    total.backward()
    return dict(parts, decisions=decisions)


def _gate_params(model: adavit.AdaViT):
    gates = ('patch_gate', 'head_gate', 'block_gate')
    return [(n, p) for n, p in model.named_parameters() if any(g in n for g in gates)]


@pytest.mark.parametrize('patch_policy', ['token', 'cls'])
@pytest.mark.parametrize('head_mode', ['full', 'partial'])
def test_straight_through_gradients_reach_every_decision_network(head_mode: str, patch_policy: str) -> None:
    cfg = Config(**{**TINY.__dict__, 'head_mode': head_mode, 'patch_policy': patch_policy})
    model = adavit.AdaViT(**cfg.model_kwargs())
    # Gates that keep about half, so the straight-through products are neither all-on nor all-off.
    with torch.no_grad():
        for blk in model.blocks:
            if blk.patch_gate is not None:
                blk.patch_gate.bias.fill_(5 * math.log(1.5))
    parts = _training_step(model)
    d = parts['decisions']
    assert set(torch.unique(d.patch).tolist()) == {0.0, 1.0}  # hard in the forward pass
    assert 0.0 < parts['keep_patch'].item() < 1.0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    gates = _gate_params(model)
    assert len(gates) == 2 * (3 * TINY.depth - 2)
    for name, p in gates:
        assert p.grad.abs().sum().item() > 0, f'no gradient reaches {name}'


def test_random_policy_is_seeded_and_near_budgets() -> None:
    keep = (0.3, 0.7, 0.6)
    model = adavit.AdaViT(**TINY.model_kwargs(), policy='random', random_keep=keep, random_seed=11,
                          executor='masked').eval()
    x = torch.randn(64, 3, TINY.img_size, TINY.img_size)
    with torch.no_grad():
        _, first = model(x, return_decisions=True)
        _, second = model(x, return_decisions=True)
        model.reset_random_policy()
        _, again = model(x, return_decisions=True)
        model.reset_random_policy(12)
        _, other = model(x, return_decisions=True)
    assert torch.equal(first.patch, again.patch) and torch.equal(first.head, again.head)
    assert torch.equal(first.block, again.block)
    assert not torch.equal(first.patch, second.patch)  # the generator moves on between batches
    assert not torch.equal(first.patch, other.patch)
    # Binomial standard errors: patches 64*3*16 draws (~0.006), heads 64*2*3 (~0.019), blocks 64*2*2 (~0.022).
    assert first.patch[:, :, 1:].mean().item() == pytest.approx(keep[0], abs=0.03)
    assert first.head[:, 1:].mean().item() == pytest.approx(keep[1], abs=0.08)
    assert first.block[:, 1:].mean().item() == pytest.approx(keep[2], abs=0.08)
    assert bool(first.patch[:, :, 0].all())  # the class token is never dropped
    # The random policy ignores the images: the same draw for any input once reseeded.
    model.reset_random_policy()
    with torch.no_grad():
        _, on_noise = model(torch.randn_like(x), return_decisions=True)
    assert torch.equal(first.patch, on_noise.patch)


@pytest.mark.parametrize('eval_rule', ['released', 'consistent'])
def test_train_decisions_eval_trains_under_the_served_decisions(eval_rule) -> None:
    model = adavit.AdaViT(**TINY.model_kwargs(), train_decisions='eval', eval_rule=eval_rule, executor='masked')
    for p in model.parameters():  # decision networks with some spread, so that units are dropped
        torch.nn.init.normal_(p, std=0.3) if p.ndim > 1 else None
    x = torch.randn(16, 3, TINY.img_size, TINY.img_size)
    with torch.no_grad():
        served_logits, served = model.eval()(x, return_decisions=True)
        trained_logits, trained = model.train()(x, return_decisions=True)
    assert 0.0 < served.patch[:, :, 1:].mean().item() < 1.0
    for kind in ('patch', 'head', 'block'):
        assert torch.equal(getattr(served, kind), getattr(trained, kind)), kind
    torch.testing.assert_close(trained_logits, served_logits, rtol=1e-4, atol=1e-4)


def test_random_policy_draws_only_the_gates_a_block_has() -> None:
    keep = (0.3, 0.4, 0.6)
    kwargs = dict(TINY.model_kwargs(), gates=('head', 'block'), keep_layers=1)
    model = adavit.AdaViT(**kwargs, policy='random', random_keep=keep, executor='masked').eval()
    with torch.no_grad():
        _, d = model(torch.randn(256, 3, TINY.img_size, TINY.img_size), return_decisions=True)
    assert bool(d.patch.eq(1).all())  # no patch gates: every token runs
    assert bool(d.head[:, 0].eq(1).all()) and bool(d.block[:, 0].eq(1).all())  # block 0 has no gates
    # Binomial standard errors: heads 256*3*TINY heads, blocks 256*3*2 draws (both ~0.012).
    assert d.head[:, 1:].mean().item() == pytest.approx(keep[1], abs=0.05)
    assert d.block[:, 1:].mean().item() == pytest.approx(keep[2], abs=0.05)


@pytest.mark.parametrize('batch', [1, 5])
def test_random_policy_draws_as_one_draw_per_block(batch) -> None:
    """All blocks come from one draw, which consumes the generator exactly as a (B, units) draw per block would: the
    Random and Random+ figures measured before the change reproduce."""
    keep = (0.3, 0.4, 0.6)
    model = adavit.AdaViT(**TINY.model_kwargs(), keep_layers=1, policy='random', random_keep=keep, random_seed=5).eval()
    with torch.no_grad():
        _, d = model(torch.randn(batch, 3, TINY.img_size, TINY.img_size), return_decisions=True)
    g = torch.Generator().manual_seed(5)
    N, H = d.patch.shape[2], d.head.shape[2]
    for i in range(TINY.depth):
        gated = i >= 1  # head and block gates from keep_layers on; patch gates everywhere
        width = N + (H + 2 if gated else 0)
        probs = torch.tensor([1.0] + [keep[0]] * (N - 1) + ([keep[1]] * H + [keep[2]] * 2 if gated else []))
        kept = (torch.rand(batch, width, generator=g) < probs).float()
        assert torch.equal(d.patch[:, i], kept[:, :N]), i
        if gated:
            assert torch.equal(d.head[:, i], kept[:, N:N + H]) and torch.equal(d.block[:, i], kept[:, N + H:]), i


def test_random_policy_training_gives_every_parameter_a_gradient() -> None:
    """Random+ fine-tuning: decisions are random, yet every parameter takes part (DDP without unused parameters)."""
    model = adavit.AdaViT(**TINY.model_kwargs(), policy='random', random_keep=(0.5, 0.5, 0.5))
    parts = _training_step(model, batch=8)
    d = parts['decisions']
    assert set(torch.unique(torch.cat([d.patch.flatten(), d.head.flatten(), d.block.flatten()])).tolist()) <= {0., 1.}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for name, p in _gate_params(model):
        assert torch.count_nonzero(p.grad) == 0, f'{name} must stay untrained under the random policy'
