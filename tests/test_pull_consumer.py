"""The engine's pull consumer against a real JetStream: several requests open at once."""

import nats
from nats.js import api as jsapi

from daemon.pull import PullConsumer


async def test_two_open_requests_bring_the_messages_in_stream_order_and_an_expired_one_says_what_it_did_not_bring(
    nats_server_url, prefix
):
    """Two requests of 250 open at once: JetStream serves them in turns, and the 500 messages come
    in stream order. A request of 200 with 100 messages left expires: its 408 says the other 100
    will not come, and the consumer counts them as given up (a caller frees the room it kept)."""
    nc = await nats.connect(nats_server_url)
    try:
        js = nc.jetstream()
        stream = f"{prefix.upper()}_PULLS"
        await js.add_stream(name=stream, subjects=[f"{prefix}.pulls.>"])
        for i in range(600):
            await js.publish(f"{prefix}.pulls.{i % 7}", str(i).encode())
        await js.add_consumer(stream, jsapi.ConsumerConfig(durable_name="c", ack_policy=jsapi.AckPolicy.EXPLICIT))
        consumer = PullConsumer(nc, stream, "c", expires=0.3)
        await consumer.subscribe()

        await consumer.open(250)
        await consumer.open(250)
        assert consumer.outstanding == 500
        taken = []
        while consumer.outstanding:
            taken += await consumer.take(0, request_more=False)
        assert [d.stream_seq for d in taken] == list(range(1, 501))
        assert (consumer.received, consumer.given_up) == (500, 0)

        await consumer.open(200)
        while consumer.outstanding:
            taken += await consumer.take(0, request_more=False)
        assert [d.stream_seq for d in taken] == list(range(1, 601))
        assert (consumer.received, consumer.given_up) == (600, 100)
        await consumer.unsubscribe()
    finally:
        await nc.close()
