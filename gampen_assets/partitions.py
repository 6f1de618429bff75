"""Partition definitions shared by assets, sensors and schedules."""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition

from gampen_ml.store import SIM_TEST

__all__ = ["SIM_TEST", "add_declared_domains", "datasets", "domains"]

#: Datasets a posterior catalog is built for: ``sim-test`` and one key per inbox batch.
datasets = DynamicPartitionsDefinition(name="datasets")

#: Survey domains a labelled set and a fine-tuned model are made for, one key per declared
#: ``<dagster_home>/domains/<name>.toml`` (the key is the file's domain name). Dynamic, so
#: that declaring a domain needs no code reload: add the key in the UI's materialize dialog
#: ("Add partition"), or with :func:`add_declared_domains`; the assets refuse a key that
#: has no domain file.
domains = DynamicPartitionsDefinition(name="domains")


def add_declared_domains(instance, domains_folder) -> list[str]:
    """Add every domain declared in ``domains_folder`` as a ``domains`` partition.

    Returns the keys added (those not yet partitions). For scripts and the CLI; in the UI a
    key is added from the materialize dialog.
    """
    from gampen_ml.domains import list_domains

    known = set(instance.get_dynamic_partitions(domains.name))
    new = [d.name for d in list_domains(domains_folder) if d.name not in known]
    if new:
        instance.add_dynamic_partitions(domains.name, new)
    return new
