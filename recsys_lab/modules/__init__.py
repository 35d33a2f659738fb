"""Reusable torch-only layers shared by the models: embeddings, MLPs, attention and pooling."""
