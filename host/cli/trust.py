"""The publishers a command requires, from ``--trust`` and ``--policy`` (registry and deploy commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["PolicyOpt", "TrustOpt", "note_unchecked", "trusted_publishers"]

TrustOpt = Annotated[list[str] | None, typer.Option(
    "--trust", metavar="KEY", help="Require this publisher (a public key A..., or a .pub file); repeatable.")]
PolicyOpt = Annotated[Path | None, typer.Option(
    "--policy", metavar="FILE", help="Require a publisher of this policy's [registry] trusted_publishers.")]


def trusted_publishers(trust: list[str] | None, policy: Path | None) -> frozenset[str] | None:
    """The publishers to require: ``--trust`` keys (or .pub files) and the policy's; None when neither is given.

    Raises:
        SandbusError: a key, key file or policy that is not valid.
    """
    if not trust and policy is None:
        return None
    from sandbus.host.cluster.keys import check_public_key, load_public_key
    from sandbus.host.lifecycle.policy import load_policy

    keys: set[str] = set()
    for item in trust or ():
        if item.startswith("A") and len(item) == 56:
            check_public_key(item)
            keys.add(item)
        else:
            keys.add(load_public_key(Path(item)))
    if policy is not None:
        keys.update(load_policy(policy).registry.trusted_publishers)
    return frozenset(keys)


def note_unchecked(trusted: frozenset[str] | None, what: str) -> None:
    """Without --trust/--policy, any publisher's valid signature passes (and the highest version is
    whoever's): say so, on stderr, so that output piped on is unchanged."""
    if trusted is None:
        typer.echo(f"sandbus: note: the signature was checked, not who signed it: any publisher's highest version "
                   f"was {what}; give --trust KEY or --policy FILE to require your publishers", err=True)
