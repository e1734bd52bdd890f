"""What the deployment checks share: the settings every process reads, and what the deployments must run."""

from __future__ import annotations

from typing import Any

from api.settings import ApiSettings
from blipq.reference import configuration_tables
from contract.states import JobTask
from worker.settings import WorkerSettings

FOREIGN_VARIABLES = {"HF_HOME", "CUDA_VISIBLE_DEVICES"}  # read by transformers and CUDA, not by blipq


BLIPQ_COMMANDS = {"api", "worker"}  # `blipq up` is for one machine, not for production


# The models production serves, by task (with BLIPQ_MODEL unset, a worker serves a demo model of the repository).
PRODUCTION_MODELS = {JobTask.VQA: "Salesforce/blip-vqa-base", JobTask.CAPTION: "Salesforce/blip-image-captioning-base"}


def known_variables() -> set[str]:
    """Every BLIPQ_* variable a process reads: those of its settings model (the source of docs/configuration.md)."""
    return {model.variable(name) for _, _, model, names in configuration_tables() for name in names}


def worker_settings(environment: dict[str, Any]) -> WorkerSettings:
    """What a worker makes of this environment, as `blipq worker` reads it."""
    return WorkerSettings.from_env({name: str(value) for name, value in environment.items()})


def api_settings(environment: dict[str, Any]) -> ApiSettings:
    """What the API makes of this environment (but its keys file, which exists only where the API runs)."""
    env = {name: str(value) for name, value in environment.items() if name != "BLIPQ_API_KEYS_FILE"}
    return ApiSettings.from_env(env)
