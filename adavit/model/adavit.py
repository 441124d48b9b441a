"""AdaViT: a timm ``VisionTransformer`` that decides, per image and per block, which patches, heads and sub-blocks run.

Each block ``l`` may carry three decision networks (SPEC.md, "Decision networks"):

* ``blocks[l].patch_gate`` scores patch tokens (from ``patch_start_layer`` on);
* ``blocks[l].head_gate`` scores attention heads from the raw class token (from ``keep_layers`` on);
* ``blocks[l].block_gate`` scores the [MSA, FFN] sub-blocks from the same class token (from ``keep_layers`` on).

The blocks themselves are timm's, untouched, so a DeiT/ViT state dict loads as is and the decision networks are the
only new parameters. Defaults reproduce the released models in eval mode.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError, ConfigError, InputError
from ..execution.masked import masked_block_forward
from ..execution.sparse import runs_accelerator_plan, sparse_block_forward
from ..gates.networks import DecisionGate, PatchGate
from ..gates.sampling import bernoulli_decisions, gumbel_sigmoid_hard, threshold_decisions, threshold_mask

GATES = ('patch', 'head', 'block')
HEAD_MODES = ('full', 'partial')
PATCH_POLICIES = ('token', 'cls')
POLICIES = ('learned', 'random')
EXECUTORS = ('sparse', 'masked')
EVAL_RULES = ('released', 'consistent')
TRAIN_DECISIONS = ('gumbel', 'eval')


@dataclass
class Decisions:
    """What a forward pass decided, as floats in {0, 1}; ungated blocks and units read 1.

    Attributes:
        patch: (B, depth, num_tokens), prefix (class) tokens first and always 1.
        head: (B, depth, num_heads).
        block: (B, depth, 2), [MSA, FFN].
        patch_gated: (depth,) bool, blocks whose patches are decided.
        head_gated: (depth,) bool, blocks whose heads are decided.
        block_gated: (depth,) bool, blocks whose sub-blocks are decided.
    """
    patch: torch.Tensor
    head: torch.Tensor
    block: torch.Tensor
    patch_gated: torch.Tensor
    head_gated: torch.Tensor
    block_gated: torch.Tensor

    def __getitem__(self, index: Any) -> 'Decisions':
        """The decisions of a subset of the batch."""
        return Decisions(self.patch[index], self.head[index], self.block[index],
                         self.patch_gated, self.head_gated, self.block_gated)


@dataclass
class BlockDecisions:
    """The decisions of one block: full-size tensors, or None where every unit of that kind runs."""
    patch: Optional[torch.Tensor]  # (B, num_tokens)
    head: Optional[torch.Tensor]  # (B, num_heads)
    block: Optional[torch.Tensor]  # (B, 2)


class AdaViT(VisionTransformer):
    """Adaptive Vision Transformer (Meng et al., CVPR 2022) over timm's ``VisionTransformer``.

    ``model(x)`` returns logits; ``model(x, return_decisions=True)`` returns ``(logits, Decisions)``. In training the
    decisions are sampled (binary Gumbel-softmax, hard straight-through) and applied by masking; in eval they are
    deterministic and, by default, executed sparsely (``model.executor``).
    """

    def __init__(
            self,
            *args: Any,
            gates: Sequence[str] = GATES,
            keep_layers: int = 1,
            patch_start_layer: int = 0,
            patch_threshold: float = 0.6,
            head_threshold: float = 0.5,
            block_threshold: float = 0.5,
            tau: float = 5.0,
            head_mode: str = 'full',
            patch_policy: str = 'token',
            policy: str = 'learned',
            random_keep: Sequence[float] = (0.5, 0.5, 0.5),
            random_seed: int = 0,
            executor: str = 'sparse',
            eval_rule: str = 'released',
            train_decisions: str = 'gumbel',
            **kwargs: Any,
    ) -> None:
        """
        Args:
            *args: Positional arguments of timm's ``VisionTransformer``.
            gates: Which decisions are made: any of ``"patch"``, ``"head"``, ``"block"``.
            keep_layers: Head and block gates exist in blocks ``l >= keep_layers``.
            patch_start_layer: Patch gates exist in blocks ``l >= patch_start_layer``.
            patch_threshold: Keep a patch when its (relaxed) probability exceeds this (released: 0.6).
            head_threshold: Same for heads (released: 0.5).
            block_threshold: Same for MSA and FFN (released: 0.5).
            tau: Gumbel-softmax temperature in training (released: 5, constant).
            head_mode: ``"full"`` or ``"partial"`` head deactivation.
            patch_policy: ``"token"`` (a score per patch token, released) or ``"cls"`` (``Linear(D, N)`` on the class
                token, the paper's description).
            policy: ``"learned"`` (the decision networks) or ``"random"`` (Bernoulli at ``random_keep``, the paper's
                Random and Random+ baselines).
            random_keep: Keep probabilities (patch, head, block) of the random policy.
            random_seed: Seed of the random policy's generator.
            executor: Eval execution, ``"sparse"`` (skip what is dropped) or ``"masked"`` (the reference).
            eval_rule: ``"released"``: keep iff ``sigmoid(z) > threshold`` (the released models); ``"consistent"``:
                keep iff ``sigmoid(z / tau) > threshold``, i.e. iff training's noisy rule keeps the unit more often
                than not. They differ where the threshold is not 0.5 (patches: 0.6), where the released rule keeps
                far more patches at eval than in training (SPEC.md, "Measured weakness"). Opt-in.
            train_decisions: Decisions of the learned policy in training. ``"gumbel"``: Gumbel-sigmoid samples, which
                train the decision networks (the method). ``"eval"``: the noise-free eval decisions, so that a trained
                model's backbone adapts to exactly the decisions it will serve; the decision networks get no gradient
                and the trainer freezes them. Opt-in, for a last fine-tuning stage.
            **kwargs: Keyword arguments of timm's ``VisionTransformer``.
        """
        unknown = sorted(set(gates) - set(GATES))
        _check_choice('head_mode', head_mode, HEAD_MODES)
        _check_choice('patch_policy', patch_policy, PATCH_POLICIES)
        _check_choice('policy', policy, POLICIES)
        _check_choice('executor', executor, EXECUTORS)
        _check_choice('eval_rule', eval_rule, EVAL_RULES)
        _check_choice('train_decisions', train_decisions, TRAIN_DECISIONS)
        if unknown:
            raise ConfigError(f'unknown gates {unknown}: choose from {list(GATES)}')
        if len(random_keep) != 3 or not all(0.0 <= p <= 1.0 for p in random_keep):
            raise ConfigError(f'random_keep must be three probabilities (patch, head, block), got {random_keep}')
        if kwargs.get('global_pool') == 'map' or kwargs.get('attn_layer') not in (None, 'mha'):
            raise ConfigError('AdaViT supports token or average pooling and timm\'s standard attention only')
        super().__init__(*args, **kwargs)
        if not self.has_class_token:
            raise ConfigError('AdaViT needs a class token (class_token=True): its decision networks read it')

        self.vit_kwargs = dict(kwargs)  # the backbone's architecture, to build its dense twin
        self.adavit_config = dict(
            gates=list(gates), keep_layers=keep_layers, patch_start_layer=patch_start_layer,
            patch_threshold=patch_threshold, head_threshold=head_threshold, block_threshold=block_threshold,
            tau=tau, head_mode=head_mode, patch_policy=patch_policy, policy=policy, random_keep=list(random_keep),
            random_seed=random_seed, eval_rule=eval_rule, train_decisions=train_decisions,
        )
        self.patch_threshold = patch_threshold
        self.head_threshold = head_threshold
        self.block_threshold = block_threshold
        self.tau = tau
        self.head_mode = head_mode
        self.patch_policy = patch_policy
        self.policy = policy
        self.random_keep = tuple(float(p) for p in random_keep)
        self.random_seed = random_seed
        self.executor = executor
        self.eval_rule = eval_rule
        self.train_decisions = train_decisions
        self._generator: Optional[torch.Generator] = None
        self._random_keep_probs: Optional[tuple] = None  # (key, keep probability of each drawn unit, widths)

        depth = len(self.blocks)
        num_patches = self.patch_embed.num_patches
        dim = self.embed_dim
        for i, blk in enumerate(self.blocks):
            blk.patch_gate = PatchGate(dim, num_patches, patch_policy) \
                if 'patch' in gates and i >= patch_start_layer else None
            blk.head_gate = DecisionGate(dim, blk.attn.num_heads) if 'head' in gates and i >= keep_layers else None
            blk.block_gate = DecisionGate(dim, 2) if 'block' in gates and i >= keep_layers else None
        self.register_buffer('patch_gated', torch.tensor([b.patch_gate is not None for b in self.blocks]), False)
        self.register_buffer('head_gated', torch.tensor([b.head_gate is not None for b in self.blocks]), False)
        self.register_buffer('block_gated', torch.tensor([b.block_gate is not None for b in self.blocks]), False)
        assert len(self.patch_gated) == depth

    # ----------------------------------------------------------------------------------------------------------------
    # Decisions

    def set_thresholds(
            self,
            patch: Optional[float] = None,
            head: Optional[float] = None,
            block: Optional[float] = None,
    ) -> None:
        """The run-time budget knob: raise a threshold to drop more, lower it to keep more, without retraining."""
        for name, value in (('patch', patch), ('head', head), ('block', block)):
            if value is not None:
                if not 0.0 <= value <= 1.0:
                    raise ConfigError(f'{name} threshold must lie in [0, 1], got {value}')
                setattr(self, f'{name}_threshold', float(value))

    def reset_random_policy(self, seed: Optional[int] = None) -> None:
        """Restart the random policy's decisions from ``seed`` (default: the model's ``random_seed``)."""
        self._generator = torch.Generator().manual_seed(self.random_seed if seed is None else seed)

    def _decide(self, logits: torch.Tensor, threshold: float, keep_prob: float) -> torch.Tensor:
        if self.policy == 'random':
            if self._generator is None:
                self.reset_random_policy()
            draw = bernoulli_decisions(logits.shape, keep_prob, logits, self._generator)
            # Zero-valued link to the logits: every parameter takes part in the graph, so DDP needs no
            # find_unused_parameters, and the decision networks stay untrained.
            return draw + 0.0 * logits if self.training else draw
        if self.training and self.train_decisions == 'gumbel':
            return gumbel_sigmoid_hard(logits, self.tau, threshold)
        return threshold_decisions(self._eval_logits(logits), threshold)

    def _eval_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the eval rule compares with the threshold's logit."""
        if self.eval_rule == 'consistent':
            # Keep a unit iff training keeps it more often than not: sigmoid((z + noise) / tau) > thr holds with
            # probability > 1/2 exactly when z > tau * logit(thr), i.e. sigmoid(z / tau) > thr.
            return logits / self.tau
        return logits

    def block_decisions(self, index: int, x: torch.Tensor, x_normed: torch.Tensor) -> BlockDecisions:
        """The decisions of block ``index`` for its input ``x`` (B, N, D) and ``x_normed = norm1(x)``.

        The random policy in eval draws for all blocks at once (``forward`` does, once per call): here each call draws
        anew for every block and returns block ``index``'s.
        """
        blk = self.blocks[index]
        if self.policy == 'random' and not self.training:
            return self._random_decisions(x)[index]
        cls_token = x[:, 0]  # (B, D), raw: the head and block gates read it before any norm
        need_logits = self.policy == 'learned' or self.training
        patch = head = block = None
        if blk.patch_gate is not None:
            logits = blk.patch_gate(x_normed, cls_token, self.num_prefix_tokens) if need_logits \
                else x.new_zeros(x.shape[0], x.shape[1] - self.num_prefix_tokens)  # (B, N_patches)
            keep = self._decide(logits, self.patch_threshold, self.random_keep[0])
            patch = torch.cat([keep.new_ones(x.shape[0], self.num_prefix_tokens), keep], dim=1)  # (B, N)
        if blk.head_gate is not None:
            logits = blk.head_gate(cls_token) if need_logits else x.new_zeros(x.shape[0], blk.attn.num_heads)
            head = self._decide(logits, self.head_threshold, self.random_keep[1])
        if blk.block_gate is not None:
            logits = blk.block_gate(cls_token) if need_logits else x.new_zeros(x.shape[0], 2)
            block = self._decide(logits, self.block_threshold, self.random_keep[2])
        return BlockDecisions(patch, head, block)

    def _gate_masks(self, blk: nn.Module, x: torch.Tensor, x_normed: torch.Tensor) -> BlockDecisions:
        """The decision networks' eval decisions (``block_decisions``, policy ``"learned"``) as bool masks, which the
        sparse executor reads.

        The same logits and the same comparisons, hence the same decisions as the masked executor gets, without the
        float casts, the module calls and the concatenation of the prefix tokens. At batch 1 those cost a DeiT-S block
        about 35 of ``block_decisions``' 150 us (2 CPU threads, Intel Xeon): this made the forward 1.026x as fast,
        paired against it with the same decisions; most of what is left is the patch gate reading every normed token.
        """
        gates = blk._modules  # dictionary lookups instead of ``__getattr__``: this runs once per block
        patch_gate, head_gate, block_gate = (gates.get(f'{kind}_gate') for kind in GATES)  # None: not gated

        def mask(gate: nn.Linear, inputs: torch.Tensor, threshold: float) -> torch.Tensor:
            return threshold_mask(self._eval_logits(F.linear(inputs, gate.weight, gate.bias)), threshold)

        cls_token = x[:, 0]  # (B, D), raw
        patch = head = block = None
        if patch_gate is not None:
            prefix = self.num_prefix_tokens
            if patch_gate.policy == 'token':  # every token's score, the prefix tokens' too, which are then kept
                patch = mask(patch_gate, x_normed, self.patch_threshold).squeeze(-1)  # (B, N, 1) -> (B, N)
                patch[:, :prefix] = True
            else:
                keep = mask(patch_gate, cls_token, self.patch_threshold)  # (B, N_patches)
                patch = torch.cat([keep.new_ones(x.shape[0], prefix), keep], dim=1)  # (B, N)
        if head_gate is not None:
            head = mask(head_gate, cls_token, self.head_threshold)  # (B, H)
        if block_gate is not None:
            block = mask(block_gate, cls_token, self.block_threshold)  # (B, 2)
        return BlockDecisions(patch, head, block)

    def _random_decisions(self, x: torch.Tensor, on_host: bool = False) -> List[BlockDecisions]:
        """The random policy's eval decisions for every block, from a single draw (a draw per block, with its casts,
        costs about 4% of a DeiT-S forward at batch 1). A unit is kept when its uniform draw in [0, 1) falls below its
        keep probability, so the prefix tokens, at probability 1, always are. The draw is laid out block by block, each
        block's (B, units) row-major: the same numbers, in the same order, as one draw per block. They are made on the
        host, and stay there (as bool) with ``on_host``; else they go to ``x``'s device and dtype."""
        if self._generator is None:
            self.reset_random_policy()
        B, N = x.shape[:2]
        key = (B, N, self.random_keep, self.num_prefix_tokens)  # and the gates each block has, fixed at construction
        if self._random_keep_probs is None or self._random_keep_probs[0] != key:
            widths = [(N if blk.patch_gate is not None else 0, blk.attn.num_heads if blk.head_gate is not None else 0,
                       2 if blk.block_gate is not None else 0) for blk in self.blocks]
            rows = []
            for patch, head, block in widths:  # one block's keep probabilities, then repeated for each image
                prefix = min(self.num_prefix_tokens, patch)
                row = [1.0] * prefix + [self.random_keep[0]] * (patch - prefix)
                rows.append(torch.tensor(row + [self.random_keep[1]] * head + [self.random_keep[2]] * block))
            self._random_keep_probs = (key, torch.cat([row.repeat(B) for row in rows]).numpy(), widths)
        _, probs, widths = self._random_keep_probs
        # Compared in NumPy, on one thread: torch's comparison opens a parallel region over every core. On a 16-core GPU
        # host this function's own time, the comparison included, was 3 ms a call at batch 256 (630,000 draws), against
        # 0.25 ms here on 2 cores (where NumPy and torch tie); not yet timed there. The same bits either way.
        draw = torch.from_numpy(torch.rand(probs.size, generator=self._generator).numpy() < probs)
        draw = draw if on_host else draw.to(device=x.device, dtype=x.dtype)
        if B == 1:  # every block's (1, N), (1, H), (1, 2) follow each other: one split
            parts = draw.view(1, -1).split([w for block_widths in widths for w in block_widths], dim=1)
        else:
            parts = [p for chunk, block_widths in zip(draw.split([B * sum(w) for w in widths]), widths)
                     for p in chunk.view(B, sum(block_widths)).split(block_widths, dim=1)]  # (B, N), (B, H), (B, 2)
        return [BlockDecisions(*(p if w else None for p, w in zip(parts[3 * i:3 * i + 3], block_widths)))
                for i, block_widths in enumerate(widths)]

    # ----------------------------------------------------------------------------------------------------------------
    # Forward

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a one-line ``InputError`` unless ``x`` is an image batch this model accepts."""
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f'expected an image batch of shape (B, C, H, W), got {got}')
        in_chans = self.patch_embed.proj.in_channels
        if x.shape[1] != in_chans:
            raise InputError(f'model takes {in_chans}-channel images, got {x.shape[1]} channels: convert the images '
                             f'(e.g. with the transform from timm.data.resolve_data_config(model=model))')
        expected = tuple(self.patch_embed.img_size)
        if not self.dynamic_img_size and tuple(x.shape[2:]) != expected:
            raise InputError(f'model takes {expected[0]}x{expected[1]} images, got {x.shape[2]}x{x.shape[3]}: resize '
                             f'them (e.g. with the transform from timm.data.resolve_data_config(model=model))')

    def forward_features(
            self,
            x: torch.Tensor,
            decisions: Optional[Decisions] = None,
            return_decisions: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Decisions]]:
        """Embed the images and run the blocks under their decisions.

        Args:
            x: Images, (B, C, H, W).
            decisions: Decisions to apply instead of the model's own (for ablations and tests), or None.
            return_decisions: Also return the decisions taken.

        Returns:
            Final-normed tokens (B, N, D), and the ``Decisions`` when asked.
        """
        self.check_input(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)  # (B, N, D)

        # The sparse executor is for inference: with gradients on, eval runs the masked reference, whose gradients are
        # exact (for saliency maps and the like).
        sparse = not self.training and self.executor == 'sparse' and not torch.is_grad_enabled()
        taken: List[BlockDecisions] = []
        # The random policy decides for every block at once (its draws do not depend on the tokens). Its decisions stay
        # on the host for the sparse executor on a GPU: the executor plans on the host, and would otherwise wait for the
        # device to copy them back, once per block.
        drawn = None
        if decisions is None and self.policy == 'random' and not self.training:
            drawn = self._random_decisions(x, on_host=sparse and runs_accelerator_plan(x.device))
        for i, blk in enumerate(self.blocks):
            bd = None
            if decisions is not None:
                bd = BlockDecisions(decisions.patch[:, i], decisions.head[:, i], decisions.block[:, i])
            elif drawn is not None:
                bd = drawn[i]
            # The patch gate reads norm1 of every token. Without it, the sparse executor norms only the rows it keeps.
            x_normed = blk.norm1(x) if bd is None or not sparse else None
            if bd is None:
                bd = self._gate_masks(blk, x, x_normed) if sparse and self.policy == 'learned' \
                    else self.block_decisions(i, x, x_normed)
            if sparse:
                x = sparse_block_forward(blk, x, x_normed, bd.patch, bd.head, bd.block, self.head_mode)
            else:
                x = masked_block_forward(blk, x, x_normed, bd.patch, bd.head, bd.block, self.head_mode)
            taken.append(bd)
        x = self.norm(x)
        if return_decisions:
            return x, self._stack(taken, x)
        return x

    def forward(
            self,
            x: torch.Tensor,
            return_decisions: bool = False,
            decisions: Optional[Decisions] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, Decisions]]:
        """Logits (B, num_classes), and the ``Decisions`` taken when ``return_decisions`` is set."""
        out = self.forward_features(x, decisions=decisions, return_decisions=return_decisions)
        if return_decisions:
            features, taken = out
            return self.forward_head(features), taken
        return self.forward_head(out)

    def _stack(self, taken: List[BlockDecisions], x: torch.Tensor) -> Decisions:
        B, N = x.shape[:2]
        ones = x.new_ones(())

        def stack(parts: List[Optional[torch.Tensor]], width: int) -> torch.Tensor:  # on x's device, in its dtype
            return torch.stack([p.to(ones) if p is not None else ones.expand(B, width) for p in parts], dim=1)

        num_heads = self.blocks[0].attn.num_heads
        return Decisions(
            patch=stack([d.patch for d in taken], N),
            head=stack([d.head for d in taken], num_heads),
            block=stack([d.block for d in taken], 2),
            patch_gated=self.patch_gated, head_gated=self.head_gated, block_gated=self.block_gated,
        )

    def dense_twin(self) -> VisionTransformer:
        """timm's plain ``VisionTransformer`` with this model's architecture and backbone weights, in the same mode."""
        dense = VisionTransformer(**self.vit_kwargs)
        own = {k: v for k, v in self.state_dict().items() if k in dense.state_dict()}
        dense.load_state_dict(own)
        return dense.to(next(self.parameters())).train(self.training)

    # ----------------------------------------------------------------------------------------------------------------
    # Loading

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, but a mismatch under ``strict`` is one line that names the keys."""
        if strict:
            check_state_dict_matches(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def check_state_dict_matches(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Raise a one-line ``CheckpointError`` naming missing, unexpected and mis-shaped keys, if any."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mis_shaped = [f'{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}' for k, v in own.items()
                  if k in state_dict and hasattr(state_dict[k], 'shape') and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f'missing keys {_few(missing)}')
    if unexpected:
        problems.append(f'unexpected keys {_few(unexpected)}')
    if mis_shaped:
        problems.append(f'shape mismatch {_few(mis_shaped)}')
    if problems:
        hint = ('; official AdaViT checkpoints go through adavit.convert_official_state_dict'
                if any('.query.' in k or 'token_select' in k for k in unexpected) else
                '; check that the checkpoint was made for this model (architecture, classes, image size)')
        raise CheckpointError(f'state dict does not fit {type(model).__name__}: ' + '; '.join(problems) + hint)


def _few(items: List[str], limit: int = 8) -> str:
    shown = ', '.join(items[:limit])
    return f'[{shown}' + (f', ... {len(items) - limit} more]' if len(items) > limit else ']')


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f'{name} must be one of {list(choices)}, got {value!r}')


def gate_keys(model: AdaViT) -> List[str]:
    """The state-dict keys of the decision networks (new parameters a backbone checkpoint does not have)."""
    return [k for k in model.state_dict() if any(g in k for g in ('.patch_gate.', '.head_gate.', '.block_gate.'))]

