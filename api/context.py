"""The app's context: what the routes use (settings, the job store, the Celery app, a client for reads that wait),
built once per app by create_app, and how a request reaches it."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import current_app

from api.settings import ApiSettings
from contract.job_store import JobStore

EXTENSION_KEY = "blipq"  # where create_app keeps an app's AppContext
MAX_WAIT_S = 20.0  # the longest a `GET /v1/jobs/<id>?wait=S` holds its request (and an API thread)


@dataclass(frozen=True)
class AppContext:
    """What the routes use, built once by create_app."""

    settings: ApiSettings
    store: JobStore
    celery: Celery
    waiter: redis.Redis  # for reads that wait: its socket timeout is above MAX_WAIT_S
    fleet: redis.Redis  # for the workers' records (contract.fleet.fleet_client: decoded strings)


def context() -> AppContext:
    """The AppContext of the app handling the current request."""
    found: AppContext = current_app.extensions[EXTENSION_KEY]
    return found
