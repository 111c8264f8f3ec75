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
"""

from klal.train_cli import main

if __name__ == "__main__":
    main()
