"""Replay: recorded history through the same pure core, under the recorded or a candidate policy."""

from nexuscore.replay._replay import Change, ReplayReport, replay

__all__ = ["Change", "ReplayReport", "replay"]
