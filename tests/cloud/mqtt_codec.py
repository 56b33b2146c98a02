"""The broker's half of MQTT 3.1.1 (OASIS standard), for the tests' scripted brokers and the
codec's round trips: what a broker sends (CONNACK, SUBACK, UNSUBACK, PINGRESP) and decodes
(CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT). The agent ships only what a device sends
and reads; this module reuses its framing and validation helpers."""
from __future__ import annotations

import collections

import ggc_ota as g


class ClientPacket(collections.namedtuple("ClientPacket", [
        "type", "flags", "packet_id", "topics", "client_id", "keepalive", "clean_session"],
        defaults=[0, 0, (), "", 0, True])):
    """A packet only a client sends, as the broker decodes it: `topics` holds SUBSCRIBE's (topic,
    qos) pairs (UNSUBSCRIBE's with qos 0), `client_id`, `keepalive`, `clean_session` CONNECT's."""

    __slots__ = ()


def encode_unsubscribe(packet_id: int, topics: list[str]) -> bytes:
    g.check_packet_id(packet_id)
    names = b"".join(g.encode_string(t) for t in topics)
    return g.encode_packet(g.UNSUBSCRIBE, 2, packet_id.to_bytes(2, "big") + names)


def encode_connack(return_code: int, session_present: bool = False) -> bytes:
    return g.encode_packet(g.CONNACK, 0, bytes([1 if session_present else 0, return_code]))


def encode_suback(packet_id: int, codes: list[int]) -> bytes:
    g.check_packet_id(packet_id)
    return g.encode_packet(g.SUBACK, 0, packet_id.to_bytes(2, "big") + bytes(codes))


def encode_unsuback(packet_id: int) -> bytes:
    g.check_packet_id(packet_id)
    return g.encode_packet(g.UNSUBACK, 0, packet_id.to_bytes(2, "big"))


def encode_pingresp() -> bytes:
    return g.encode_packet(g.PINGRESP, 0, b"")


def decode_client_packet(packet_type: int, flags: int, body: bytes) -> g.Packet | ClientPacket:
    """What a broker reads: the client's packets (PUBLISH and PUBACK as the device decodes them)."""
    name = g.PACKET_NAMES.get(packet_type)
    if name is None:
        raise g.MqttProtocolError(f"reserved packet type {packet_type}")
    if packet_type in (g.PUBLISH, g.PUBACK):
        return g.decode_packet(packet_type, flags, body)
    if flags != g.REQUIRED_FLAGS[packet_type]:
        raise g.MqttProtocolError(f"{name} with reserved flags {flags:#x}")
    b = g.PacketBody(body, name)
    if packet_type in (g.PINGREQ, g.DISCONNECT):
        b.finish()
        return ClientPacket(packet_type, flags)
    if packet_type == g.SUBSCRIBE:
        packet_id = b.u16()
        g.check_packet_id(packet_id)
        topics = []
        while not b.done():
            topic, qos = b.string(), b.u8()
            if qos > 2:
                raise g.MqttProtocolError("SUBSCRIBE with requested QoS above 2")
            topics.append((topic, qos))
        if not topics:
            raise g.MqttProtocolError("SUBSCRIBE without topic filters")
        return ClientPacket(g.SUBSCRIBE, flags, packet_id, topics=tuple(topics))
    if packet_type == g.UNSUBSCRIBE:
        packet_id = b.u16()
        g.check_packet_id(packet_id)
        names = []
        while not b.done():
            names.append((b.string(), 0))
        if not names:
            raise g.MqttProtocolError("UNSUBSCRIBE without topic filters")
        return ClientPacket(g.UNSUBSCRIBE, flags, packet_id, topics=tuple(names))
    if packet_type != g.CONNECT:
        raise g.MqttProtocolError(f"{name} from a client")
    if b.string() != "MQTT" or b.u8() != 4:
        raise g.MqttProtocolError("CONNECT is not MQTT 3.1.1")
    connect_flags = b.u8()
    if connect_flags & 0x01:
        raise g.MqttProtocolError("CONNECT with the reserved flag set")
    keepalive = b.u16()
    client_id = b.string()
    if connect_flags & 0x04:  # will topic and message
        b.string()
        b.take(b.u16())
    if connect_flags & 0x80:
        b.string()
    if connect_flags & 0x40:
        b.take(b.u16())
    b.finish()
    return ClientPacket(g.CONNECT, flags, client_id=client_id, keepalive=keepalive,
                        clean_session=bool(connect_flags & 0x02))


def broker_reader(max_packet: int = g.DEFAULT_MAX_PACKET) -> g.PacketReader:
    """A PacketReader that decodes what clients send."""
    return g.PacketReader(max_packet, decode=decode_client_packet)


CLIENT_SENDS = {g.CONNECT, g.SUBSCRIBE, g.UNSUBSCRIBE, g.PINGREQ, g.DISCONNECT}


def decode_any(packet_type: int, flags: int, body: bytes) -> g.Packet | ClientPacket:
    """Both directions (for the codec's own tests): what a client sends as a broker decodes it,
    everything else as the device does."""
    if packet_type in CLIENT_SENDS:
        return decode_client_packet(packet_type, flags, body)
    return g.decode_packet(packet_type, flags, body)


def any_reader(max_packet: int = g.DEFAULT_MAX_PACKET) -> g.PacketReader:
    return g.PacketReader(max_packet, decode=decode_any)
