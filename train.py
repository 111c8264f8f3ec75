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
"""

from __future__ import annotations

import sys

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from klal.datamodule import KLALDataModule
from klal.module import KLALModule


def main(argv: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI on ``argv`` (default: ``sys.argv[1:]``) and return it (``cli.model``, ``cli.trainer``)."""
    # Show the config dataclasses' field docstrings in --help.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    if argv is not None:
        # LightningCLI also inspects sys.argv; when called from Python the explicit argv is the whole command line.
        sys.argv = sys.argv[:1]
    return LightningCLI(
        KLALModule,
        KLALDataModule,
        args=argv,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
