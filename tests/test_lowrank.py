"""The low-rank edit (patcher/edits/lowrank.py): several corrupted key directions."""
import pytest
import torch

from patcher.edits import lowrank
from patcher.edits.rankone import solve_rank_one

F64 = torch.float64


def _several_triggers(directions: int, n: int = 6, positions: int = 9, kd: int = 12, v: int = 5,
                      strengths=None):
    """Keys of n images x ``positions`` tokens: clean noise, and at the first ``directions``
    tokens a trigger key e_i (one per token, as a trigger over several tokens gives); the
    residual there maps each trigger key to its own value change (an exact linear map
    T [v, kd] on the trigger keys), zero elsewhere."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(n, positions, 1, kd, generator=gen, dtype=F64) * 0.1
    strengths = strengths or [1.0] * directions
    trigger = torch.zeros(directions, kd, dtype=F64)
    for i in range(directions):
        trigger[i, i] = 3.0 * strengths[i]
    keys[:, :directions, 0, :] += trigger
    t_map = torch.randn(v, kd, generator=gen, dtype=F64)
    residual = torch.zeros(n, positions, 1, v, dtype=F64)
    residual[:, :directions, 0, :] = torch.einsum("vk,npk->npv", t_map,
                                                  keys[:, :directions, 0, :])
    return keys, residual, torch.eye(kd, dtype=F64)


def test_three_trigger_keys_need_three_directions_and_the_low_rank_edit_fits_them():
    keys, residual, c_inv = _several_triggers(3)
    single, low = lowrank.solve_edits("L", "w", keys, residual, c_inv)
    assert low is not None and low.rank == 3 and low.energy >= lowrank.ENERGY
    ratio = lambda e: e.fit_residual_after / e.fit_residual_before  # noqa: E731
    assert ratio(single) > 0.5          # one direction leaves two of the three triggers
    assert ratio(low) < 0.05, ratio(low)
    # D orthonormal, delta = Lambda D^T = the sum of its rank-one components, rank r
    torch.testing.assert_close(low.directions.T @ low.directions, torch.eye(3, dtype=F64))
    torch.testing.assert_close(sum(low.components()), low.delta)
    assert int(torch.linalg.matrix_rank(low.delta)) == 3
    assert low.norm == pytest.approx(float(low.delta.norm()))


def test_one_trigger_direction_gives_the_rank_one_edit_alone_and_the_same_one():
    keys, residual, c_inv = _several_triggers(1)
    single, low = lowrank.solve_edits("L", "w", keys, residual, c_inv)
    assert low is None
    plain = solve_rank_one("L", "w", keys, residual, c_inv)
    assert torch.equal(single.direction, plain.direction)
    assert torch.equal(single.magnitude, plain.magnitude)


def test_keys_that_max_rank_directions_cannot_hold_get_no_low_rank_edit_and_few_keys_work():
    # 8 distinct trigger keys of dimension 40 in 8 rows only (rows < Kd): the Q x Q route;
    # 4 directions hold about half of them: diffuse, the rank-one edit alone
    keys, residual, c_inv = _several_triggers(8, n=1, positions=8, kd=40)
    single, low = lowrank.solve_edits("L", "w", keys, residual, c_inv, max_rank=4)
    assert low is None and single.fit_residual_after > 0.5 * single.fit_residual_before
    _, full = lowrank.solve_edits("L", "w", keys, residual, c_inv, energy=0.9999, max_rank=16)
    assert full.rank == 8 and full.fit_residual_after / full.fit_residual_before < 1e-6


def test_magnitudes_are_least_squares_per_group():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(4, 5, 2, 6, generator=gen, dtype=F64)
    residual = torch.randn(4, 5, 2, 3, generator=gen, dtype=F64)
    d = torch.linalg.qr(torch.randn(6, 2, generator=gen, dtype=F64))[0]
    lam, before, after = lowrank.magnitudes_for("L", [keys], d, residual)
    assert lam.shape == (6, 2)
    for g in range(2):
        a = keys[:, :, g].reshape(-1, 6) @ d
        expected = torch.linalg.lstsq(a, residual[:, :, g].reshape(-1, 3)).solution  # [2, 3]
        torch.testing.assert_close(lam[g * 3:(g + 1) * 3], expected.T, rtol=1e-9, atol=1e-9)
    assert after <= before == pytest.approx(float((residual ** 2).sum()))


def test_subspace_iteration_finds_the_top_eigenpairs_of_a_large_matrix():
    gen = torch.Generator().manual_seed(2)
    n = 700
    basis = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))[0]
    values = torch.cat([torch.tensor([50.0, 30.0, 20.0, 10.0], dtype=F64),
                        torch.linspace(1.0, 0.01, n - 4, dtype=F64)])
    matrix = (basis * values) @ basis.T
    got, vectors = lowrank.top_eigenpairs(matrix, 4, torch.ones(n, dtype=F64))
    torch.testing.assert_close(got, values[:4], rtol=1e-8, atol=1e-8)
    overlap = (vectors.T @ basis[:, :4]).abs()
    torch.testing.assert_close(overlap, torch.eye(4, dtype=F64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("values, expected", [([0.6, 0.3, 0.1], 2), ([0.96, 0.04], 1),
                                              ([0.2] * 5, 5)])
def test_chosen_rank_is_the_fewest_directions_holding_the_energy(values, expected):
    r, held = lowrank.chosen_rank(torch.tensor(values, dtype=F64), 1.0, energy=0.9)
    assert r == expected and held >= 0.9 - 1e-12


def test_a_grouped_conv_keeps_the_rank_one_edit():
    keys, residual, c_inv = _several_triggers(3)
    grouped_keys = torch.cat([keys, keys], dim=2)            # two groups
    grouped_residual = torch.cat([residual, residual], dim=2)
    single, low = lowrank.solve_edits("L", "w", grouped_keys, grouped_residual, c_inv)
    plain = solve_rank_one("L", "w", grouped_keys, grouped_residual, c_inv)
    assert low is None and torch.equal(single.delta, plain.delta)


def test_max_rank_one_gives_the_rank_one_edit_alone():
    keys, residual, c_inv = _several_triggers(3)
    single, low = lowrank.solve_edits("L", "w", keys, residual, c_inv, max_rank=1)
    plain = solve_rank_one("L", "w", keys, residual, c_inv)
    assert low is None and torch.equal(single.delta, plain.delta)
