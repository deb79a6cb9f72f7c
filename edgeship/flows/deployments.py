"""Prefect deployments: scheduled retraining, and publish/rollback that anyone can start from the Prefect UI.

`edgeship serve` registers them with the Prefect server in PREFECT_API_URL and
runs them in this process (a Prefect "serve" runner); `prefect.yaml` declares
the same deployments for work pools and workers.
"""

from __future__ import annotations

from pathlib import Path


def deployments(workdir: Path, cron: str | None, params_path: str = "params.yaml",
                rollout_interval_s: float = 60.0) -> list:
    """The release (on `cron`, when given), publish, rollback and rollout (every `rollout_interval_s`)
    deployments for the project in `workdir`."""
    from edgeship.flows.publish import publish, rollback
    from edgeship.flows.release import release
    from edgeship.flows.rollout import rollout

    where = {"workdir": str(workdir.resolve()), "params_path": params_path}
    return [
        release.to_deployment(name="scheduled-retraining", cron=cron, parameters=where,
                              description="Retrain, quantize, compile, benchmark, gate and register.",
                              tags=["edgeship", "release"], concurrency_limit=1),
        publish.to_deployment(name="publish", parameters={**where, "alias": "production"},
                              description="Publish the version an alias points to into the signed OTA channel.",
                              tags=["edgeship", "ota"], concurrency_limit=1),
        rollback.to_deployment(name="rollback", parameters=where,
                               description="Point the OTA channel back at the previous version.",
                               tags=["edgeship", "ota"], concurrency_limit=1),
        rollout.to_deployment(name="rollout", interval=rollout_interval_s, parameters=where,
                              description="Advance, hold or abort each target's rollout on what the fleet reports.",
                              tags=["edgeship", "ota", "fleet"], concurrency_limit=1),
    ]
