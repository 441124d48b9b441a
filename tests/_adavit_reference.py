"""A deliberately plain, independent reference of the released AdaViT eval semantics (SPEC.md), for the tests.

It shares no code with ``adavit``: it reads the *official* checkpoint layout (separate query/key/value,
``token_select``/``head_select``/``layer_select``), loops over images and heads, gathers the kept tokens and runs
attention with a plain matmul and softmax in float64. The SPEC rules it encodes, each written out once:

* patch decision ``1[sigmoid(logit) > 0.6]``, head and block decisions ``1[sigmoid(logit) > 0.5]``, class entry 1;
* token policy: ``Linear(D, 1)`` on each ``norm1``-ed patch token; cls policy: ``Linear(D, N)`` on the raw class token;
  head and block gates read the raw class token of the block input;
* kept queries attend to kept keys only; a dropped query sees only itself (so its output is its own value);
* full head deactivation: q, k, v of dropped heads are zero (bias included), their ``proj`` input channels are zero,
  the ``proj`` bias is not masked, ``norm2(x)`` is multiplied by the head channel mask before ``fc1``;
* partial head deactivation: a dropped head's attention map is the identity (after patch masking), so it outputs its
  values; nothing else is masked;
* the MSA and FFN outputs are multiplied by the patch mask and by their block decisions.
"""
import argparse
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon
PATCH_THRESHOLD = 0.6
HEAD_THRESHOLD = 0.5
BLOCK_THRESHOLD = 0.5


@dataclass
class Config:
    """A DeiT-style architecture and the AdaViT options the reference follows."""
    img_size: int = 32
    patch_size: int = 8
    dim: int = 24
    depth: int = 3
    heads: int = 3
    num_classes: int = 7
    mlp_ratio: float = 4.0
    head_mode: str = 'full'
    patch_policy: str = 'token'

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def model_kwargs(self) -> Dict[str, object]:
        """Keyword arguments that build the same model as ``adavit.AdaViT`` (or, minus the last two, timm's ViT)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.dim, depth=self.depth,
                    num_heads=self.heads, num_classes=self.num_classes, mlp_ratio=self.mlp_ratio,
                    head_mode=self.head_mode, patch_policy=self.patch_policy)


TINY = Config()
DEIT_TINY = Config(img_size=224, patch_size=16, dim=192, depth=12, heads=3, num_classes=1000)


def make_official_state_dict(cfg: Config, seed: int = 0, gate_scale: float = 3.0) -> Dict[str, torch.Tensor]:
    """Random weights in the official key layout, scaled so that attention is peaked and about half of the patches,
    heads and sub-blocks are dropped at eval.

    Args:
        cfg: The architecture.
        seed: Seed of the weights.
        gate_scale: Spread of the decision logits (in units of their input's scale): large keeps decisions far from
            the thresholds, so float32 and float64 agree on them.
    """
    g = torch.Generator().manual_seed(seed)
    D, N, R, p = cfg.dim, cfg.num_patches, cfg.hidden, cfg.patch_size

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def linear(prefix: str, out_f: int, in_f: int) -> None:
        sd[f'{prefix}.weight'] = randn(out_f, in_f, std=1.0 / math.sqrt(in_f))
        sd[f'{prefix}.bias'] = randn(out_f, std=0.2)

    def norm(prefix: str) -> None:
        sd[f'{prefix}.weight'] = 1.0 + randn(D, std=0.1)
        sd[f'{prefix}.bias'] = randn(D, std=0.1)

    sd: Dict[str, torch.Tensor] = {
        # A class token of unit scale, so that the gates reading it (raw, no norm) give logits of a known spread.
        'cls_token': randn(1, 1, D),
        'pos_embed': randn(1, N + 1, D, std=0.5),
        'patch_embed.proj.weight': randn(D, 3, p, p, std=1.0 / math.sqrt(3 * p * p)),
        'patch_embed.proj.bias': randn(D, std=0.1),
    }
    threshold_logit = math.log(PATCH_THRESHOLD / (1 - PATCH_THRESHOLD))
    for i in range(cfg.depth):
        b = f'blocks.{i}'
        norm(f'{b}.norm1')
        for name in ('query', 'key', 'value'):
            linear(f'{b}.attn.{name}', D, D)
        # Sharper attention than 1/sqrt(D) weights give, so that a wrong mask changes the logits visibly.
        sd[f'{b}.attn.query.weight'] *= 2.0
        linear(f'{b}.attn.proj', D, D)
        norm(f'{b}.norm2')
        linear(f'{b}.mlp.fc1', R, D)
        linear(f'{b}.mlp.fc2', D, R)
        # Gate inputs: norm1 tokens have unit scale; the raw class token grows along the residual stream, so its
        # gates are scaled by 1/sqrt(block) as a rough normalisation.
        if cfg.patch_policy == 'token':
            sd[f'{b}.attn.token_select.mlp_head.weight'] = randn(1, D, std=gate_scale / math.sqrt(D))
            sd[f'{b}.attn.token_select.mlp_head.bias'] = torch.full((1,), threshold_logit)
        else:
            sd[f'{b}.attn.token_select.mlp_head.weight'] = randn(N, D, std=gate_scale / math.sqrt(D * (i + 1)))
            sd[f'{b}.attn.token_select.mlp_head.bias'] = torch.full((N,), threshold_logit)
        if i >= 1:
            sd[f'{b}.head_select.mlp_head.weight'] = randn(cfg.heads, D, std=gate_scale / math.sqrt(D * (i + 1)))
            sd[f'{b}.head_select.mlp_head.bias'] = randn(cfg.heads, std=0.3)
            sd[f'{b}.layer_select.mlp_head.weight'] = randn(2, D, std=gate_scale / math.sqrt(D * (i + 1)))
            sd[f'{b}.layer_select.mlp_head.bias'] = randn(2, std=0.3)
    norm('norm')
    linear('head', cfg.num_classes, D)
    return sd


def wrap_official_checkpoint(state_dict: Dict[str, torch.Tensor], seed: int = 1) -> Dict[str, object]:
    """Wrap a state dict as the released training script saves it: ``module.`` prefixes, a (different, older)
    ``state_dict`` next to the ``state_dict_ema`` that should be preferred, ``args`` and ``optimizer``."""
    g = torch.Generator().manual_seed(seed)
    stale = {f'module.{k}': v + torch.randn(v.shape, generator=g) for k, v in state_dict.items()}
    return {
        'state_dict': stale,
        'state_dict_ema': {f'module.{k}': v.clone() for k, v in state_dict.items()},
        'args': argparse.Namespace(model='ada_step_deit_small_patch16_224', ada_head=True, ada_layer=True,
                                   ada_token=True, keep_layers=1, head_select_tau=5.0),
        'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-4}]},
        'epoch': 149,
    }


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * weight + bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def reference_forward(
        state_dict: Dict[str, torch.Tensor],
        cfg: Config,
        images: torch.Tensor,
        decisions: Optional[Dict[str, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], float]:
    """Eval forward of an official-layout AdaViT, one image at a time.

    Args:
        state_dict: Official layout, no ``module.`` prefix.
        cfg: The architecture and options.
        images: (B, 3, H, W).
        decisions: Optional decisions to apply instead of the gates': ``patch`` (B, depth, N + 1), ``head``
            (B, depth, H), ``block`` (B, depth, 2).

    Returns:
        Logits (B, classes) in float64, the decisions taken (same layout as above, ungated entries 1), and the smallest
        distance of a gate logit to its threshold (how safely float32 should agree with the decisions).
    """
    sd = {k: v.double() for k, v in state_dict.items()}
    B = images.shape[0]
    D, H, N, p, L = cfg.dim, cfg.heads, cfg.num_patches, cfg.patch_size, cfg.depth
    dh = D // H
    grid = cfg.img_size // p
    taken = {'patch': torch.ones(B, L, N + 1, dtype=torch.float64), 'head': torch.ones(B, L, H, dtype=torch.float64),
             'block': torch.ones(B, L, 2, dtype=torch.float64)}
    margin = math.inf
    all_logits = []
    for n in range(B):
        img = images[n].double()
        # Patch embedding as an explicit patchify + matmul (row-major patch order, like a strided conv).
        patches = img.reshape(3, grid, p, grid, p).permute(1, 3, 0, 2, 4).reshape(N, 3 * p * p)
        tokens = patches @ sd['patch_embed.proj.weight'].reshape(D, -1).T + sd['patch_embed.proj.bias']
        x = torch.cat([sd['cls_token'][0], tokens], dim=0) + sd['pos_embed'][0]  # (N + 1, D)
        for i in range(L):
            b = f'blocks.{i}'
            xn = _layer_norm(x, sd[f'{b}.norm1.weight'], sd[f'{b}.norm1.bias'])
            cls_raw = x[0]

            # --- decisions
            w, bias = sd[f'{b}.attn.token_select.mlp_head.weight'], sd[f'{b}.attn.token_select.mlp_head.bias']
            if cfg.patch_policy == 'token':
                patch_logits = torch.stack([xn[j] @ w[0] + bias[0] for j in range(1, N + 1)])
            else:
                patch_logits = w @ cls_raw + bias
            probs = torch.sigmoid(patch_logits)
            margin = min(margin, (probs - PATCH_THRESHOLD).abs().min().item())
            t = torch.cat([torch.ones(1, dtype=torch.float64), (probs > PATCH_THRESHOLD).double()])
            heads = torch.ones(H, dtype=torch.float64)
            blocks = torch.ones(2, dtype=torch.float64)
            if f'{b}.head_select.mlp_head.weight' in sd:
                probs = torch.sigmoid(sd[f'{b}.head_select.mlp_head.weight'] @ cls_raw
                                      + sd[f'{b}.head_select.mlp_head.bias'])
                margin = min(margin, (probs - HEAD_THRESHOLD).abs().min().item())
                heads = (probs > HEAD_THRESHOLD).double()
            if f'{b}.layer_select.mlp_head.weight' in sd:
                probs = torch.sigmoid(sd[f'{b}.layer_select.mlp_head.weight'] @ cls_raw
                                      + sd[f'{b}.layer_select.mlp_head.bias'])
                margin = min(margin, (probs - BLOCK_THRESHOLD).abs().min().item())
                blocks = (probs > BLOCK_THRESHOLD).double()
            if decisions is not None:
                t = decisions['patch'][n, i].double()
                heads = decisions['head'][n, i].double()
                blocks = decisions['block'][n, i].double()
            taken['patch'][n, i], taken['head'][n, i], taken['block'][n, i] = t, heads, blocks
            channel_keep = heads.repeat_interleave(dh)  # (D,)
            kept = torch.nonzero(t > 0.5).flatten()

            # --- MSA
            q = xn @ sd[f'{b}.attn.query.weight'].T + sd[f'{b}.attn.query.bias']
            k = xn @ sd[f'{b}.attn.key.weight'].T + sd[f'{b}.attn.key.bias']
            v = xn @ sd[f'{b}.attn.value.weight'].T + sd[f'{b}.attn.value.bias']
            head_outputs = []
            for h in range(H):
                cols = slice(h * dh, (h + 1) * dh)
                qh, kh, vh = q[:, cols], k[:, cols], v[:, cols]
                if cfg.head_mode == 'full' and heads[h] == 0:
                    qh, kh, vh = torch.zeros_like(qh), torch.zeros_like(kh), torch.zeros_like(vh)
                out = vh.clone()  # a dropped query sees only itself: softmax over one key is 1
                attn = torch.softmax(qh[kept] @ kh[kept].T / math.sqrt(dh), dim=-1)
                out[kept] = attn @ vh[kept]
                if cfg.head_mode == 'partial' and heads[h] == 0:
                    out = vh.clone()  # identity attention map
                head_outputs.append(out)
            o = torch.cat(head_outputs, dim=1)
            if cfg.head_mode == 'full':
                o = o * channel_keep
            o = o @ sd[f'{b}.attn.proj.weight'].T + sd[f'{b}.attn.proj.bias']  # proj bias not masked
            x = x + blocks[0] * t[:, None] * o

            # --- FFN
            h2 = _layer_norm(x, sd[f'{b}.norm2.weight'], sd[f'{b}.norm2.bias'])
            if cfg.head_mode == 'full':
                h2 = h2 * channel_keep
            f = _gelu(h2 @ sd[f'{b}.mlp.fc1.weight'].T + sd[f'{b}.mlp.fc1.bias'])
            f = f @ sd[f'{b}.mlp.fc2.weight'].T + sd[f'{b}.mlp.fc2.bias']
            x = x + blocks[1] * t[:, None] * f
        cls_out = _layer_norm(x, sd['norm.weight'], sd['norm.bias'])[0]
        all_logits.append(cls_out @ sd['head.weight'].T + sd['head.bias'])
    return torch.stack(all_logits), taken, margin
