"""The worker: an AgentServer registered under the VoiceAgent's dispatch name.

Capacity (admission.py, overflow.py). `on_request` gives floor(jobsPerWorker x loadThreshold)
callers (the admission budget) the agent and the next ones the overflow treatment, counting the
offers it accepted whose job has not started yet (the accept waits for LiveKit's assignment and
for a job process); it refuses only when its overflow slots are used too, without terminating
the job, so LiveKit offers it to another worker. The load LiveKit sees is the admission's
steering load, which keeps the worker AVAILABLE while it can still answer: a worker reported
FULL is never offered the callers it could at least tell.

Processes. The main process runs the AgentServer (registration, availability, liveness on
worker.healthPort: `/` and `/worker`) and our own small server on worker.metricsPort: `/metrics`
(every process's series) and `/ready`. Each call runs in its own job process, pre-warmed
(`prewarm`: config and Silero VAD loaded) so a call starts quickly.
Job processes find the config through the same environment (VOICEFLEET_CONFIG).

Readiness. livekit-agents' `/` answers OK while the worker is still connecting, so a pod would
turn Ready (and a rollout retire an old worker) before LiveKit can dispatch to it. `/ready`
answers 200 only while the worker is registered with LiveKit and not draining. livekit-agents
builds and freezes its own HTTP app inside run(), leaving no hook to add a route there; that is
why the metrics port is served by us (metrics.exposition for /metrics).

Shutdown. SIGTERM makes livekit-agents drain: the worker reports itself unavailable, running
calls go on for up to worker.drainTimeoutSeconds, and the process exits when they are done.

Call records. With callRecords.webhook set, each job process records its call (recorder.py) and
writes the record to the spool when the call ends; the main process delivers the spool
(delivery.py), also during the drain, and once more before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from livekit import rtc
from livekit.agents import (
    AgentServer,
    AgentSession,
    CloseEvent,
    JobContext,
    JobProcess,
    JobRequest,
    room_io,
)
from livekit.agents.types import NOT_GIVEN, NotGivenOr
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError

from voicefleet_runtime import agents_internals, metrics, overflow
from voicefleet_runtime.admission import (
    ADMISSION_PATH,
    LIVEKIT_LOAD_THRESHOLD,
    OVERFLOW_ATTRIBUTE,
    REPORT_PATH,
    AdmissionGate,
    AdmissionUpdate,
    Admit,
    WorkerReport,
    worker_load,
)
from voicefleet_runtime.agents import AgentFactory, CallState
from voicefleet_runtime.callrecords import Recording, utc
from voicefleet_runtime.config import (
    CONFIG_PATH_ENV,
    CallLimitsConfig,
    CallRecordingConfig,
    RuntimeConfig,
    load_from_environment,
)
from voicefleet_runtime.delivery import (
    FLUSH_MIN_SECONDS,
    SPOOL_DIR_ENV,
    RecordDelivery,
    Spool,
    signing_key,
    spool_directory,
)
from voicefleet_runtime.dtmf import DtmfReceiver, DtmfSender
from voicefleet_runtime.limits import CallLimiter
from voicefleet_runtime.pipeline import (
    TurnDetectionPlan,
    build_pipeline,
    load_vad,
    plan_turn_detection,
    plugin_modules,
    prebuild_models,
    register_turn_detector,
)
from voicefleet_runtime.recorder import CallRecorder
from voicefleet_runtime.recording import (
    CONTENT_TYPE,
    RECORD_AUDIO_ONLY,
    RECORDING_FILE,
    upload_recording,
)
from voicefleet_runtime.telemetry import CallTelemetry
from voicefleet_runtime.telephony import CallControls, PhoneCall
from voicefleet_runtime.tools import ToolBox, build_mcp_toolsets

logger = logging.getLogger("voicefleet.runtime")

DEAD_PROCESS_SWEEP_SECONDS = 5.0
PROCESS_INIT_TIMEOUT_SECONDS = 60.0


@functools.cache
def runtime_config() -> RuntimeConfig:
    """The config, loaded once per process (validated already by the main process)."""
    return load_from_environment()


def metric_labels(config: RuntimeConfig) -> dict[str, str]:
    return {"tenant": config.tenant, "agent": config.name}


@functools.cache
def runtime_config_hash() -> str:
    """Hash of the config file this process runs (the pinned copy of the ConfigMap's file):
    the same value as the operator's status.configHash for it (render.config_hash)."""
    path = os.environ.get(CONFIG_PATH_ENV)
    if not path:
        return ""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


# --- capacity -------------------------------------------------------------------------------


class WorkerRuntime:
    """Main-process side: admission, load and the worker-level metrics."""

    def __init__(self, config: RuntimeConfig, plan: TurnDetectionPlan) -> None:
        self.config = config
        self.plan = plan
        self.labels = metric_labels(config)
        worker = config.worker
        self.admission = AdmissionGate.for_worker(
            worker.jobs_per_worker, worker.load_threshold, config.admission
        )
        self.server: AgentServer | None = None
        self.worker_id: str | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._serving: asyncio.Task[None] | None = None
        self._http: agents_internals.HttpServer | None = None
        # Overflow treatments from this process (no job process), when it can mint tokens.
        self.desk = overflow.OverflowDesk.from_environment(config, on_done=self._overflow_done)
        self.delivery: RecordDelivery | None = None
        self._delivering: asyncio.Task[None] | None = None
        self.drain_started_at: float | None = None
        webhook = config.records_webhook
        if webhook is not None:
            spool = Spool(spool_directory(config)).ensure()
            self.delivery = RecordDelivery(webhook, signing_key(webhook), spool, self.labels)

    def active_jobs(self) -> int:
        return len(self.server.active_jobs) if self.server is not None else 0

    def running_jobs(self, server: AgentServer | None = None) -> tuple[int, int]:
        """(agent calls, overflow treatments) running: an overflow job was accepted with the
        overflow attribute."""
        server = server or self.server
        agent_jobs = overflow_jobs = 0
        for job in server.active_jobs if server is not None else []:
            attributes = job.accept_arguments.attributes or {}
            if OVERFLOW_ATTRIBUTE in attributes:
                overflow_jobs += 1
            else:
                agent_jobs += 1
        if self.desk is not None:
            overflow_jobs += len(self.desk.running)
        return agent_jobs, overflow_jobs

    async def on_request(self, request: JobRequest) -> None:
        received_at = time.time()
        gate = self.admission
        gate.draining = self.server is not None and self.server.draining
        agent_jobs, overflow_jobs = self.running_jobs()
        decision, reason = gate.admit(agent_jobs, overflow_jobs)
        if decision is Admit.REFUSE:
            metrics.DISPATCH_REJECTED.labels(**self.labels, reason=reason).inc()
            logger.info(
                "refusing job %s: %s (agent calls %d+%d of %d, overflow %d+%d of %d)",
                request.id,
                reason,
                agent_jobs,
                gate.pending_agent,
                gate.budget,
                overflow_jobs,
                gate.pending_overflow,
                gate.overflow_slots,
            )
            # terminate=False: LiveKit may offer the job to another worker.
            await request.reject(terminate=False)
            return
        try:
            if decision is Admit.AGENT:
                metrics.DISPATCH_ACCEPTED.labels(**self.labels).inc()
                # Returns once LiveKit assigned the job and a job process has started it.
                await request.accept(name=self.config.name)
            else:
                metrics.CALLS_OVERFLOWED.labels(**self.labels, reason=reason).inc()
                logger.info(
                    "overflow: job %s (room %s) gets the overflow treatment: %s "
                    "(%d agent calls of %d)",
                    request.id,
                    request.room.name,
                    reason,
                    agent_jobs,
                    gate.budget,
                )
                if self.desk is not None:
                    # Treated here; terminate: LiveKit ends the job, offers it to no one else.
                    self.desk.start(request.id, request.room.name, reason, received_at)
                    await request.reject(terminate=True)
                else:
                    await request.accept(
                        name=self.config.name,
                        identity=f"overflow-{request.id}",
                        attributes={OVERFLOW_ATTRIBUTE: reason},
                    )
        finally:
            gate.started(decision)

    def _overflow_done(self, treated: overflow.Treated) -> None:
        """A treatment by the desk ended: its call record, as a job process would spool it."""
        if self.config.records_webhook is None:
            return
        recorder = CallRecorder(
            tenant=self.config.tenant,
            voice_agent=self.config.name,
            dispatch_name=self.config.dispatch_name,
            config_hash=runtime_config_hash(),
            job_id=treated.job_id,
            room=treated.room,
            dispatch_received_at=treated.received_at,
        )
        if treated.caller is not None:
            phone = PhoneCall.from_participant(treated.room, treated.caller)
            recorder.set_caller(
                phone=phone is not None,
                caller_number=phone.caller_number if phone else "",
                dialed_number=phone.dialed_number if phone else "",
                sip_call_id=phone.sip_call_id if phone else "",
            )
        spool_record(
            self.config, recorder, f"overflow ({treated.reason}): {treated.how}", None, True
        )

    def on_refused_by_livekit_agents(self, reason: str) -> None:
        metrics.DISPATCH_REJECTED.labels(**self.labels, reason=reason).inc()
        logger.info("refused a job offer: %s (running %s)", reason, self.running_jobs())

    def load(self, server: AgentServer) -> float:
        """load_fnc: called by livekit-agents every 0.5 s (in a thread) and before each offer.

        What LiveKit sees is the admission's steering load (admission.py); the metric is the
        real load, agent calls / jobsPerWorker, which the HPA and the dashboards use."""
        agent_jobs, overflow_jobs = self.running_jobs(server)
        real = worker_load(agent_jobs, self.config.worker.jobs_per_worker)
        metrics.WORKER_LOAD.labels(**self.labels).set(real)
        return self.admission.steering_load(agent_jobs, overflow_jobs)

    def on_started(self) -> None:
        worker = self.config.worker
        logger.info(
            "VoiceFleet runtime for %s/%s: dispatch name %r, %d jobs per worker, "
            "load threshold %s, health :%d, metrics :%d",
            self.config.tenant,
            self.config.name,
            self.config.dispatch_name,
            worker.jobs_per_worker,
            worker.load_threshold,
            worker.health_port,
            worker.metrics_port,
        )
        if self.plan.fell_back:
            logger.warning(
                "turn detection: %s requested, FALLING BACK to %s: %s",
                self.plan.requested,
                self.plan.effective,
                self.plan.reason,
            )
        else:
            logger.info("turn detection: %s", self.plan.effective)
        # Main-process series are written only now: livekit-agents empties the multiprocess
        # directory when the server starts, which would orphan anything written before.
        metrics.JOBS_CAPACITY.labels(**self.labels).set(self.config.worker.jobs_per_worker)
        metrics.WORKER_LOAD.labels(**self.labels).set(0)
        metrics.ACTIVE_JOBS.labels(**self.labels).set(0)
        metrics.DISPATCH_ACCEPTED.labels(**self.labels)
        metrics.CALLS_OVERFLOWED.labels(**self.labels, reason=self.admission.reason.value)
        # Refusals are rare now (callers beyond capacity are told): their series exist at 0.
        for refusal in ("overflow_full", "draining"):
            metrics.DISPATCH_REJECTED.labels(**self.labels, reason=refusal)
        metrics.AGENT_CAPACITY.labels(**self.labels).set(self.admission.budget)
        logger.info(
            "admission: %d agent calls, then %d overflow treatments at once (%s)",
            self.admission.budget,
            self.admission.overflow_slots,
            self.admission.reason.value,
        )
        metrics.TURN_DETECTOR_FALLBACK.labels(**self.labels, requested=self.plan.requested).set(
            1 if self.plan.fell_back else 0
        )
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep_dead_processes())
        self._serving = loop.create_task(self._serve_metrics_and_readiness())
        if self.desk is not None:
            self.desk.warm()
        if self.delivery is not None:
            for result in ("delivered", "retried", "failed"):
                metrics.CALL_RECORDS.labels(**self.labels, result=result)
            pending = len(self.delivery.spool.pending())
            metrics.CALL_RECORDS_PENDING.labels(**self.labels).set(pending)
            logger.info(
                "call records to %s (spool %s, %d waiting from before)",
                self.delivery.webhook.url,
                self.delivery.spool.root,
                pending,
            )
            self._delivering = loop.create_task(self.delivery.run())

    async def flush_records(self) -> None:
        """Before exit: deliver what is spooled, for the rest of the drain timeout (at least
        FLUSH_MIN_SECONDS); what is left stays in the spool for the next start."""
        if self.delivery is None:
            return
        if self._delivering is not None:
            self._delivering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._delivering
            self._delivering = None
        budget = FLUSH_MIN_SECONDS
        if self.drain_started_at is not None:
            elapsed = time.monotonic() - self.drain_started_at
            budget = max(budget, self.config.worker.drain_timeout_seconds - elapsed)
        left = await self.delivery.flush(budget)
        await self.delivery.aclose()
        if left:
            logger.error(
                "%d call record(s) not delivered before exit; they stay in the spool %s and "
                "are delivered when this worker starts again: %s",
                len(left),
                self.delivery.spool.pending_dir,
                ", ".join(left),
            )
        else:
            logger.info("call record spool empty at exit")

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): registered with LiveKit, connected, and taking new jobs."""
        server = self.server
        if server is None or self.worker_id is None:
            return False, "not registered with LiveKit yet"
        if agents_internals.is_reconnecting(server):
            return False, "reconnecting to LiveKit"
        if server.draining:
            return False, "draining: finishing running calls, taking no new ones"
        return True, f"registered with LiveKit as {self.config.dispatch_name!r} ({self.worker_id})"

    async def _ready(self, _request: web.Request) -> web.Response:
        ready, why = self.readiness()
        return web.Response(status=200 if ready else 503, text=why + "\n")

    def report(self) -> WorkerReport:
        gate = self.admission
        gate.draining = self.server is not None and self.server.draining
        server = self.server
        return gate.report(
            *self.running_jobs(),
            jobs_per_worker=self.config.worker.jobs_per_worker,
            load_threshold=self.config.worker.load_threshold,
            registered=(
                server is not None
                and self.worker_id is not None
                and not agents_internals.is_reconnecting(server)
            ),
            config_hash=runtime_config_hash(),
        )

    async def _get_report(self, _request: web.Request) -> web.Response:
        return web.json_response(self.report().model_dump(mode="json", by_alias=True))

    async def _put_admission(self, request: web.Request) -> web.Response:
        """The operator's share of the caps for this worker (admission.AdmissionUpdate)."""
        try:
            update = AdmissionUpdate.model_validate(await request.json())
        except (ValueError, ValidationError) as error:
            return web.Response(status=400, text=f"invalid admission update: {error}\n")
        before = (self.admission.budget, self.admission.reason)
        self.admission.set_budget(update.max_agent_jobs, update.limit_reason)
        metrics.AGENT_CAPACITY.labels(**self.labels).set(self.admission.budget)
        if (self.admission.budget, self.admission.reason) != before:
            logger.info(
                "admission: budget %d agent calls (%s), was %d (%s)",
                self.admission.budget,
                self.admission.reason.value,
                *before,
            )
        return await self._get_report(request)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = await asyncio.to_thread(metrics.exposition)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve_metrics_and_readiness(self) -> None:
        port = self.config.worker.metrics_port
        http = agents_internals.HttpServer("", port)  # all interfaces, like livekit-agents
        http.app.add_routes(
            [
                web.get("/metrics", self._metrics),
                web.get("/ready", self._ready),
                web.get(REPORT_PATH, self._get_report),
                web.put(ADMISSION_PATH, self._put_admission),
            ]
        )
        try:
            await http.start()
        except OSError as error:
            # Without it the pod can never turn Ready: exit loudly rather than idle unready.
            logger.critical(
                "cannot serve /metrics and /ready on worker.metricsPort %d: %s", port, error
            )
            os._exit(1)
        self._http = http
        logger.info("metrics on :%d/metrics, readiness on :%d/ready", port, port)

    async def _sweep_dead_processes(self) -> None:
        while True:
            await asyncio.sleep(DEAD_PROCESS_SWEEP_SECONDS)
            try:
                metrics.reap_dead_processes()
            except OSError:
                logger.warning("could not clean up metrics of ended job processes", exc_info=True)

    def on_registered(self, worker_id: str, server_info: Any) -> None:
        self.worker_id = worker_id
        logger.info(
            "registered with LiveKit as %r (worker %s)", self.config.dispatch_name, worker_id
        )


# --- job processes --------------------------------------------------------------------------


def prewarm(proc: JobProcess) -> None:
    """Runs once per job process before it takes a call: config and VAD model in memory, and
    what an overflow treatment needs (its TTS client; the HTTP stack's lazy imports), so that a
    caller beyond capacity hears the message as early as possible; and the call's STT, LLM and
    TTS (pipeline.prebuild_models), so that the greeting does not wait for their clients."""
    config = runtime_config()
    proc.userdata["vad"] = load_vad(config.pipeline.vad)
    proc.userdata["overflow_tts"] = overflow.prewarm_tts(config)
    proc.userdata["models"] = prebuild_models(config.pipeline)


async def entrypoint(ctx: JobContext) -> None:
    config = runtime_config()
    # A console session's mock job is never an overflow call, and has no token at all when no
    # LiveKit credentials are set (decoding it would crash the console's only job).
    overflow_reason = (
        None if ctx.is_fake_job() else (ctx.token_claims().attributes or {}).get(OVERFLOW_ATTRIBUTE)
    )
    if overflow_reason:
        if config.records_webhook is not None:
            # Overflow calls are accounted for too (endReason overflow), however the treatment ends.
            async def record_overflow(shutdown_reason: str) -> None:
                await spool_overflow_record(config, ctx, overflow_reason, shutdown_reason)

            # (a closure: livekit-agents reads the callback's __code__ to pass the reason)
            ctx.add_shutdown_callback(record_overflow)
        tts = ctx.proc.userdata.get("overflow_tts")
        await overflow.give_overflow_treatment(ctx, config, overflow_reason, tts=tts)
        return
    labels = metric_labels(config)
    received_at = agents_internals.dispatch_received_at(ctx)
    pipeline_config = config.pipeline
    providers: dict[str, str] = {
        "llm_usage": (
            pipeline_config.realtime.provider
            if pipeline_config.realtime is not None
            else pipeline_config.llm.provider
        ),
        "tts_usage": pipeline_config.tts.provider,
        "stt_usage": pipeline_config.stt.provider,
    }
    telemetry = CallTelemetry(labels, providers, dispatch_received_at=received_at)
    toolbox = ToolBox(config.tools, os.environ, labels)
    recorder: CallRecorder | None = None
    if config.records_webhook is not None or config.recording is not None:
        recorder = CallRecorder(
            tenant=config.tenant,
            voice_agent=config.name,
            dispatch_name=config.dispatch_name,
            config_hash=runtime_config_hash(),
            job_id=ctx.job.id,
            room=ctx.job.room.name,
            providers=providers,
            dispatch_received_at=received_at,
        )
    call_controls: list[CallControls] = []
    sessions: list[AgentSession[CallState]] = []

    async def close_books(reason: str) -> None:
        telemetry.end(reason or "job_shutdown")
        if recorder is not None:
            recorder.mark_ended()
        await toolbox.aclose()
        if recorder is not None and config.recording is not None and sessions:
            await attach_recording(config.recording, recorder, sessions[0], ctx)
        if recorder is not None and config.records_webhook is not None:
            spool_record(config, recorder, reason, call_controls[0] if call_controls else None)

    ctx.add_shutdown_callback(close_books)
    try:
        await ctx.connect()
        participant = await ctx.wait_for_participant()
        state = CallState.from_participant_attributes(
            dict(participant.attributes), room=ctx.room.name
        )
        pipeline = build_pipeline(
            config.pipeline,
            vad=ctx.proc.userdata.get("vad"),
            models=ctx.proc.userdata.pop("models", None),
        )
        session_options: dict[str, Any] = pipeline.session_options()
        call_limits = config.call_limits or CallLimitsConfig()
        session_options["user_away_timeout"] = CallLimiter.user_away_timeout(
            call_limits, pipeline.user_away_timeout
        )
        # Session-level toolsets: one MCP session per call, kept across handoffs.
        mcp_toolsets = build_mcp_toolsets(config.mcp_servers, os.environ, labels, call=state)
        if mcp_toolsets:
            session_options["tools"] = mcp_toolsets
        session = AgentSession[CallState](userdata=state, **session_options)
        sessions.append(session)
        telemetry.attach(session, current_agent=lambda: state.current_agent)
        phone_call = PhoneCall.from_participant(ctx.room.name, participant)
        if recorder is not None:
            recorder.attach(session, current_agent=lambda: state.current_agent)
            recorder.set_caller(
                phone=phone_call is not None,
                caller_number=state.caller_number,
                dialed_number=state.dialed_number,
                sip_call_id=phone_call.sip_call_id if phone_call else "",
            )

        @session.on("close")
        def _end_job(event: CloseEvent) -> None:
            # The caller hung up (or the session failed): free the slot now rather than when
            # LiveKit closes the room.
            ctx.shutdown(reason=f"session closed: {event.reason.value}")

        controls = CallControls(
            ctx.room.name, phone_call, config.telephony.transfer_to, room=ctx.room
        )
        call_controls.append(controls)
        # Keypad digits on phone calls (spec.dtmf): the caller's reach the LLM, agents may send.
        dtmf = config.dtmf if phone_call is not None else None
        sender = DtmfSender(ctx.room) if dtmf is not None and dtmf.send_tool else None

        def call_tools() -> list[Any]:
            tools: list[Any] = list(controls.function_tools())
            if sender is not None:
                tools += sender.function_tools()
            return tools

        factory = AgentFactory(config, toolbox, state, call_tools=call_tools)
        room_options = room_io.RoomOptions(
            participant_identity=participant.identity,
            audio_input=room_io.AudioInputOptions(noise_cancellation=pipeline.noise_cancellation),
        )
        started = time.monotonic()
        start_options: dict[str, Any] = {}
        if config.recording is not None and recorder is not None:
            # The session's own audio in and out, to a stereo file in the job's directory.
            start_options["record"] = RECORD_AUDIO_ONLY
            recorder.recording_started_at = time.time()
        await session.start(
            factory.entry(), room=ctx.room, room_options=room_options, **start_options
        )
        CallLimiter(call_limits, session, controls.hang_up_at_limit).start()
        if dtmf is not None:
            DtmfReceiver(dtmf, session, ctx.room, participant.identity).start()
        logger.info(
            "call started in room %s (session start %.3fs)",
            ctx.room.name,
            time.monotonic() - started,
        )
    except Exception:
        telemetry.job_failed()
        if recorder is not None:
            recorder.job_failed()
        raise


async def attach_recording(
    storage: CallRecordingConfig,
    recorder: CallRecorder,
    session: AgentSession[CallState],
    ctx: JobContext,
) -> None:
    """Upload the call's recording and note it in the record; a failure is logged and
    counted, and the record goes out without it."""
    try:
        await session.aclose()  # flushes the recorder; returns at once when already closed
        path = ctx.session_directory / RECORDING_FILE
        if not path.exists():
            raise FileNotFoundError(f"no recording was written ({path})")
        key, duration = await upload_recording(storage, os.environ, path, recorder.record_id)
    except Exception:
        labels = metric_labels(runtime_config())
        metrics.ERRORS.labels(**labels, component="recording", recoverable="true").inc()
        logger.exception("the recording of call %s was not stored", recorder.record_id)
        return
    started = recorder.recording_started_at
    recorder.recording = Recording(
        bucket=storage.bucket,
        object_key=key,
        duration_seconds=round(duration, 3),
        content_type=CONTENT_TYPE,
        started_at=utc(started) if started is not None else None,
    )


async def spool_overflow_record(
    config: RuntimeConfig, ctx: JobContext, overflow_reason: str, shutdown_reason: str
) -> None:
    """The record of a caller who got the overflow treatment instead of the agent."""
    recorder = CallRecorder(
        tenant=config.tenant,
        voice_agent=config.name,
        dispatch_name=config.dispatch_name,
        config_hash=runtime_config_hash(),
        job_id=ctx.job.id,
        room=ctx.job.room.name,
        dispatch_received_at=agents_internals.dispatch_received_at(ctx),
    )
    callers = [
        p
        for p in ctx.room.remote_participants.values()
        if p.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    ]
    if callers:
        phone = PhoneCall.from_participant(ctx.room.name, callers[0])
        recorder.set_caller(
            phone=phone is not None,
            caller_number=phone.caller_number if phone else "",
            dialed_number=phone.dialed_number if phone else "",
            sip_call_id=phone.sip_call_id if phone else "",
        )
    spool_record(config, recorder, shutdown_reason or f"overflow ({overflow_reason})", None, True)


def spool_record(
    config: RuntimeConfig,
    recorder: CallRecorder,
    shutdown_reason: str,
    controls: CallControls | None,
    overflowed: bool = False,
) -> None:
    """The call's record into the spool (job process, at shutdown); never raises."""
    try:
        record = recorder.finish(
            shutdown_reason,
            hung_up_by_agent=controls is not None and controls.hung_up,
            transferred=controls is not None and bool(controls.transfers),
            overflowed=overflowed,
            limit_reached=controls.limit_reached if controls is not None else None,
        )
        path = Spool(spool_directory(config)).put(record)
    except Exception:
        metrics.CALL_RECORDS.labels(**metric_labels(config), result="failed").inc()
        logger.exception("could not write the call record of job %s", recorder.job_id)
        return
    logger.info(
        "call record %s spooled (%s, %d turns, %d tool calls): %s",
        record.record_id,
        record.end_reason,
        len(record.transcript),
        len(record.tool_calls),
        path,
    )


# --- the server -----------------------------------------------------------------------------


class CountingAgentServer(AgentServer):
    """An AgentServer whose availability is the admission's, and that counts the job offers
    livekit-agents turns down by itself.

    livekit-agents compares an "effective load" with load_threshold, both for the status it
    reports (FULL/AVAILABLE) and before our on_request runs: the load plus an estimate for each
    offer in flight. With the steering load (admission.py) that estimate would turn a worker
    FULL in a burst of offers, and its callers would never be offered to it, so the effective
    load here is the steering load alone: the worker turns FULL only when it can give no
    overflow treatment either (or drains). `_get_effective_load` and `_is_available` are
    private; tests/unit/test_runtime_capacity.py fails if a livekit-agents upgrade renames them.
    """

    on_refused: Callable[[str], None] | None = None
    runtime: WorkerRuntime | None = None

    def _get_effective_load(self) -> float:
        return agents_internals.worker_load(self)

    def _is_available(self) -> bool:
        available = super()._is_available()
        if not available and self.on_refused is not None:
            self.on_refused("draining" if self.draining else "overflow_full")
        return available

    async def drain(self, timeout: NotGivenOr[int | None] = NOT_GIVEN) -> None:  # noqa: ASYNC109
        if self.runtime is not None and self.runtime.drain_started_at is None:
            self.runtime.drain_started_at = time.monotonic()
        await super().drain(timeout)

    async def aclose(self) -> None:
        """Close the worker, then deliver the call records still spooled (the job processes
        have written theirs by now: closing the process pool waits for their shutdown)."""
        await super().aclose()
        if self.runtime is not None:
            runtime, self.runtime = self.runtime, None  # once
            if runtime.desk is not None:
                # Overflow treatments in progress (a few seconds each) finish and spool theirs.
                await runtime.desk.aclose()
            await runtime.flush_records()


def build_server(config: RuntimeConfig, plan: TurnDetectionPlan | None = None) -> AgentServer:
    """The AgentServer for this config (main process). `plan` is decided first if not given."""
    plan = plan or plan_turn_detection(config.pipeline)
    register_turn_detector(plan)

    worker = config.worker
    # Job processes inherit the environment: they spool where the main process delivers from.
    os.environ[SPOOL_DIR_ENV] = str(spool_directory(config))
    runtime = WorkerRuntime(config, plan)
    server = CountingAgentServer(
        # Only the admission's FULL_LOAD reaches it; loadThreshold is applied by the admission.
        load_threshold=LIVEKIT_LOAD_THRESHOLD,
        num_idle_processes=worker.idle_processes,
        job_memory_warn_mb=worker.job_memory_warn_mb,
        job_memory_limit_mb=worker.job_memory_limit_mb,
        drain_timeout=worker.drain_timeout_seconds,
        port=worker.health_port,
        # WorkerRuntime serves worker.metricsPort itself (metrics and /ready); see the docstring.
        prometheus_port=None,
        prometheus_multiproc_dir=os.environ.get("PROMETHEUS_MULTIPROC_DIR"),
        setup_fnc=prewarm,
        load_fnc=runtime.load,
        # Imported once in the forkserver, so job processes start without re-importing them.
        preload_modules=[*plugin_modules(config.pipeline), "voicefleet_runtime.worker"],
        # Importing the plugins and loading the VAD can take longer than the default 10 s on a
        # busy node; a process that times out is killed and the job waits for another one.
        initialize_process_timeout=PROCESS_INIT_TIMEOUT_SECONDS,
    )
    server.rtc_session(entrypoint, agent_name=config.dispatch_name, on_request=runtime.on_request)
    runtime.server = server
    server.runtime = runtime
    server.on_refused = runtime.on_refused_by_livekit_agents
    server.on("worker_started", runtime.on_started)
    server.on("worker_registered", runtime.on_registered)
    return server
