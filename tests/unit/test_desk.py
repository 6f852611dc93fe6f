"""The platform desk's contract, its HTTP API and settings, and the operator's side: the token it
mints for one room, and when turning callers away takes the desk's voice. The desk speaking in
a real room (livekit-server, livekit-sip, sipp) is in tests/integration/test_wake.py."""

from __future__ import annotations

import json
from datetime import timedelta

import jwt
import pytest
from aiohttp.test_utils import TestClient, TestServer
from livekit.protocol import models
from voicefleet_operator.desk import DeskClient, desk_token
from voicefleet_operator.wake import desk_speaks
from voicefleet_runtime.admission import OverflowOptions
from voicefleet_runtime.config import TtsConfig
from voicefleet_runtime.desk import Desk, DeskSettingsError, Voice, make_app
from voicefleet_runtime.desk import settings_from_environment as desk_settings
from voicefleet_runtime.desk_contract import DESK_ATTRIBUTE, FLEET_ATTRIBUTE, HoldRequest

SECRET = "a-livekit-api-secret-of-32-characters-or-more"


def test_the_desk_token_joins_one_room_as_an_agent_and_administers_nothing() -> None:
    token = desk_token("key", SECRET, "call-1", "acme.support", 90)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_aud": False})
    video = claims["video"]
    assert video["room"] == "call-1" and video["roomJoin"] is True
    assert video["agent"] is True and video["canPublish"] is True
    assert video["canUpdateOwnMetadata"] is True  # its voicefleet.desk attribute
    for power in ("roomAdmin", "roomCreate", "roomList", "roomRecord", "canSubscribe"):
        assert not video.get(power), power
    assert "sip" not in claims or not any(claims["sip"].values())
    assert claims["kind"] == "agent"
    assert claims["attributes"] == {DESK_ATTRIBUTE: "holding", FLEET_ATTRIBUTE: "acme.support"}
    assert claims["exp"] - claims["nbf"] == pytest.approx(timedelta(seconds=90).seconds, abs=2)


def _caller(kind: int) -> models.ParticipantInfo:
    caller = models.ParticipantInfo(identity="c")
    caller.kind = kind  # type: ignore[assignment]  # protobuf enums are ints at run time
    return caller


SIP = models.ParticipantInfo.Kind.SIP
WEBRTC = models.ParticipantInfo.Kind.STANDARD


@pytest.mark.parametrize(
    ("kind", "action", "speaks"),
    [
        (WEBRTC, "reject", True),  # a WebRTC caller always hears the overflow message
        (SIP, "reject", False),  # a ringing call is rejected with a SIP status, not answered
        (SIP, "message", True),
        (SIP, "transfer", True),
    ],
)
def test_turning_a_caller_away_takes_the_desk_unless_a_phone_call_is_rejected(
    kind: int, action: str, speaks: bool
) -> None:
    sip: dict[str, object] = {"action": action}
    if action == "transfer":
        sip["transferTo"] = "+15550100"
    overflow = OverflowOptions.model_validate({"sip": sip})
    assert desk_speaks([_caller(kind)], overflow) is speaks


def test_the_desk_settings_name_the_variable_and_the_fix() -> None:
    url, tts, port = desk_settings(
        {
            "VOICEFLEET_DESK_LIVEKIT_URL": "ws://livekit:7880",
            "VOICEFLEET_DESK_TTS": '{"provider": "openai", "voice": "alloy"}',
        }
    )
    assert (url, tts.provider, tts.voice, port) == ("ws://livekit:7880", "openai", "alloy", 8095)
    with pytest.raises(DeskSettingsError, match="VOICEFLEET_DESK_LIVEKIT_URL: set it"):
        desk_settings({})
    with pytest.raises(DeskSettingsError, match=r"VOICEFLEET_DESK_TTS: provider: .*spec.pipeline"):
        desk_settings(
            {"VOICEFLEET_DESK_LIVEKIT_URL": "ws://x", "VOICEFLEET_DESK_TTS": '{"provider": "x"}'}
        )
    with pytest.raises(DeskSettingsError, match="VOICEFLEET_DESK_PORT"):
        desk_settings({"VOICEFLEET_DESK_LIVEKIT_URL": "ws://x", "VOICEFLEET_DESK_PORT": "http"})


def test_a_hold_request_without_a_token_or_with_a_long_message_is_refused() -> None:
    with pytest.raises(ValueError, match="token"):
        HoldRequest.model_validate({"room": "r", "agentName": "a.b", "message": "hi"})
    with pytest.raises(ValueError, match="message"):
        HoldRequest.model_validate(
            {"room": "r", "token": "t", "agentName": "a.b", "message": "x" * 501}
        )


@pytest.fixture
async def desk_client() -> TestClient:  # type: ignore[misc]
    desk = Desk("ws://127.0.0.1:1", Voice(TtsConfig(provider="openai")))
    async with TestClient(TestServer(make_app(desk))) as client:
        yield client


async def test_the_desk_api_names_bad_fields_and_unknown_rooms(desk_client: TestClient) -> None:
    response = await desk_client.post("/holds", data=json.dumps({"room": "r"}))
    assert response.status == 400
    problem = (await response.json())["error"]
    assert "token" in problem and "agentName" in problem and "message" in problem
    response = await desk_client.post(
        "/holds/nope/finish", data=json.dumps({"message": "bye", "reason": "wake_timeout"})
    )
    assert response.status == 404
    assert (await desk_client.delete("/holds/nope")).status == 404
    assert (await desk_client.get("/healthz")).status == 200
    metrics = await (await desk_client.get("/metrics")).text()
    assert "voicefleet_desk_holding 0.0" in metrics


async def test_a_room_the_desk_cannot_join_is_a_502_and_the_operator_goes_on_without_it(
    desk_client: TestClient,
) -> None:
    """livekit-server unreachable: the desk answers 502 naming why; the operator's client says
    False (the caller keeps the no-desk treatment) and never raises."""
    response = await desk_client.post(
        "/holds",
        data=HoldRequest(room="r", token="t", agent_name="a.b", message=None).model_dump_json(
            by_alias=True
        ),
    )
    assert response.status == 502
    assert (await response.json())["error"]
    client = DeskClient(str(desk_client.make_url("")))
    assert await client.hold(("ws://x", "key", SECRET), "r", "a.b", None, 10) is False
    assert await client.finish("r", "bye", "wake_timeout") is None
    assert await client.end("r/with/slashes") is False
    nobody = DeskClient("http://127.0.0.1:9")  # nothing listens: logged, False
    assert await nobody.hold(("ws://x", "key", SECRET), "r", "a.b", "hi", 10) is False
