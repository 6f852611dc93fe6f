"""Phone calls for the tests: sipp dials livekit-sip, and the RTP the caller receives is captured.

sipp (scenarios in voicefleet_testkit/sipp/) plays the caller: it sends an INVITE with a PCMU offer,
streams
spoken audio (espeak-ng, 8 kHz u-law) with rtp_stream, and hangs up with a BYE. sipp does not
keep what it receives, so `WireCapture` reads the call's packets off the wire with a Linux packet
socket (AF_PACKET, as tcpdump does; needs root, which the test machines have): the SIP messages
to and from sipp's port (for timings and the REFER) and the RTP sent to sipp's media port, decoded
from u-law so a test can assert the caller heard something that is not silence.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from voicefleet_testkit.net import free_port

SIPP_DIR = Path(__file__).resolve().parent / "sipp"
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SILENCE_RMS = 0.003
"""Below this RMS (full scale 1.0, about -50 dBFS) a 20 ms frame counts as silence."""


def _ulaw_table() -> npt.NDArray[np.float64]:
    """G.711 u-law byte -> linear sample, full scale 1.0."""
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.float64) / 32768.0


ULAW = _ulaw_table()


def caller_audio(
    path: Path, text: str, lead_seconds: float = 0.0, tail_seconds: float = 1.5
) -> Path:
    """Speech for the caller, raw 8 kHz mono u-law as sipp's rtp_stream plays it.

    `lead_seconds` of silence first (the caller listens to the greeting before speaking),
    `tail_seconds` after (so a looped stream has pauses that end the caller's turn).
    """
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed; `make infra` installs it (Debian)")
    wav = path.with_suffix(".wav")
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    subprocess.run(
        [
            "sox",
            str(wav),
            "-t",
            "raw",
            "-e",
            "u-law",
            "-r",
            "8000",
            "-c",
            "1",
            str(path),
            "pad",
            str(lead_seconds),
            str(tail_seconds),
        ],
        check=True,
        capture_output=True,
    )
    return path


@dataclass
class RtpFrame:
    at: float
    sequence: int
    payload_type: int
    rms: float


DTMF_EVENTS = "0123456789*#ABCD"
"""RFC 4733 event codes 0-15 as keypad digits."""


@dataclass
class TelephoneEvent:
    """One RFC 4733 telephone-event packet (an RTP payload of 4 bytes): a key being pressed.
    A key press is several packets with the same RTP timestamp, the last ones marked `end`."""

    at: float
    payload_type: int
    timestamp: int
    event: int
    end: bool
    duration: int
    """In timestamp units (8 kHz: 1/8000 s)."""


@dataclass
class SipPacket:
    at: float
    outgoing: bool
    """Sent by sipp (to livekit-sip) rather than received."""
    text: str

    @property
    def first_line(self) -> str:
        return self.text.split("\r\n", 1)[0]


@dataclass
class WireCapture:
    """Packets of one call: SIP to/from `sip_port`, RTP to `media_port` (sipp's ports)."""

    sip_port: int
    media_port: int
    rtp: list[RtpFrame] = field(default_factory=list)
    sip: list[SipPacket] = field(default_factory=list)
    events: list[TelephoneEvent] = field(default_factory=list)
    """4-byte RTP payloads of any payload type but PCMU: candidate telephone-events (the
    payload type is dynamic; `dtmf_digits` keeps the one the answer's SDP names)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _socket: socket.socket | None = None
    _samples: list[npt.NDArray[np.float64]] = field(default_factory=list)

    def start(self) -> WireCapture:
        try:
            self._socket = socket.socket(
                socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP)
            )
        except PermissionError as error:
            raise RuntimeError("capturing RTP needs root (AF_PACKET socket)") from error
        self._socket.settimeout(0.2)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._thread = threading.Thread(target=self._run, name="rtp-capture", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> WireCapture:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self) -> None:
        assert self._socket is not None
        while not self._stop.is_set():
            try:
                data, address = self._socket.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if address[2] == PACKET_OUTGOING:
                continue  # the same packet arrives again on its way in
            self._packet(time.monotonic(), data)

    def _packet(self, at: float, data: bytes) -> None:
        if len(data) < 28 or data[0] >> 4 != 4 or data[9] != socket.IPPROTO_UDP:
            return
        header = (data[0] & 0x0F) * 4
        source_port, destination_port = struct.unpack_from("!HH", data, header)
        payload = data[header + 8 :]
        if destination_port == self.media_port:
            self._rtp(at, payload)
        elif self.sip_port in (source_port, destination_port) and payload[:1].isalpha():
            text = payload.decode("utf-8", "replace")
            self.sip.append(SipPacket(at, source_port == self.sip_port, text))

    def _rtp(self, at: float, packet: bytes) -> None:
        if len(packet) < 12 or packet[0] >> 6 != 2:
            return
        payload_type = packet[1] & 0x7F
        sequence = struct.unpack_from("!H", packet, 2)[0]
        offset = 12 + 4 * (packet[0] & 0x0F)
        if packet[0] & 0x10 and len(packet) >= offset + 4:  # header extension
            offset += 4 + 4 * struct.unpack_from("!H", packet, offset + 2)[0]
        body = packet[offset:]
        if packet[0] & 0x20 and body:  # padding
            body = body[: -body[-1]]
        rms = 0.0
        if payload_type != 0 and len(body) == 4:
            event, flags, duration = struct.unpack("!BBH", body)
            timestamp = struct.unpack_from("!I", packet, 4)[0]
            self.events.append(
                TelephoneEvent(at, payload_type, timestamp, event, bool(flags & 0x80), duration)
            )
        if payload_type == 0 and body:
            samples = ULAW[np.frombuffer(body, dtype=np.uint8)]
            self._samples.append(samples)
            rms = float(np.sqrt(np.mean(samples**2)))
        self.rtp.append(RtpFrame(at, sequence, payload_type, rms))

    # --- what the caller got ------------------------------------------------------------------

    def pcmu_frames(self) -> list[RtpFrame]:
        return [frame for frame in self.rtp if frame.payload_type == 0]

    def audio(self) -> npt.NDArray[np.float64]:
        """Everything received as PCMU, decoded (8 kHz, full scale 1.0)."""
        return np.concatenate(self._samples) if self._samples else np.zeros(0)

    def voiced_seconds(self) -> float:
        return 0.02 * sum(1 for frame in self.pcmu_frames() if frame.rms > SILENCE_RMS)

    def first_voiced_at(self) -> float | None:
        return next((f.at for f in self.pcmu_frames() if f.rms > SILENCE_RMS), None)

    def telephone_event_payload_type(self) -> int | None:
        """The telephone-event payload type livekit-sip's answer (SDP) chose."""
        answer = self.answer()
        if answer is None:
            return None
        found = re.search(r"^a=rtpmap:(\d+) telephone-event/8000", answer.text, re.M | re.I)
        return int(found.group(1)) if found else None

    def dtmf_digits(self) -> str:
        """The keys livekit-sip pressed towards the caller, in order: one digit per distinct
        RTP timestamp of the answer's telephone-event payload type (RFC 4733 sends a key as
        several packets with one timestamp, the last ones repeated with the end bit)."""
        payload_type = self.telephone_event_payload_type()
        digits: dict[int, str] = {}
        for event in self.events:
            if event.payload_type == payload_type and event.event < len(DTMF_EVENTS):
                digits.setdefault(event.timestamp, DTMF_EVENTS[event.event])
        return "".join(digits.values())

    def sent(self, method: str) -> list[SipPacket]:
        return [p for p in self.sip if p.outgoing and p.first_line.startswith(method + " ")]

    def received_requests(self, method: str) -> list[SipPacket]:
        return [p for p in self.sip if not p.outgoing and p.first_line.startswith(method + " ")]

    def answer(self) -> SipPacket | None:
        """The 200 OK livekit-sip answered the INVITE with (None if the call was not answered)."""
        for packet in self.sip:
            if packet.outgoing or not packet.first_line.startswith("SIP/2.0 200"):
                continue
            if re.search(r"^CSeq:\s*\d+\s+INVITE\s*$", packet.text, re.M | re.I):
                return packet
        return None

    def advertised_addresses(self) -> dict[str, list[str]]:
        """Where the answer tells the caller to send its ACK, BYE and RTP: the host of every
        Contact header, and the SDP's connection (c=) and origin (o=) addresses."""
        answer = self.answer()
        if answer is None:
            return {}
        headers, _, body = answer.text.partition("\r\n\r\n")
        contact = re.findall(
            r"^(?:Contact|m):[^\n]*?sips?:(?:[^@>;\s]+@)?\[?([^\]>;:\s]+)", headers, re.M | re.I
        )
        connection = re.findall(r"^c=IN IP[46] ([^\s/]+)", body, re.M)
        origin = re.findall(r"^o=\S+ \S+ \S+ IN IP[46] (\S+)", body, re.M)
        return {"contact": contact, "sdp_connection": connection, "sdp_origin": origin}

    def responses(self) -> list[int]:
        """Status codes livekit-sip answered with, in order."""
        codes = []
        for packet in self.sip:
            match = re.match(r"SIP/2\.0 (\d{3})", packet.first_line)
            if match and not packet.outgoing:
                codes.append(int(match.group(1)))
        return codes


@dataclass
class CallResult:
    returncode: int
    stdout: str
    messages: str
    """sipp's message trace (-trace_msg)."""
    errors: str
    capture: WireCapture
    invite_at: float | None
    answered_at: float | None
    bye_sent_at: float | None

    @property
    def invite_to_first_audio(self) -> float | None:
        """Seconds from the INVITE to the first non-silent audio the caller got."""
        voiced = self.capture.first_voiced_at()
        if self.invite_at is None or voiced is None:
            return None
        return voiced - self.invite_at

    def describe(self) -> str:
        codes = self.capture.responses()
        return (
            f"sipp exit {self.returncode}; responses {codes}; "
            f"{len(self.capture.pcmu_frames())} PCMU frames received, "
            f"{self.capture.voiced_seconds():.2f}s voiced\n"
            f"--- sipp stdout (tail) ---\n{self.stdout[-1500:]}\n"
            f"--- sipp errors ---\n{self.errors[-1500:]}\n"
            f"--- sipp messages (tail) ---\n{self.messages[-4000:]}"
        )


def place_call(
    scenario: str,
    number: str,
    workdir: Path,
    *,
    sip_host: str = "127.0.0.1",
    sip_port: int = 5060,
    caller: str = "+15550001111",
    talk_seconds: float = 8.0,
    speech: str = "Hello. I would like to know where my order is. It was placed last Tuesday.",
    speech_delay: float = 0.0,
    timeout: float = 90.0,
    answer_timeout: float = 30.0,
    auth: tuple[str, str] | None = None,
) -> CallResult:
    """Run one sipp call with `scenario` (a file in voicefleet_testkit/sipp/) to `number`; wait
    for its end.

    `answer_timeout` bounds each wait for a message (the answer, a REFER, the BYE's 200).
    `auth` (username, password) answers digest challenges (scenario call_auth.xml).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(SIPP_DIR / scenario, workdir / scenario)
    caller_audio(workdir / "caller.ul", speech, lead_seconds=speech_delay)
    local_port = free_port("udp")
    media_port = free_port("udp", even=True, block=4)  # RTP, RTCP, video RTP, RTCP
    messages = workdir / "messages.log"
    errors = workdir / "errors.log"
    argv = [
        "sipp",
        f"{sip_host}:{sip_port}",
        *("-sf", scenario, "-s", number, "-m", "1", "-t", "u1"),
        *("-i", "127.0.0.1", "-p", str(local_port), "-mi", "127.0.0.1", "-mp", str(media_port)),
        *("-set", "caller", caller, "-d", str(int(talk_seconds * 1000))),
        *("-timeout", f"{int(timeout)}s", "-recv_timeout", str(int(answer_timeout * 1000))),
        *("-trace_msg", "-message_file", str(messages)),
        *("-trace_err", "-error_file", str(errors)),
        "-nostdin",
    ]
    if auth is not None:
        argv += ["-au", auth[0], "-ap", auth[1]]
    with WireCapture(local_port, media_port) as capture:
        done = subprocess.run(
            argv, cwd=workdir, capture_output=True, text=True, timeout=timeout + 30
        )
        time.sleep(0.3)  # the last packets
    invite = capture.sent("INVITE")
    answered = [p for p in capture.sip if not p.outgoing and p.first_line.startswith("SIP/2.0 200")]
    bye = capture.sent("BYE")
    return CallResult(
        returncode=done.returncode,
        stdout=done.stdout + done.stderr,
        messages=messages.read_text(errors="replace") if messages.exists() else "",
        errors=errors.read_text(errors="replace") if errors.exists() else "",
        capture=capture,
        invite_at=invite[0].at if invite else None,
        answered_at=answered[0].at if answered else None,
        bye_sent_at=bye[0].at if bye else None,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m voicefleet_testkit.sipcall NUMBER`: place one call through livekit-sip."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(
        prog="python -m voicefleet_testkit.sipcall", description=main.__doc__
    )
    parser.add_argument("number", help="the dialled number, e.g. +15551230001")
    parser.add_argument("--caller", default="+15550001111")
    parser.add_argument("--seconds", type=float, default=10.0, help="talk time before the BYE")
    parser.add_argument("--sip", default="127.0.0.1:5060", help="livekit-sip host:port")
    args = parser.parse_args(argv)
    host, _, port = args.sip.partition(":")
    with tempfile.TemporaryDirectory(prefix="voicefleet-call-") as workdir:
        result = place_call(
            "call.xml",
            args.number,
            Path(workdir),
            sip_host=host,
            sip_port=int(port or 5060),
            caller=args.caller,
            talk_seconds=args.seconds,
            speech_delay=4.0,
        )
    answered = result.answered_at is not None
    latency = result.invite_to_first_audio
    print(
        f"call to {args.number}: {'answered' if answered else 'NOT answered'}; "
        f"SIP responses {result.capture.responses()}; "
        f"{result.capture.voiced_seconds():.1f}s of agent audio heard"
        + (f"; first audio {latency:.2f}s after the INVITE" if latency is not None else "")
    )
    if not answered or result.capture.voiced_seconds() <= 0:
        print(result.describe())
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
