"""Options shared by several commands, declared once, and collapsed into typed option objects."""

from __future__ import annotations

import enum
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from webhook import policy_file
from webhook.core.policy import Policy
from webhook.store.errors import AuditTampered, StoreError

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(enum.IntEnum):
    """Every command's exit status (docs/ci.md)."""

    OK = 0
    REFUSED = 1  # judged and refused: denied workloads, rule violations, 401/403/409/422, a tampered log
    INPUT = 2  # the command's input cannot be used: usage, unreadable files, malformed envelopes
    UNAVAILABLE = 3  # the server or store could not be reached or failed


class Output(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def store_option(*, required: bool = False, help: str | None = None) -> Callable[[F], F]:
    """``--store URL`` (env ``PROMOTION_GATE_STORE``): the one declaration every command uses."""
    return click.option(
        "--store", "store", envvar="PROMOTION_GATE_STORE", required=required,
        help=help or "Store URL: sqlite:///path or postgresql://… [env: PROMOTION_GATE_STORE]",
    )


def policy_option(*, required: bool = False,
                  help: str = "Policy file [env: PROMOTION_GATE_POLICY].") -> Callable[[F], F]:
    return click.option("--policy", "policy_path", type=click.Path(dir_okay=False, path_type=Path),
                        envvar="PROMOTION_GATE_POLICY", required=required, help=help)


def output_option(func: F) -> F:
    return click.option("--output", type=click.Choice([o.value for o in Output]), default=Output.TEXT.value,
                        show_default=True, callback=lambda _ctx, _param, value: Output(value))(func)


@dataclass(frozen=True)
class BackendOptions:
    """Where records are read and written: a server (``--server``) or a local store (``--store``)."""

    server: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    store: str | None = None
    policy_path: Path | None = None
    output: Output = Output.TEXT

    @property
    def json(self) -> bool:
        return self.output is Output.JSON


def grouped(name: str, cls: type[Any], options: list[Callable[[Any], Any]]) -> Callable[[F], F]:
    """Add ``options`` to a command and hand them over as one typed object, ``name=cls(...)``.

    Each option's parameter name must be a field of ``cls``: commands never see an untyped bag.
    """
    fields = tuple(cls.__dataclass_fields__)

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kwargs[name] = cls(**{field: kwargs.pop(field) for field in fields if field in kwargs})
            return func(*args, **kwargs)

        decorated: Any = wrapper
        for option in reversed(options):
            decorated = option(decorated)
        return decorated  # type: ignore[no-any-return]

    return decorate


def backend_options(func: F) -> F:
    """Add the backend options to a command; it receives them as one ``backend: BackendOptions``.

    Errors of the backend are mapped here, once: a refusal exits 1, an unreachable server or store 3.
    """
    from webhook.cli.backend import BackendError, BackendRefused, BackendRejectedInput

    @functools.wraps(func)
    def mapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AuditTampered as exc:  # a local store's answer contradicts its own hashes
            click.echo(f"error: audit log TAMPERED: {exc}; run 'promotion-gate audit verify'", err=True)
            sys.exit(ExitCode.REFUSED)
        except StoreError as exc:  # a local store failed while a command read from it
            click.echo(f"error: {exc}", err=True)
            sys.exit(ExitCode.UNAVAILABLE)
        except BackendRefused as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(ExitCode.REFUSED)
        except BackendRejectedInput as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(ExitCode.INPUT)
        except BackendError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(ExitCode.UNAVAILABLE)

    return grouped("backend", BackendOptions, [
        click.option("--server", envvar="PROMOTION_GATE_SERVER", help="Server URL [env: PROMOTION_GATE_SERVER]."),
        click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                     envvar="PROMOTION_GATE_TOKEN_FILE", help="File with the API bearer token."),
        click.option("--ca-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="CA bundle that signed the server's certificate."),
        store_option(help="Use a local store instead: sqlite:///path or postgresql://…"),
        policy_option(help="Policy file (with --store: the promotion rules)."),
        output_option,
    ])(cast(F, mapped))


def load_policy(path: Path | None, *, usage: bool = False) -> Policy:
    """The ``--policy`` file, or digest-only rules without one.

    An invalid file exits 1, or 2 with ``usage`` (``check``, whose exit 2 means unusable input).
    """
    if path is None:
        return policy_file.default_policy()
    try:
        return policy_file.load(path)
    except policy_file.PolicyError as exc:
        if usage:
            raise click.BadParameter(str(exc), param_hint="--policy") from exc
        raise click.ClickException(str(exc)) from exc
