"""Partition definitions shared by assets, sensors and schedules."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition

#: Datasets a posterior catalog is built for: ``sim-test`` and one key per inbox batch.
datasets = DynamicPartitionsDefinition(name="datasets")

#: Dataset key of the simulated test split.
SIM_TEST = "sim-test"
