"""Run amqtt (an independently written Python broker) with TLS on a given port, for interop
tests: python -m tests.cloud.amqtt_broker PORT CA CERT KEY"""
import asyncio
import sys

from amqtt.broker import Broker


async def main(port: int, ca: str, cert: str, key: str) -> None:
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}", "ssl": True,
                                  "cafile": ca, "certfile": cert, "keyfile": key}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    while True:
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), *sys.argv[2:5]))
