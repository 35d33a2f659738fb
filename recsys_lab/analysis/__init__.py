"""The research workflow after training: statistics across runs, plots, explanations."""
