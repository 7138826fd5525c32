"""Training: EDM teacher training (for the bundled digits teacher) and the SiD distillation loop."""
