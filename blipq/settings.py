"""The settings of the client commands and of `blipq up`, read from BLIPQ_* variables (the API's and the workers' are
their processes' own)."""

from __future__ import annotations

from contract.settings import BlipqSettings, setting

DEFAULT_SERVICE_URL = "http://127.0.0.1:8000"  # where `blipq up` serves the API


class ClientSettings(BlipqSettings):
    """What `blipq ask`, `caption` and `tag` read: where the service is, and the key to present."""

    url: str = setting(DEFAULT_SERVICE_URL, "The API the client commands use (their --url overrides it)")
    api_key: str | None = setting(None, "The API key the client commands present; unset: none", secret=True)


class UpSettings(BlipqSettings):
    """What `blipq up` reads besides the API's and the workers' settings (it starts both)."""

    caption_model: str = setting(
        "",
        "The model of `blipq up`'s captioning workers (BLIPQ_MODEL is its VQA workers')",
        shown_default="demo_model/blip-caption-easy",
    )
