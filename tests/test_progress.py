"""The partition watermark over out-of-order completions."""

from hypothesis import given
from hypothesis import strategies as st

from daemon.progress import PartitionProgress


def test_the_watermark_waits_for_the_oldest_message_in_flight():
    p = PartitionProgress(10)
    for seq in (11, 12, 13, 14):
        p.fetched(seq)
    p.settled(13)
    p.settled(12)
    assert p.watermark == 10  # 11 is still in flight
    p.fetched(12)  # a redelivery of a settled one changes nothing
    p.settled(11)
    assert p.watermark == 13
    p.settled(14)
    assert p.watermark == 14 and len(p) == 0


@given(st.permutations(list(range(1, 40))))
def test_the_watermark_is_always_the_longest_settled_prefix(order):
    p = PartitionProgress(0)
    for seq in range(1, 40):
        p.fetched(seq)
    done = set()
    for seq in order:
        p.settled(seq)
        done.add(seq)
        prefix = 0
        while prefix + 1 in done:
            prefix += 1
        assert p.watermark == prefix
