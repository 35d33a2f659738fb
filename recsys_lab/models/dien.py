"""Deep Interest Evolution Network: a GRU extracts the user's interest at every behaviour, an auxiliary loss ties
each state to the next behaviour, and an attention-gated GRU evolves the interests relevant to the candidate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recsys_lab.data.batch import Batch
from recsys_lab.data.schema import Schema
from recsys_lab.modules.embeddings import FeatureEmbedding, pooled_seq_and_dense, pooled_width
from recsys_lab.modules.mlp import MLP, Dice
from recsys_lab.modules.sequence import behaviour_history


class AUGRUCell(nn.Module):
    """GRU with attentional update gate, DIEN (Zhou et al., arXiv:1809.03672, eq. 9-10): one step.

    r = σ(W_r x + U_r h + b_r),  u = σ(W_u x + U_u h + b_u),  c = tanh(W_c x + r ⊙ (U_c h + b_c')),
    u' = a ⊙ u,  h_new = (1 - u') ⊙ h + u' ⊙ c.

    The paper's gate convention (u = 1 keeps the candidate); the reset gate also scales the hidden-side bias, as
    in PyTorch's GRU (the paper leaves that bias on the input side; the two are the same family of functions).
    With a = 1 this is a plain GRU step; with a = 0 the state is carried over unchanged, so an irrelevant
    behaviour cannot overwrite the interest the candidate cares about — the point of AUGRU over AIGRU/AGRU.

    Args:
        input_dim: width of the input x.
        hidden_dim: H, width of the state h.

    forward(x (B, input_dim), h (B, H), attention (B,)) -> h_new (B, H); step(input_gates (B, 3H), h, attention)
    is the same with `self.input(x)` computed beforehand, so a loop can project every time step in one matmul.
    """

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.input = nn.Linear(input_dim, 3 * hidden_dim)  # W_r, W_u, W_c and b_r, b_u, b_c side by side
        self.hidden = nn.Linear(hidden_dim, 3 * hidden_dim)  # U_r, U_u, U_c and the hidden-side biases

    def forward(self, x: Tensor, h: Tensor, attention: Tensor) -> Tensor:
        return self.step(self.input(x), h, attention)

    def step(self, input_gates: Tensor, h: Tensor, attention: Tensor) -> Tensor:
        x_r, x_u, x_c = input_gates.chunk(3, dim=-1)  # each (B, H)
        h_r, h_u, h_c = self.hidden(h).chunk(3, dim=-1)  # each (B, H)
        reset = torch.sigmoid(x_r + h_r)  # (B, H)
        update = torch.sigmoid(x_u + h_u) * attention.unsqueeze(-1)  # (B, H): u' = a * u
        candidate = torch.tanh(x_c + reset * h_c)  # (B, H)
        return (1 - update) * h + update * candidate  # (B, H)


class DIEN(nn.Module):
    """Deep Interest Evolution Network (Zhou et al., AAAI 2019, arXiv:1809.03672).

    Behaviour history and candidate are chosen as in DIN (`behaviour_history`): each event is the concatenation
    of its behaviour features' embeddings, E = (behaviour features) * D wide, and the candidate is embedded by
    the same tables. Then:

    1. interest extractor: a GRU of width E over the history gives an interest state h_t per behaviour. The GRU
       is causal and sequences are right-padded, so padding can never reach a real position's state.
    2. auxiliary loss (`auxiliary_loss`, weighted by `aux_loss_weight` = the paper's α): h_t must score the
       next real behaviour e_{t+1} above a sampled negative, by the inner product σ(h_t · e) of the paper's
       eq. 3 — which is why the GRU is E wide. The negative is a behaviour event drawn uniformly from the real
       positions of the batch (not the same event as e_{t+1}): this samples items in proportion to how often
       they are clicked, as the paper's released code does (it draws from the list of all logged clicks), and
       gives the negative every behaviour feature (id, category, ...), which a uniform draw of ids could not.
    3. interest evolution: attention a_t = softmax_t(h_t · W e_candidate) over the real positions (eq. 5),
       then an AUGRU (`AUGRUCell`) over h_t gated by a_t; its state at each row's last real step (zeros for an
       empty history) is the evolved interest.
    4. prediction: [all sparse embeddings (user, candidate, context), evolved interest, masked mean of other
       seq features, dense features] -> MLP with Dice (as DIN) -> logit.

    Args:
        schema: the dataset's features. Needs at least one seq feature with `embed_as` on an item-side feature.
        embedding_dim: D, width of every embedding (the paper's code: 18).
        mlp_hidden: hidden widths of the prediction MLP (the paper: 200-80).
        dropout: dropout after each hidden layer of the prediction MLP.
        aux_loss_weight: α, the weight of the auxiliary loss in the training objective (the paper's code: 1).

    forward(batch) -> logits (B,); auxiliary_loss(batch) -> α-weighted scalar; interest_states(batch) -> e, h
    (B, L, E), mask (B, L); evolve(h, attention, mask) -> (B, E); forward_with_attention(batch) -> logits (B,),
    attention (B, L).
    """

    def __init__(
        self,
        schema: Schema,
        embedding_dim: int = 16,
        mlp_hidden: list[int] = [200, 80],  # noqa: B006 - never mutated; plain lists keep Hydra configs simple
        dropout: float = 0.0,
        aux_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight={aux_loss_weight}: expected a number >= 0")
        self.behaviour, self.candidate = behaviour_history(schema, "DIEN")
        self.sparse_features = [f.name for f in schema.select("sparse")]
        self.other_seq = [f.name for f in schema.select("seq") if f.name not in self.behaviour]
        self.dense_features = [f.name for f in schema.select("dense")]
        self.aux_loss_weight = aux_loss_weight

        self.embedding = FeatureEmbedding(schema, embedding_dim)
        item_dim = len(self.behaviour) * embedding_dim  # E
        self.extractor = nn.GRU(item_dim, item_dim, batch_first=True)
        self.attention = nn.Linear(item_dim, item_dim, bias=False)  # W of the bilinear score h_t · W e
        self.evolution = AUGRUCell(item_dim, item_dim)
        # the candidate is already among the sparse embeddings, so it is not concatenated a second time
        input_dim = (
            len(self.sparse_features) * embedding_dim
            + item_dim
            + pooled_width(schema, embedding_dim, self.other_seq, self.dense_features)
        )
        self.mlp = MLP(input_dim, mlp_hidden, activation=Dice, dropout=dropout, output_dim=1)

    def interest_states(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Behaviour embeddings e (B, L, E), interest states h (B, L, E) (zeros at padding), mask bool (B, L)."""
        history = self.embedding.seq(batch, self.behaviour)  # (B, L, E)
        mask = batch.seq[self.behaviour[0]].mask()  # (B, L)
        states, _ = self.extractor(history)  # (B, L, E); causal, so real positions never read padding
        return history, states * mask.unsqueeze(-1), mask

    def auxiliary_loss(self, batch: Batch) -> Tensor:
        """α * mean over valid steps of -log σ(h_t · e_{t+1}) - log(1 - σ(h_t · ê_{t+1})): scalar.

        A step t is valid when behaviour t + 1 is real, so padding never enters (neither as h_t, as positive,
        nor as a negative). Negatives are drawn with torch's global generator. 0 when no row has two behaviours.
        """
        return self._auxiliary_loss(batch, *self.interest_states(batch))

    def forward_with_auxiliary_loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Logits (B,) and `auxiliary_loss` from one pass of the interest extractor (what training needs:
        `CTRTask` calls this when the net has it, instead of running the GRU twice)."""
        history, states, mask = self.interest_states(batch)
        logits, _ = self._predict(batch, states, mask)
        return logits, self._auxiliary_loss(batch, history, states, mask)

    def _auxiliary_loss(self, batch: Batch, history: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        valid = mask[:, 1:]  # (B, L-1): step t is supervised by a real next behaviour t + 1
        if not valid.any():
            return states.sum() * 0.0  # keeps the graph (and the dtype/device) without contributing
        ids = torch.stack([batch.seq[name].ids for name in self.behaviour], dim=-1)  # (B, L, behaviours)

        # negatives: real behaviour events of the whole batch, drawn uniformly (click-frequency proportional)
        pool, pool_ids = history[mask], ids[mask]  # (N, E), (N, behaviours)
        draw = torch.randint(len(pool), valid.shape, device=pool.device)  # (B, L-1)
        negative = pool[draw]  # (B, L-1, E)
        # the paper samples "from the item set except the item clicked": a draw of the same event does not count
        other = (pool_ids[draw] != ids[:, 1:]).any(dim=-1)  # (B, L-1)

        h = states[:, :-1]  # (B, L-1, E): the state after behaviour t
        positive_logit = (h * history[:, 1:]).sum(-1)  # (B, L-1)
        negative_logit = (h * negative).sum(-1)  # (B, L-1)
        # -log σ(z) = softplus(-z) and -log(1 - σ(z)) = softplus(z), stable for large |z|
        per_step = F.softplus(-positive_logit) + F.softplus(negative_logit) * other  # (B, L-1)
        return self.aux_loss_weight * per_step[valid].mean()

    def evolve(self, states: Tensor, attention: Tensor, mask: Tensor) -> Tensor:
        """AUGRU over the interest states (B, L, E) with attention (B, L): the state after each row's last real
        step (B, E), zeros for an empty history.

        The loop runs as far as the longest row; a padded step keeps the state as it was (its attention is 0
        too, but the state must not depend on that), so shorter rows end at their own last real step.
        """
        interest = states.new_zeros(states.shape[0], states.shape[-1])  # (B, E)
        steps = int(mask.sum(1).max()) if mask.numel() else 0
        # the input side of every step at once, one matmul
        input_gates = self.evolution.input(states[:, :steps])  # (B, steps, 3E)
        # unbind, not [:, t]: its backward stacks the step gradients once instead of filling a (B, L, 3E)
        # zero tensor per step
        steps_of = (input_gates.unbind(1), attention[:, :steps].unbind(1), mask[:, :steps].unbind(1))
        for gates, a, real in zip(*steps_of, strict=True):
            stepped = self.evolution.step(gates, interest, a)  # (B, E)
            interest = torch.where(real.unsqueeze(-1), stepped, interest)  # (B, E)
        return interest

    def forward_with_attention(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Logits (B,) and the attention a_t of the candidate on every interest state (B, L), 0 at padding."""
        _, states, mask = self.interest_states(batch)  # (B, L, E), (B, L)
        return self._predict(batch, states, mask)

    def _predict(self, batch: Batch, states: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Logits (B,) and attention (B, L) from the interest states (B, L, E) and their mask (B, L)."""
        sparse = self.embedding.sparse(batch, self.sparse_features).flatten(1)  # (B, F*D)
        candidate = self.embedding.sparse(batch, self.candidate).flatten(1)  # (B, E)

        # eq. 5: softmax over the real positions of h_t · W e_a. A finite fill instead of -inf: an empty row
        # would otherwise softmax to NaN, and NaN poisons the gradients even where it is masked out afterwards
        scores = (states * self.attention(candidate).unsqueeze(1)).sum(-1)  # (B, L)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        attention = torch.softmax(scores, dim=-1) * mask  # (B, L), 0 at padding (and for an empty row)

        interest = self.evolve(states, attention, mask)  # (B, E)

        # other seq groups (no behaviour of the candidate's kind) and dense features, as in DIN
        rest = pooled_seq_and_dense(self.embedding, batch, self.other_seq, self.dense_features)
        logits = self.mlp(torch.cat([sparse, interest, *rest], dim=-1)).squeeze(-1)  # (B,)
        return logits, attention

    def forward(self, batch: Batch) -> Tensor:
        return self.forward_with_attention(batch)[0]
