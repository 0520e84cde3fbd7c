"""The panel worker: one daemon thread that draws an epoch's panels and makes its logger calls, with bounded waits.

The training thread hands over one epoch's drawing at a time (:meth:`PanelWorker.submit`) and later opens a
*delivery window* (:meth:`PanelWorker.deliver`): the logger calls of the drawn panels run on the worker thread while
the training thread waits, so they never run beside Lightning's own logging. The training thread waits at most
``timeout`` seconds per epoch in all (drawing it still waits for, plus logger calls); what misses that is dropped
with one warning that counts it. A sink that overran is not called again. Failures (a sink raising, a disk full,
even ``SystemExit`` from a sink) are counted per epoch and reported in one warning; none reaches training.

``background=False`` draws on the same thread and waits for the drawing and the logger calls at once (within the
same budget) instead of at the next training batch. Ctrl-C: the thread is a daemon and :meth:`close` with
``wait=False`` returns at once; the interpreter's exit waits for a thread still in a job at most ``timeout`` from
when it was let go (see :func:`_wait_at_exit`).
"""

from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn

Send = Callable[[], None]
Draw = Callable[["Epoch"], None]  # draws one epoch's panels; calls epoch.send(sink name, what, send) per logger call


@dataclass
class Epoch:
    """One epoch's panels on their way: the logger calls drawn so far, and what failed or was dropped. Once the
    training thread gives up on it (``abandoned``), a drawing still running adds nothing more."""

    label: str
    budget: float
    skipped_sinks: frozenset[str] = frozenset()  # sinks that overran before: nothing is prepared for them
    sinks: list[Any] = field(default_factory=list)  # the caller's: this epoch's own sink objects
    sends: list[tuple[str, str, Send]] = field(default_factory=list)  # (sink, what, call)
    scales: dict[str, float] = field(default_factory=dict)  # error scales the panels fixed: the callback's to keep
    failures: Counter = field(default_factory=Counter)  # "what: ErrorType: message" -> count
    dropped: int = 0
    drawn: threading.Event = field(default_factory=threading.Event)
    closed: bool = False  # no more logger calls taken (delivery has begun, or the epoch was given up)
    abandoned: bool = False  # given up: a drawing still running counts nothing more either
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, sink: str, what: str, call: Send) -> None:
        with self.lock:
            if self.closed:
                _clean_up(call)
            else:
                self.sends.append((sink, what, call))

    def guard(self, what: str, call: Callable[[], Any]) -> Any:
        """Run ``call``; count a failure instead of raising it (``SystemExit`` and ``KeyboardInterrupt`` too off the
        main thread, where no Ctrl-C arrives: nothing the panel thread raises ends the fit, and it is reported)."""
        try:
            return call()
        except BaseException as error:
            if threading.current_thread() is threading.main_thread() and isinstance(error, (KeyboardInterrupt,
                                                                                            SystemExit)):  # fmt: skip
                raise  # Ctrl-C or an exit on the training thread: the user's
            with self.lock:
                if not self.abandoned:
                    self.failures[f"{what}: {type(error).__name__}: {error}"] += 1
            return None

    def take_sends(self, abandon: bool = False) -> list[tuple[str, str, Send]]:
        """The logger calls drawn so far; later ones are refused (and, with ``abandon``, later failures too)."""
        with self.lock:
            self.closed, self.abandoned = True, self.abandoned or abandon
            sends, self.sends = self.sends, []
        return sends


class PanelWorker:
    """One daemon thread, an explicit queue, bounded waits (see the module doc)."""

    def __init__(self, timeout: float, background: bool = True) -> None:
        self.timeout, self.background = timeout, background
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._epoch: Epoch | None = None  # drawn or being drawn, not yet delivered
        self._broken: set[str] = set()  # sinks that overran a delivery window

    def submit(self, label: str, draw: Draw) -> dict[str, float]:
        """Hand over an epoch's drawing; the previous epoch's panels are delivered (or dropped) first. Returns the
        error scales of the epochs delivered meanwhile (the earlier epoch's first)."""
        scales = self.deliver(wait=True)
        epoch = self._epoch = Epoch(label, self.timeout, frozenset(self._broken))
        self._run_on_thread(lambda: self._draw(epoch, draw))
        if not self.background:  # drawn and delivered now, under the same budget and containment
            scales = {**self.deliver(wait=True), **scales}
        return scales

    def deliver(self, wait: bool) -> dict[str, float]:
        """Make the logger calls of the drawn epoch, on the worker thread, waiting within the epoch's budget; returns
        the error scales its panels fixed (``{}`` when nothing was delivered or it was not drawn in time).

        ``wait=False`` (a training batch): only if the drawing is done. ``wait=True`` (the next validation epoch,
        teardown): wait for the drawing too, within the budget. A call is only started with at least a quarter of
        the timeout left (else it is dropped, no sink blamed); a call that overruns that marks its sink as skipped,
        and what it leaves behind (temporary files) is removed at once.
        The thread of a call or drawing that overran is let go: the next job starts a fresh one.
        """
        epoch = self._epoch
        if epoch is None or not (wait or epoch.drawn.is_set()):
            return {}
        self._epoch = None
        if not self._waited(epoch, epoch.drawn.wait):  # not even drawn in time
            self._let_thread_go()
            self._give_up(epoch)
            return {}
        sends = epoch.take_sends()  # drawn: nothing more comes
        for index, (sink, what, call) in enumerate(sends):
            if sink in self._broken or epoch.budget < self.timeout / 4:
                epoch.dropped += self._drop([(sink, what, call)])
                continue
            done = threading.Event()
            self._run_on_thread(lambda c=call, w=what, d=done: (epoch.guard(w, c), d.set()))
            if not self._waited(epoch, done.wait):
                self._let_thread_go()
                self._broken.add(sink)
                late = f"{what}: no answer within the {self.timeout:g} s budget; {sink} is skipped now"
                epoch.failures[late] += 1
                _clean_up(call)  # what the hung call leaves behind goes now: it may never return
                epoch.dropped += self._drop(sends[index + 1 :])
                break
        self._report(epoch)
        return dict(epoch.scales)

    def drawn_scales(self) -> dict[str, float]:
        """The error scales of the epoch not yet delivered, once its drawing is done (``{}`` before)."""
        epoch = self._epoch
        return dict(epoch.scales) if epoch is not None and epoch.drawn.is_set() else {}

    def call(self, what: str, job: Callable[[], Any]) -> Any:
        """Run ``job`` on the worker thread while this thread waits, at most the timeout: for logger calls outside
        an epoch's delivery (opening the sinks reads each logger's ``experiment``). Returns what it returns, raises
        what it raises (an exit or interrupt raised there as ``RuntimeError``: no Ctrl-C reaches that thread), or
        ``TimeoutError`` (its thread is then let go)."""
        done, result = threading.Event(), {}

        def run() -> None:
            try:
                result["value"] = job()
            except BaseException as error:
                result["error"] = error
            finally:
                done.set()

        self._run_on_thread(run)
        if not done.wait(self.timeout):
            self._let_thread_go()
            raise TimeoutError(f"{what}: no answer within the {self.timeout:g} s budget")
        error = result.get("error")
        if error is not None and not isinstance(error, Exception):  # SystemExit off the main thread: not the user's
            raise RuntimeError(f"{what}: {type(error).__name__}: {error}") from error
        if error is not None:
            raise error
        return result["value"]

    def close(self, wait: bool = True) -> dict[str, float]:
        """Deliver what is left (``wait``: within the budget) and let the thread go; never blocks beyond it.
        Returns the delivered epoch's error scales."""
        scales = self.deliver(wait=True) if wait else {}
        if not wait and self._epoch is not None:
            self._give_up(self._epoch)
            self._epoch = None
        thread = self._thread
        self._let_thread_go()  # it ends after its current job; a hung job holds only a daemon thread
        if wait and thread is not None:  # not let go above, so idle: gone before teardown returns
            thread.join(0.5)
        return scales

    def __getstate__(self) -> dict[str, Any]:  # ddp_spawn pickles callbacks: a fresh worker on the other side
        return {"timeout": self.timeout, "background": self.background}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    # -- internals ---------------------------------------------------------------------------------------------

    def _draw(self, epoch: Epoch, draw: Draw) -> None:
        try:
            epoch.guard("drawing panels", lambda: draw(epoch))
        finally:
            epoch.drawn.set()

    def _waited(self, epoch: Epoch, wait: Callable[[float], bool]) -> bool:
        """Wait with what is left of the epoch's budget; charge the time waited."""
        start = time.monotonic()
        done = wait(max(0.0, epoch.budget))
        epoch.budget -= time.monotonic() - start
        return done

    def _run_on_thread(self, job: Callable[[], Any]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._queue = queue.Queue()  # a thread let go keeps its own queue
            threads, started = torch.get_num_threads(), threading.Event()
            self._thread = threading.Thread(target=_serve, args=(self._queue, started), name="pl_pmse_panels",
                                            daemon=True)  # fmt: skip
            self._thread.start()
            started.wait()
            torch.set_num_threads(threads)  # the process default back: the worker thread keeps its 1
        self._queue.put(job)

    def _let_thread_go(self) -> None:
        """The thread ends after its current job (one that overran, or none); later jobs get a new thread. Until it
        ends, the interpreter's exit waits for it, within the budget (see :func:`_wait_at_exit`)."""
        if self._thread is not None:
            self._queue.put(None)
            for ended in [thread for thread in _ENDING if not thread.is_alive()]:
                del _ENDING[ended]
            _ENDING[self._thread] = time.monotonic() + self.timeout
            self._thread = None

    def _give_up(self, epoch: Epoch) -> None:
        """Drop an epoch whose drawing may still run (it adds nothing more) and report it."""
        epoch.dropped += max(1, self._drop(epoch.take_sends(abandon=True)))
        self._report(epoch)

    @staticmethod
    def _drop(sends: list[tuple[str, str, Send]]) -> int:
        """Logger calls that will not be made: their cleanup (temporary files) runs; returns how many."""
        for _, _, call in sends:
            _clean_up(call)
        return len(sends)

    @staticmethod
    def _report(epoch: Epoch) -> None:
        with epoch.lock:
            failures, dropped = dict(epoch.failures), epoch.dropped
        if not (failures or dropped):
            return
        kinds = "; ".join(f"{what} (x{count})" if count > 1 else what for what, count in failures.items())
        if "soundfile" in kinds.lower():
            kinds += " (pip install soundfile for audio clips)"
        rank_zero_warn(
            f"PerceptionMSECallback: panels of {epoch.label}: {sum(failures.values())} logger or drawing call(s) "
            f"failed"
            + (f" and {dropped} panel(s) were dropped" if dropped else "")
            + (f": {kinds}" if kinds else "")
            + "; training continues",
            category=RuntimeWarning,
            stacklevel=5,
        )


_ENDING: dict[threading.Thread, float] = {}  # panel threads let go, with when the exit stops waiting for them


@atexit.register
def _wait_at_exit() -> None:
    """At interpreter exit, give panel threads still in a job (an overrun drawing or logger call) their budget to
    end: a daemon thread inside a torch operation when the interpreter finalizes aborts the whole process
    ("terminate called without an active exception", exit code 134) instead of letting it exit as it would. Each
    thread gets at most ``timeout`` from when it was let go: one hung for long costs the exit nothing."""
    for thread, deadline in list(_ENDING.items()):
        thread.join(max(0.0, deadline - time.monotonic()))


def _clean_up(call: Send) -> None:
    """What a logger call that will not be made leaves behind (``call.cleanup``, e.g. W&B's temporary PNGs)."""
    cleanup = getattr(call, "cleanup", None)
    if cleanup is not None:
        with contextlib.suppress(Exception):
            cleanup()


def _serve(jobs: queue.Queue, started: threading.Event) -> None:
    """The worker thread: single-threaded torch (a second OpenMP team slowed every op of the training thread by
    ~20% on 2 cores; OpenMP's count is per thread once initialised, so the caller restores its own); jobs guard
    themselves."""
    torch.get_num_threads()  # this thread's own OpenMP setting is initialised first ...
    torch.set_num_threads(1)  # ... then lowered
    started.set()
    while (job := jobs.get()) is not None:
        with contextlib.suppress(BaseException):  # jobs count their own failures; the thread must survive
            job()
