"""prefect.yaml (work pools, `prefect deploy --all`) and `edgeship serve` (edgeship/flows/deployments.py) declare
the same deployments: a flow, name, tags and concurrency limit each, scheduled where the other schedules it."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

from edgeship.flows.deployments import deployments

REPO = Path(__file__).resolve().parents[1]


def test_prefect_yaml_declares_what_edgeship_serve_runs():
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pull = declared["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == "{{ $EDGESHIP_PROJECT_DIR }}"  # resolved by each run's process, from its worker

    from_yaml = {}
    for entry in declared["deployments"]:
        flow = load_flow_from_entrypoint(entry["entrypoint"])  # a module path: loads from any working directory
        assert entry["work_pool"] == {"name": "edgeship", "work_queue_name": "default"}
        assert {"params_path", "workdir"} <= set(entry["parameters"])
        from_yaml[f"{flow.name}/{entry['name']}"] = (sorted(entry["tags"]), entry["concurrency_limit"],
                                                      bool(entry.get("schedules")))
    served = {f"{d.flow_name}/{d.name}": (sorted(d.tags), d.concurrency_limit, bool(d.schedules))
              for d in deployments(REPO, cron="0 3 * * 1")}
    assert from_yaml == served
