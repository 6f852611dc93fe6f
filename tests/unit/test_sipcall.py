"""The SIP caller's reading of livekit-sip's answer: where it tells the caller to send media."""

from __future__ import annotations

from voicefleet_testkit.sipcall import SipPacket, WireCapture

ANSWER = (
    "SIP/2.0 200 OK\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bK-1\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:127.0.0.1:5060>\r\n"
    "Content-Type: application/sdp\r\n"
    "\r\n"
    "v=0\r\n"
    "o=LiveKit 1 2 IN IP4 10.1.2.3\r\n"
    "c=IN IP4 192.168.0.7\r\n"
    "m=audio 10000 RTP/AVP 0\r\n"
)


def capture_with(*packets: SipPacket) -> WireCapture:
    capture = WireCapture(sip_port=5071, media_port=6000)
    capture.sip.extend(packets)
    return capture


def test_the_invite_answer_names_its_contact_and_sdp_addresses() -> None:
    ringing = SipPacket(0.1, False, "SIP/2.0 180 Ringing\r\nCSeq: 1 INVITE\r\n\r\n")
    bye_ok = SipPacket(
        2.0, False, "SIP/2.0 200 OK\r\nCSeq: 2 BYE\r\nContact: <sip:10.9.9.9:5060>\r\n\r\n"
    )
    capture = capture_with(ringing, SipPacket(0.2, False, ANSWER), bye_ok)
    assert capture.advertised_addresses() == {
        "contact": ["127.0.0.1"],
        "sdp_connection": ["192.168.0.7"],
        "sdp_origin": ["10.1.2.3"],
    }


def test_contact_with_a_user_part_and_compact_form() -> None:
    text = ANSWER.replace(
        "Contact: <sip:127.0.0.1:5060>", "m: <sip:+15551230001@127.0.0.2;transport=udp>"
    )
    assert capture_with(SipPacket(0.2, False, text)).advertised_addresses()["contact"] == [
        "127.0.0.2"
    ]


def test_an_unanswered_call_advertises_nothing() -> None:
    busy = SipPacket(0.2, False, "SIP/2.0 486 Busy Here\r\nCSeq: 1 INVITE\r\n\r\n")
    sent_ok = SipPacket(0.3, True, ANSWER)  # sipp's own 200 OK (e.g. to a BYE) is not the answer
    assert capture_with(busy, sent_ok).advertised_addresses() == {}
