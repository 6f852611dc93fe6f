"""Call limits (spec.callLimits): the longest call and the longest silence, ended politely.

Max duration. Counted from the session's start (the caller is connected). At
maxDurationSeconds - warnBeforeSeconds the agent says the warning, queued after the sentence in
progress; at maxDurationSeconds it stops what it is saying, says the end message (the caller
cannot interrupt it) and hangs up through the call's controls (the room is deleted: a phone
caller gets a BYE), with the call record's endReason `max_duration`.

Silence. Built on livekit-agents' user-away detection (AgentSession's `user_away_timeout`):
the session turns the caller `away` after that many seconds in which neither the caller nor the
agent spoke, with the clock paused while a tool runs or the session waits for its participant,
and restarted by the caller's key presses (RoomIO calls `reset_away_timer` on SIP DTMF). With
silenceTimeoutSeconds set it is that timeout (pipeline.userAwayTimeoutSeconds otherwise, which
only marks the caller away). When the caller turns away the agent asks the prompt; the session
does not restart its timer while the caller stays away, so this module waits as long again
after the prompt has been said: still away (no speech, no key) -> the end message, then the
hang-up with endReason `silence_timeout`. The caller speaking or pressing a key in between
turns them back to `speaking`/`listening` and the watch starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from livekit.agents import AgentSession, UserStateChangedEvent

from voicefleet_runtime.agents import say_line
from voicefleet_runtime.config import CallLimitsConfig

logger = logging.getLogger("voicefleet.runtime.limits")

LimitReason = Literal["max_duration", "silence_timeout"]
END_MESSAGE_TIMEOUT_SECONDS = 20.0
"""Longest wait for the end message to be said before hanging up anyway (a stuck TTS must not
keep a call past its limit)."""

HangUp = Callable[[LimitReason], Awaitable[None]]


class CallLimiter:
    """Watches one call's session and ends the call at its limits."""

    def __init__(
        self, limits: CallLimitsConfig, session: AgentSession[Any], hang_up: HangUp
    ) -> None:
        self.limits = limits
        self.session = session
        self._hang_up = hang_up
        self.ending: LimitReason | None = None
        """The limit that is ending the call (set once)."""
        self.warned = False
        self.prompted = 0
        """Silence prompts said during the call."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: list[asyncio.TimerHandle] = []
        self._silence_watch: asyncio.Task[None] | None = None

    @staticmethod
    def user_away_timeout(limits: CallLimitsConfig, pipeline_default: float | None) -> float | None:
        """The session's user_away_timeout: silenceTimeoutSeconds when set."""
        if limits.silence_timeout_seconds is not None:
            return limits.silence_timeout_seconds
        return pipeline_default

    def start(self) -> None:
        """Call right after the session started."""
        loop = asyncio.get_running_loop()
        maximum = self.limits.max_duration_seconds
        if maximum is not None:
            warn_at = maximum - self.limits.warn_before_seconds
            self._timers.append(loop.call_later(warn_at, self._spawn, self._warn))
            self._timers.append(
                loop.call_later(maximum, self._spawn, lambda: self._end("max_duration"))
            )
        if self.limits.silence_timeout_seconds is not None:
            self.session.on("user_state_changed", self._on_user_state)
        self.session.on("close", lambda _event: self.stop())

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.session.off("user_state_changed", self._on_user_state)
        if self._silence_watch is not None:
            self._silence_watch.cancel()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()

    def _spawn(self, make: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        async def run() -> None:
            try:
                await make()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("call limits")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- max duration -----------------------------------------------------------------------

    async def _warn(self) -> None:
        if self.ending is not None:
            return
        self.warned = True
        logger.info("call limit: %d s to go, warning the caller", self.limits.warn_before_seconds)
        say_line(self.session, self.limits.warning_text(), allow_interruptions=False)

    async def _end(self, reason: LimitReason) -> None:
        if self.ending is not None:
            return
        self.ending = reason
        message = (
            self.limits.end_message if reason == "max_duration" else self.limits.silence_end_message
        )
        logger.info("call limit reached (%s): saying goodbye, then hanging up", reason)
        try:
            if reason == "max_duration":
                # The limit is hard: what the agent is saying stops here.
                with contextlib.suppress(RuntimeError):
                    await self.session.interrupt(force=True)
            handle = say_line(self.session, message, allow_interruptions=False)
            try:
                await asyncio.wait_for(handle.wait_for_playout(), END_MESSAGE_TIMEOUT_SECONDS)
            except TimeoutError:
                logger.warning(
                    "the %s end message was not said within %.0f s; hanging up",
                    reason,
                    END_MESSAGE_TIMEOUT_SECONDS,
                )
        except RuntimeError:
            logger.warning("could not say the %s end message; hanging up", reason, exc_info=True)
        await self._hang_up(reason)

    # --- silence ----------------------------------------------------------------------------

    def _on_user_state(self, event: UserStateChangedEvent) -> None:
        if self.ending is not None:
            return
        if event.new_state == "away":
            if self._silence_watch is None or self._silence_watch.done():
                self._silence_watch = self._spawn(self._prompt_then_wait)
        elif self._silence_watch is not None:
            # The caller spoke (or pressed a key): start over.
            self._silence_watch.cancel()
            self._silence_watch = None

    async def _prompt_then_wait(self) -> None:
        timeout = self.limits.silence_timeout_seconds
        assert timeout is not None
        self.prompted += 1
        logger.info("caller silent for %.0f s: prompting", timeout)
        handle = say_line(self.session, self.limits.silence_prompt)
        await handle.wait_for_playout()
        await asyncio.sleep(timeout)
        if self.session.user_state == "away" and self.ending is None:
            self._silence_watch = None  # _end must not cancel itself through the event
            await self._end("silence_timeout")
