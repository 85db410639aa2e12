"""mtssm.nn: multi-task dense prediction networks with state-space (Mamba) decoders.

Blocks to reuse (``SS2D`` and its scan cores, ``STMBlock``, ``CTMBlock``, ``SCTMBlock``, ...), whole models from the
registry (``create_model("mtmamba_swin_large_nyud")``, ``list_models()``), and the functional scan
API in :mod:`mtssm.nn.functional`.
"""

from mtssm.nn import encoders, functional
from mtssm.nn.encoders import create_encoder, list_encoders
from mtssm.nn.heads import ConvHead, ExpandHead, LinearHead
from mtssm.nn.layers import DropPath, FinalPatchExpand4x, LayerNorm2d, PatchExpand
from mtssm.nn.model import ExportableModel, MultiTaskModel
from mtssm.nn.msm import MSScan, build_msm, msm_cross_block
from mtssm.nn.mtmamba import CTMBlock, MTMambaDecoder, MTMambaStage, STMBlock
from mtssm.nn.mtmamba_pp import FCTMBlock, SCTMBlock
from mtssm.nn.pamm import PAMEBlock, PAMMDecoder
from mtssm.nn.registry import DECODERS, MODEL_CONFIGS, create_model, list_models, model_config, register_model
from mtssm.nn.ss2d import SS2D, CrossSS2D, DirectionalScan, mamba_init_
from mtssm.nn.tasks import DATASET_TASKS, dataset_tasks, resolve_tasks, task_channels

__all__ = [
    "build_msm",
    "ConvHead",
    "create_encoder",
    "create_model",
    "CrossSS2D",
    "CTMBlock",
    "DATASET_TASKS",
    "dataset_tasks",
    "DECODERS",
    "DirectionalScan",
    "DropPath",
    "encoders",
    "ExpandHead",
    "ExportableModel",
    "FCTMBlock",
    "FinalPatchExpand4x",
    "functional",
    "LayerNorm2d",
    "LinearHead",
    "list_encoders",
    "list_models",
    "model_config",
    "MODEL_CONFIGS",
    "mamba_init_",
    "msm_cross_block",
    "MSScan",
    "MTMambaDecoder",
    "MTMambaStage",
    "MultiTaskModel",
    "PAMEBlock",
    "PAMMDecoder",
    "PatchExpand",
    "register_model",
    "resolve_tasks",
    "SCTMBlock",
    "SS2D",
    "STMBlock",
    "task_channels",
]
