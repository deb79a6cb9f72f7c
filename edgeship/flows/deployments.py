"""Prefect deployments: scheduled retraining and re-signing, and publish/rollout/rollback from the Prefect UI.

`edgeship serve` registers them with the Prefect server in PREFECT_API_URL and
runs them in this process (a Prefect "serve" runner); `prefect.yaml` declares
the same deployments for work pools and workers.
"""

from __future__ import annotations

from pathlib import Path


def deployments(workdir: Path, cron: str | None, params_path: str = "params.yaml",
                controller_interval_s: float = 60.0) -> list:
    """The release (on `cron`, when given), publish, rollback, rollout, resign (every
    `ota.resign_every_hours`) and rollout-controller (every `controller_interval_s`) deployments for the
    project in `workdir`."""
    from datetime import timedelta

    from edgeship.config import load_params
    from edgeship.flows.publish import publish, resign, rollback, rollout
    from edgeship.flows.release import release
    from edgeship.flows.rollout import rollout_controller

    where = {"workdir": str(workdir.resolve()), "params_path": params_path}
    every = timedelta(hours=load_params(workdir / params_path).ota.resign_every_hours)
    return [
        release.to_deployment(name="scheduled-retraining", cron=cron, parameters=where,
                              description="Retrain, quantize, compile, benchmark, gate and register.",
                              tags=["edgeship", "release"], concurrency_limit=1),
        publish.to_deployment(name="publish", parameters={**where, "alias": "production"},
                              description="Publish the version an alias points to into the signed OTA channel.",
                              tags=["edgeship", "ota"], concurrency_limit=1),
        rollback.to_deployment(name="rollback", parameters=where,
                               description="Roll targets back (abort an unfinished rollout, else the previous base).",
                               tags=["edgeship", "ota"], concurrency_limit=1),
        rollout.to_deployment(name="rollout", parameters=where,
                              description="Widen, narrow or complete one target's rollout of the channel's candidate.",
                              tags=["edgeship", "ota"], concurrency_limit=1),
        resign.to_deployment(name="resign", parameters=where, interval=every,
                             description="Renew timestamp/snapshot/targets before they expire (devices go stale).",
                             tags=["edgeship", "ota"], concurrency_limit=1),
        rollout_controller.to_deployment(name="rollout-controller", interval=controller_interval_s, parameters=where,
                                         description="Advance, hold or abort each target's rollout on what the "
                                                     "fleet reports.", tags=["edgeship", "ota", "fleet"],
                                         concurrency_limit=1),
    ]
