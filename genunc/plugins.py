"""What the library finds by registration, never by import: entry points of installed packages.

Two groups, each read from ``importlib.metadata`` on use:

* ``genunc.commands``: ``name = "package.module:add_parser"``, a function that adds the
  subcommand ``name`` to the ``genunc`` parser's subparsers (genunc's own lab registers
  ``zoo``: ``genunc zoo train``);
* ``genunc.judges``: ``name = "package.module:Factory"``, a callable taking keyword arguments
  (``device=``) and returning a judge of images: ``probabilities(images)`` gives ``(N, classes)``
  class probabilities (``quality: zoo:<name>`` in an image job's config).

A package registers its own in its ``pyproject.toml`` (``[project.entry-points."genunc.judges"]``)
and is seen once installed (``pip install -e .`` re-reads them).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from genunc.errors import ConfigError

COMMANDS = "genunc.commands"
JUDGES = "genunc.judges"


def registered(group: str) -> dict[str, EntryPoint]:
    """The entry points of `group` by name (sorted)."""
    return {ep.name: ep for ep in sorted(entry_points(group=group), key=lambda ep: ep.name)}


def judge(name: str, **kwargs: Any) -> Any:
    """The judge registered as `name` in ``genunc.judges``, built with `kwargs`."""
    found = registered(JUDGES).get(name)
    if found is None:
        names = ", ".join(registered(JUDGES)) or "none"
        raise ConfigError(f"no judge {name!r} is registered (registered: {names}); install the "
                          f"package that provides it (genunc's own: pip install -e . from a clone) "
                          f"or register yours under the entry-point group {JUDGES!r}")
    try:
        factory = found.load()
    except ImportError as err:
        raise ConfigError(f"judge {name!r} is registered as {found.value} but cannot be imported "
                          f"({err}); install the package that provides it") from None
    return factory(**kwargs)


def command_plugins() -> dict[str, Callable[[Any], Any]]:
    """``name -> add_parser`` of every registered ``genunc.commands`` entry point that imports;
    one that does not (its package gone, the entry point left behind) is skipped with a warning,
    so the rest of the command line keeps working."""
    commands = {}
    for name, ep in registered(COMMANDS).items():
        try:
            commands[name] = ep.load()
        except ImportError as err:
            warnings.warn(f"genunc: command {name!r} ({ep.value}) cannot be imported ({err}); "
                          "skipped", stacklevel=2)
    return commands
