"""The stages (spec.STAGE_ORDER). Each module has `preflight(job, check_upstream)` (driver side:
fail fast with a message naming the field) and `train_loop(config)` (what every Ray Train worker
runs)."""

STAGE_MODULES = {
    "sft": "rlhf_trainer.stages.sft",
    "reward": "rlhf_trainer.stages.reward",
    "ppo": "rlhf_trainer.stages.ppo",
    "dpo": "rlhf_trainer.stages.dpo",
    "evaluation": "rlhf_trainer.stages.evaluation",
}
