"""Sampling of decisions: Gumbel-sigmoid with hard straight-through in training, thresholds at eval."""
import math

import pytest
import torch

from adavit.gates.networks import DecisionGate, PatchGate
from adavit.gates.sampling import bernoulli_decisions, gumbel_sigmoid_hard, threshold_decisions, threshold_mask


def test_gumbel_sigmoid_hard_is_binary_with_the_soft_gradient() -> None:
    logits = torch.linspace(-4, 4, 101, requires_grad=True)
    hard = gumbel_sigmoid_hard(logits, tau=5.0, threshold=0.6)
    assert set(torch.unique(hard.detach()).tolist()) <= {0.0, 1.0}  # exactly, not 1 - 1 ulp
    hard.sum().backward()
    # The gradient is that of the relaxed sample, sigmoid((l + noise) / tau) / tau * (1 - ...): positive, <= 1/(4 tau).
    assert (logits.grad > 0).all() and (logits.grad <= 0.25 / 5.0 + 1e-7).all()


@pytest.mark.parametrize('logit, tau, threshold', [(0.0, 5.0, 0.6), (2.0, 5.0, 0.6), (-1.0, 5.0, 0.5), (1.0, 1.0, 0.5)])
def test_gumbel_sigmoid_keep_probability(logit: float, tau: float, threshold: float) -> None:
    """g1 - g2 is Logistic(0, 1), so P(keep) = P(noise > tau * logit(thr) - l) = sigmoid(l - tau * logit(thr))."""
    torch.manual_seed(1)
    draws = gumbel_sigmoid_hard(torch.full((200_000,), logit), tau, threshold)
    expected = 1.0 / (1.0 + math.exp(-(logit - tau * math.log(threshold / (1 - threshold)))))
    assert draws.mean().item() == pytest.approx(expected, abs=0.005)


def test_threshold_decisions_match_sigmoid_rule() -> None:
    logits = torch.tensor([-3.0, 0.0, 0.40, 0.41, 3.0])
    assert threshold_decisions(logits, 0.6).tolist() == (torch.sigmoid(logits) > 0.6).float().tolist()
    assert threshold_decisions(logits, 0.6).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert threshold_decisions(logits, 0.5).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # sigmoid(0) = 0.5 is not > 0.5
    assert threshold_decisions(logits, 0.0).tolist() == [1.0] * 5
    assert threshold_decisions(logits, 1.0).tolist() == [0.0] * 5


def test_threshold_mask_is_threshold_decisions_as_bool() -> None:
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0])
    for threshold in (0.0, 0.3, 0.5, 0.6, 1.0):
        mask = threshold_mask(logits, threshold)
        assert mask.dtype == torch.bool
        assert mask.tolist() == [v == 1.0 for v in threshold_decisions(logits, threshold).tolist()]
    assert threshold_mask(logits, 0.6).tolist() == [False, False, False, False, True]


def test_bernoulli_decisions_are_seeded() -> None:
    like = torch.zeros(())
    a = bernoulli_decisions(torch.Size([1000]), 0.3, like, torch.Generator().manual_seed(3))
    b = bernoulli_decisions(torch.Size([1000]), 0.3, like, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.mean().item() == pytest.approx(0.3, abs=0.05)


def test_gate_shapes_and_init() -> None:
    token = PatchGate(16, 9, 'token')
    cls = PatchGate(16, 9, 'cls')
    assert token.weight.shape == (1, 16) and cls.weight.shape == (9, 16)
    x_normed, cls_token = torch.randn(2, 10, 16), torch.randn(2, 16)
    assert token(x_normed, cls_token, 1).shape == (2, 9)
    torch.testing.assert_close(token(x_normed, cls_token, 1), x_normed[:, 1:] @ token.weight[0] + token.bias)
    torch.testing.assert_close(cls(x_normed, cls_token, 1), cls_token @ cls.weight.T + cls.bias)
    gate = DecisionGate(384, 6)
    assert torch.equal(gate.bias, torch.zeros(6))
    # timm's trunc_normal_(std=0.02) cuts at +-2 in absolute units (as in the release), i.e. hardly at all.
    assert gate.weight.std().item() == pytest.approx(0.02, abs=0.002)
    assert gate.weight.mean().abs().item() < 0.003


def test_consistent_eval_rule_matches_majority_of_training_decisions():
    """``eval_rule="consistent"`` keeps a patch iff the noisy training rule keeps it more often than not."""
    import adavit
    model = adavit.AdaViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=4,
                          eval_rule='consistent')
    logits = torch.tensor([-1.0, 0.5, 1.9, 2.2, 3.0])  # the patch boundary is tau * logit(0.6) = 5 ln 1.5 ~ 2.03
    model.eval()
    assert model._decide(logits, 0.6, 0.5).tolist() == [0, 0, 0, 1, 1]
    model.train()
    torch.manual_seed(0)
    frequency = torch.stack([model._decide(logits, 0.6, 0.5) for _ in range(4000)]).mean(0)
    assert ((frequency > 0.5).float() == torch.tensor([0.0, 0, 0, 1, 1])).all()
    released = adavit.AdaViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=4).eval()
    assert released._decide(logits, 0.6, 0.5).tolist() == [0, 1, 1, 1, 1]  # logit > ln 1.5 ~ 0.405
    with pytest.raises(adavit.ConfigError):
        adavit.AdaViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, eval_rule='median')


@pytest.mark.parametrize('patch_policy', ['token', 'cls'])
@pytest.mark.parametrize('eval_rule', ['released', 'consistent'])
@pytest.mark.parametrize('batch', [1, 5])
def test_gate_masks_are_the_eval_decisions_as_bool(patch_policy, eval_rule, batch):
    """The sparse executor's decisions (``_gate_masks``) are ``block_decisions``' (the masked executor's), as masks,
    at any threshold, the prefix token kept."""
    import adavit
    torch.manual_seed(0)
    model = adavit.AdaViT(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=4,
                          keep_layers=1, patch_policy=patch_policy, eval_rule=eval_rule).eval()
    with torch.no_grad():
        for blk in model.blocks:
            for gate in (blk.patch_gate, blk.head_gate, blk.block_gate):
                if gate is not None:
                    gate.weight.normal_(0, 0.3)
        x = torch.randn(batch, 17, 48)
        kept = set()
        for thresholds in ((0.6, 0.5, 0.5), (0.4, 0.7, 0.3), (0.0, 1.0, 0.0), (1.0, 0.0, 1.0)):
            model.set_thresholds(*thresholds)
            for i, blk in enumerate(model.blocks):
                x_normed = blk.norm1(x)
                want, got = model.block_decisions(i, x, x_normed), model._gate_masks(blk, x, x_normed)
                for kind in ('patch', 'head', 'block'):
                    w, g = getattr(want, kind), getattr(got, kind)
                    assert (w is None) == (g is None) == (kind != 'patch' and i == 0), (kind, i)
                    if g is not None:
                        assert g.dtype == torch.bool and torch.equal(g, w == 1.0), (kind, i, thresholds)
                        kept.add(g.float().mean().item())
                assert got.patch[:, 0].all()  # the class token
    assert len(kept) > 4  # thresholds that keep all, none and some
