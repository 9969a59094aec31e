"""Locate: whether the tracker a command names answers, and which tracker holds a run or an experiment
when the user did not say (``atm history --run ID`` or ``--experiment NAME`` without ``--backend``)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from atm.adapters.base import Backend, BackendUnavailable, RunNotFound

#: Seconds the first probe of a tracking server may take: a server that answers at all answers in far less.
PROBE_TIMEOUT_S = 3.0


def server_down(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """Non-empty, saying what happened, when nothing answers HTTP at ``uri`` within ``timeout`` seconds.

    Any HTTP answer counts as up (a 401 from a proxy, a 404 from a server without ``/health``): the
    probe tells a dead address from a live one, and the tracker's client reports anything else.
    """
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):  # noqa: S310 - the user's own tracking URI
            return ""
    except urllib.error.HTTPError:
        return ""
    except (urllib.error.URLError, OSError, socket.timeout) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
            why = f"no answer within {timeout:g} s"
        else:
            why = str(reason) or type(reason).__name__
        return f"the MLflow server at {uri} does not answer ({why})"


def find_run(
    run_id: str, candidates: Sequence[tuple[str, Callable[[], Backend]]]
) -> tuple[Backend | None, list[str]]:
    """The first backend, in the order of ``candidates`` (name, factory), whose tracker holds ``run_id``,
    and what each one tried said. A factory may raise ``SystemExit`` or ``ValueError`` (a store that does
    not exist): that tracker does not hold it. A not-found that names a whole id the given one is the start
    of ends the search: it is the answer (the run is there, cut short), returned as the only note with no
    backend. An unreachable tracker is noted and the search goes on."""
    notes: list[str] = []
    for name, make in candidates:
        try:
            backend = make()
            backend.poll(run_id)
            return backend, notes
        except RunNotFound as exc:
            if getattr(exc, "matches", None):
                return None, [str(exc)]
            notes.append(f"{name}: {exc}")
        except (SystemExit, ValueError, BackendUnavailable) as exc:
            notes.append(f"{name}: {_text(exc)}")
    return None, notes


def find_experiment(
    experiment: str, candidates: Sequence[tuple[str, Callable[[], Backend]]]
) -> tuple[Backend | None, list[str], list[str]]:
    """The first backend, in the order of ``candidates`` (name, factory), whose tracker holds
    ``experiment``, the experiment's runs (:meth:`~atm.adapters.base.Backend.experiment_runs`), and what
    each one tried said (``name: why``). A factory that raises ``SystemExit`` or ``ValueError`` (a store
    that does not exist, a server that does not answer), like an unreachable tracker, is noted and the
    search goes on."""
    notes: list[str] = []
    for name, make in candidates:
        try:
            backend = make()
            return backend, backend.experiment_runs(experiment), notes
        except (RunNotFound, SystemExit, ValueError, BackendUnavailable) as exc:
            notes.append(f"{name}: {_text(exc)}")
    return None, [], notes


def _text(exc: Any) -> str:
    text = str(exc.code if isinstance(exc, SystemExit) else exc)
    return text[len("atm: "):] if text.startswith("atm: ") else text
