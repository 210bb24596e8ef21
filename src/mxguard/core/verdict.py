"""Score -> action, once per message, after every check ran (``[actions]``).

Scoring model (like rspamd's): every check emits symbols with scores; the
total picks one action, strongest first: ``reject``, ``greylist`` (defer
once), ``rewrite_subject``, ``add_header``; a threshold of 0 turns that action
off. Hard decisions of checks (HELO, greylisting, SPF, DMARC rejects) are
already in the Verdict and win by rank over a weaker score action.
"""

from __future__ import annotations

from typing import Any

from mxguard.core.transaction import (
    Action,
    CheckResult,
    Decision,
    HeaderChange,
    Message,
    Mode,
    Verdict,
)

NO_ACTION = "no action"
ACTIONS = ("reject", "greylist", "rewrite_subject", "add_header")  # strongest first
NAME = "actions"  # the Verdict's decided_by when a score action decides


def choose_action(score: float, actions: Any) -> str:
    """The strongest action whose threshold (non-zero) the score reaches."""
    for name in ACTIONS:
        threshold = float(getattr(actions, name))
        if threshold and score >= threshold:
            return name
    return NO_ACTION


def is_spam(score: float, actions: Any) -> bool:
    return bool(actions.add_header) and score >= actions.add_header


def printable(text: str, limit: int = 400) -> str:
    """Text safe for an SMTP reply: printable ASCII, one line, bounded."""
    return " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())[:limit]


def decision_for(action: str, score: float, cfg: Any) -> Decision | None:
    """The hard decision for ``reject`` (550 5.7.1) and ``greylist`` (451 4.7.1)."""
    if action == "reject":
        try:
            text = cfg.actions.reject_text.format(score=f"{score:.1f}",
                                                  required=f"{cfg.actions.reject:.1f}")
        except (KeyError, IndexError, ValueError):
            text = f"Message rejected as spam (score {score:.1f})"
        return Decision(Action.REJECT, 550, "5.7.1", printable(text))
    if action == "greylist":
        return Decision(Action.DEFER, 451, "4.7.1",
                        "Message looks like spam, please try again later")
    return None


def subject_change(headers: list[tuple[str, str]], tag: str) -> HeaderChange | None:
    """The tagged Subject (not tagged twice); an added Subject when there is none."""
    if not tag:
        return None
    for name, value in headers:
        if name.strip().lower() == "subject":
            current = value.lstrip(" ")
            if current.startswith(tag.strip()):
                return None
            return HeaderChange.change("Subject", " " + tag + current
                                       if value.startswith(" ") else tag + current)
    return HeaderChange.add("Subject", tag.strip())


def apply_actions(verdict: Verdict, message: Message | None, cfg: Any, mode: Mode) -> str:
    """Pick the action for the verdict's total score and merge it under ``mode``;
    returns the action's name (``verdict.extra["spam_action"]``)."""
    total = round(verdict.score, 3)
    action = choose_action(total, cfg.actions)
    result = CheckResult(NAME, decision=decision_for(action, total, cfg),
                         extra={"spam_action": action, "score_total": f"{total:g}"})
    tag_at = cfg.actions.rewrite_subject
    if tag_at and total >= tag_at and action not in ("reject", "greylist"):
        change = subject_change(list(message.headers) if message else [],
                                cfg.content.subject_tag)
        if change is not None:
            result.edits.append(change)
    verdict.add(result, mode)
    return action


__all__ = ["ACTIONS", "NO_ACTION", "apply_actions", "choose_action", "decision_for", "is_spam",
           "printable", "subject_change"]
