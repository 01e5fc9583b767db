"""Helpers every ``propstream`` command shares: options bound to settings, durations, one-line failures."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

from streams.settings import ENV_PREFIX, Settings, env_name

F = TypeVar("F", bound=Callable[..., Any])
DURATION_HELP = "90s, 30m, 2h, 7d"


def setting_option(field: str, *flags: str, **kwargs: Any) -> Callable[[F], F]:
    """A click option bound to settings ``field``: env var shown in help, default from Settings."""
    desc = Settings.model_fields[field].description or ""
    return click.option(
        *flags, field, envvar=env_name(field), show_envvar=True, default=None, help=desc, **kwargs
    )


class Duration(click.ParamType):
    """A duration as settings and target horizons spell it (``90s``, ``30m``, ``2h``, ``7d``), in ``unit``.

    A plain number is in ``unit``, so ``--days 30`` and ``--seconds 20`` keep their meaning.
    ``horizon``: whole seconds above zero, as a target horizon must be.

    >>> Duration("d").convert("36h", None, None), Duration().convert("20", None, None)
    (1.5, 20.0)
    """

    name = "duration"

    def __init__(self, unit: str = "s", *, horizon: bool = False) -> None:
        self.unit = unit
        self.horizon = horizon

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        from models.targets import UNITS_S, parse_duration, parse_horizon

        if isinstance(value, int | float) and not self.horizon:
            return float(value)
        try:
            if self.horizon:
                return float(parse_horizon(str(value)))
            return parse_duration(str(value), bare_unit=self.unit) / UNITS_S[self.unit]
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def cli_env_names(command: click.Command) -> set[str]:
    """Every environment variable the options under ``command`` read: explicit ones and click's auto names.

    Click tries ``<prefix>_<COMMAND>_<OPTION>`` even for options with an explicit ``envvar`` (when
    that one is unset), so both count. Prefixes come from click's own contexts, never by hand.
    """
    names: set[str] = set()

    def walk(cmd: click.Command, name: str, parent: click.Context | None) -> None:
        ctx = click.Context(cmd, parent=parent, info_name=name, **cmd.context_settings)
        for param in cmd.get_params(ctx):
            explicit = param.envvar
            names.update([explicit] if isinstance(explicit, str) else explicit or ())
            auto = isinstance(param, click.Option) and param.allow_from_autoenv
            if auto and param.name and ctx.auto_envvar_prefix is not None:
                names.add(f"{ctx.auto_envvar_prefix}_{param.name.upper()}")
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(ctx):
                child = cmd.get_command(ctx, sub)
                if child is not None:
                    walk(child, sub, ctx)

    walk(command, command.name or "propstream", None)
    return names


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with the CLI options given on the command line on top."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # one short line per bad field, named by its variable
        problems = []
        for err in exc.errors():
            error = (err.get("ctx") or {}).get("error")
            msg = str(error) if err["type"] == "value_error" and error is not None else err["msg"]
            if err["loc"] and not msg.startswith(ENV_PREFIX):
                msg = f"{env_name(str(err['loc'][0]))}: {msg}"
            problems.append(msg)
        raise click.UsageError("; ".join(problems)) from None
    except Exception as exc:  # pydantic-settings' own errors (a variable it cannot decode)
        raise click.UsageError(str(exc)) from None


def stop_broker_after(*, bootstrap: str, was_running: bool, keep: bool) -> bool:
    """Whether a command stops the local broker when it ends: only one it started itself, unless kept.

    >>> stop_broker_after(bootstrap="", was_running=False, keep=False)
    True
    >>> stop_broker_after(bootstrap="", was_running=True, keep=False)  # somebody else's
    False
    """
    return not bootstrap and not was_running and not keep


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
