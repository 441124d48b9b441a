"""AdaViT: Adaptive Vision Transformers on timm, with decisions that really skip work."""
from .errors import AdaViTError, CheckpointError, ConfigError, InputError
from .model import AdaViT, Decisions, convert_official_state_dict, load_checkpoint_file
from .losses.usage import AdaViTLoss, distillation_loss, usage_loss
from .cost.macs import decision_macs, dense_macs, macs
from .gates.budget import calibrate_thresholds, random_patch_keep_for_cost
from .training.checkpoint import load_model

__version__ = '0.1.0'
