"""LightningModules, one per training objective, shared by many models."""
