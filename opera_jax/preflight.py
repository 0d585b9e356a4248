"""Checks that run before any work starts and before anything is written.

Output paths (a directory or a file the command will write: not the wrong kind of thing, and
writable) and whether one batch of a config fits the training set its method draws from. Each
function returns nothing or raises one ``InputError`` naming the path or the config field, so a
mistake costs a second, not a hard-negative mining, and leaves no half-made output behind.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from opera_jax.errors import InputError


def check_output_dir(path: str | os.PathLike, what: str = "output directory") -> None:
    """``path`` is a directory we can write in, or can be made one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory (the {what})")
    _check_writable(path, what)


def check_output_file(path: str | os.PathLike, what: str = "output file") -> None:
    """``path`` is a file we can write: not a directory, in a directory we can write in or make."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; the {what} must be a file path")
    _check_writable(path.parent, what)


def _check_writable(path: Path, what: str) -> None:
    """Probe the deepest existing folder of ``path`` with a temporary file (removed at once):
    permission bits alone mislead (root, read-only mounts, ACLs)."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{path}: cannot be created, {existing} is a file (the {what})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".opera-jax-probe-", dir=existing)
    except OSError as e:
        raise InputError(f"{path}: cannot write in {existing} ({e.strerror or e}) (the {what})") from None
    os.close(fd)
    os.unlink(probe)


def plan_draws(method: str, num_queries: int, num_pairs: int, *, kept_pct: float = 1.0) -> int | None:
    """The most queries one plan of ``method`` can draw from a training set: every query for basic
    and InfoBatch (it never prunes below one batch), and for SP at most the queries of its
    ``floor(kept_pct * pairs)`` kept pairs (the exact count needs the base model's scores).
    None for DP: its plans chain whole epochs until they fill their batches."""
    if method == "dp":
        return None
    if method == "sp":
        return min(math.floor(kept_pct * num_pairs), num_queries)
    return num_queries


def check_batch_fits(config, num_queries: int, num_pairs: int, split: str) -> None:
    """One global batch of ``config.optim.batch_size`` fits in one plan drawn from the training set
    (``num_queries`` queries with ``num_pairs`` positive pairs); SP keeps at least one pair."""
    m, batch = config.method, config.optim.batch_size
    if m.name == "sp":
        check_sp_keeps(m.sp.kept_pct, num_pairs, split)
    draws = plan_draws(m.name, num_queries, num_pairs, kept_pct=m.sp.kept_pct)
    if draws is not None:
        check_batch_within(batch, draws, m.name, f"split {split!r} has {num_queries} training queries")


def check_sp_keeps(kept_pct: float, num_pairs: int, split: str) -> None:
    """Static pruning keeps at least one of the ``num_pairs`` training pairs."""
    if math.floor(kept_pct * num_pairs) == 0:
        raise InputError(
            f"method.sp.kept_pct {kept_pct} keeps no pair of the {num_pairs} training pairs "
            f"of split {split!r}; raise it"
        )


def check_batch_within(batch_size: int, draws: int, method: str, about: str) -> None:
    """``batch_size`` is at most ``draws``, the queries one plan of ``method`` draws."""
    if draws < batch_size:
        raise InputError(
            f"optim.batch_size {batch_size} is larger than the {draws} queries one epoch of "
            f"method {method!r} draws ({about}); lower optim.batch_size"
        )
