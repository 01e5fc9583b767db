"""The CLI as a user meets it: help everywhere, env-var fallbacks, clear one-line errors."""

from __future__ import annotations

import os

import click
import pytest
from click.testing import CliRunner

from streams.broker import BrokerError, LocalBroker
from streams.cli import main
from streams.settings import Settings


def commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        out.append((path, cmd))
        if isinstance(cmd, click.Group):
            out.extend(commands(cmd, path))
    return out


def test_required_subcommands_exist() -> None:
    names = {path[0] for path, _ in commands(main)}
    assert {"broker", "worker", "simulate", "replay", "features"} <= names
    assert {("broker", "start"), ("broker", "stop"), ("broker", "status")} <= {p for p, _ in commands(main)}


@pytest.mark.parametrize("path", [p for p, _ in commands(main)], ids=lambda p: " ".join(p))
def test_every_option_shows_an_environment_variable(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    cmd = dict(commands(main))[path]
    ctx = click.Context(cmd, info_name=path[-1], auto_envvar_prefix="PROPSTREAM_" + "_".join(path).upper())
    for param in cmd.params:
        if isinstance(param, click.Option):
            record = param.get_help_record(ctx)  # exactly what --help renders for this option
            assert record is not None
            assert "env var: PROPSTREAM_" in record[1], f"{' '.join(path)} {param.opts}: {record}"
            assert " ".join(record[1].split()) in " ".join(result.output.split())


def test_environment_overrides_reach_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROPSTREAM_PARTITIONS", "12")
    monkeypatch.setenv("PROPSTREAM_TOPIC_CART", "shop.cart")
    s = Settings()
    assert (s.partitions, s.topic_cart) == (12, "shop.cart")
    with pytest.raises(Exception, match="frozen"):
        s.partitions = 3  # type: ignore[misc]
    with pytest.raises(Exception, match="Extra inputs"):
        Settings(partitons=3)  # type: ignore[call-arg]  # misspelt keys fail loudly


def test_missing_java_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no java, no mvn
    with pytest.raises(BrokerError) as info:
        LocalBroker(Settings(home=tmp_path)).start()
    message = str(info.value)
    assert "\n" not in message and "Java 17+" in message and "PROPSTREAM_BOOTSTRAP" in message


def test_missing_maven_is_one_clear_line(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    import shutil

    java = shutil.which("java")
    if java is None:
        pytest.skip("no java here")
    bin_dir = os.path.join(str(tmp_path), "bin")
    os.makedirs(bin_dir)
    os.symlink(java, os.path.join(bin_dir, "java"))
    monkeypatch.setenv("PATH", bin_dir)
    with pytest.raises(BrokerError) as info:
        LocalBroker(Settings(home=tmp_path), data_dir=tmp_path).fetch()  # type: ignore[arg-type]
    assert "\n" not in str(info.value) and "Maven" in str(info.value)


def test_features_without_a_worker_says_what_to_do() -> None:
    from streams.broker import free_port

    result = CliRunner().invoke(main, ["features", "u1", "--web-port", str(free_port())])
    assert result.exit_code == 1
    assert "propstream worker" in result.output
