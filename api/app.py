"""The Flask app factory."""

from __future__ import annotations

from flask import Flask

from api.admission import install_rate_limits
from api.auth import install_api_keys
from api.batches import bp as batches_bp
from api.context import EXTENSION_KEY, MAX_WAIT_S, AppContext
from api.errors import register_error_handlers
from api.openapi import install_openapi
from api.ops import install_ops
from api.page import bp as page_bp
from api.settings import ApiSettings
from api.views import bp
from contract.broker import create_celery
from contract.fleet import fleet_client
from contract.job_store import JobStore


def create_app(settings: ApiSettings | None = None) -> Flask:
    """Build the API for `settings` (from the environment when None)."""
    settings = settings or ApiSettings.from_env()
    app = Flask("blipq")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION_KEY] = AppContext(
        settings=settings,
        store=JobStore.connect(settings.redis, settings.job_ttl_s),
        celery=create_celery(settings.redis, settings.queue, settings.job_time_limit_s),
        waiter=settings.redis.client(socket_connect_timeout=5, socket_timeout=MAX_WAIT_S + 5),
        fleet=fleet_client(settings.redis),
    )
    install_api_keys(app, settings.api_keys)
    install_rate_limits(app, settings, bp, batches_bp)  # after the keys: it counts per key name
    app.register_blueprint(bp)
    app.register_blueprint(batches_bp)  # /v1/batches
    app.register_blueprint(page_bp)  # GET /: the web page
    install_ops(app, settings)  # /readyz, /metrics, and a metric and a log line per request
    install_openapi(app, settings)  # /openapi.json and /docs: last, as it describes the routes registered before it
    register_error_handlers(app)
    return app
