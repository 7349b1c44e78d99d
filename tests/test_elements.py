"""The one mapping from a label to the element whose lines measure it."""

from __future__ import annotations

import pytest

from specabund.baselines.cannon import censored_element
from specabund.elements import element_of_label


@pytest.mark.parametrize(
    ("label", "element"),
    [
        ("MG_FE", "MG"),
        ("[Mg/Fe]", "MG"),
        ("c", "C"),  # an element symbol alone means [X/Fe]
        ("FE_H", "FE"),  # iron's own abundance
        ("[Fe/H]", "FE"),
        ("feh", "FE"),
        ("TEFF", None),
        ("LOGG", None),
        ("M_H", None),
        ("_FE", None),
    ],
)
def test_element_of_label(label: str, element: str | None) -> None:
    assert element_of_label(label) == element


def test_cannon_censors_only_x_fe_labels() -> None:
    # FE_H is measured on iron lines but stays a free label of the Cannon, like TEFF and LOGG
    assert censored_element("MG_FE") == "MG"
    assert censored_element("FE_H") is None
    assert censored_element("TEFF") is None
    assert censored_element("FE_FE") is None
    assert censored_element("MG_H") is None
