"""Training and evaluation engine: recipe configs, the training loop, checkpoints, evaluation,
prediction images, export, distributed helpers and the CLI.

Submodules are imported on use (``from mtssm.engine.trainer import train``) so that
``import mtssm.engine`` stays cheap.
"""
