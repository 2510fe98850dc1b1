"""The results stream is trimmed by worker maintenance to about CHARGING_RESULTS_MAXLEN,
and never past an outcome a group named in CHARGING_RESULTS_GROUPS has not read and
acked. Trimming drops whole stream nodes (at most 100 entries or 4 KB each, the server
defaults), so lengths here are checked to within one node."""

from __future__ import annotations

from charging import codec
from charging.keys import Keys
from producer import Producer
from worker.loop import Worker

NODE = 100  # stream-node-max-entries: no node holds more


def outcomes(client, settings, n: int) -> list[str]:
    """n outcomes on the results stream (authorize writes one each); returns their ids."""
    codec.set_balances(client, settings, [("account1", n)])
    producer = Producer(client, settings)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        codec.settle(pipe, settings, producer.prepare({"request_id": f"o-{i}", "account": "account1",
                                                           "amount": 1}), 1)
    pipe.execute()
    return [eid.decode() for eid, _ in client.xrange(Keys(settings.namespace, 0).results)]


def read_and_ack(client, stream: str, group: str, read: int, ack: int) -> list[str]:
    reply = client.xreadgroup(group, "subscriber", {stream: ">"}, count=read)
    ids = [eid.decode() for eid, _ in reply[0][1]]
    client.xack(stream, group, *ids[:ack])
    return ids


def maintain(client, settings) -> None:
    """What a running worker does every maintenance_interval_s."""
    worker = Worker(client, settings, "upkeep")
    worker.ensure_groups()
    worker.maintain()


def test_without_subscriber_groups_results_are_kept_to_about_maxlen(client, settings):
    settings = settings.model_copy(update={"results_maxlen": 200})
    outcomes(client, settings, 1000)

    maintain(client, settings)

    assert 200 <= client.xlen(Keys(settings.namespace, 0).results) < 200 + NODE


def test_an_outcome_a_configured_group_has_not_read_and_acked_is_never_trimmed(client, settings):
    settings = settings.model_copy(update={"results_maxlen": 100, "results_groups": "billing"})
    results = Keys(settings.namespace, 0).results
    ids = outcomes(client, settings, 1000)
    client.xgroup_create(results, "billing", id="0")
    client.xgroup_create(results, "adhoc", id="0")  # not configured: holds nothing back

    maintain(client, settings)
    assert client.xlen(results) == 1000, "billing has read nothing yet"

    delivered = read_and_ack(client, results, "billing", read=500, ack=350)
    maintain(client, settings)

    kept = [eid.decode() for eid, _ in client.xrange(results)]
    oldest_unacked = delivered[350]
    assert kept == ids[len(ids) - len(kept):], "only the oldest entries go"
    assert oldest_unacked in kept and 1000 - 350 <= len(kept) < 1000 - 350 + NODE


def test_trimming_waits_for_every_configured_group_and_stops_near_maxlen(client, settings):
    settings = settings.model_copy(update={"results_maxlen": 600, "results_groups": "billing,audit"})
    results = Keys(settings.namespace, 0).results
    outcomes(client, settings, 1000)
    client.xgroup_create(results, "billing", id="0")

    read_and_ack(client, results, "billing", read=1000, ack=1000)
    maintain(client, settings)
    assert client.xlen(results) == 1000, "audit does not exist yet, and will read from the start"

    client.xgroup_create(results, "audit", id="$")  # made at the end: it needs nothing older
    maintain(client, settings)
    assert 600 <= client.xlen(results) < 600 + NODE, "groups are done, maxlen still keeps the newest"
