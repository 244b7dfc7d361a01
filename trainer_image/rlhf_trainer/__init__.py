"""The RLHF trainer: SFT, reward model, PPO and evaluation on Ray Train + DeepSpeed ZeRO.

Kept import-light: torch, ray and deepspeed are imported by the modules that need them, so that
`rlhf_trainer.losses` tests and the CLI's argument parsing never pay for them.
"""

__version__ = "0.1.0"
