"""FactoredMatrix and the QK/OV circuits: every factored result equals its materialised counterpart."""

import pytest
import torch

from conftest import tiny_hf_model
from hooked_attn import HookedTransformer
from hooked_attn.architectures.llama import tiny_hf_configs
from hooked_attn.factored_matrix import FactoredMatrix

TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture
def fm():
    gen = torch.Generator().manual_seed(0)
    return FactoredMatrix(torch.randn(3, 10, 4, generator=gen, dtype=torch.float64),
                          torch.randn(3, 4, 10, generator=gen, dtype=torch.float64))


def test_svd_norm_and_rank_match_the_full_matrix(fm):
    full = fm.AB
    U, S, V = fm.svd()  # TransformerLens' convention: V, not Vh
    torch.testing.assert_close(U @ torch.diag_embed(S) @ V.mT, full)
    torch.testing.assert_close(S, torch.linalg.svdvals(full)[:, :4])
    torch.testing.assert_close(fm.norm(), torch.linalg.matrix_norm(full))
    assert fm.rank().tolist() == [4, 4, 4]
    even = fm.make_even()
    torch.testing.assert_close(even.AB, full)
    torch.testing.assert_close(torch.linalg.svdvals(even.A), torch.linalg.svdvals(even.B))


def test_eigenvalues_are_the_nonzero_eigenvalues_of_the_full_matrix(fm):
    ours = torch.sort(fm.eigenvalues.abs(), dim=-1, descending=True).values
    full = torch.sort(torch.linalg.eigvals(fm.AB).abs(), dim=-1, descending=True).values[:, :4]
    torch.testing.assert_close(ours, full)


def test_products_stay_factored_and_correct(fm):
    other = FactoredMatrix(torch.randn(3, 10, 2, dtype=torch.float64), torch.randn(3, 2, 10, dtype=torch.float64))
    product = fm @ other
    assert isinstance(product, FactoredMatrix) and product.mdim == 2
    torch.testing.assert_close(product.AB, fm.AB @ other.AB)
    x = torch.randn(10, 5, dtype=torch.float64)
    torch.testing.assert_close((fm @ x).AB, fm.AB @ x)
    torch.testing.assert_close((x.T @ fm).AB, x.T @ fm.AB)
    torch.testing.assert_close(fm[1].AB, fm.AB[1])
    torch.testing.assert_close(fm.T.AB, fm.AB.mT)
    torch.testing.assert_close(fm.get_corner(3), fm.AB[:, :3, :3])
    with pytest.raises(ValueError, match="inner dimensions"):
        FactoredMatrix(torch.randn(4, 3), torch.randn(4, 3))


def test_model_qk_and_ov_circuits():
    model = HookedTransformer.from_pretrained_no_processing(tiny_hf_model(tiny_hf_configs()["gqa"]))
    c = model.cfg
    qk, ov = model.QK, model.OV
    assert qk.shape == (c.n_layers, c.n_heads, c.d_model, c.d_model) and qk.mdim == c.d_head
    layer, head = 1, 3
    kv = head // c.group_size
    attn = model.blocks[layer].attn
    torch.testing.assert_close(qk[layer, head].AB, attn.W_Q[head] @ attn.W_K[kv].T, **TOL)
    torch.testing.assert_close(ov[layer, head].AB, attn.W_V[kv] @ attn.W_O[head], **TOL)
    # The OV circuit is what the head adds per unit of attention: z @ W_O == v @ W_O.
    x = torch.randn(5, c.d_model)
    torch.testing.assert_close((x @ ov[layer, head]).AB, x @ attn.W_V[kv] @ attn.W_O[head], **TOL)
