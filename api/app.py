"""The Flask app factory."""

from __future__ import annotations

from flask import Flask

from api.admission import install_rate_limits
from api.auth import install_api_keys
from api.errors import register_error_handlers
from api.settings import ApiSettings
from api.views import Services, bp
from worker.jobs import JobStore, create_celery


def create_app(settings: ApiSettings | None = None) -> Flask:
    """Build the API for `settings` (from the environment when None)."""
    settings = settings or ApiSettings.from_env()
    app = Flask("blipq")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["blipq"] = Services(
        settings=settings,
        store=JobStore.from_url(settings.redis_url, settings.job_ttl_s),
        celery=create_celery(settings.redis_url, settings.queue, settings.job_ttl_s, settings.job_time_limit_s),
    )
    install_api_keys(app, settings.api_keys)
    install_rate_limits(app, settings, bp)  # after the keys: it counts per key name
    app.register_blueprint(bp)
    register_error_handlers(app)
    return app
