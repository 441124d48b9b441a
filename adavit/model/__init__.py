from .adavit import AdaViT, BlockDecisions, Decisions, gate_keys
from .checkpoint import convert_official_state_dict, load_checkpoint_file, unwrap_state_dict
from . import registry  # noqa: F401  registers the timm entrypoints
