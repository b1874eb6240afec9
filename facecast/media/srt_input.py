"""The SRT bridges of one live input, attempt after attempt: a caller's bridge is new on every
attempt, a listener's is started once and kept listening across callers (see
``SrtInputBridges``)."""

from __future__ import annotations

from facecast.errors import MediaError
from facecast.media.handoff import Halted
from facecast.media.input_plan import InputPlan, plan_input
from facecast.media.live_errors import OpenFailed
from facecast.media.srt_bridge import Bridge, srt_listens


class SrtInputBridges:
    """Starts, keeps and stops the SRT bridges of the input at ``url``.

    A caller's bridge is new on every attempt (a fresh port and process: the bridge
    restarts with the input). A listener's is started once and kept listening across
    callers and attempts (``-a:yes``): stopping it while nobody calls would close the
    port in the face of a caller coming back (OBS retrying: it got an I/O error).
    """

    def __init__(self, url: str, open_timeout: float, stall_timeout: float) -> None:
        self.url = url
        self.open_timeout, self.stall_timeout = open_timeout, stall_timeout
        # An SRT listener's bridge, kept across callers while the reader runs: the port
        # stays open, so a caller that comes back (OBS reconnecting) is taken at once.
        self._listener: Bridge | None = None
        self._listener_plan: InputPlan | None = None

    def attempt(self, halted: Halted) -> tuple[InputPlan, Bridge, bool, int]:
        """The SRT bridge for one attempt, once its SRT side is connected: the plan that
        reads it, the bridge, whether it is kept after the attempt, and its caller count.
        Raises ``OpenFailed`` when it does not connect."""
        listens = srt_listens(self.url)
        bridge, plan = (self._listener, self._listener_plan) if listens else (None, None)
        if bridge is None or plan is None or not bridge.alive():
            if bridge is not None:
                bridge.stop()  # it died: its reason was given when the input was lost
            self._listener = None
            plan = plan_input(
                self.url, open_timeout=self.open_timeout, stall_timeout=self.stall_timeout
            )
            assert plan.bridge is not None
            bridge = Bridge(plan.bridge)
            try:
                bridge.start()
            except MediaError as exc:
                raise OpenFailed(str(exc)) from exc
            if listens:
                self._listener, self._listener_plan = bridge, plan
        # Only read once the SRT side is up: a caller with no listener fails here in
        # the bridge's own connect timeout, and a stop is seen within 50 ms, instead
        # of waiting out PyAV's open timeouts on a UDP port nobody sends to.
        if not bridge.wait_connected(self.open_timeout, halted):
            if listens and bridge.alive():
                # A listener that nobody called is the SRT form of "nothing published".
                # It goes on listening; the retry wakes as soon as a caller is taken.
                raise OpenFailed("no SRT caller yet", absent=True)
            reason = "SRT connect timed out" if bridge.alive() else bridge.exit_reason()
            self.drop(bridge, False)
            raise OpenFailed(reason)
        return plan, bridge, listens, bridge.calls

    def drop(self, bridge: Bridge, keep: bool) -> None:
        """After a failed attempt: a caller's bridge is stopped, a listener's only if it
        died (the next attempt starts another)."""
        if keep and bridge.alive():
            return
        bridge.stop()
        if bridge is self._listener:
            self._listener = None

    def caller_waiting(self) -> bool:
        """An SRT listener has taken a caller that no session reads yet."""
        bridge = self._listener
        return bridge is not None and bridge.peer_up()

    def stop_listening(self) -> None:
        """The reader is done: an SRT listener stops listening with it."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None


__all__ = ["SrtInputBridges"]
