"""A recording stand-in for `tbo_streams.StreamOps`: stream names and numbered events in one log."""

from __future__ import annotations

from contextlib import contextmanager


class FakeStreams:
    """Streams are the names "compute" / "comm", events are numbers; everything lands in one log."""

    def __init__(self, log: list):
        self.log, self.current, self.events = log, "compute", 0
        self.kept: dict[str, set[int]] = {"compute": set(), "comm": set()}

    def current_stream(self):
        return "compute"

    def comm_stream(self):
        return "comm"

    def record(self, stream):
        self.events += 1
        self.log.append(("record", stream, self.events))
        return self.events

    def wait(self, stream, event):
        self.log.append(("wait", stream, event))

    @contextmanager
    def use(self, stream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def keep(self, tensor, stream):
        self.kept[stream].add(id(tensor))
