"""The checks and the one pipeline table that drives them at every stage of
both doors (policy delegation, milter) and ``mxguard scan``.

Read the table like Haraka's ``config/plugins``: order within a stage is
execution order. Adding a check is one file in this package plus one row.
``mode_key`` names the config section whose ``mode`` (enforce | score |
observe | off) applies; ``enabled`` switches a row off by other keys. The
runner (:mod:`mxguard.core.runner`) owns mode, time budget, error capture,
timing and the log line; the core applies ``[actions]`` after the EOM rows
and before the DONE rows.
"""

from __future__ import annotations

from mxguard.checks import (
    authresults,
    bayes,
    dkim_sign,
    dkim_verify,
    dmarc,
    dmarc_failure,
    dnsbl,
    explain_header,
    greylist,
    helo,
    report_safe,
    rules,
    spam_headers,
    spf,
)
from mxguard.config import Config
from mxguard.core import runner
from mxguard.core.runner import CheckSpec, Direction, Pipeline
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Mode, Stage, Transaction, Verdict

IN, OUT = Direction.INCOMING, Direction.OUTGOING


def _content_on(cfg: Config) -> bool:
    return cfg.mode("content") is not Mode.OFF


PIPELINE = Pipeline(
    rows=(
        CheckSpec("helo", Stage.HELO, "helo", helo.check,
                  "HELO/EHLO syntax, FQDN and DNS checks with Postfix's reply codes",
                  ("HELO_INVALID", "HELO_NOT_FQDN", "HELO_BARE_IP", "HELO_UNKNOWN",
                   "HELO_DNS_TEMPFAIL"), "[helo]"),
        # SPF before greylisting: an SPF fail is rejected without greylisting and
        # an SPF pass can shorten it.
        CheckSpec("spf", Stage.RCPT, "spf", spf.check,
                  "SPF of the HELO and MAIL FROM identities (RFC 7208), Received-SPF",
                  ("SPF_PASS", "SPF_FAIL", "SPF_SOFTFAIL", "SPF_NEUTRAL", "SPF_NONE",
                   "SPF_PERMERROR", "SPF_TEMPERROR", "SPF_HELO_PASS", "SPF_HELO_FAIL",
                   "SPF_HELO_SOFTFAIL", "SPF_SKIPPED"), "[spf]",
                  budget=lambda cfg: cfg.spf.timeout + 1.0),
        CheckSpec("greylist", Stage.RCPT, "greylist", greylist.check,
                  "greylisting of (client network, sender, recipient) triplets",
                  ("GREYLIST_DEFERRED", "GREYLIST_PASSED", "GREYLIST_WHITELISTED",
                   "GREYLIST_AUTO_WHITELISTED"), "[greylist]"),
        CheckSpec(dkim_sign.NAME, Stage.EOM, None, dkim_sign.check,
                  "DKIM-sign outgoing mail once, with every key of the From domain",
                  dkim_sign.SYMBOLS, "[dkim] sign, keys", OUT,
                  enabled=lambda cfg: cfg.dkim.sign and cfg.mode("dkim") is not Mode.OFF),
        CheckSpec("spf", Stage.EOM, "spf", spf.at_end_of_message,
                  "the policy door's SPF result for this message (or computed now)",
                  (), "[spf]", IN, budget=lambda cfg: cfg.spf.timeout + 1.0),
        CheckSpec(dkim_verify.NAME, Stage.EOM, "dkim", dkim_verify.check,
                  "verify every DKIM signature (RFC 6376, 8301, 8463)",
                  dkim_verify.SYMBOLS, "[dkim] verify", IN,
                  enabled=lambda cfg: cfg.dkim.verify),
        CheckSpec(dmarc.NAME, Stage.EOM, "dmarc", dmarc.check,
                  "the From domain's DMARC policy on the SPF and DKIM results",
                  dmarc.SYMBOLS, "[dmarc]", IN),
        CheckSpec(authresults.NAME, Stage.EOM, None, authresults.check,
                  "Authentication-Results at the top; forged ones with our authserv-id removed",
                  (), "[milter] authserv_id", IN),
        CheckSpec(dnsbl.NAME, Stage.EOM, "dnsbl", dnsbl.check,
                  "DNS blocklists of the client IP and the body's URI domains",
                  dnsbl.SYMBOLS, "[dnsbl]", IN, budget=lambda cfg: cfg.dnsbl.timeout + 1.0),
        CheckSpec(bayes.NAME, Stage.EOM, "content", bayes.check,
                  "the Bayes classifier (once min_spam / min_ham are learned)",
                  bayes.SYMBOLS, "[bayes]", IN,
                  enabled=lambda cfg: cfg.bayes.enabled and _content_on(cfg)),
        CheckSpec(rules.NAME, Stage.EOM, "content", rules.check,
                  "the content rules (built-in and SpamAssassin .cf)",
                  rules.SYMBOLS, "[content]", IN, enabled=_content_on),
        CheckSpec(bayes.AUTOLEARN, Stage.DONE, "content", bayes.autolearn,
                  "learn clearly-spam / clearly-ham mail in the background", (),
                  "[bayes] autolearn, autolearn_spam, autolearn_ham", IN,
                  enabled=lambda cfg: cfg.bayes.enabled and _content_on(cfg)),
        CheckSpec(dmarc_failure.NAME, Stage.DONE, "dmarc", dmarc_failure.check,
                  "DMARC failure reports (RFC 9991) to ruf= addresses, rate-limited, sent in "
                  "the background", (), "[dmarc] failure_reports", IN,
                  enabled=lambda cfg: cfg.dmarc.failure_reports),
        CheckSpec(spam_headers.NAME, Stage.DONE, "content", spam_headers.check,
                  "X-Spam-Flag, X-Spam-Status, X-Spam-Level (X-Spam-Report)", (),
                  "[content] header_prefix, add_report", IN, enabled=_content_on),
        CheckSpec(report_safe.NAME, Stage.DONE, "content", report_safe.check,
                  "wrap delivered spam in a report, the original attached", (),
                  "[content] report_safe", IN,
                  enabled=lambda cfg: cfg.content.report_safe and _content_on(cfg)),
        CheckSpec(explain_header.NAME, Stage.DONE, None, explain_header.check,
                  "X-Mxguard-Reason: the action, the deciding check and the top symbols", (),
                  "[milter] explain_header", IN, enabled=lambda cfg: cfg.milter.explain_header),
    ),
    outgoing=dkim_sign.outgoing,
    actions_mode="content",  # the score actions follow [content] mode
)


async def evaluate(tx: Transaction, rt: Runtime, upto: Stage,
                   after: Stage | None = None) -> Verdict:
    """The policy door's run: the rows of the stages ``(after, upto]``."""
    return await runner.evaluate(tx, rt, PIPELINE, upto, after)


async def run_message(tx: Transaction, rt: Runtime) -> Verdict:
    """End of message: the EOM rows, the score actions, the DONE rows."""
    return await runner.run_message(tx, rt, PIPELINE)


__all__ = ["PIPELINE", "evaluate", "run_message"]
