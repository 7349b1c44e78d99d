"""Registered networks: shapes, gradient flow, configuration round trips, network input."""

from __future__ import annotations

import pytest
import torch

from specabund.errors import ConfigError
from specabund.models import (
    ModelConfig,
    SpectralResCNN,
    build_model,
    default_config,
    list_models,
    register_model,
)
from specabund.training.data import SIGMA_CAP, prepare_input


def test_registry_lists_required_models() -> None:
    names = list_models()
    assert {"rescnn", "rescnn_small", "rescnn_wide"} <= set(names)
    assert ModelConfig().name == "rescnn"


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels", [1, 2])
def test_shapes_and_gradient_flow(name: str, in_channels: int) -> None:
    torch.manual_seed(0)
    cfg = default_config(name, in_channels=in_channels)
    n_pixels, n_labels = 517, 3  # odd length: downsampling must cope
    model = build_model(cfg, n_pixels, n_labels)
    assert isinstance(model, SpectralResCNN)
    x = torch.randn(4, in_channels, n_pixels)
    mean, logvar = model(x)
    assert mean.shape == (4, n_labels) and logvar.shape == (4, n_labels)
    assert torch.all(logvar >= cfg.logvar_min) and torch.all(logvar <= cfg.logvar_max)
    # two optimisation steps so that zero-initialised layers (last BN of each block) pass gradient on
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(2):
        mean, logvar = model(x)
        loss = (mean - 1.0).pow(2).mean() + (logvar - 0.5).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"no gradient reaches {pname}"


def test_wrong_input_channels_raise() -> None:
    model = build_model(default_config("rescnn_small", in_channels=2), 256, 2)
    with pytest.raises(ValueError, match="expected input"):
        model(torch.randn(2, 1, 256))


def test_model_config_round_trip_and_validation() -> None:
    cfg = default_config("rescnn_small", dropout=0.2, activation="relu")
    d = cfg.to_dict()
    assert d["group_channels"] == list(cfg.group_channels)
    assert ModelConfig.from_dict(d) == cfg
    # absent keys take the preset of the named model, not the class defaults
    assert ModelConfig.from_dict({"name": "rescnn_small"}) == default_config("rescnn_small")
    with pytest.raises(ConfigError, match="unknown model config keys"):
        ModelConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ConfigError):
        ModelConfig(kernel_size=4)
    with pytest.raises(ConfigError):
        ModelConfig(in_channels=3)
    with pytest.raises(ConfigError):
        ModelConfig(activation="tanhh")
    with pytest.raises(ConfigError, match="unknown model"):
        build_model(ModelConfig(name="nope"), 100, 1)
    with pytest.raises(ConfigError, match="already registered"):
        register_model("rescnn")(lambda c, p, n: SpectralResCNN(c, p, n))


def test_presets_differ_in_size() -> None:
    sizes = {
        n: sum(p.numel() for p in build_model(default_config(n), 1000, 2).parameters())
        for n in ("rescnn_small", "rescnn", "rescnn_wide")
    }
    assert sizes["rescnn_small"] < sizes["rescnn"] < sizes["rescnn_wide"]


def test_prepare_input_channels() -> None:
    flux = torch.tensor([[1.0, 0.5, float("nan"), 9.0, 0.8]])
    ivar = torch.tensor([[100.0, 0.0, 4.0, 25.0, 0.25]])
    one = prepare_input(flux, ivar, 1)
    assert one.shape == (1, 1, 5)
    # continuum at zero; no-data pixels (ivar 0 or NaN flux) set to the continuum; outliers clipped
    assert torch.allclose(one[0, 0], torch.tensor([0.0, 0.0, 0.0, 2.0, -0.2]))
    two = prepare_input(flux, ivar, 2)
    assert two.shape == (1, 2, 5)
    assert torch.allclose(two[0, 0], one[0, 0])
    # sigma = ivar**-0.5, capped; pixels without data take the cap
    assert torch.allclose(two[0, 1], torch.tensor([0.1, SIGMA_CAP, SIGMA_CAP, 0.2, SIGMA_CAP]))


def test_mc_dropout_shares_the_trunk_when_dropout_is_only_in_the_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Head-only dropout: the trunk runs once per batch and the samples equal full-network MC passes
    (the same dropout masks are drawn); with dropout in the blocks the full path is taken."""
    from pathlib import Path

    import numpy as np

    from specabund.predict import uncertainty
    from specabund.training.data import LabelScaler
    from specabund.training.saved import LoadedModel

    torch.manual_seed(0)
    cfg = default_config("rescnn_small", dropout=0.0, head_dropout=0.2)
    net = build_model(cfg, 256, 3)
    scaler = LabelScaler(mean=np.zeros(3), std=np.ones(3))
    member = LoadedModel(net, Path("mem"), {}, ["A", "B", "C"], scaler, cfg)
    rng = np.random.default_rng(1)
    X = (1 + 0.05 * rng.normal(size=(10, 256))).astype(np.float32)
    iv = np.full_like(X, 400.0)
    assert uncertainty.head_only_dropout(net)
    calls = {"trunk": 0}
    trunk = net.trunk

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls["trunk"] += 1
        return trunk(x)

    monkeypatch.setattr(net, "trunk", counting)
    fast = uncertainty._sample_member(member, X, iv, 20, batch_size=5, max_rows=40, seed=3)
    assert calls["trunk"] == 2  # once per batch of 5, not once per sample
    monkeypatch.setattr(uncertainty, "head_only_dropout", lambda n: False)
    slow = uncertainty._sample_member(member, X, iv, 20, batch_size=5, max_rows=40, seed=3)
    for a, b in zip(fast[:3], slow[:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert np.all(fast[1] > 0)  # the samples differ: a model term exists
    monkeypatch.undo()
    assert not uncertainty.head_only_dropout(build_model(default_config("rescnn_small", dropout=0.1), 256, 3))
