"""The towers: shapes, unit norm, the Redis-row path, padding and pooling invariants, save/load."""

from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from models.features import history_tensor, padded_lists
from models.towers import TwoTower, UserTowerArrays, corpus_item_vectors, load_model, model_config_dict, recency_weights
from twotower.config import ModelConfig

N_USERS, N_ITEMS, N_ATTRS, L = 7, 11, 5, 6


def make(arch: str = "youtubednn", pooling: str = "mean", seed: int = 0) -> TwoTower:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, dim=8, id_dim=6, hidden=16, pooling=pooling, decay_half_life=2.0)
    return TwoTower(cfg, N_USERS, N_ITEMS, N_ATTRS, L).eval()


def batch():
    users = torch.tensor([1, 2, 7, 0])
    attrs = torch.tensor([[1, 2, 0], [3, 0, 0], [0, 0, 0], [4, 5, 1]])
    hist = history_tensor([[3, 4, 5], [], [11, 10, 9, 8, 7, 6, 5, 4], [1]], L)
    return users, attrs, hist


@pytest.mark.parametrize("arch,pooling", [("youtubednn", "mean"), ("youtubednn", "decay"), ("dssm", "mean")])
def test_output_shapes_and_unit_norm(arch, pooling):
    model = make(arch, pooling)
    users, attrs, hist = batch()
    u = model.user_vectors(users, attrs, hist)
    v = model.item_vectors(torch.tensor([1, 5, 11]), torch.tensor([[1, 0], [2, 3], [0, 0]]))
    assert u.shape == (4, 8) and v.shape == (3, 8)
    assert torch.allclose(u.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.allclose(v.norm(dim=1), torch.ones(3), atol=1e-6)
    assert model.score(u, v).shape == (4, 3)
    assert torch.allclose(model.score(u, v), u @ v.T / model.temperature)


def test_user_vectors_from_rows_equals_the_id_lookup():
    model = make()
    users, attrs, hist = batch()
    rows = model.user_id_embedding.weight[users].detach().clone()
    assert torch.equal(model.user_vectors_from_rows(rows, attrs, hist), model.user_vectors(users, attrs, hist))


def test_gradient_flows_into_injected_rows_only_when_asked():
    model = make()
    users, attrs, hist = batch()
    rows = model.user_id_embedding.weight[users].detach().clone().requires_grad_(True)
    model.user_vectors_from_rows(rows, attrs, hist).sum().backward()
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert model.user_id_embedding.weight.grad is None  # the table was not used


def test_padding_and_its_position_do_not_change_the_user_vector():
    model = make(pooling="decay")
    users, attrs = torch.tensor([1, 1, 1]), torch.tensor([[1, 2, 0, 0], [0, 1, 0, 2], [2, 1, 0, 0]])
    hist = torch.tensor([[3, 4, 5, 0, 0, 0], [0, 0, 0, 3, 4, 5], [0, 3, 0, 4, 5, 0]])
    u = model.user_vectors(users, attrs, hist)
    assert torch.allclose(u[0], u[1], atol=1e-6) and torch.allclose(u[0], u[2], atol=1e-6)


def test_history_order_matters_for_decay_but_not_for_mean():
    users, attrs = torch.tensor([1, 1]), torch.tensor([[1], [1]])
    hist = torch.tensor([[3, 4, 5, 0, 0, 0], [5, 4, 3, 0, 0, 0]])
    mean_u = make(pooling="mean").user_vectors(users, attrs, hist)
    decay_u = make(pooling="decay").user_vectors(users, attrs, hist)
    assert torch.allclose(mean_u[0], mean_u[1], atol=1e-6)
    assert not torch.allclose(decay_u[0], decay_u[1], atol=1e-4)


def test_recency_weights_halve_every_half_life_items():
    w = recency_weights(torch.tensor([[3, 4, 5, 0], [0, 0, 0, 0]]), half_life=1.0)
    assert w.tolist() == [[0.25, 0.5, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_dssm_ignores_history():
    model = make("dssm")
    users, attrs, hist = batch()
    assert torch.equal(model.user_vectors(users, attrs, hist), model.user_vectors(users, attrs, torch.zeros_like(hist)))


def test_youtubednn_uses_history():
    model = make()
    users, attrs, hist = batch()
    assert not torch.allclose(model.user_vectors(users, attrs, hist), model.user_vectors(users, attrs, torch.zeros_like(hist)))


def test_padding_rows_are_zero_and_user_row_zero_is_a_real_row():
    model = make()
    assert model.item_id_embedding.weight[0].abs().sum() == 0
    assert model.attr_embedding.weight[0].abs().sum() == 0
    assert model.user_id_embedding.weight[0].abs().sum() > 0  # out-of-vocabulary user: learnable
    assert model.state_dict()["user_id_embedding.weight"].shape == (N_USERS + 1, 6)


def test_corpus_item_vectors_have_a_zero_padding_row():
    model = make()
    item_attrs = torch.randint(0, N_ATTRS + 1, (N_ITEMS + 1, 3))
    vecs = corpus_item_vectors(model, item_attrs)
    assert vecs.shape == (N_ITEMS + 1, 8)
    assert vecs[0].abs().sum() == 0
    assert torch.allclose(vecs[1:], model.item_vectors(torch.arange(1, N_ITEMS + 1), item_attrs[1:]), atol=1e-6)


def test_load_model_rebuilds_the_same_function(tmp_path):
    model = make(pooling="decay")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(model_config_dict(model)))
    loaded = load_model(tmp_path)
    assert not loaded.training
    users, attrs, hist = batch()
    assert torch.equal(loaded.user_vectors(users, attrs, hist), model.user_vectors(users, attrs, hist))
    assert loaded.cfg == model.cfg and loaded.temperature == model.temperature


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="arch"):
        TwoTower(ModelConfig(arch="mind"), 3, 3, 3, 4)


def test_padded_lists_keep_the_most_recent_entries_left_aligned():
    import pyarrow as pa

    out = padded_lists(pa.array([[1, 2, 3, 4, 5], [], None, [9]], pa.list_(pa.int32())), 3)
    assert out.tolist() == [[3, 4, 5], [0, 0, 0], [0, 0, 0], [9, 0, 0]]


@pytest.mark.parametrize("arch,pooling", [("youtubednn", "mean"), ("youtubednn", "decay"), ("youtubednn", "mean+decay"), ("dssm", "mean")])
def test_the_numpy_user_tower_equals_the_torch_tower_and_autograd(arch, pooling):
    """UserTowerArrays (the hourly update's tower): its context against user_context, alone
    (one history) and as a batch (a matrix), and its forward and written-out row gradient
    against user_vectors_from_context and autograd."""
    model = make(arch, pooling)
    with torch.no_grad():  # padding rows that are not zero: pooling must skip them, not add them in
        model.item_id_embedding.weight[0] = 3.0
        model.attr_embedding.weight[0] = 3.0
    attrs = torch.tensor([[1, 2, 0], [3, 0, 0], [0, 0, 0], [4, 5, 1]])
    # oldest first; 0 = an unknown item that still holds its slot; the third is longer than L
    hists = [np.array([3, 4, 5]), np.array([], dtype=np.int32), np.array([11, 10, 9, 0, 8, 7, 6, 5, 4]), np.array([0, 1])]
    context = model.user_context(attrs, history_tensor([h.tolist() for h in hists], L)).detach()
    tower = UserTowerArrays(model)
    got = tower.context(attrs.numpy(), hists)
    np.testing.assert_allclose(got, context.numpy(), atol=1e-6)
    for b in range(len(hists)):
        np.testing.assert_allclose(tower.context(attrs[b : b + 1].numpy(), hists[b : b + 1]), context[b : b + 1].numpy(), atol=1e-6)

    torch.manual_seed(1)
    rows, g = torch.randn(4, 6), torch.randn(4, 8)
    r = rows.clone().requires_grad_(True)
    ref = model.user_vectors_from_context(r, context) * 20.0
    (ref_grad,) = torch.autograd.grad(ref, r, grad_outputs=g)
    fwd = tower.row_forward(rows.numpy(), tower.hidden_context(got), scale=20.0)
    np.testing.assert_allclose(fwd.v, ref.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(tower.row_backward(g.numpy(), fwd), ref_grad.numpy(), atol=1e-5)
    assert np.abs(ref_grad.numpy()).max() > 1e-2
    assert model.item_id_embedding.weight[0, 0] == 3.0  # the tower's arrays are copies
