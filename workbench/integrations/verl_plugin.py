"""Import hook for verl workers: ``VERL_USE_EXTERNAL_MODULES=workbench.integrations.verl_plugin``.

verl imports every module named in ``VERL_USE_EXTERNAL_MODULES`` when ``verl`` itself is imported, in the
driver and in every Ray worker. Importing this module calls :func:`workbench.integrations.verl.install` with
the settings in ``WORKBENCH_VERL_DVP``: the ``dvp_mis`` loss is registered and the DVP patches are armed.
It has a side effect on purpose; nothing else should import it (pytest's doctest collection skips it).
"""

from __future__ import annotations

from workbench.integrations.verl import install

SETTINGS = install()
"""The :class:`~workbench.integrations.verl.VerlDVPConfig` this process runs with."""
