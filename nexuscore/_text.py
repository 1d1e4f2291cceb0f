"""Text that came from outside (prompts, reasons, reviewer names, file contents), made safe to show.

The CLI prints such values through rich, which reads ``[...]`` as markup (``[/x]`` crashes the
print, ``[red]`` restyles what follows), and to a terminal, which obeys escape sequences (clear the
screen, move the cursor, set the title, rewrite what a reviewer reads). ``safe_text`` keeps the
characters and drops the control: what is shown is what was recorded, minus anything that acts.
"""

from __future__ import annotations

import re

from rich.markup import escape
from rich.text import Text

# Whole escape sequences first, so that their parameters do not remain as stray text: CSI
# (ESC [ or 0x9b, parameters, intermediates, a final byte), string controls (OSC, DCS, SOS, PM, APC:
# ESC ] P X ^ _ or their 8-bit forms, up to BEL or the string terminator), and any other ESC
# sequence (intermediates and a final byte).
_ESCAPES = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)"
    r"|\x1b[ -/]*[0-~]"
)
# Line and tab breaks become spaces: the value stays on the line (and in the cell) it belongs to.
_BREAKS = re.compile(r"[\t\n\v\f\r\x85\u2028\u2029]")
# What is left that acts rather than shows: C0, DEL, C1 (a lone ESC among them), and the bidi
# overrides and isolates, which reorder what is displayed so that it reads as something else.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def safe_text(value: object) -> str:
    """``value`` as one line of plain text for rich: no control characters, no escape sequences,
    and its square brackets escaped so that rich shows them instead of reading them as markup.

    rich.markup.escape doubles a trailing backslash (so that markup appended after the value is not
    escaped by it); a value ending in one backslash is shown with two.
    """
    text = value if isinstance(value, str) else str(value)
    text = _ESCAPES.sub("", text)
    text = _BREAKS.sub(" ", text)
    text = _CONTROLS.sub("", text)
    return escape(text)


def safe_rich_text(value: object) -> Text:
    """``safe_text`` as a rich Text, for a table cell or title: shown literally, and with emoji
    codes such as ``:x:`` left as typed rather than turned into pictures."""
    return Text.from_markup(safe_text(value), emoji=False)
