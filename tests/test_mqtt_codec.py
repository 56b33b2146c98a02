"""MQTT 3.1.1 codec of ggc_ota: round trips, every malformation the spec names, and fuzzing
(random bytes and mutated valid packets: only MqttProtocolError may escape, memory stays
bounded whatever length a packet declares)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ggc_ota as g
from tests.cloud import mqtt_codec as bc

NORMAL_EXAMPLES = 10_000
SLOW_EXAMPLES = 200_000


def split(data: bytes) -> g.Packet:
    packets = bc.any_reader().feed(data)
    assert len(packets) == 1
    return packets[0]


@pytest.mark.parametrize("n,encoded", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"), (16_384, b"\x80\x80\x01"),
    (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"), (268_435_455, b"\xff\xff\xff\x7f"),
])
def test_remaining_length_boundaries(n, encoded):
    assert g.encode_remaining_length(n) == encoded
    assert g.decode_remaining_length(b"\x30" + encoded) == (n, len(encoded))


def test_remaining_length_fifth_byte_and_limits():
    with pytest.raises(g.MqttProtocolError):
        g.decode_remaining_length(b"\x30\xff\xff\xff\xff\x01")
    with pytest.raises(g.MqttProtocolError):
        g.encode_remaining_length(268_435_456)
    assert g.decode_remaining_length(b"\x30\xff\xff") is None  # incomplete, not an error


def test_round_trips():
    p = split(g.encode_connect("thing-1", 60))
    assert (p.type, p.client_id, p.keepalive, p.clean_session) == (g.CONNECT, "thing-1", 60, True)
    p = split(bc.encode_connack(5))
    assert (p.type, p.return_code) == (g.CONNACK, 5)
    p = split(g.encode_publish("a/b", b"\x00hello", 1, 65535, retain=True, dup=True))
    assert (p.topic, p.payload, p.qos, p.packet_id, p.retain, p.dup) == ("a/b", b"\x00hello", 1, 65535, True, True)
    p = split(g.encode_publish("a/b", b"", 0))
    assert (p.qos, p.packet_id, p.payload) == (0, 0, b"")
    assert split(g.encode_puback(7)).packet_id == 7
    p = split(g.encode_subscribe(9, [("$aws/things/t/jobs/#", 1), ("x", 0)]))
    assert p.topics == (("$aws/things/t/jobs/#", 1), ("x", 0))
    p = split(bc.encode_suback(9, [1, 0x80]))
    assert p.codes == (1, 0x80)
    p = split(bc.encode_unsubscribe(3, ["x", "y"]))
    assert [t for t, _ in p.topics] == ["x", "y"]
    assert split(bc.encode_unsuback(3)).packet_id == 3
    for enc, t in ((g.encode_pingreq, g.PINGREQ), (bc.encode_pingresp, g.PINGRESP),
                   (g.encode_disconnect, g.DISCONNECT)):
        assert split(enc()).type == t


def test_large_publish_round_trip():
    payload = bytes(range(256)) * 512  # 128 KiB
    p = split(g.encode_publish("big", payload, 1, 1))
    assert p.payload == payload


def test_reader_handles_byte_by_byte_and_coalesced_input():
    stream = bc.encode_connack(0) + g.encode_publish("t", b"x" * 300, 1, 2) + bc.encode_pingresp()
    reader = bc.any_reader()
    out = []
    for i in range(len(stream)):
        out += reader.feed(stream[i:i + 1])
    assert [p.type for p in out] == [g.CONNACK, g.PUBLISH, g.PINGRESP]
    assert [p.type for p in bc.any_reader().feed(stream)] == [g.CONNACK, g.PUBLISH, g.PINGRESP]


@pytest.mark.parametrize("data,words", [
    (b"\x21\x02\x00\x00", "reserved flags"),          # CONNACK with flags
    (b"\x20\x03\x00\x00\x00", "length 3"),            # CONNACK of the wrong length
    (b"\x20\x01\x00", "length 1"),
    (b"\x20\x02\x00\x06", "unknown return code"),
    (b"\x20\x02\x02\x00", "reserved acknowledge"),
    (b"\x36\x05\x00\x01t\x00\x01", "QoS 3"),
    (b"\x38\x03\x00\x01t", "DUP"),                     # QoS 0 with DUP
    (b"\x32\x05\x00\x01t\x00\x00", "packet id 0"),
    (b"\x40\x02\x00\x00", "packet id 0"),              # PUBACK id 0
    (b"\x40\x03\x00\x01\x00", "length 3"),
    (b"\x42\x02\x00\x01", "reserved flags"),           # PUBACK with flags
    (b"\x90\x03\x00\x01\x03", "invalid return codes"),  # SUBACK code 3
    (b"\x90\x02\x00\x01", "without return codes"),
    (b"\xd0\x01\x00", "trailing"),                     # PINGRESP with a body
    (b"\xd1\x00", "reserved flags"),
    (b"\x00\x00", "reserved packet type"),
    (b"\xf0\x00", "reserved packet type"),
    (b"\x30\x03\x00\x05a", "truncated"),               # topic length beyond the body
    (b"\x30\x03\x00\x01+", "invalid topic"),
    (b"\x30\x04\x00\x02\xff\xfe", "UTF-8"),
    (b"\x30\x80\x00", "minimally"),
    (b"\x82\x04\x00\x01\x00\x00", "truncated"),        # SUBSCRIBE missing its QoS byte
])
def test_malformed_packets_raise_protocol_error(data, words):
    with pytest.raises(g.MqttProtocolError) as err:
        bc.any_reader().feed(data)
    assert words in str(err.value)


def test_oversized_declared_length_refused_before_buffering():
    reader = bc.any_reader(max_packet=1024)
    with pytest.raises(g.MqttProtocolError, match="cap"):
        reader.feed(b"\x30\xff\xff\xff\x7f")
    reader = bc.any_reader(max_packet=1024)
    with pytest.raises(g.MqttProtocolError):
        reader.feed(b"\x30" + g.encode_remaining_length(1024))


def test_encoders_refuse_bad_input():
    with pytest.raises(g.MqttProtocolError):
        g.encode_publish("a/+", b"", 0)
    with pytest.raises(g.MqttProtocolError):
        g.encode_publish("a", b"", 1, 0)
    with pytest.raises(g.MqttProtocolError):
        g.encode_publish("a", b"", 3, 1)
    with pytest.raises(g.MqttProtocolError):
        g.encode_puback(65536)
    with pytest.raises(g.MqttProtocolError):
        g.encode_subscribe(1, [])
    with pytest.raises(g.MqttProtocolError):
        g.encode_string("x" * 65536)


VALID = [
    bc.encode_connack(0), bc.encode_connack(5, True), g.encode_publish("$aws/things/t/jobs/notify", b'{"a":1}', 1, 10),
    g.encode_publish("t", b"", 0), g.encode_puback(1), bc.encode_suback(2, [0, 1, 0x80]),
    bc.encode_unsuback(3), bc.encode_pingresp(), g.encode_connect("c", 30), g.encode_subscribe(4, [("a/#", 1)]),
    bc.encode_unsubscribe(5, ["a"]), g.encode_pingreq(), g.encode_disconnect(),
]


def feed_all(data: bytes, cap: int = 4096) -> None:
    reader = bc.any_reader(max_packet=cap)
    try:
        reader.feed(data)
    except g.MqttProtocolError:
        return
    assert reader.buffered <= cap + 5


def fuzz_settings(examples):
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


@fuzz_settings(NORMAL_EXAMPLES)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data):
    feed_all(data)


@st.composite
def mutated(draw):
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(VALID), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos]
        elif op == "truncate":
            del data[pos:]
    return bytes(data)


@fuzz_settings(NORMAL_EXAMPLES)
@given(mutated())
def test_fuzz_mutated_valid_packets(data):
    feed_all(data)


@fuzz_settings(2_000)
@given(st.integers(5_000, 268_435_455), st.integers(0, 15))
def test_fuzz_huge_declared_lengths_stay_bounded(length, type_nibble):
    data = bytes([type_nibble << 4]) + g.encode_remaining_length(length) + b"\x00" * 64
    feed_all(data, cap=4096)


@pytest.mark.slow
@fuzz_settings(SLOW_EXAMPLES)
@given(mutated())
def test_fuzz_mutated_long(data):
    feed_all(data)


def test_fuzz_found_nothing_escapes_struct_errors():
    """A regression guard for the classic bug: struct.error leaking out of a short body."""
    for data in (b"\x90\x01\x00", b"\x40\x01\x00", b"\x10\x01\x00", b"\x82\x01\x00"):
        with pytest.raises(g.MqttProtocolError):
            bc.any_reader().feed(data)


def test_the_device_never_decodes_what_only_a_client_sends():
    """The broker's half of the codec is the tests' (tests/cloud/mqtt_codec.py): a CONNECT,
    SUBSCRIBE, UNSUBSCRIBE, PINGREQ or DISCONNECT from the broker is a protocol error."""
    for data in (g.encode_connect("c", 30), g.encode_subscribe(4, [("a/#", 1)]), bc.encode_unsubscribe(5, ["a"]),
                 g.encode_pingreq(), g.encode_disconnect()):
        with pytest.raises(g.MqttProtocolError, match="only a client sends it"):
            g.PacketReader().feed(data)
    assert not hasattr(g, "encode_connack") and not hasattr(g, "encode_suback")
