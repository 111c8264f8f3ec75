"""A small pretrained base made by klal (``python -m studies.pretrain --config configs/pretrain/tiny_base.yaml``).

:mod:`studies.pretrain.curriculum` generates the synthetic curriculum (colours, shapes, counts, positions, left-of /
above relations, captions; none of the evaluation tasks); :mod:`studies.pretrain.recipe` trains the tiny Qwen2.5-VL on
it from random weights (full fine-tuning, vision tower included, deterministic) and writes the weights with a model
card (docs/reproduce.md, *A pretrained base*).
"""
