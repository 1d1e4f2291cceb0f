"""Replay: recorded history through the same pure core, under the recorded or a candidate policy."""

from nexuscore.replay._columnar import replay
from nexuscore.replay._html import render_replay_html
from nexuscore.replay._kafka import project_log
from nexuscore.replay._replay import Change, ReplayReport, replay_reference

__all__ = ["Change", "ReplayReport", "project_log", "render_replay_html", "replay", "replay_reference"]
