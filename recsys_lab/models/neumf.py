"""Neural collaborative filtering: GMF, the MLP model and their fusion NeuMF, optionally from pre-trained parts.

The two branches are their own modules so that one definition serves three models: `GMF` and `NCFMLP` (each
a branch plus an output layer, trained alone with `python train.py model=gmf` / `model=mlp`) and `NeuMF` (both
branches, one output layer over their concatenation), which can start from those two runs' checkpoints
(sec. 3.4.1 of the paper). The recipe is in conf/model/neumf.yaml.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.mlp import MLP, relu


def _id_embeddings(schema: Schema, dim: int) -> tuple[nn.Embedding, nn.Embedding]:
    """One table per user code and per item code, N(0, 0.01) as in the authors' code (and RecBole's)."""
    user, item = nn.Embedding(schema.num_users, dim), nn.Embedding(schema.num_items, dim)
    nn.init.normal_(user.weight, std=0.01)
    nn.init.normal_(item.weight, std=0.01)
    return user, item


class GMFBranch(nn.Module):
    """GMF's predictive vector φ(p_u, q_i) = p_u ⊙ q_i (NCF eq. 9): forward(batch) -> (B, embedding_dim)."""

    def __init__(self, schema: Schema, embedding_dim: int) -> None:
        super().__init__()
        self.user_key, self.item_key = schema.user_id, schema.item_id
        self.user, self.item = _id_embeddings(schema, embedding_dim)
        self.output_dim = embedding_dim

    def forward(self, batch: Batch) -> Tensor:
        return self.user(batch.sparse[self.user_key]) * self.item(batch.sparse[self.item_key])  # (B, k)


class MLPBranch(nn.Module):
    """The MLP model's predictive vector: [p_u, q_i] through ReLU layers `hidden` (NCF eq. 10), its own user and
    item tables: forward(batch) -> (B, hidden[-1])."""

    def __init__(self, schema: Schema, embedding_dim: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        if not hidden:
            raise ValueError(
                "NCF MLP: hidden needs at least one layer (its last width is the predictive factors)"
            )
        self.user_key, self.item_key = schema.user_id, schema.item_id
        self.user, self.item = _id_embeddings(schema, embedding_dim)
        self.tower = MLP(2 * embedding_dim, hidden, activation=relu, dropout=dropout)
        self.output_dim = self.tower.output_dim

    def forward(self, batch: Batch) -> Tensor:
        return self.pairs(batch.sparse[self.user_key], batch.sparse[self.item_key])  # (B, hidden[-1])

    def pairs(self, users: Tensor, items: Tensor) -> Tensor:
        """The tower's output for (user, item) pairs given as codes of broadcastable shapes: (B,) and (B,) for
        rows, (B, 1) and (B, C) for each query's candidates -> (..., hidden[-1]).

        The first layer is linear in the concatenation, W [p; q] + b = (W_p p + b) + W_q q, so its user half is
        computed once per distinct user and its item half once per distinct item, instead of once per pair: a
        training batch of positives and their negatives repeats each user 1 + n times and a catalogue ranking
        repeats every item per query, and this layer (2E x H1) is the widest of the tower. The result is the
        concatenated form's up to float rounding.
        """
        first, rest = self.tower.layers[0], self.tower.layers[1:]  # Linear(2E, H1), then activation, ...
        E = self.user.embedding_dim
        user_codes, user_at = users.unique(return_inverse=True)  # (U,), users' shape
        item_codes, item_at = items.unique(return_inverse=True)  # (I,), items' shape
        user_part = F.linear(self.user(user_codes), first.weight[:, :E], first.bias)  # (U, H1)
        item_part = F.linear(self.item(item_codes), first.weight[:, E:])  # (I, H1)
        # gathered as embedding lookups: their backward (a sorted segment sum) is several times faster on the
        # CPU than the accumulating index_put that plain indexing differentiates into
        return rest(
            F.embedding(user_at, user_part) + F.embedding(item_at, item_part)
        )  # (..., H1) -> (..., h)


class GMF(nn.Module):
    """Generalized Matrix Factorization, NCF's linear model (He et al., WWW 2017, "Neural Collaborative
    Filtering", arXiv:1708.05031, sec. 3.2): logit = h · (p_u ⊙ q_i) + b.

    Being bilinear, it is also an encoder model: encode_query = [h ⊙ p_u, b], encode_item = [q_i, 1], so a
    full catalogue is ranked by one matrix product instead of scoring (user, item) pairs.

    Args:
        schema: the dataset's features; reads the user-id and item-id features only.
        embedding_dim: k, the predictive factors (8 in the paper's main runs).

    forward(batch) -> logits (B,); encode_query(batch) -> (B, k + 1); encode_item(item batch) -> (N, k + 1).
    """

    reads_features = False  # ids only: its batches carry the user and item ids, nothing else

    def __init__(self, schema: Schema, embedding_dim: int = 8) -> None:
        super().__init__()
        self.branch = GMFBranch(schema, embedding_dim)
        self.output = nn.Linear(embedding_dim, 1)

    def encode_query(self, batch: Batch) -> Tensor:
        p = self.branch.user(batch.sparse[self.branch.user_key])  # (B, k)
        bias = self.output.bias.expand(len(p), 1)  # (B, 1)
        return torch.cat([p * self.output.weight, bias], dim=-1)  # (B, k + 1)

    def encode_item(self, batch: Batch) -> Tensor:
        q = self.branch.item(batch.sparse[self.branch.item_key])  # (N, k)
        return torch.cat([q, q.new_ones(len(q), 1)], dim=-1)  # (N, k + 1)

    def forward(self, batch: Batch) -> Tensor:
        return self.output(self.branch(batch)).squeeze(-1)  # (B,)


class NCFMLP(nn.Module):
    """NCF's Multi-Layer Perceptron model (He et al., WWW 2017, arXiv:1708.05031, sec. 3.3): logit = h · MLP([p_u,
    q_i]) + b. (Named NCFMLP: `MLP` is the layer stack of `recsys_lab.modules.mlp`.)

    The paper's "[64, 32, 16, 8]" is embedding_dim=32 (the concatenation is 64 wide) and hidden=[32, 16, 8].

    Args:
        schema: the dataset's features; reads the user-id and item-id features only.
        embedding_dim: width of the user and of the item embedding (the tower's input is twice that).
        hidden: widths of the ReLU layers; the last is the predictive factors.
        dropout: dropout after each hidden layer (the paper uses none).

    forward(batch) -> logits (B,).
    """

    reads_features = False  # ids only: its batches carry the user and item ids, nothing else

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 32,
        hidden: list[int] = [32, 16, 8],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.branch = MLPBranch(schema, embedding_dim, hidden, dropout)
        self.output = nn.Linear(self.branch.output_dim, 1)

    def forward(self, batch: Batch) -> Tensor:
        return self.output(self.branch(batch)).squeeze(-1)  # (B,)

    def score_items(self, batch: Batch, items: Tensor) -> Tensor:
        """Logits of each query's candidates: batch with B users, items (B, C) item codes -> (B, C)."""
        users = batch.sparse[self.branch.user_key].unsqueeze(1)  # (B, 1)
        return self.output(self.branch.pairs(users, items)).squeeze(-1)


def load_net_state(path: str, expected: type[nn.Module], schema: Schema, recipe: str) -> dict[str, Tensor]:
    """The net's weights (keys without the task's "net." prefix) from a `train.py` checkpoint of `expected`
    trained on the same data; a ValueError naming the file and the model it should hold otherwise."""
    name = f"{expected.__module__}.{expected.__qualname__}"
    hint = f"expected a checkpoint of {name}, as written by `{recipe}`"
    if not Path(path).is_file():
        raise ValueError(f"NeuMF: {path}: no such file; {hint}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt or not a torch file: torch raises many kinds
        raise ValueError(
            f"NeuMF: {path} is not a readable checkpoint ({type(err).__name__}); {hint}"
        ) from None
    identity = checkpoint.get("recsys_lab_model") if isinstance(checkpoint, dict) else None
    if not isinstance(identity, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"NeuMF: {path} was not written by recsys_lab's train.py; {hint}")
    if identity.get("net") != name:
        raise ValueError(f"NeuMF: {path} holds a {identity.get('net')}; {hint}")
    if identity.get("schema_fingerprint") != schema.fingerprint():
        raise ValueError(
            f"NeuMF: {path} was trained on data with another feature layout (schema fingerprint "
            f"{identity.get('schema_fingerprint')}, this run has {schema.fingerprint()}); pre-train on the same data"
        )
    return {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}


class NeuMF(nn.Module):
    """Neural Matrix Factorization (He et al., WWW 2017, "Neural Collaborative Filtering", arXiv:1708.05031,
    sec. 3.4): a GMF branch and an MLP branch with separate embeddings, logit = h · [p⊙q, MLP([p', q'])] + b.

    Pre-training (sec. 3.4.1): with `gmf_checkpoint` and `mlp_checkpoint` (checkpoints of `python train.py
    model=gmf` and `model=mlp` runs on the same data), the branches start from those models' weights and the
    output layer from theirs, h = [α h_GMF, (1 − α) h_MLP], b = α b_GMF + (1 − α) b_MLP, so the fused model
    starts at α · GMF + (1 − α) · MLP logits. The paper then trains with plain SGD (Adam's moments were not
    saved with the parts).

    Args:
        schema: the dataset's features; reads the user-id and item-id features only.
        gmf_dim: predictive factors of the GMF branch (its embedding width).
        mlp_embedding_dim: width of the MLP branch's user and item embeddings.
        mlp_hidden: ReLU layer widths of the MLP branch.
        dropout: dropout after each hidden layer of the MLP branch.
        gmf_checkpoint / mlp_checkpoint: pre-trained GMF and NCFMLP runs (both or neither); their sizes must
            match the ones above.
        alpha: α, the GMF share of the pre-trained output layer.

    forward(batch) -> logits (B,).
    """

    reads_features = False  # ids only: its batches carry the user and item ids, nothing else

    def __init__(
        self,
        schema: Schema,
        gmf_dim: int = 8,
        mlp_embedding_dim: int = 32,
        mlp_hidden: list[int] = [32, 16, 8],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        dropout: float = 0.0,
        gmf_checkpoint: str | None = None,
        mlp_checkpoint: str | None = None,
        alpha: float = 0.5,
    ) -> None:
        super().__init__()
        self.gmf = GMFBranch(schema, gmf_dim)
        self.mlp = MLPBranch(schema, mlp_embedding_dim, mlp_hidden, dropout)
        self.output = nn.Linear(self.gmf.output_dim + self.mlp.output_dim, 1)
        if (gmf_checkpoint is None) != (mlp_checkpoint is None):
            raise ValueError(
                "NeuMF: pre-training needs both gmf_checkpoint and mlp_checkpoint (or neither), got "
                f"gmf_checkpoint={gmf_checkpoint}, mlp_checkpoint={mlp_checkpoint}"
            )
        if gmf_checkpoint is not None and mlp_checkpoint is not None:
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"NeuMF: alpha must be in [0, 1], got {alpha}")
            gmf = load_net_state(gmf_checkpoint, GMF, schema, "python train.py model=gmf")
            mlp = load_net_state(mlp_checkpoint, NCFMLP, schema, "python train.py model=mlp")
            self._load_branch(self.gmf, gmf, gmf_checkpoint, "gmf_dim")
            self._load_branch(self.mlp, mlp, mlp_checkpoint, "mlp_embedding_dim / mlp_hidden")
            with torch.no_grad():
                weight = torch.cat([alpha * gmf["output.weight"], (1 - alpha) * mlp["output.weight"]], dim=1)
                self.output.weight.copy_(weight)  # (1, k_gmf + k_mlp)
                self.output.bias.copy_(alpha * gmf["output.bias"] + (1 - alpha) * mlp["output.bias"])

    @staticmethod
    def _load_branch(branch: nn.Module, state: dict[str, Tensor], path: str, sizes: str) -> None:
        weights = {k.removeprefix("branch."): v for k, v in state.items() if k.startswith("branch.")}
        try:
            branch.load_state_dict(weights)
        except RuntimeError as err:  # missing keys or other sizes: say which setting must match
            raise ValueError(
                f"NeuMF: the weights in {path} do not fit this NeuMF's branch; set {sizes} to the pre-trained "
                f"model's sizes ({str(err).splitlines()[-1].strip()})"
            ) from None

    def forward(self, batch: Batch) -> Tensor:
        fused = torch.cat([self.gmf(batch), self.mlp(batch)], dim=-1)  # (B, k_gmf + k_mlp)
        return self.output(fused).squeeze(-1)  # (B,)

    def score_items(self, batch: Batch, items: Tensor) -> Tensor:
        """Logits of each query's candidates, as forward would give them pair by pair: batch with B users,
        items (B, C) item codes -> (B, C). The MLP branch shares its first layer across pairs
        (`MLPBranch.pairs`); the GMF part is h_GMF · (p_u ⊙ q_i) = (h_GMF ⊙ p_u) · q_i."""
        users = batch.sparse[self.gmf.user_key]
        k = self.gmf.output_dim
        h_gmf, h_mlp = self.output.weight[0, :k], self.output.weight[0, k:]  # (k_gmf,), (k_mlp,)
        p = self.gmf.user(users) * h_gmf  # (B, k_gmf)
        gmf = torch.einsum("bk,bck->bc", p, self.gmf.item(items))  # (B, C)
        mlp = self.mlp.pairs(users.unsqueeze(1), items) @ h_mlp  # (B, C, k_mlp) -> (B, C)
        return gmf + mlp + self.output.bias
