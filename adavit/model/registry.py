"""timm entrypoints: ``timm.create_model("adavit_deit_small_patch16_224", pretrained=True)`` and the official names.

The pretrained configs point at the DeiT ImageNet-1k weights; the decision networks start from their initialisation
and timm reports them as the expected missing keys. A local file loads with
``pretrained_cfg_overlay=dict(file=PATH)``: a timm/DeiT backbone, an official AdaViT checkpoint, or one of ours.
"""
from typing import Any, Dict

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .adavit import AdaViT
from .checkpoint import checkpoint_filter_fn

_DEIT_ARGS = {
    'tiny': dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'small': dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'base': dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
}
_DEIT_URLS = {
    'tiny': 'https://dl.fbaipublicfiles.com/deit/deit_tiny_patch16_224-a1311bcf.pth',
    'small': 'https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth',
    'base': 'https://dl.fbaipublicfiles.com/deit/deit_base_patch16_224-b5f2ef4d.pth',
}


def _cfg(size: str) -> Dict[str, Any]:
    return {
        'url': _DEIT_URLS[size], 'hf_hub_id': f'timm/deit_{size}_patch16_224.fb_in1k',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': .9,
        'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head', 'license': 'apache-2.0',
    }


default_cfgs = generate_default_cfgs({
    f'{prefix}_deit_{size}_patch16_224.fb_in1k': _cfg(size)
    for prefix in ('adavit', 'ada_step') for size in _DEIT_ARGS
})


def create_adavit(variant: str, pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """Build a registered AdaViT variant through timm (pretrained loading, config overlays, features)."""
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        AdaViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # Non-strict so that the decision networks a backbone lacks are reported, not fatal; checkpoint_filter_fn
        # rejects any other missing key.
        pretrained_strict=False,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _deit(size: str, prefix: str, pretrained: bool, kwargs: Dict[str, Any]) -> AdaViT:
    return create_adavit(f'{prefix}_deit_{size}_patch16_224', pretrained, **dict(_DEIT_ARGS[size], **kwargs))


@register_model
def adavit_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """AdaViT over DeiT-Tiny (1.3 GMACs dense)."""
    return _deit('tiny', 'adavit', pretrained, kwargs)


@register_model
def adavit_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """AdaViT over DeiT-Small (4.6 GMACs dense; the paper's Ada-DeiT-S)."""
    return _deit('small', 'adavit', pretrained, kwargs)


@register_model
def adavit_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """AdaViT over DeiT-Base (17.6 GMACs dense)."""
    return _deit('base', 'adavit', pretrained, kwargs)


@register_model
def ada_step_deit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """The official code's name for ``adavit_deit_tiny_patch16_224``."""
    return _deit('tiny', 'ada_step', pretrained, kwargs)


@register_model
def ada_step_deit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """The official code's name for ``adavit_deit_small_patch16_224``."""
    return _deit('small', 'ada_step', pretrained, kwargs)


@register_model
def ada_step_deit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> AdaViT:
    """The official code's name for ``adavit_deit_base_patch16_224``."""
    return _deit('base', 'ada_step', pretrained, kwargs)
