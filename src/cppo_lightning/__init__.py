"""cppo-lightning: RL fine-tuning of vision-language models with CPPO on Lightning."""

__version__ = "0.1.0"
