"""Evaluation layer: how well a spectrum can determine each label at all.

* :mod:`.crb` - Cramer-Rao bounds (the information limit) of simulated spectra, from the simulator's
  physics or through a frozen copy of the preprocessing chain.

The test-set metrics of a trained model are :func:`specabund.training.evaluate`.
"""

from __future__ import annotations
