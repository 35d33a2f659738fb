"""Multi-task rankers and their task: which parameters each loss trains, ESMM's product, the gates against
hand-checkable reductions, the loss weightings against their formulas, per-label metrics end to end, and the
config errors."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recsys_lab.data.schema import Schema
from recsys_lab.data.sources.simulator import EcommerceSimulator
from recsys_lab.models.deepfm import DeepFM
from recsys_lab.models.esmm import ESMM, log1mexp, product_logit
from recsys_lab.models.mmoe import MMoE
from recsys_lab.models.ple import PLE
from recsys_lab.models.shared_bottom import SharedBottom
from recsys_lab.tasks.multitask import FixedWeights, MultiTaskTask, UncertaintyWeights
from recsys_lab.train import train
from recsys_lab.utils.checks import user_error_message
from recsys_lab.utils.testing import random_batch, tiny_schema
from tests.helpers import model_overrides

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


def build(name: str, schema: Schema) -> nn.Module:
    torch.manual_seed(0)
    return {
        "shared_bottom": lambda: SharedBottom(schema, embedding_dim=4, bottom_hidden=[8], tower_hidden=[4]),
        "mmoe": lambda: MMoE(schema, embedding_dim=4, num_experts=3, expert_hidden=[6], tower_hidden=[4]),
        "ple": lambda: PLE(
            schema,
            embedding_dim=4,
            num_levels=2,
            num_specific_experts=1,
            num_shared_experts=1,
            expert_hidden=[6],
        ),
        "esmm": lambda: ESMM(schema, embedding_dim=4, tower_hidden=[6]),
    }[name]()


# Per model and head: parameter-name prefixes only that head's loss may train. ESMM's pCTCVR multiplies pCTR
# by pCVR, so the purchase loss trains both towers and only the CVR tower is private (to the purchase head).
PRIVATE = {
    "shared_bottom": {"click": ["towers.towers.0."], "purchase": ["towers.towers.1."]},
    "mmoe": {
        "click": ["towers.towers.0.", "gate_layers.0."],
        "purchase": ["towers.towers.1.", "gate_layers.1."],
    },
    # the last level's task experts and gates feed only their task (earlier ones also feed the shared gate)
    "ple": {
        "click": ["towers.towers.0.", "levels.1.specific.0.", "levels.1.task_gates.0."],
        "purchase": ["towers.towers.1.", "levels.1.specific.1.", "levels.1.task_gates.1."],
    },
    "esmm": {"click": [], "purchase": ["towers.towers.1."]},
}
SHARED = {
    "shared_bottom": "bottom.",
    "mmoe": "experts.",
    "ple": "levels.0.shared.",
    "esmm": "towers.towers.0.",
}
# PLE's shared gate passes the other task's first-level experts into the next level's shared input: they are
# trained by both losses (the paper's progressive extraction), unlike the last level's
CROSS = {"ple": {"click": "levels.0.specific.1.", "purchase": "levels.0.specific.0."}}


def grads_of(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("name", list(PRIVATE))
def test_each_head_trains_its_own_parameters_and_both_train_the_shared_ones(name):
    schema = tiny_schema()
    batch = random_batch(schema, batch_size=16)
    model = build(name, schema)
    assert model.labels == ["click", "purchase"]
    for label in model.labels:
        logits = model.forward_heads(batch)[label]
        grads = grads_of(model, F.binary_cross_entropy_with_logits(logits, batch.labels[label]))
        own = PRIVATE[name][label]
        others = [p for t, prefixes in PRIVATE[name].items() if t != label for p in prefixes]
        for n, g in grads.items():
            if any(n.startswith(p) for p in others):
                assert torch.all(g == 0), f"{name}: the {label} loss reaches {n}, private to another head"
            elif any(n.startswith(p) for p in own) or n.startswith(("fields.", SHARED[name])):
                assert g.abs().sum() > 0, f"{name}: the {label} loss does not reach {n}"
        if name in CROSS:
            cross = [g for n, g in grads.items() if n.startswith(CROSS[name][label])]
            assert cross and all(g.abs().sum() > 0 for g in cross), (
                f"{name}: no {label} gradient through the shared gate"
            )
        # the shared embedding is trained by every head
        assert any(g.abs().sum() > 0 for n, g in grads.items() if n.startswith("fields."))


# ---- ESMM --------------------------------------------------------------------------------------------------------
def test_simulator_purchases_imply_clicks():
    """ESMM's pCTCVR = p(click and buy) is supervised by the purchase label: that needs purchase => click."""
    log = EcommerceSimulator(n_users=300, n_items=200, impressions_per_user=20, seed=3).simulate().log
    assert log.purchase.sum() > 0
    assert (log.purchase <= log.click).all()


def test_esmm_ctcvr_head_is_the_product_of_ctr_and_cvr():
    schema = tiny_schema()
    batch = random_batch(schema, batch_size=16)
    model = build("esmm", schema).eval()
    with torch.no_grad():
        parts, heads = model.forward_parts(batch), model.forward_heads(batch)
        torch.testing.assert_close(heads["click"], parts["ctr"], rtol=0, atol=0)
        torch.testing.assert_close(heads["purchase"], parts["ctcvr"], rtol=0, atol=0)
        torch.testing.assert_close(model(batch), parts["ctr"], rtol=0, atol=0)
        product = torch.sigmoid(parts["ctr"]) * torch.sigmoid(parts["cvr"])
        torch.testing.assert_close(torch.sigmoid(heads["purchase"]), product, rtol=0, atol=1e-5)


def test_product_logit_is_accurate_for_extreme_logits():
    a, b = torch.meshgrid(torch.linspace(-40, 40, 81), torch.linspace(-40, 40, 81), indexing="ij")
    logit = product_logit(a.flatten(), b.flatten())
    assert torch.isfinite(logit).all()
    exact = torch.sigmoid(a.flatten().double()) * torch.sigmoid(b.flatten().double())
    torch.testing.assert_close(torch.sigmoid(logit.double()), exact, rtol=0, atol=1e-5)
    # small probabilities keep their relative precision (a naive log(p / (1 - p)) of a float32 p does too, but a
    # logit from sigmoid products would round p = 1e-30 to 0 and give -inf)
    deep = product_logit(torch.tensor([-40.0]), torch.tensor([-30.0]))
    torch.testing.assert_close(deep, torch.tensor([-70.0]), rtol=1e-5, atol=0)
    # gradients are finite everywhere, including at the clamp
    x = torch.tensor([-40.0, 0.0, 40.0], requires_grad=True)
    product_logit(x, torch.full((3,), 40.0)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_log1mexp_is_accurate_near_zero_and_far_from_it():
    x = torch.tensor([-1e-7, -1e-5, -1e-3, -0.5, -1.0, -10.0, -50.0])
    exact = torch.log(-torch.expm1(x.double()))
    torch.testing.assert_close(log1mexp(x).double(), exact, rtol=1e-6, atol=1e-12)


def test_esmm_label_mapping_is_configurable_and_one_label_data_has_one_head():
    schema = tiny_schema()
    swapped = ESMM(schema, embedding_dim=4, tower_hidden=[4], ctr_label="purchase", ctcvr_label="click")
    assert swapped.labels == ["purchase", "click"]
    one = Schema(features=schema.features, labels=["label"], item_counts=schema.item_counts)
    assert ESMM(one, embedding_dim=4, tower_hidden=[4]).labels == ["label"]
    assert SharedBottom(one, embedding_dim=4).labels == ["label"]


# ---- gates -------------------------------------------------------------------------------------------------------
def test_mmoe_gates_are_distributions_over_experts():
    schema = tiny_schema()
    batch = random_batch(schema, batch_size=16)
    model = build("mmoe", schema)
    gates = model.gates(batch)
    assert list(gates) == ["click", "purchase"]
    for g in gates.values():
        assert g.shape == (16, 3)
        assert (g >= 0).all()
        torch.testing.assert_close(g.sum(-1), torch.ones(16))
    assert not torch.allclose(gates["click"], gates["purchase"])  # one gate per task, not one shared gate


def test_mmoe_with_one_expert_is_shared_bottom():
    schema = tiny_schema()
    batch = random_batch(schema, batch_size=8)
    mmoe = MMoE(schema, embedding_dim=4, num_experts=1, expert_hidden=[8, 6], tower_hidden=[4])
    bottom = SharedBottom(schema, embedding_dim=4, bottom_hidden=[8, 6], tower_hidden=[4])
    state = {k.replace("experts.0.", "bottom."): v for k, v in mmoe.state_dict().items()}
    bottom.load_state_dict({k: v for k, v in state.items() if not k.startswith("gate_layers.")})
    with torch.no_grad():
        for label, logits in mmoe.forward_heads(batch).items():
            torch.testing.assert_close(logits, bottom.forward_heads(batch)[label])


def test_ple_with_one_level_and_only_shared_experts_is_mmoe():
    schema = tiny_schema()
    batch = random_batch(schema, batch_size=8)
    ple = PLE(
        schema, embedding_dim=4, num_levels=1, num_specific_experts=0, num_shared_experts=3, expert_hidden=[6]
    )
    mmoe = MMoE(schema, embedding_dim=4, num_experts=3, expert_hidden=[6], tower_hidden=[32])
    renamed = {
        k.replace("levels.0.shared.", "experts.").replace("levels.0.task_gates.", "gate_layers."): v
        for k, v in ple.state_dict().items()
    }
    mmoe.load_state_dict(renamed)  # strict: the two hold exactly the same parameters
    with torch.no_grad():
        for label, logits in ple.forward_heads(batch).items():
            torch.testing.assert_close(logits, mmoe.forward_heads(batch)[label])


def test_ple_task_output_mixes_own_and_shared_experts_by_its_gate():
    """One CGC layer by hand: task t's output is softmax(W_t x) over [own experts; shared experts]."""
    schema = tiny_schema()
    batch = random_batch(schema, batch_size=8)
    ple = PLE(
        schema, embedding_dim=4, num_levels=1, num_specific_experts=2, num_shared_experts=1, expert_hidden=[5]
    )
    layer = ple.levels[0]
    x = ple.fields(batch).flatten(1)
    with torch.no_grad():
        outputs, shared = layer([x, x], x)
        assert shared is None  # the last level has no shared gate
        for t in range(2):
            experts = [e(x) for e in layer.specific[t]] + [e(x) for e in layer.shared]
            g = torch.softmax(x @ layer.task_gates[t].weight.T, dim=-1)  # (B, 3)
            expected = sum(g[:, k : k + 1] * experts[k] for k in range(3))
            torch.testing.assert_close(outputs[t], expected)
    # between levels, the shared gate mixes every expert of the layer: task 0's, task 1's, then the shared ones
    first = PLE(schema, embedding_dim=4, num_levels=2, num_specific_experts=2, expert_hidden=[5]).levels[0]
    with torch.no_grad():
        _, shared = first([x, x], x)
        every = [e(x) for t in range(2) for e in first.specific[t]] + [e(x) for e in first.shared]
        g = torch.softmax(x @ first.shared_gate.weight.T, dim=-1)  # (B, 2 * 2 + 1)
        assert g.shape == (8, 5)
        torch.testing.assert_close(shared, sum(g[:, k : k + 1] * every[k] for k in range(5)))


# ---- loss weighting ----------------------------------------------------------------------------------------------
def test_uncertainty_weights_follow_kendall_et_al_and_train():
    weighting = UncertaintyWeights(["click", "purchase"])
    with torch.no_grad():
        weighting.log_var.copy_(torch.tensor([0.3, -0.5]))
    losses = {"click": torch.tensor(0.7), "purchase": torch.tensor(0.2)}
    total = weighting(losses)
    # (1 / sigma^2) L + log sigma with s = log sigma^2: exp(-s) L + s / 2
    expected = math.exp(-0.3) * 0.7 + 0.15 + math.exp(0.5) * 0.2 - 0.25
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    torch.testing.assert_close(
        weighting.log_var.grad, torch.tensor([-math.exp(-0.3) * 0.7 + 0.5, -math.exp(0.5) * 0.2 + 0.5])
    )
    assert {k: float(v) for k, v in weighting.weights().items()} == pytest.approx(
        {"click": math.exp(-0.3), "purchase": math.exp(0.5)}
    )


def test_uncertainty_parameters_are_optimized_with_the_model():
    schema = tiny_schema()
    task = MultiTaskTask(build("mmoe", schema), schema, ADAM, weighting=UncertaintyWeights)
    optimized = {id(p) for group in task.configure_optimizers().param_groups for p in group["params"]}
    assert id(task.weighting.log_var) in optimized


def test_fixed_weights_one_zero_is_single_task_bce():
    schema = tiny_schema()
    batch = random_batch(schema, batch_size=16)
    net = build("shared_bottom", schema)
    single = copy.deepcopy(net)
    weighting = functools.partial(FixedWeights, weights={"click": 1.0, "purchase": 0.0})
    task = MultiTaskTask(net, schema, ADAM, weighting=weighting)
    multi_grads = grads_of(net, task.weighting(task.task_losses(batch)))
    single_grads = grads_of(single, F.binary_cross_entropy_with_logits(single(batch), batch.labels["click"]))
    assert multi_grads.keys() == single_grads.keys()
    for n in multi_grads:
        torch.testing.assert_close(multi_grads[n], single_grads[n], msg=n)
    # ...and a weighted sum otherwise (unnamed labels weigh 1)
    losses = {"click": torch.tensor(0.5), "purchase": torch.tensor(2.0)}
    assert float(FixedWeights(["click", "purchase"], {"click": 3.0})(losses)) == pytest.approx(3.5)


# ---- end to end --------------------------------------------------------------------------------------------------
def test_per_label_metrics_are_logged_and_uncertainty_weights_train(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            *model_overrides("esmm", tmp_path),
            "trainer.max_epochs=1",
            "model.weighting._target_=recsys_lab.tasks.multitask.UncertaintyWeights",  # the documented switch
        ]
    )
    results = train(cfg)
    m = results["metrics"]
    for label in ("click", "purchase"):
        for key in ("auc", "gauc", "logloss"):
            assert f"test/{label}/{key}" in m
        assert 0.5 < m[f"test/{label}/auc"] <= 1
    # the unprefixed metrics, and so the default monitor val/auc, are the first label's
    assert results["monitor"] == "val/auc"
    assert m["test/auc"] == m["test/click/auc"] and m["test/logloss"] == m["test/click/logloss"]
    assert m["test/purchase/auc"] != m["test/click/auc"]
    state = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    assert (state["weighting.log_var"] != 0).all()  # learned with the model


# ---- errors ------------------------------------------------------------------------------------------------------
def test_a_single_head_model_under_multitask_task_is_a_type_error():
    schema = tiny_schema()
    with pytest.raises(TypeError, match=r"DeepFM lacks forward_heads\(batch\)"):
        MultiTaskTask(DeepFM(schema, embedding_dim=4, mlp_hidden=[4]), schema, ADAM)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda s: SharedBottom(s, labels=["click", "buy"]),
            r"model.net.labels=\['click', 'buy'\]: \['buy'\] not in this dataset's labels \['click', 'purchase'\]",
        ),
        (lambda s: MMoE(s, labels=[]), r"model.net.labels=\[\]: need distinct labels"),
        (
            lambda s: PLE(s, labels=["click", "click"]),
            r"model.net.labels=\['click', 'click'\]: need distinct",
        ),
        (
            lambda s: ESMM(s, ctcvr_label="buy"),
            r"model.net.ctcvr_label='buy' is not a label of this dataset; labels are \['click', 'purchase'\]",
        ),
        (lambda s: ESMM(s, ctr_label="purchase"), r"ctr_label and model.net.ctcvr_label are both 'purchase'"),
        (lambda s: MMoE(s, num_experts=0), r"model.net.num_experts >= 1 \(got 0\)"),
        (lambda s: PLE(s, num_specific_experts=0, num_shared_experts=0), r"must be >= 1"),
        (
            lambda s: FixedWeights(s.labels, {"buy": 1.0}),
            r"model.weighting.weights names \['buy'\], which the model has no head for",
        ),
    ],
)
def test_bad_options_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make(tiny_schema())


def test_missing_label_through_train_is_one_line(make_cfg, tmp_path):
    cfg = make_cfg([*model_overrides("mmoe", tmp_path), "model.net.labels=[click,buy]"])
    with pytest.raises(ValueError) as err:
        train(cfg)
    assert user_error_message(err.value) == (
        "error: model.net.labels=['click', 'buy']: ['buy'] not in this dataset's labels ['click', 'purchase']"
    )
