"""What Dagster does after a run fails: call the lineage failure sensor on its failure event."""

from __future__ import annotations

from dagster import (
    DagsterEventType,
    DagsterInstance,
    ExecuteInProcessResult,
    build_run_status_sensor_context,
)

from gampen_assets.lineage import lineage_failure_sensor


def sense_run_failure(result: ExecuteInProcessResult, instance: DagsterInstance) -> None:
    """Run ``lineage_failure_sensor`` on the failure of ``result``, a failed run of ``instance``."""
    failure = next(
        e for e in result.all_events if e.event_type == DagsterEventType.PIPELINE_FAILURE
    )
    context = build_run_status_sensor_context(
        sensor_name="lineage_failure_sensor",
        dagster_event=failure,
        dagster_instance=instance,
        dagster_run=result.dagster_run,
    ).for_run_failure()
    lineage_failure_sensor(context)
