"""What several workflows share: the training data and labels, and the configuration objects."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import (
    parse_settings,
)
from ..errors import SpecabundError

if TYPE_CHECKING:  # pragma: no cover
    from ..dataset import Dataset
    from ..models import ModelConfig
    from ..training import TrainConfig

logger = logging.getLogger(__name__)


#: The resolved configuration written beside every run's outputs.
RESOLVED_CONFIG = "resolved_config.toml"


# --------------------------------------------------------------------------------------------- helpers


def load_training_data(data_path: str | Path) -> tuple[Dataset, Dataset, Dataset | None]:
    """The (train, val, test-or-None) splits of a dataset.

    Parameters
    ----------
    data_path : path
        A reference dataset (split by its ``split`` column), or a train file with ``val_dataset.npz`` (and
        optionally ``test_dataset.npz``) beside it.

    Raises
    ------
    SpecabundError
        When no validation rows can be found.
    """
    from ..dataset import SPLIT_CODES, load_dataset
    from ..store import resolve_dataset_path

    data_path = Path(data_path)
    ds = load_dataset(data_path)
    if (ds.split == SPLIT_CODES["val"]).any() and (ds.split == SPLIT_CODES["train"]).any():
        test = ds.split_subset("test")
        return ds.split_subset("train"), ds.split_subset("val"), test if len(test) else None
    val_path = resolve_dataset_path(data_path.with_name("val_dataset.npz"))  # or .zarr
    if not val_path.exists():
        raise SpecabundError(
            f"{data_path}: no validation rows in it and no val_dataset.npz beside it; pass the reference "
            "dataset written by 'specabund preprocess' or a train file with val_dataset.npz next to it"
        )
    test_path = resolve_dataset_path(data_path.with_name("test_dataset.npz"))
    return ds, load_dataset(val_path), load_dataset(test_path) if test_path.exists() else None


def choose_labels(requested: Sequence[str], available: Sequence[str], include_params: bool) -> list[str]:
    """Requested labels (default: every abundance), then Teff, logg and [Fe/H] when present and wanted.

    Parameters
    ----------
    requested : sequence of str
        Labels asked for (empty: every abundance, or every label when the data has no abundance).
    available : sequence of str
        The dataset's labels.
    include_params : bool
        Add the stellar parameters present in the data.
    """
    from ..elements import STELLAR_PARAMETERS, resolve_labels

    available = list(available)
    # every abundance by default; a dataset without any (e.g. a LASP catalogue) learns its parameters
    abund = [a for a in available if a not in STELLAR_PARAMETERS] or list(available)
    labels = resolve_labels(list(requested) or None, available if requested else abund, what="dataset labels")
    if include_params:
        labels += [p for p in STELLAR_PARAMETERS if p in available and p not in labels]
    return labels


def build_configs(
    cfg: Mapping[str, Any], device: str, num_threads: int | None = None
) -> tuple[ModelConfig, TrainConfig, int]:
    """ModelConfig, TrainConfig and ensemble size of a configuration (through the typed schema).

    Parameters
    ----------
    cfg : mapping
        The configuration (nested dict, e.g. from :func:`~specabund.config.load_config`).
    device : str
        The resolved device.
    num_threads : int, optional
        ``torch`` threads during training (default ``training.num_threads``; 0 keeps the current value).
    """
    settings = parse_settings(cfg)
    return (
        settings.model_config(),
        settings.train_config(device, num_threads=num_threads),
        settings.ensemble,
    )
