"""Write the official-output fixtures of ``tests/nn/test_official_parity.py`` (run by hand, not in CI).

Runs the official MTMamba, MTMamba++ and PAMM code once, on CPU, at small widths with random weights
(fixed seeds), and saves under ``tests/fixtures/official/``:

* ``<name>.pth.tar``: the model's checkpoint in the official format (``{'model': state_dict}`` of a
  DistributedDataParallel model: every key under ``module.``), what ``main.py`` of each project saves;
* ``<name>_io.pt``: the input image, the official outputs per task, the hyperparameters the test
  builds the mtssm model with, and (PAMM) the tensors the official code keeps outside its state dict.

The official sources are imported from ``--official-root`` (default: the folder holding this
repository), never copied::

    MTMamba/          https://github.com/EnVision-Research/MTMamba
    PAMM/             https://github.com/CQC-gogopro/PAMM
    mmsegmentation/   mmseg 1.x sources; only mmseg/models/backbones/swin.py and
                      mmseg/models/utils/embed.py are read (e.g. ``pip download --no-deps
                      mmsegmentation==1.2.2`` and unzip)

What the official code imports but does not need here, or what cannot run on a CPU machine, is
replaced by the small stand-ins of this script: mamba-ssm's CUDA ``selective_scan_fn`` by its own
pure-PyTorch ``selective_scan_ref`` (loaded through :mod:`mtssm._ops.mamba_reference`), timm's
``DropPath`` / ``PatchEmbed`` / ``Mlp`` / init helpers, mmcv's ``build_norm_layer`` / ``FFN`` /
``build_dropout`` and mmengine's ``BaseModule`` (written from their documented behaviour), the
image libraries PAMM imports for its visualisations, and ``.cuda()`` / ``cuda:N`` devices (CPU).

Usage::

    python scripts/make_official_fixtures.py [--official-root DIR] [--out tests/fixtures/official]

PAMM's pair also holds, under ``extra``, its task priors (the official code keeps them outside its
state dict, random at construction) and its Hilbert scan orders (``get_h_order_4``) for a few map
sizes, including the paper's token grids.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SEED = 0


# --------------------------------------------------------------------------- stand-ins


def _module(name: str, **attrs) -> types.ModuleType:
    mod = sys.modules.get(name) or types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(_module(parent), child, mod)
    return mod


class DropPath(nn.Module):
    """timm's DropPath (stochastic depth); identity in eval mode, which is all the fixtures run."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class TimmMlp(nn.Module):
    """timm's Mlp: fc1, act, dropout, fc2, dropout."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0, **_):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _pair(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class TimmPatchEmbed(nn.Module):
    """timm's PatchEmbed: a p x p stride-p conv, flattened to (B, N, C); the input size is fixed."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **_):
        super().__init__()
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, self.patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        assert tuple(x.shape[-2:]) == self.img_size, (x.shape, self.img_size)
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


def _build_model_with_cfg(model_cls, variant, pretrained, default_cfg=None, **kwargs):
    for key in ("pretrained_filter_fn", "pretrained_custom_load"):
        kwargs.pop(key, None)
    return model_cls(**kwargs)


def _named_apply(fn, module, name="", depth_first=True, include_root=False):
    for child_name, child in module.named_children():
        _named_apply(fn, child, f"{name}.{child_name}" if name else child_name, depth_first, True)
    if include_root:
        fn(module=module, name=name)
    return module


def install_timm() -> None:
    init = nn.init
    _module("timm")
    _module(
        "timm.models.layers",
        DropPath=DropPath, Mlp=TimmMlp, PatchEmbed=TimmPatchEmbed, to_2tuple=_pair,
        trunc_normal_=init.trunc_normal_, lecun_normal_=lambda t: init.trunc_normal_(t, std=1 / math.sqrt(t.shape[1])),
    )
    _module(
        "timm.models.helpers",
        build_model_with_cfg=_build_model_with_cfg, named_apply=_named_apply, adapt_input_conv=lambda c, w: w,
    )
    _module(
        "timm.data",
        IMAGENET_DEFAULT_MEAN=(0.485, 0.456, 0.406), IMAGENET_DEFAULT_STD=(0.229, 0.224, 0.225),
        IMAGENET_INCEPTION_MEAN=(0.5, 0.5, 0.5), IMAGENET_INCEPTION_STD=(0.5, 0.5, 0.5),
    )


class BaseModule(nn.Module):
    """mmengine's BaseModule: an nn.Module remembering its ``init_cfg``."""

    def __init__(self, init_cfg=None):
        super().__init__()
        self.init_cfg = init_cfg

    def init_weights(self):
        for m in self.children():
            if hasattr(m, "init_weights"):
                m.init_weights()


class ModuleList(nn.ModuleList):
    def __init__(self, modules=None, init_cfg=None):
        super().__init__(modules)


def _build_norm_layer(cfg, num_features, postfix=""):
    assert cfg["type"] == "LN", cfg
    return f"ln{postfix}", nn.LayerNorm(num_features, eps=cfg.get("eps", 1e-5))


def _build_conv_layer(cfg, *args, **kwargs):
    assert cfg is None or cfg["type"] == "Conv2d", cfg
    return nn.Conv2d(*args, **kwargs)


def _build_dropout(cfg):
    assert cfg["type"] == "DropPath", cfg
    return DropPath(cfg.get("drop_prob", 0.0))


class FFN(BaseModule):
    """mmcv's FFN with two fcs: ``layers = [[Linear, act, Dropout], Linear, Dropout]`` and the
    identity added after its dropout layer."""

    def __init__(self, embed_dims=256, feedforward_channels=1024, num_fcs=2, act_cfg=None, ffn_drop=0.0,
                 dropout_layer=None, add_identity=True, init_cfg=None, **_):
        super().__init__(init_cfg)
        assert num_fcs == 2 and (act_cfg or {"type": "GELU"})["type"] == "GELU"
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.GELU(), nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )
        self.dropout_layer = _build_dropout(dropout_layer) if dropout_layer else nn.Identity()
        self.add_identity = add_identity

    def forward(self, x, identity=None):
        out = self.layers(x)
        if not self.add_identity:
            return self.dropout_layer(out)
        return (x if identity is None else identity) + self.dropout_layer(out)


def _trunc_normal_init(module, mean=0.0, std=1.0, a=-2.0, b=2.0, bias=0.0):
    nn.init.trunc_normal_(module.weight, mean, std, a, b)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


def _constant_init(module, val, bias=0.0):
    nn.init.constant_(module.weight, val)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, bias)


class _Registry:
    def register_module(self, *args, **kwargs):
        return lambda cls: cls


def install_mmseg(mmseg_root: Path) -> types.ModuleType:
    """mmcv / mmengine stand-ins, then mmseg's own swin.py and embed.py from ``mmseg_root``."""
    _module("mmcv")
    _module("mmcv.cnn", build_norm_layer=_build_norm_layer, build_conv_layer=_build_conv_layer)
    _module("mmcv.cnn.bricks")
    _module("mmcv.cnn.bricks.transformer", FFN=FFN, build_dropout=_build_dropout)
    _module("mmengine")
    _module("mmengine.logging", print_log=lambda *a, **k: None)
    _module("mmengine.model", BaseModule=BaseModule, ModuleList=ModuleList)
    _module(
        "mmengine.model.weight_init",
        constant_init=_constant_init, trunc_normal_=nn.init.trunc_normal_, trunc_normal_init=_trunc_normal_init,
    )
    _module("mmengine.runner", CheckpointLoader=None)
    _module("mmengine.utils", to_2tuple=_pair)
    _module("mmseg").__path__ = [str(mmseg_root / "mmseg")]
    _module("mmseg.registry", MODELS=_Registry())
    _module("mmseg.models").__path__ = [str(mmseg_root / "mmseg" / "models")]
    _module("mmseg.models.utils").__path__ = [str(mmseg_root / "mmseg" / "models" / "utils")]
    _module("mmseg.models.backbones").__path__ = [str(mmseg_root / "mmseg" / "models" / "backbones")]
    return importlib.import_module("mmseg.models.backbones.swin")


def install_mamba_ssm() -> None:
    from mtssm._ops.mamba_reference import load_mamba_selective_scan_ref

    ref = load_mamba_selective_scan_ref()
    _module("mamba_ssm")
    _module("mamba_ssm.ops")
    _module("mamba_ssm.ops.selective_scan_interface", selective_scan_fn=ref, selective_scan_ref=ref)


def install_pamm_imports() -> None:
    """PAMM imports image and plotting libraries for its visualisations and ``.cuda()``s its orders."""
    _module("cv2", applyColorMap=None, COLORMAP_BONE=None)
    _module("sklearn")
    _module("sklearn.decomposition", PCA=None)
    _module("matplotlib")
    _module("matplotlib.pyplot", get_cmap=None)
    _module("hilbertcurve")
    _module("hilbertcurve.hilbertcurve", HilbertCurve=None)
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]


class _CpuTorch(types.ModuleType):
    """``torch`` for a module that builds on ``torch.device('cuda:N')``: every device is the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def device(*args, **kwargs):
        return torch.device("cpu")


class P(dict):
    """The official configs' EasyDict: keys readable as attributes."""

    __getattr__ = dict.__getitem__
    __setattr__ = dict.__setitem__


# --------------------------------------------------------------------------- weights


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> None:
    """Move every parameter and norm statistic off its initial value (fixed seed), so that a weight
    loaded into the wrong place cannot go unnoticed; sizes stay moderate."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.add_(0.1 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.mul_(0.5 + torch.rand(b.shape, generator=g))


def ddp_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict a DistributedDataParallel wrapper of ``model`` saves."""
    return {f"module.{k}": v.detach().clone() for k, v in model.state_dict().items()}


def save(out: Path, name: str, model: nn.Module, x: torch.Tensor, outputs: dict, config: dict, extra=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": ddp_state(model)}, out / f"{name}.pth.tar")
    io = {"input": x, "outputs": {k: v.detach().clone() for k, v in outputs.items()}, "config": config}
    if extra:
        io["extra"] = extra
    torch.save(io, out / f"{name}_io.pt")
    size = sum((out / f).stat().st_size for f in (f"{name}.pth.tar", f"{name}_io.pt"))
    print(f"{name}: {sum(v.numel() for v in model.state_dict().values())} values, {size / 1e6:.2f} MB, "
          f"outputs {[tuple(v.shape) for v in outputs.values()]}")


def _purge(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


# --------------------------------------------------------------------------- MTMamba / MTMamba++

SWIN = dict(embed_dims=8, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
MTMAMBA_TASKS = {"semseg": 19, "depth": 1}  # the Cityscapes tasks: the smallest official task set
MTMAMBA_SIZE = (32, 64)  # not square, so a swapped H / W cannot go unnoticed


def make_mtmamba(root: Path, mmseg_swin: types.ModuleType, out: Path) -> None:
    sys.path.insert(0, str(root / "MTMamba"))
    try:
        _purge("models")
        from models.MTMamba import MTMamba
        from models.MTMamba_plus import MTMamba_plus

        p = P(TASKS=P(NAMES=list(MTMAMBA_TASKS), NUM_OUTPUT=dict(MTMAMBA_TASKS)), IMAGE_ORI_SIZE=MTMAMBA_SIZE)
        for name, cls, seed in (("mtmamba", MTMamba, 1), ("mtmamba_plus", MTMamba_plus, 2)):
            torch.manual_seed(seed)
            # as utils/common_config.py's get_backbone builds it, at small widths
            backbone = mmseg_swin.SwinTransformer(
                patch_size=4, pretrain_img_size=MTMAMBA_SIZE, pretrained=None, **SWIN
            )
            backbone.init_weights()
            nn_sync = nn.SyncBatchNorm
            nn.SyncBatchNorm = nn.BatchNorm2d  # same parameters and eval-mode arithmetic, runs on CPU
            try:
                model = cls(p, backbone, d_state=4)
            finally:
                nn.SyncBatchNorm = nn_sync
            randomise(model, seed)
            model.eval()
            torch.manual_seed(100 + seed)
            x = torch.randn(1, 3, *MTMAMBA_SIZE)
            with torch.no_grad():
                y = model(x)
            config = dict(
                encoder_kwargs=dict(embed_dim=SWIN["embed_dims"], depths=SWIN["depths"], num_heads=SWIN["num_heads"],
                                    window_size=SWIN["window_size"]),
                tasks=list(MTMAMBA_TASKS), dataset="cityscapes", d_state=4, depths=(2, 2, 2),
            )
            if name == "mtmamba_plus":
                config["head_hidden"] = 96  # MTMamba_plus.py: Conv2d(feature_channel[0], 96, 3)
            save(out, name, model, x, y, config)
    finally:
        sys.path.remove(str(root / "MTMamba"))
        _purge("models")


# --------------------------------------------------------------------------- PAMM

PAMM_GRID = (2, 3)  # ViT tokens (H, W): a 32 x 48 image; not square
PAMM_TASKS = {"semseg": 40, "depth": 1}  # PAMM's MoE reads task "semseg"; two tasks keep the file small
PAMM_VIT = dict(patch_size=16, embed_dim=32, depth=4, num_heads=2)
PAMM_DIM = 64  # decoder channels; GroupNorm(32, .) needs a multiple of 32
# the config's topk, which the official code passes to the B / C MoEs as their `kernal` (their top-k
# stays MoE's default 9): 1x1 experts keep the file near 6 MB (3x3 ones make it 8 MB)
PAMM_TOPK = 1
PAMM_ORDER_GRIDS = ((2, 3), (5, 8), (7, 7), (28, 36), (32, 32))  # 28x36, 32x32: NYUDv2's and PASCAL's


def pamm_config() -> P:
    """configs/nyu_PAME.yml at small widths (the keys the model code reads)."""
    h, w = PAMM_GRID
    return P(
        TASKS=P(NAMES=list(PAMM_TASKS), NUM_OUTPUT=dict(PAMM_TASKS)), H=h, W=w, Scan="h", BASELINE=False,
        overstage=0, promptB=True, promptC=True, MoE_B=True, MoE_C=True, SSM=True, TaskConv=True,
        LocalConv=False, final_embed_dim=PAMM_DIM, backbone_dim=PAMM_VIT["embed_dim"], dstate=4,
        rank_list=[2] * 15, topk=PAMM_TOPK, local_rank=0, __train__=False, backbone_stage3_dirs=None,
        meta=None, head_tsne_save_dirs=None, head_pca_save_dirs=None, head_vis_pca_reverse=False,
    )


def make_pamm(root: Path, out: Path) -> None:
    sys.path.insert(0, str(root / "PAMM"))
    try:
        _purge("models")
        moe = importlib.import_module("models.transformers.MoE_mamba")
        moe.torch = _CpuTorch()  # MoeMamba builds on torch.device('cuda:' + local_rank)
        pame = importlib.import_module("models.transformers.PAME")
        wrapper = importlib.import_module("models.PAME_wrapper")
        p = pamm_config()
        torch.manual_seed(3)
        size = (PAMM_GRID[0] * PAMM_VIT["patch_size"], PAMM_GRID[1] * PAMM_VIT["patch_size"])
        # as utils/common_config.py builds it (PAME_vit_large_patch16_384 at small widths; select_list
        # range(6, 24, 6) of the 24 blocks becomes blocks 1, 2, 3 of 4)
        backbone = pame._create_PAME(
            "vit_large_patch16_384", pretrained=False, p=p, select_list=range(1, 4), img_size=size,
            drop_path_rate=0.15, **PAMM_VIT,
        )
        heads = nn.ModuleDict({t: pame.ConvHead(PAMM_DIM, n) for t, n in PAMM_TASKS.items()})
        model = wrapper.PAMEWrapper(p, backbone, heads)
        randomise(model, 3)
        model.eval()
        torch.manual_seed(103)
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            y = model(x, p)
        # the task priors live in plain dicts, outside the state dict: the test needs their values
        extra = {}
        for s, block in enumerate(backbone.stage_MTLoRA_mamba):
            for t in PAMM_TASKS:
                extra[f"decoder.blocks.{s}.prior_B.{t}"] = block.task_prompt_B[t].detach().clone()
                extra[f"decoder.blocks.{s}.prior_C.{t}"] = block.task_prompt_C[t].detach().clone()
        order_h = importlib.import_module("models.transformers.order_h")
        for h, w in PAMM_ORDER_GRIDS:
            maps = order_h.get_h_order_4(H=h, W=w)
            extra[f"orders.{h}x{w}"] = torch.stack([m["ind_2sorted"] for m in maps]).to(torch.int16)
        config = dict(
            encoder_kwargs=dict(img_size=size, class_token=False, **PAMM_VIT), tasks=list(PAMM_TASKS),
            dataset="nyud", dim=PAMM_DIM, d_state=4, num_experts=15, expert_rank=4, top_k=9,
            task_rank=4, expert_kernel_size=PAMM_TOPK, router_grid=PAMM_GRID,
        )
        save(out, "pamm", model, x, {t: y[t] for t in PAMM_TASKS}, config, extra)
    finally:
        sys.path.remove(str(root / "PAMM"))
        _purge("models")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-root", type=Path, default=REPO.parent)
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "official")
    args = parser.parse_args()
    root = args.official_root.resolve()
    for sub in ("MTMamba", "PAMM", "mmsegmentation/mmseg/models/backbones/swin.py"):
        if not (root / sub).exists():
            sys.exit(f"{root / sub} not found; see this script's docstring for what --official-root holds")
    sys.path.insert(0, str(REPO))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    install_mamba_ssm()
    install_timm()
    make_mtmamba(root, install_mmseg(root / "mmsegmentation"), args.out)
    install_pamm_imports()
    make_pamm(root, args.out)


if __name__ == "__main__":
    main()
