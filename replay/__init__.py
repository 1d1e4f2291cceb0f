"""Replay: recorded history through the same pure core, under the recorded or a candidate policy."""

from nexuscore.replay._columnar import fold_history, replay
from nexuscore.replay._html import render_replay_html
from nexuscore.replay._kafka import project_log
from nexuscore.replay._load import History, load_history
from nexuscore.replay._replay import Change, ReplayReport, replay_reference

__all__ = [
    "Change",
    "History",
    "ReplayReport",
    "load_history",
    "project_log",
    "render_replay_html",
    "replay",
    "fold_history",
    "replay_reference",
]
