"""cppo-lightning: RL fine-tuning of vision-language models with CPPO, GRPO and PAPO on Lightning."""

__version__ = "0.1.0"
