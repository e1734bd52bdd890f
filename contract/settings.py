"""BLIPQ_* settings: the base of every process's pydantic-settings model, and the fields the API and the workers share.

Each process has one model, built by `Model.from_env(env)`: `ApiSettings` (api/settings.py), `WorkerSettings`
(worker/settings.py), and the client's and `blipq up`'s small ones. A field is read from BLIPQ_<FIELD NAME>, or from
the variable its `validation_alias` names; its description is its documentation (docs/configuration.md is generated
from the models). Values are stripped, and a blank one is no value: the default applies. Lists are comma-separated.
A bad value raises SettingsError, one line naming the variable, the value and the rule it breaks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal, Self, get_args, get_origin

import annotated_types
from pydantic import BeforeValidator, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from contract.errors import SettingsError
from contract.redis_target import DEFAULT_MASTER, RedisTarget

PREFIX = "BLIPQ_"

# Defaults shared by the API and the worker: both read these variables and must agree.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "blipq"
DEFAULT_CAPTION_QUEUE = "blipq-caption"  # captioning jobs (`"task": "caption"`) and the workers that serve them
DEFAULT_JOB_TTL_S = 24 * 3600  # job records, uploads and results expire a day after submission
# One image, uploaded or downloaded. Far below Pillow's 89M: a 40 MP camera original is plenty for a 384 px model.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# The byte limit follows the pixel limit, so that both admit the same camera originals: one byte per pixel admits a
# JPEG of that many pixels up to quality 98 with 4:2:0 chroma (0.68 bytes per pixel) or 4:2:2 (0.89), as cameras and
# phones write them, with room for their metadata (benchmarks/image_sizes.py, 2026-12-06); not 4:4:4 at quality 98
# (1.37) nor a PNG photo (1.97), which need BLIPQ_MAX_IMAGE_BYTES raised.
IMAGE_BYTES_PER_PIXEL = 1
MIN_DEFAULT_IMAGE_BYTES = 1024 * 1024  # a small pixel limit still admits the headers and metadata of its images
DEFAULT_TIME_LIMIT_S = 300  # the hard limit of one job (a 20 s fetch and a generate, with room); sets the visibility
WEBHOOK_SECRET_MIN_CHARS = 16  # a signing key short enough to guess signs nothing

LogFormat = Literal["json", "text"]  # json: one object per line, for log collectors; text: for people at a terminal


def setting(
    default: Any,
    description: str,
    *,
    variable: str | None = None,
    rule: str = "",
    shown_default: str = "",
    secret: bool = False,
    **constraints: Any,
) -> Any:
    """A field read from BLIPQ_<NAME> (or `variable`), documented by its one-line `description`.

    `rule` states what the type and bounds do not (a format); `shown_default` is what the docs show as the default
    when the value depends on other settings; a `secret` value is in neither the repr nor an error message.
    """
    extra: dict[str, str | bool] = {"rule": rule, "shown_default": shown_default, "secret": secret}
    return Field(
        default,
        description=description,
        validation_alias=variable,
        repr=not secret,
        json_schema_extra={key: value for key, value in extra.items() if value},
        **constraints,
    )


def derived(default: Any, description: str) -> Any:
    """A field that no variable of its own sets: validators derive it from other fields (code may give it)."""
    return Field(default, description=description, validate_default=True, json_schema_extra={"derived": True})


def field_extra(field: FieldInfo, key: str) -> Any:
    """What `setting` or `derived` noted on a field, or None."""
    extra = field.json_schema_extra
    return extra.get(key) if isinstance(extra, dict) else None


def comma_separated(value: str) -> list[str]:
    """The items of a comma-separated list, stripped, blank ones skipped."""
    return [item for item in (part.strip() for part in value.split(",")) if item]


def choices(field: FieldInfo) -> tuple[str, ...]:
    """The values a field accepts, when it accepts only some (a Literal or an Enum); () otherwise."""
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        return tuple(str(option) for option in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return tuple(str(member.value) for member in annotation)
    return ()


def on_off(value: Any) -> Any:
    """Read a switch: `on` or `off` (a bool given in code passes as it is)."""
    if isinstance(value, str):
        if value not in ("on", "off"):
            raise ValueError("is not one of on, off")
        return value == "on"
    return value


OnOff = Annotated[bool, BeforeValidator(on_off)]  # a switch: on or off


def number(value: float) -> str:
    """A bound as people write it: 1, 0.5."""
    return str(int(value)) if float(value).is_integer() else str(value)


def rule_of(field: FieldInfo) -> str:
    """The rule a field's value follows, in words: its type and bounds, its choices, or its format."""
    explicit = field_extra(field, "rule")
    if explicit:
        return str(explicit)
    options = choices(field)
    if options:
        return f"one of {', '.join(options)}"
    kinds = {int: "integer", float: "number", bool: "on or off"}
    words = [kinds.get(field.annotation, "text")]  # type: ignore[arg-type]
    for bound in field.metadata:
        if isinstance(bound, annotated_types.Ge):
            words.append(f"at least {number(bound.ge)}")  # type: ignore[arg-type]
        elif isinstance(bound, annotated_types.Gt):
            words.append(f"greater than {number(bound.gt)}")  # type: ignore[arg-type]
        elif isinstance(bound, annotated_types.Le):
            words.append(f"at most {number(bound.le)}")  # type: ignore[arg-type]
    return ", ".join(words)


class VariablesSource(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping, read as blipq reads it: BLIPQ_* names as written
    (upper case), values stripped, a blank value no value, and derived fields not read at all."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self.environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        values = {name: value.strip() for name, value in self.environ.items() if name.startswith(PREFIX)}
        # Names are matched lower-cased (the model is case-insensitive): only the upper-case spelling counts.
        return {name.lower(): value for name, value in values.items() if value and name == name.upper()}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """A field's raw value from the mapping; none for a derived field (it has no variable)."""
        if field_extra(field, "derived"):
            return None, field_name, False
        return super().get_field_value(field, field_name)


class BlipqSettings(BaseSettings):
    """The base of each process's settings model: frozen, read from BLIPQ_* variables by `from_env` alone."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        frozen=True,
        extra="forbid",
        validate_by_name=True,  # fields with a variable of another name are still given by name in code
        arbitrary_types_allowed=True,  # port ranges are `range`s
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what the code gives: a model built in code (a test's) is not changed by the environment."""
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """Build the settings from `env` (os.environ by default); raises SettingsError naming each bad variable."""
        raw = VariablesSource(cls, os.environ if env is None else env)()
        by_variable = {
            field.validation_alias: name
            for name, field in cls.model_fields.items()
            if isinstance(field.validation_alias, str)
        }
        values = {by_variable.get(key, key): value for key, value in raw.items()}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError("; ".join(cls.explain(error) for error in exc.errors())) from None

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Each variable the model reads, and the field it sets."""
        return {
            cls.variable(name): name for name, field in cls.model_fields.items() if not field_extra(field, "derived")
        }

    @classmethod
    def variable(cls, name: str) -> str:
        """The variable that sets field `name`."""
        alias = cls.model_fields[name].validation_alias
        return alias if isinstance(alias, str) else f"{PREFIX}{name.upper()}"

    @classmethod
    def explain(cls, error: ErrorDetails) -> str:
        """One refused value as a line: `BLIPQ_<NAME>='value' rule` (a rule across variables names them itself)."""
        context = error.get("ctx", {})
        if not error["loc"]:
            return str(context.get("error", error["msg"]))
        name = str(error["loc"][0])
        field = cls.model_fields[name]
        value = error["input"]
        shown = f"<{len(str(value))} characters, not shown>" if field_extra(field, "secret") else repr(value)
        return f"{cls.variable(name)}={shown} {broken_rule(error, field)}"


# pydantic's errors for a bound: the bound's name in the error's context, and the rule in words.
BOUND_RULES = {
    "greater_than_equal": ("ge", "must be at least"),
    "greater_than": ("gt", "must be greater than"),
    "less_than_equal": ("le", "must be at most"),
}
TYPE_RULES = {"int": "is not an integer", "float": "is not a number"}  # by the first word of pydantic's error type


def broken_rule(error: ErrorDetails, field: FieldInfo) -> str:
    """The rule a value broke, in words, from pydantic's error."""
    kind, context = error["type"], error.get("ctx", {})
    if kind == "value_error":  # a validator's own words
        return str(context["error"])
    if kind in BOUND_RULES:
        bound, words = BOUND_RULES[kind]
        return f"{words} {number(context[bound])}"
    if kind in ("literal_error", "enum"):
        return f"is not one of {', '.join(choices(field))}"
    return TYPE_RULES.get(kind.partition("_")[0], f"is refused: {error['msg']}")


class SharedSettings(BlipqSettings):
    """The settings both the API and the workers read: give both processes the same values."""

    redis_url: str = setting(
        DEFAULT_REDIS_URL,
        "The Redis that holds jobs and queues (with Sentinel, only its database number and password are used)",
        rule="a redis:// or rediss:// URL",
    )
    redis_sentinels: Annotated[tuple[tuple[str, int], ...], NoDecode] = setting(
        (),
        "Redis Sentinel's addresses: the primary is found through them; unset: no Sentinel",
        rule="host:port addresses, comma-separated",
    )
    redis_master: str = setting(DEFAULT_MASTER, "The name the sentinels know the primary by")
    job_ttl_s: int = setting(DEFAULT_JOB_TTL_S, "Seconds job records, uploads and results are kept", ge=60)
    job_time_limit_s: int = setting(
        DEFAULT_TIME_LIMIT_S,
        "Seconds one job may run (hard limit; it fails `timeout` 10 s earlier); sets the broker's visibility timeout",
        ge=15,
    )
    max_image_pixels: int = setting(
        DEFAULT_MAX_IMAGE_PIXELS,
        "The most pixels an image may have, uploaded (checked by the API from its header) or downloaded",
        ge=1,
    )
    # Validated after max_image_pixels, whose value its default follows.
    max_image_bytes: int = setting(
        None,
        "The largest image, uploaded or downloaded. The default admits the JPEG camera originals of "
        "BLIPQ_MAX_IMAGE_PIXELS up to quality 98 (4:2:0 or 4:2:2 chroma), not PNG photos (2 bytes per pixel). Each "
        "upload waits in Redis until its job ends: up to this much Redis memory per upload in flight",
        shown_default="1 byte per pixel of BLIPQ_MAX_IMAGE_PIXELS (40000000)",
        validate_default=True,
        ge=1024,
    )
    log_format: LogFormat = setting("json", "json: one object per line, for log collectors; text: for a terminal")
    webhook_secret: str = setting(
        "",
        "The key that signs webhooks (workers sign, the API accepts jobs naming a webhook); unset: no webhooks",
        rule=f"unset, or at least {WEBHOOK_SECRET_MIN_CHARS} characters",
        secret=True,
    )

    @property
    def redis(self) -> RedisTarget:
        """Where Redis is (contract/redis_target.py)."""
        return RedisTarget(self.redis_url, self.redis_sentinels, self.redis_master)

    @field_validator("max_image_bytes", mode="before")
    @classmethod
    def follow_pixels(cls, value: Any, info: ValidationInfo) -> Any:
        """Unset: one byte per pixel of BLIPQ_MAX_IMAGE_PIXELS (a bad BLIPQ_MAX_IMAGE_PIXELS is reported on its own)."""
        if value is not None:
            return value
        pixels = info.data.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
        return max(MIN_DEFAULT_IMAGE_BYTES, pixels * IMAGE_BYTES_PER_PIXEL)

    @field_validator("redis_url")
    @classmethod
    def check_redis_url(cls, url: str) -> str:
        """Refuse a URL that is not Redis's."""
        if not url.startswith(("redis://", "rediss://")):
            raise ValueError("must start with redis:// or rediss://")
        return url

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def parse_sentinels(cls, value: Any) -> Any:
        """Read `host:port` addresses, comma-separated."""
        if not isinstance(value, str):
            return value
        sentinels = []
        for item in comma_separated(value):
            host, _, port = item.rpartition(":")
            if not host or not port.isdecimal() or not 1 <= int(port) <= 65535:
                raise ValueError(f"has {item!r}, which is not a host:port address (sentinel-1:26379)")
            sentinels.append((host.strip("[]"), int(port)))
        return tuple(sentinels)

    @field_validator("webhook_secret")
    @classmethod
    def check_webhook_secret(cls, secret: str) -> str:
        """Refuse a signing key short enough to guess (the message never shows it: errors end up in logs)."""
        if secret and len(secret) < WEBHOOK_SECRET_MIN_CHARS:
            raise ValueError(f"must be at least {WEBHOOK_SECRET_MIN_CHARS} characters long")
        return secret
