"""LoRA unlearning: the trainer, esd, ca, spm and its facilitated transport."""
