"""Train Qwen2.5-VL with LoRA on next-token loss plus the KL attention loss (KLAL).

A thin LightningCLI over :class:`klal.module.KLALModule` and :class:`klal.datamodule.KLALDataModule`; every option of
both (and of the Trainer) is a flag or a YAML key, and the resolved config is saved with every run.

Examples::

    # tiny random model on CPU, a synthetic grid-patch set generated on the fly (a few minutes on 2 cores)
    python train.py fit --config configs/demo.yaml
    # override anything from the command line
    python train.py fit --config configs/demo.yaml --model.klal_weight 0.5 --trainer.max_steps 20
    # real checkpoint on 8 GPUs
    python train.py fit --config configs/qwen2.5-vl-3b_lora_klal.yaml --trainer.devices 8
    # validation only, from a checkpoint
    python train.py validate --config configs/demo.yaml --ckpt_path runs/demo/.../last.ckpt
    # continue a killed run from its newest last.ckpt (docs/checkpoints.md)
    python train.py fit --config configs/demo.yaml --ckpt_path last

Lightning, transformers and torch are imported only when a command runs: ``train.py fit --help`` is answered from a
stored text after its first use (:mod:`klal.helpcache`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from klal.cli import user_errors
from klal.helpcache import cached_help


def main(argv: list[str] | None = None, run: bool = True, prog: str | None = None) -> Any:
    """:func:`klal.train_cli.main` (imported here; Ctrl-C during the import exits 130 with one line)."""
    with user_errors(prog or os.path.basename(sys.argv[0]) or "train.py"):
        from klal.train_cli import main as train_main
    return train_main(argv, run=run, prog=prog)


if __name__ == "__main__":
    cached_help(os.path.basename(sys.argv[0]) or "train.py", sys.argv[1:], main, script=__file__)
