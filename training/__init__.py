"""Training: the tiny model zoo, self-distillation, draft-head training, the grounding analysis."""
