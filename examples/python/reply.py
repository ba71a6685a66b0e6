#!/usr/bin/env python3
"""Send one command to cmdproc with the `replyto` extension and print its reply.

The command is a structured-mode CloudEvent keyed by its subject (the aggregate id) and
partitioned with murmur2, as every cmdproc producer does. The workers answer on the reply
topic with a `cmdproc.reply` CloudEvent keyed by the command's id; this script reads the one
partition of the reply topic that murmur2 gives that id, from where it ends now, and picks
the reply for its own command.

    python reply.py --type account.Deposit --subject acc-1 --data '{"amount": 500}'

Prints the reply's data as one JSON line and exits like `cmdproc produce --wait`:
0 applied, 3 rejected or key reused, 4 dead-lettered or skipped, 5 no reply in time,
1 any other error (no broker, no reply topic, the command not accepted by the broker).
"""

import argparse
import json
import sys
import time
import uuid
from datetime import datetime, timezone

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

EXIT_APPLIED = 0
EXIT_ERROR = 1
EXIT_REJECTED = 3
EXIT_DEAD_LETTERED = 4
EXIT_TIMED_OUT = 5

EXIT_BY_OUTCOME = {
    "applied": EXIT_APPLIED,
    "rejected": EXIT_REJECTED,
    "key_reused": EXIT_REJECTED,
    "dead_lettered": EXIT_DEAD_LETTERED,
    "skipped": EXIT_DEAD_LETTERED,
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--brokers", default="127.0.0.1:9092", help="Kafka bootstrap servers")
    p.add_argument("--topic", default="commands", help="the commands topic")
    p.add_argument("--reply-topic", help="where the reply goes (default: <topic>.replies)")
    p.add_argument("--type", required=True, help="command type, e.g. account.Deposit")
    p.add_argument("--subject", required=True, help="aggregate id, e.g. acc-1")
    p.add_argument("--data", default="{}", help="the command's data as JSON")
    p.add_argument("--id", default=None, help="command id (default: a new UUID)")
    p.add_argument("--source", default="/python-example", help="the sender, a URI-reference")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the reply")
    return p.parse_args()


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def murmur2(data):
    """Kafka's murmur2 hash (the Java client's default partitioner, and cmdproc's)."""
    seed, m, r = 0x9747B28C, 0x5BD1E995, 24
    length = len(data)
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = length - length % 4
    extra = length % 4
    if extra >= 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def partition_for(key, partitions):
    """The partition the murmur2 partitioner gives `key`: where the reply to it lands."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def start_reading(consumer, topic, command_id, timeout):
    """Assigns the reply topic's partition for `command_id` at its current end, before the
    command is produced: the reply is written after that, so it is read, and older replies
    are not. The reply is keyed by the command's id, so only that partition can hold it."""
    metadata = consumer.list_topics(topic, timeout=timeout)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        fail(f"reply topic `{topic}` does not exist; create it with `cmdproc topics create`")
    partition = partition_for(command_id.encode(), len(found.partitions))
    _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout)
    consumer.assign([TopicPartition(topic, partition, high)])


def produce(brokers, topic, command, timeout):
    producer = Producer(
        {
            "bootstrap.servers": brokers,
            "enable.idempotence": True,
            "acks": "all",
            # The partitioner of the Java client and of cmdproc: the same key lands on the
            # same partition whichever client sent it.
            "partitioner": "murmur2_random",
        }
    )
    delivered = {}

    def on_delivery(error, message):
        delivered["error"] = error
        delivered["where"] = (message.partition(), message.offset())

    producer.produce(
        topic,
        key=command["subject"].encode(),
        value=json.dumps(command).encode(),
        headers=[("content-type", b"application/cloudevents+json")],
        on_delivery=on_delivery,
    )
    producer.flush(timeout)
    if "error" not in delivered:
        fail(f"the broker at {brokers} did not acknowledge the command within {timeout}s")
    if delivered["error"] is not None:
        fail(f"producing the command failed: {delivered['error']}")
    return delivered["where"]


def wait_for_reply(consumer, command, timeout):
    deadline = time.monotonic() + timeout
    want_key = command["id"].encode()
    while (left := deadline - time.monotonic()) > 0:
        message = consumer.poll(min(left, 0.5))
        if message is None:
            continue
        if message.error() is not None:
            raise KafkaException(message.error())
        if message.key() != want_key:
            continue
        try:
            event = json.loads(message.value())
        except (TypeError, ValueError):
            continue
        reply = event.get("data") if event.get("type") == "cmdproc.reply" else None
        # The key is the command id alone: another sender's command with the same id is told
        # apart by its source.
        if reply and reply.get("command") == {"source": command["source"], "id": command["id"]}:
            return reply
    return None


def main():
    args = parse_args()
    try:
        data = json.loads(args.data)
    except ValueError as e:
        fail(f"--data is not valid JSON: {e}")
    reply_topic = args.reply_topic or f"{args.topic}.replies"
    command = {
        "specversion": "1.0",
        "id": args.id or str(uuid.uuid4()),
        "source": args.source,
        "type": args.type,
        "subject": args.subject,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "replyto": reply_topic,
        "data": data,
    }
    consumer = Consumer(
        {
            "bootstrap.servers": args.brokers,
            # Partitions are assigned by hand: the group is never joined nor committed.
            "group.id": f"reply-example-{uuid.uuid4()}",
            "enable.auto.commit": False,
            # Replies are published in Kafka transactions: read only committed ones.
            "isolation.level": "read_committed",
        }
    )
    try:
        start_reading(consumer, reply_topic, command["id"], args.timeout)
        partition, offset = produce(args.brokers, args.topic, command, args.timeout)
        print(
            f"sent {command['id']} {command['type']} {command['subject']} "
            f"-> partition {partition} offset {offset}",
            file=sys.stderr,
        )
        reply = wait_for_reply(consumer, command, args.timeout)
    except KafkaException as e:
        fail(f"kafka: {e}")
    finally:
        consumer.close()
    if reply is None:
        print(f"no reply for {command['id']} within {args.timeout}s on {reply_topic}", file=sys.stderr)
        return EXIT_TIMED_OUT
    print(json.dumps(reply, sort_keys=True))
    return EXIT_BY_OUTCOME.get(reply.get("outcome"), EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
