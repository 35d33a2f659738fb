"""One architecture per file; every model is a plain `nn.Module` mapping a `Batch` to logits [B]."""
