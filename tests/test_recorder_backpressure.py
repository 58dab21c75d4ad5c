"""The recorder's back-pressure on a live session (broker/live.py): a resume that reaches the loop late must not
undo a newer pause.

The writer thread schedules ``_recorder_caught_up`` with ``call_soon_threadsafe`` when it is back under its mark;
before it runs, the loop may append again and pause the writer once more (the holds are still on, so nothing new
is held). Releasing then would let every channel read on while the writer stays paused, with no pause to come:
in the full bench every SFTP and scp upload of 256 MiB grew the backlog past its 64 MiB limit and the recording
failed ("recording failed (write failed)", strict mode ends the session). Driven here with a real
RecordingWriter and real ``Holds`` bookkeeping, without a network.
"""

from __future__ import annotations

from types import SimpleNamespace

from broker.live import LiveSession
from sessions.holds import Holds


class _Relay:
    """The two calls LiveSession makes on a channel, over the real Holds bookkeeping."""

    def __init__(self) -> None:
        self.reading = {"vendor": True, "device": True}
        chans = {side: SimpleNamespace(pause_reading=lambda s=side: self.reading.__setitem__(s, False),
                                       resume_reading=lambda s=side: self.reading.__setitem__(s, True))
                 for side in ("vendor", "device")}
        self.holds = Holds(chans.get)

    def hold(self, side: str, reason: str) -> None:
        self.holds.hold(side, reason)

    def release(self, side: str, reason: str) -> None:
        self.holds.release(side, reason)


def _session(paused: bool) -> SimpleNamespace:
    relay = _Relay()
    live = SimpleNamespace(recorder=SimpleNamespace(paused=paused), channels={relay}, relay=relay)
    return live


def test_a_late_resume_does_not_release_a_newer_pause():
    live = _session(paused=True)
    LiveSession._recorder_behind(live)  # the first pause: reading stops
    assert live.relay.reading == {"vendor": False, "device": False}
    # the writer caught up and scheduled the resume; the loop paused it again before the resume ran
    LiveSession._recorder_behind(live)
    LiveSession._recorder_caught_up(live)  # the late resume: the writer is paused, so reading stays stopped
    assert live.relay.reading == {"vendor": False, "device": False}
    live.recorder.paused = False  # the writer's own resume for the newer pause
    LiveSession._recorder_caught_up(live)
    assert live.relay.reading == {"vendor": True, "device": True}


def test_a_resume_with_the_writer_running_releases_every_channel():
    live = _session(paused=False)
    LiveSession._recorder_behind(live)
    LiveSession._recorder_caught_up(live)
    assert live.relay.reading == {"vendor": True, "device": True}
