"""Drivers: the ``dpfedseg`` command, presets, the comparison runner, reports and plots."""
