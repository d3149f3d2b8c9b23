"""Secrets out of what the project writes: a recorded command line, a model card, a results file.

A token passed as `--hub_token hf_...` (a standard `TrainingArguments` flag) would otherwise be copied verbatim into
every card and results file that records the command. `redact_argv` replaces the value of every `--*_token` flag, in
both the `--flag value` and `--flag=value` forms; `redact_text` replaces anything shaped like a Hugging Face token
(`hf_` and 20 or more letters or digits) in free text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

REDACTED = "<redacted>"
#: A Hugging Face access token: `hf_` and (today) 34 letters and digits; 20 or more is what we match.
HUB_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
_TOKEN_FLAG = re.compile(r"^--?[A-Za-z0-9_.-]*token$")


def redact_argv(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of every `--*_token` flag (and `--token`) and every Hub-token-shaped string replaced."""
    out, hide_next = [], False
    for arg in map(str, argv):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if _TOKEN_FLAG.match(flag):
            if eq:
                out.append(f"{flag}={REDACTED}")
            else:
                out.append(arg)
                hide_next = True
            continue
        out.append(redact_text(arg))
    return out


def redact_text(text: str) -> str:
    """`text` with every Hub-token-shaped string replaced."""
    return HUB_TOKEN.sub(REDACTED, text)
