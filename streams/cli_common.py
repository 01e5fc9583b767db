"""Helpers every ``propstream`` command shares: options bound to settings, one-line failures, topics."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from streams.settings import Settings, env_name

F = TypeVar("F", bound=Callable[..., Any])


def setting_option(field: str, *flags: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option bound to settings ``field``: env var shown in help, default from Settings."""
    desc = Settings.model_fields[field].description or ""
    return click.option(
        *flags, field, envvar=env_name(field), show_envvar=True, default=None, help=desc, **kwargs
    )


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the CLI options given on the command line on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic's ValidationError lists every bad field
        raise click.UsageError(str(exc)) from None


def fail(message: str) -> NoReturn:
    click.echo(f"propstream: {message}", err=True)
    sys.exit(1)


def _ensure(settings: Settings) -> str:
    from streams.broker import BrokerError
    from streams.topics import TopicMismatch, ensure_topics

    try:
        servers = settings.broker_url
        ensure_topics(settings, servers)
    except (BrokerError, TopicMismatch) as exc:
        fail(str(exc))
    return servers
