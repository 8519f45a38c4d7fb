"""LoRA unlearning: the trainer (adversarial training too), esd, ca, spm and its facilitated transport, advunlearn."""
