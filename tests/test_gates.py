"""Sampling of decisions: Gumbel-sigmoid with hard straight-through in training, thresholds at eval."""
import math

import pytest
import torch

from adavit.gates.networks import DecisionGate, PatchGate
from adavit.gates.sampling import bernoulli_decisions, gumbel_sigmoid_hard, threshold_decisions


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
