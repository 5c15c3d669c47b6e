"""The experiments' configs: one file per experiment, ``get_config(arg)`` with ``arg`` the setup
(``--config configs/FILE.py:SETUP``), as in big_vision."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_collections

from experiments.cli import UserError


def select(
    path: str,
    setups: Mapping[str, Callable[[], ml_collections.ConfigDict]],
    arg: str | None,
    default: str = "cpu",
) -> ml_collections.ConfigDict:
    """The config of setup ``arg`` of the config file ``path``: what each ``get_config`` shares.

    Args:
      path: the config file as the user names it (``configs/lm.py``), for the message.
      setups: ``{name: function returning the setup's config}``, in the order the message
        lists them; its first name is the example of the hint.
      arg: the ``SETUP`` of ``--config path:SETUP`` (``None`` or empty: ``default``).
      default: the setup of an empty ``arg``.

    Returns:
      ``setups[arg]()``.

    Raises:
      UserError: an unknown setup, naming the known ones.

    Example::

        def get_config(arg=None):
            return configs.select("configs/lm.py", {"smoke": smoke, "cpu": cpu}, arg)
    """
    arg = arg or default
    if arg not in setups:
        raise UserError(
            f"unknown {path} variant {arg!r}: use one of {', '.join(setups)}",
            hint=f"e.g. --config {path}:{next(iter(setups))}",
        )
    return setups[arg]()
