"""Abundance-swap augmentation: the simulator's response moves a spectrum to another abundance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specabund.simulate.synth import lamost_wavelength_grid, normalized_model_flux
from specabund.training.swap import AbundanceSwap, abundance_response, log_flux_change, swappable_labels

WAVE = lamost_wavelength_grid()[::2]


def test_only_modelled_abundances_are_swappable() -> None:
    labels = ["C_FE", "MG_FE", "TEFF", "LOGG", "FE_H", "ZZ_FE", "ALPHA_M", "CA_FE"]
    assert [labels[j] for j in swappable_labels(labels)] == ["C_FE", "MG_FE", "CA_FE"]


@pytest.mark.parametrize(("teff", "logg", "feh"), [(4600.0, 2.4, -0.4), (5900.0, 4.3, 0.0)])
@pytest.mark.parametrize("label", ["MG_FE", "CA_FE", "C_FE"])
def test_linear_response_reproduces_the_simulator(teff: float, logg: float, feh: float, label: str) -> None:
    base = {"teff": teff, "logg": logg, "fe_h": feh, "c_fe": 0.05, "mg_fe": 0.1, "ca_fe": 0.08}
    names = ["C_FE", "MG_FE", "CA_FE"]
    abund = np.array([[base[n.lower()] for n in names]])
    resp = abundance_response(WAVE, np.array([teff]), np.array([logg]), np.array([feh]), abund, names)
    k = names.index(label)
    delta = 0.25
    f0 = normalized_model_flux(base, WAVE)
    f1 = normalized_model_flux({**base, label.lower(): base[label.lower()] + delta}, WAVE)
    r = resp[0, k].astype(np.float64)
    step = log_flux_change(torch.from_numpy(r[0]), torch.from_numpy(r[1]), torch.tensor(delta)).numpy()
    moved = f0 * np.exp(step)
    change = np.abs(f1 - f0)
    assert change.max() > 5e-3  # the element has lines here
    # the quadratic step recovers the change, pixel by pixel where it matters
    sel = change > 0.2 * change.max()
    err = np.abs(moved - f1)[sel]
    # (atomic lines to 1%; C's molecular bands in cool giants saturate: 6% at 0.25 dex)
    assert np.median(err / change[sel]) < (0.08 if label == "C_FE" else 0.02)
    assert err.max() < 0.15 * change.max()
    # other elements' responses are zero where only this element has lines
    assert np.all(np.isfinite(resp))


def test_swap_moves_labels_and_flux_consistently() -> None:
    rng = np.random.default_rng(0)
    labels = ["MG_FE", "TEFF"]
    n = 6
    y = np.column_stack([rng.uniform(-0.2, 0.4, n), rng.uniform(4500, 6000, n)])
    teff, logg, feh = y[:, 1], np.full(n, 4.0), np.full(n, -0.2)
    mean, std = y.mean(axis=0), y.std(axis=0)
    swap = AbundanceSwap.build(1.0, labels, y, WAVE, teff, logg, feh, std)
    assert swap is not None and swap.cols == [0]
    ys = torch.as_tensor((y - mean) / std, dtype=torch.float32)
    flux = torch.stack(
        [
            torch.as_tensor(
                normalized_model_flux({"teff": teff[i], "logg": 4.0, "fe_h": -0.2, "mg_fe": y[i, 0]}, WAVE)
            )
            for i in range(n)
        ]
    ).float()
    ivar = torch.full_like(flux, 100.0)
    idx = torch.arange(n)
    gen = torch.Generator().manual_seed(3)
    f2, v2, y2 = swap(flux, ivar, ys, idx, ys, gen)
    # Teff is never touched; Mg takes values of the training pool
    assert torch.equal(y2[:, 1], ys[:, 1])
    pool = set(np.round(ys[:, 0].numpy(), 5))
    assert set(np.round(y2[:, 0].numpy(), 5)) <= pool
    # each spectrum now looks like the simulator's spectrum at its new Mg
    new_mg = y2[:, 0].numpy() * std[0] + mean[0]
    for i in range(n):
        want = normalized_model_flux({"teff": teff[i], "logg": 4.0, "fe_h": -0.2, "mg_fe": new_mg[i]}, WAVE)
        old_err = np.abs(flux[i].numpy() - want).max()
        new_err = np.abs(f2[i].numpy() - want).max()
        assert new_err <= 0.1 * old_err + 2e-3
    assert torch.allclose(v2 * (f2 / flux) ** 2, ivar, rtol=1e-4)


def test_swap_never_uses_missing_labels_or_parameters() -> None:
    labels = ["MG_FE"]
    y = np.array([[0.1], [np.nan], [0.3], [-0.1]])
    teff = np.array([5000.0, 5000.0, np.nan, 5200.0])
    swap = AbundanceSwap.build(1.0, labels, y, WAVE, teff, np.full(4, 3.0), np.zeros(4), np.array([0.2]))
    assert swap is not None
    assert swap.usable[:, 0].tolist() == [True, False, False, True]
    ys = torch.as_tensor(np.nan_to_num(y / 0.2, nan=np.nan), dtype=torch.float32)
    flux = torch.ones(4, len(WAVE))
    f2, _, y2 = swap(flux, torch.ones_like(flux), ys, torch.arange(4), ys, torch.Generator().manual_seed(0))
    # rows 1 and 2 are unchanged; rows 0 and 3 only take finite donor values
    assert torch.equal(f2[1], flux[1]) and torch.equal(f2[2], flux[2])
    assert torch.isnan(y2[1, 0]) and y2[2, 0] == ys[2, 0]
    assert torch.isfinite(y2[[0, 3], 0]).all()


def test_response_table_on_disk_gives_the_in_memory_swap(tmp_path) -> None:
    """A table too large for memory lives in a float16 file read by rows: same swap, file removed after."""
    import gc

    from specabund.training.swap import ResponseTable

    rng = np.random.default_rng(1)
    n, labels = 5, ["MG_FE", "CA_FE"]
    y = rng.uniform(-0.2, 0.4, (n, 2))
    teff, logg, feh = rng.uniform(4500, 6000, n), np.full(n, 4.0), np.full(n, -0.2)
    teff[2] = np.nan  # a star without parameters: zero response
    resp = abundance_response(WAVE, teff, logg, feh, y, labels)
    mem = ResponseTable(resp.shape)
    disk = ResponseTable(resp.shape, in_memory_bytes=0, directory=tmp_path)
    assert not mem.on_disk and disk.on_disk and disk.path.parent == tmp_path
    abundance_response(WAVE, teff, logg, feh, y, labels, out=mem)
    abundance_response(WAVE, teff, logg, feh, y, labels, out=disk)
    assert disk.path.stat().st_size == resp.size * 2
    np.testing.assert_array_equal(mem.to_numpy(), resp.astype(np.float32))
    np.testing.assert_array_equal(disk.to_numpy(), resp.astype(np.float32))
    idx = torch.tensor([4, 0, 4, 2])
    assert torch.equal(disk.rows(idx), mem.rows(idx))
    assert torch.all(disk.rows(torch.tensor([2]))[:, :, 0] == 0)
    std = y.std(axis=0)
    ys = torch.as_tensor((y - y.mean(axis=0)) / std, dtype=torch.float32)
    flux, ivar = torch.ones(n, WAVE.size), torch.full((n, WAVE.size), 50.0)
    out = []
    for table in (mem, disk):
        swap = AbundanceSwap(
            1.0, [0, 1], table, torch.ones(n, 2, dtype=torch.bool), torch.as_tensor(std).float()
        )
        out.append(swap(flux, ivar, ys, torch.arange(n), ys, torch.Generator().manual_seed(5)))
    for a, b in zip(out[0], out[1], strict=True):
        assert torch.equal(a, b)
    path = disk.path
    del disk, out, swap, table
    gc.collect()
    assert not path.exists()


@pytest.mark.parametrize(
    ("teff", "logg", "feh"), [(3900.0, 1.2, -0.5), (5900.0, 4.3, 0.0), (4200.0, 4.7, 0.3)]
)
def test_log_flux_steps_equal_whole_model_evaluations(teff: float, logg: float, feh: float) -> None:
    """The swap's central differences recompute only the moved element's lines: same as the whole model."""
    from specabund.simulate.synth import abundance_log_flux_steps

    names = ["C_FE", "N_FE", "O_FE", "MG_FE", "CA_FE", "TI_FE", "BA_FE"]
    rng = np.random.default_rng(int(teff))
    base = {"teff": teff, "logg": logg, "fe_h": feh, **{n.lower(): rng.uniform(-0.3, 0.5) for n in names}}
    mid, plus, minus = abundance_log_flux_steps(base, WAVE, names, 0.1)

    def ln_f(labels: dict) -> np.ndarray:
        return np.log(np.maximum(normalized_model_flux(labels, WAVE), 1e-6))

    np.testing.assert_allclose(mid, ln_f(base), rtol=0, atol=1e-12)
    for k, n in enumerate(names):
        key = n.lower()
        np.testing.assert_allclose(plus[k], ln_f({**base, key: base[key] + 0.1}), rtol=0, atol=1e-12)
        np.testing.assert_allclose(minus[k], ln_f({**base, key: base[key] - 0.1}), rtol=0, atol=1e-12)
        if n in ("MG_FE", "CA_FE"):  # (strong lines at every Teff here; N and C bands need cool stars)
            assert np.abs(plus[k] - minus[k]).max() > 1e-3, n
    with pytest.raises(ValueError, match="ZZ_FE"):
        abundance_log_flux_steps(base, WAVE, ["ZZ_FE"], 0.1)
