"""What a worker applies: one protocol for every item of work in its pipeline.

Four kinds of item travel from intake through the ordering ring (or straight
to enrolment), the batcher and settling, each standing for what a `Unit`
commits:

- `message`: a JetStream message, from the triggers stream or a partition of
  the execution stream (`daemon/pull.py` `Delivery`); acked once it commits.
- `trigger_part`: one event of a trigger batch message (`daemon/enrolment.py`
  `BatchPart`); the message is acked once its last part commits.
- `timer`: a due timer (`daemon/timers.py` `TimerFire`); its row goes with
  the commit of what it causes.
- `local_result`: an in-process action's result (`daemon/local_results.py`
  `LocalResult`); never in a stream, nothing to ack.

Every item has every attribute below, so the pipeline reads them and never
tests an item's type: what differs by kind is decided on `kind`.
"""

from typing import Literal, Protocol

from ledger.batcher import Source

Kind = Literal["message", "trigger_part", "timer", "local_result"]


class WorkItem(Source, Protocol):
    """An item of work; with the `Source` attributes a dead letter of it records (key, subject,
    stream, stream_seq, data, batch_index)."""

    @property
    def kind(self) -> Kind:
        """What it is, and so how it settles (see the module docstring)."""

    @property
    def key(self) -> str | None:
        """The ordering-ring key (its execution's id) while it holds it; None when it holds none
        (a trigger, or a message that could not be decoded)."""

    @property
    def partition(self) -> int:
        """The execution-stream partition it was fetched from, whose watermark waits for it (-1: none)."""

    @property
    def reply(self) -> str | None:
        """The subject that acks it (None: nothing of its own to ack)."""

    @property
    def delivered(self) -> int:
        """How many times JetStream has delivered it (1 for what never was in a stream)."""
