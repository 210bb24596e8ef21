"""One typed, validated configuration object, loaded from one TOML file.

Every option has an embedded default, so ``mxguard serve`` starts without a
file. Each section is a frozen dataclass; each field carries its bounds and a
one-line doc in ``metadata`` (like Postfix's ``{name, default, min, max}``
tables). Loading rejects unknown keys, wrong types and out-of-range values
with one message naming the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mxguard.core.transaction import Mode
from mxguard.redact import redact, remember

DAY = 86400


class ConfigError(Exception):
    """A configuration problem, phrased for the admin (file, key, allowed values);
    a password in a value it quotes is masked."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


def opt(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
        choices: tuple[str, ...] | None = None) -> Any:
    """A config field: default, one-line doc, optional bounds or allowed values."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_state_dir() -> str:
    """``/var/lib/mxguard`` for root, else ``$XDG_STATE_HOME/mxguard`` (~/.local/state)."""
    if os.geteuid() == 0:
        return "/var/lib/mxguard"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "mxguard")


MODE_DOC = "enforce | score | observe | off"

# The names of the pipeline's checks (mxguard.checks.PIPELINE; a test keeps the two
# equal), for keys that name checks. Config knows no check module.
CHECK_NAMES = ("authresults", "autolearn", "bayes", "dkim_sign", "dkim_verify", "dmarc",
               "dmarc_failure",
               "dnsbl", "explain_header",
               "greylist", "helo", "report_safe", "rules", "spam_headers", "spf")

# Default score of every symbol a check can emit; [scores] in the file overrides.
SYMBOL_SCORES: dict[str, float] = {
    "HELO_INVALID": 3.0,
    "HELO_NOT_FQDN": 2.0,
    "HELO_BARE_IP": 2.0,
    "HELO_UNKNOWN": 1.5,
    "HELO_DNS_TEMPFAIL": 0.0,
    "GREYLIST_DEFERRED": 0.0,
    "GREYLIST_PASSED": 0.0,
    "GREYLIST_WHITELISTED": 0.0,
    "GREYLIST_AUTO_WHITELISTED": 0.0,
    "SPF_PASS": -0.5,
    "SPF_FAIL": 5.0,
    "SPF_SOFTFAIL": 2.0,
    "SPF_NEUTRAL": 0.5,
    "SPF_NONE": 0.5,
    "SPF_PERMERROR": 1.0,
    "SPF_TEMPERROR": 0.0,
    "SPF_HELO_PASS": 0.0,
    "SPF_HELO_FAIL": 3.0,
    "SPF_HELO_SOFTFAIL": 1.0,
    "SPF_SKIPPED": 0.0,
    "DKIM_VALID": -0.1,
    "DKIM_INVALID": 1.0,
    "DKIM_NONE": 0.0,
    "DKIM_TEMPFAIL": 0.0,
    "DKIM_PERMFAIL": 0.5,
    "DKIM_WEAK": 0.5,
    "DKIM_SIGNED": 0.0,
    "DMARC_PASS": -0.5,
    "DMARC_REJECT": 5.0,
    "DMARC_QUARANTINE": 3.0,
    "DMARC_NONE_FAIL": 1.0,
    "DMARC_NO_POLICY": 0.0,
    "DMARC_TEMPERROR": 0.0,
    "DMARC_PERMERROR": 0.5,
    # Bayes, tuned on the corpus train split (see content/bayes.py BAYES_SCORES)
    "BAYES_00": -1.5,
    "BAYES_05": -0.5,
    "BAYES_20": -0.1,
    "BAYES_40": 0.0,
    "BAYES_50": 1.0,
    "BAYES_60": 1.5,
    "BAYES_80": 3.5,
    "BAYES_95": 3.5,
    "BAYES_99": 5.0,
    "BAYES_999": 5.0,
}


@dataclass(frozen=True)
class ServerConfig:
    state_dir: str = opt("", "directory for state (SQLite, keys); empty: /var/lib/mxguard "
                         "as root, else ~/.local/state/mxguard")
    shutdown_grace: float = opt(10.0, "seconds SIGTERM waits for in-flight requests", lo=0, hi=600)
    workers: int | str = opt(1, '"auto" (one per core) or a number of worker processes '
                             "sharing the listening sockets; 1: one process, no master")


@dataclass(frozen=True)
class PolicyConfig:
    listen: str = opt("127.0.0.1:10023", 'policy delegation socket: "host:port" or "unix:/path"')
    fail_action: str = opt("DUNNO", "answer when a check fails internally (storage, bug)",
                           choices=("DUNNO", "DEFER_IF_PERMIT", "DEFER"))
    max_request_bytes: int = opt(65536, "longest request (and line) accepted before the "
                                 "connection is closed", lo=1024, hi=16 * 1024 * 1024)
    max_attributes: int = opt(256, "most attributes in one request", lo=16, hi=100000)
    max_buffered_total: int = opt(16777216, "bytes of incomplete requests held for all "
                                  "policy connections together; past it the connection "
                                  "holding the most is closed (logged)", lo=1 << 20, hi=1 << 34)
    idle_timeout: float = opt(600.0, "seconds an idle connection is kept (Postfix's own "
                              "smtpd_policy_service_max_idle is 300)", lo=1, hi=86400)
    max_connections: int = opt(20000, "concurrent connections served; more are closed",
                               lo=1, hi=1000000)


@dataclass(frozen=True)
class PipelineConfig:
    check_timeout: float = opt(30.0, "seconds one check may take (SPF and blocklists: their own "
                               "timeout); beyond it the check ends as NAME_TIMEOUT and its "
                               "error behaviour applies", lo=0.05, hi=600)
    tempfail_on_error: list[str] = opt([], "end-of-message checks whose error or timeout "
                                       "tempfails the message (451 4.3.0); the others are "
                                       "skipped with a NAME_ERROR symbol and a log line; "
                                       "policy-stage checks answer [policy] fail_action")


@dataclass(frozen=True)
class DnsConfig:
    nameservers: list[str] = opt([], 'resolvers as "host" or "host:port"; empty: '
                                 "/etc/resolv.conf")
    timeout: float = opt(5.0, "seconds per query (all retries)", lo=0.05, hi=120)
    cache_size: int = opt(20000, "answers kept in the TTL cache (0 disables)", lo=0, hi=10**7)
    negative_ttl_max: int = opt(3600, "longest time a negative answer is cached", lo=0, hi=DAY)


@dataclass(frozen=True)
class StorageConfig:
    url: str = opt("", 'state store: "sqlite:///path/mxguard.db", "redis://[:password@]host:'
                   'port/db", "rediss://...", "redis+sentinel://host:port,host:port/'
                   'mastername/db"; empty: sqlite under server.state_dir')
    busy_timeout: float = opt(2.0, "seconds a SQLite write waits for a lock", lo=0, hi=60)
    redis_timeout: float = opt(1.0, "seconds a Redis command may take before the fail mode "
                               "applies", lo=0.01, hi=60)
    fail_open_log_interval: float = opt(60.0, "seconds between repeated 'store unavailable' "
                                        "log lines", lo=1, hi=86400)


@dataclass(frozen=True)
class LogConfig:
    target: str = opt("stderr", "where decision lines go", choices=("stderr", "syslog"))
    level: str = opt("info", "least severity logged",
                     choices=("debug", "info", "warning", "error"))
    syslog_address: str = opt("/dev/log", 'syslog socket path or "host:port"')
    syslog_facility: str = opt("mail", "syslog facility",
                               choices=("mail", "daemon", "user", "local0", "local1", "local2",
                                        "local3", "local4", "local5", "local6", "local7"))


@dataclass(frozen=True)
class HeloConfig:
    mode: Mode = opt(Mode.ENFORCE, MODE_DOC)
    reject_invalid: bool = opt(True, "501 for a HELO that is not a valid hostname or "
                               "[address] (Postfix reject_invalid_helo_hostname)")
    reject_non_fqdn: bool = opt(True, "504 for a HELO that is not fully qualified, incl. a "
                                "bare IP (reject_non_fqdn_helo_hostname)")
    reject_unknown: bool = opt(True, "450 for a HELO with no A, AAAA or MX record "
                               "(reject_unknown_helo_hostname)")
    unknown_code: int = opt(450, "SMTP code for an unknown HELO name (Postfix "
                            "unknown_hostname_reject_code)", lo=400, hi=599)
    exempt_networks: list[str] = opt(["127.0.0.0/8", "::1/128"], "client CIDRs never checked")
    exempt_helo: list[str] = opt([], 'HELO patterns never checked: "*.local" (any client) or '
                                 '"*.local@192.0.2.0/24" / "*.corp@mail.example.com" (only '
                                 "from that client network or verified client name)")


@dataclass(frozen=True)
class GreylistConfig:
    mode: Mode = opt(Mode.ENFORCE, MODE_DOC)
    delay: int = opt(300, "seconds a new triplet is deferred", lo=0, hi=DAY)
    max_age: int = opt(35 * DAY, "seconds a passed triplet is remembered after last use",
                       lo=60, hi=365 * DAY)
    retry_window: int = opt(2 * DAY, "seconds after first sight a retry still counts",
                            lo=60, hi=30 * DAY)
    ipv4_prefix: int = opt(24, "client IPv4 network size of the triplet", lo=0, hi=32)
    ipv6_prefix: int = opt(64, "client IPv6 network size of the triplet", lo=0, hi=128)
    lookup_by_host: bool = opt(False, "use the exact client address, not its network")
    auto_whitelist_clients: int = opt(5, "successful deliveries after which a client is no "
                                      "longer greylisted (0 disables)", lo=0, hi=10000)
    auto_whitelist_interval: int = opt(3600, "a client's deliveries count at most once per "
                                       "this many seconds", lo=0, hi=DAY)
    default_whitelist: bool = opt(True, "use the shipped list of large senders that retry "
                                  "from address pools")
    client_whitelist_files: list[str] = opt([], "files of client IPs, CIDRs, domains, "
                                            "/regexes/ (reloaded on SIGHUP)")
    recipient_whitelist_files: list[str] = opt([], "files of recipients, domains, "
                                               "/regexes/ never greylisted")
    action: str = opt("DEFER_IF_PERMIT", "Postfix action for a greylisted request",
                      choices=("DEFER_IF_PERMIT", "DEFER"))
    text: str = opt("Greylisted, see {url}", "reply text; {url}, {seconds}, {recipient}, "
                    "{sender}, {client} are filled in")
    url: str = opt("https://en.wikipedia.org/wiki/Greylisting", "the {url} in text")
    header: bool = opt(True, "prepend X-Greylist on the first accepted retry")
    privacy: bool = opt(False, "store a keyed hash of each triplet instead of the addresses")
    expiry_batch: int = opt(500, "rows removed per expiry step (never one long sweep)",
                            lo=1, hi=100000)
    expiry_interval: float = opt(60.0, "seconds between expiry steps", lo=1, hi=DAY)
    skip_spf_pass_domains: list[str] = opt([], "sender domains (or *.parent) not greylisted "
                                           "when SPF passes")
    lookup_cache: float = opt(10.0, "seconds a passed triplet and a client's record read "
                              "from the store are reused in this process (0: ask the store "
                              "every time); writes always reach the store", lo=0, hi=300)


@dataclass(frozen=True)
class SpfConfig:
    mode: Mode = opt(Mode.ENFORCE, MODE_DOC)
    helo_check: bool = opt(True, "check the HELO identity first (RFC 7208 §2.3)")
    fail_action: str = opt("reject", "what an SPF fail of MAIL FROM does",
                           choices=("reject", "defer", "score"))
    helo_fail_action: str = opt("reject", "what an SPF fail of the HELO identity does",
                                choices=("reject", "defer", "score"))
    softfail_action: str = opt("score", "what a softfail does",
                               choices=("score", "defer", "reject"))
    neutral_action: str = opt("score", "what a neutral / none result does",
                              choices=("score", "defer", "reject"))
    permerror_action: str = opt("score", "what a permerror does",
                                choices=("score", "defer", "reject"))
    temperror_action: str = opt("score", "what a temperror does (defer answers 451 4.4.3)",
                                choices=("score", "defer"))
    fail_text: str = opt("SPF fail - not authorized: {explanation}", "reply text for a fail; "
                         "{explanation}, {sender}, {client}, {domain} are filled in")
    header: bool = opt(True, "prepend a Received-SPF header (RFC 7208 §9.1)")
    timeout: float = opt(20.0, "seconds one SPF evaluation may take in all", lo=0.1, hi=120)
    skip_networks: list[str] = opt([], "client CIDRs never SPF-checked (e.g. secondary MX)")
    skip_sender_domains: list[str] = opt([], "sender domains never SPF-checked")
    skip_helo_covers_client: bool = opt(False, "skip when the HELO name's A/AAAA covers the "
                                        "client address")
    skip_authenticated: bool = opt(True, "skip SASL-authenticated clients")
    result_cache_ttl: int = opt(600, "seconds a result is remembered for the same client, "
                                "HELO and sender (one evaluation per message)", lo=0, hi=DAY)


@dataclass(frozen=True)
class MilterConfig:
    enabled: bool = opt(True, "run the milter door (DKIM, DMARC, Authentication-Results)")
    listen: str = opt("127.0.0.1:10024", 'milter socket: "host:port" or "unix:/path"')
    fail_action: str = opt("tempfail", "answer when a check fails internally; tempfail keeps "
                           "the mail queued at the client", choices=("tempfail", "accept",
                                                                     "reject"))
    authserv_id: str = opt("", "authserv-id of Authentication-Results; empty: this host's name")
    max_body_memory: int = opt(1048576, "message bytes held in memory before spooling to a "
                               "temporary file", lo=4096, hi=1 << 30)
    max_scan_size: int = opt(10485760, "bytes of a message that content checks (rules, Bayes, "
                             "URIs) read; larger messages are scanned partially (logged); DKIM "
                             "always hashes the whole body", lo=65536, hi=1 << 31)
    max_message_size: int = opt(67108864, "bytes of a message (headers and body) kept in the "
                                "spool; a larger one gets limit_action (keep it above Postfix's "
                                "message_size_limit)", lo=65536, hi=1 << 34)
    max_headers: int = opt(2000, "header lines per message (real mail has fewer than 200); "
                           "more get limit_action", lo=100, hi=1000000)
    max_header_bytes: int = opt(1048576, "bytes of header per message; more get limit_action",
                                lo=65536, hi=1 << 30)
    limit_action: str = opt("reject", "answer to a message past max_message_size, max_headers "
                            "or max_header_bytes: reject (552 5.3.4), tempfail (452 4.3.4) or "
                            "accept (delivered unchecked); logged", choices=("reject",
                                                                             "tempfail",
                                                                             "accept"))
    max_packet: int = opt(262144, "largest milter packet accepted, else the connection is "
                          "closed (Postfix sends 64 KB body pieces and one header per packet, "
                          "at most header_size_limit, 102400)", lo=131072, hi=1 << 26)
    max_buffered_total: int = opt(33554432, "bytes of incomplete packets and unhandled "
                                  "commands held for all milter connections together; past it "
                                  "the connection holding the most is closed (logged)",
                                  lo=1 << 20, hi=1 << 34)
    idle_timeout: float = opt(600.0, "seconds an idle milter connection is kept", lo=1, hi=86400)
    max_connections: int = opt(20000, "concurrent milter connections", lo=1, hi=1000000)
    progress_interval: float = opt(5.0, "seconds between keep-alives while a check is slow",
                                   lo=0.5, hi=300)
    stage_timeout: float = opt(25.0, "seconds a check may take before end of message "
                               "(below Postfix's milter_command_timeout of 30 s)", lo=1, hi=600)
    explain_header: bool = opt(False, "add X-Mxguard-Reason: the deciding check and the top "
                               "symbols")
    eom_timeout: float = opt(240.0, "seconds the end-of-message checks may take (keep-alives "
                             "are sent meanwhile)", lo=1, hi=3600)


DEFAULT_SIGN_HEADERS = [
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Resent-Date", "Resent-From",
    "Resent-To", "Resent-Cc", "In-Reply-To", "References", "List-Id", "List-Help",
    "List-Unsubscribe", "List-Subscribe", "List-Post", "List-Owner", "List-Archive",
    "Message-ID", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
]


@dataclass(frozen=True)
class DkimConfig:
    mode: Mode = opt(Mode.ENFORCE, MODE_DOC + " (verification; DMARC decides on failures)")
    sign: bool = opt(True, "sign mail from internal_hosts and SASL-authenticated clients")
    verify: bool = opt(True, "verify DKIM signatures of incoming mail")
    keys: list[str] = opt([], 'KeyTable: "domain:selector:/path/to/private.key" (RSA or '
                          "Ed25519 PEM); several keys of one domain sign together (dual "
                          "signing)")
    signing_table: list[str] = opt([], 'SigningTable: "pattern domain", e.g. '
                                   '"*@example.com example.com", "*@*.example.com '
                                   'example.com"; empty: the From domain or its nearest parent '
                                   "with a key")
    internal_hosts: list[str] = opt(["127.0.0.0/8", "::1/128"], "client CIDRs whose mail is "
                                    "signed, not verified")
    sign_headers: list[str] = opt(DEFAULT_SIGN_HEADERS, "headers signed when present (RFC "
                                  "6376 §5.4)")
    oversign_headers: list[str] = opt(["From"], "headers signed once more than present, so "
                                      "none can be added")
    canonicalization: str = opt("relaxed/relaxed", "header/body canonicalization",
                                choices=("relaxed/relaxed", "relaxed/simple", "simple/relaxed",
                                         "simple/simple"))
    signature_ttl: int = opt(0, "x= seconds after signing (0: no expiry)", lo=0,
                             hi=365 * DAY)
    max_signatures: int = opt(10, "signatures verified per message (others ignored)",
                              lo=1, hi=100)
    min_rsa_bits: int = opt(1024, "RSA keys shorter than this fail (RFC 8301)", lo=512,
                            hi=8192)


@dataclass(frozen=True)
class DmarcConfig:
    mode: Mode = opt(Mode.ENFORCE, MODE_DOC)
    reject_action: str = opt("reject", "what a failing message of a p=reject domain gets",
                             choices=("reject", "quarantine", "score"))
    quarantine_action: str = opt("score", "what a failing message of a p=quarantine domain "
                                 "gets", choices=("quarantine", "score", "reject"))
    reject_text: str = opt("Message rejected by the DMARC policy of {domain}: it failed SPF "
                           "and DKIM alignment", "reply text; {domain} is filled in")
    temperror_action: str = opt("defer_reject", "what a DMARC temperror (DNS down) does: "
                                "defer_reject = 451 4.7.5 when the domain is known to publish "
                                "p=reject (its record, or one seen in the last day), else "
                                "score; defer = 451 4.7.5 always; accept = score only",
                                choices=("defer_reject", "defer", "accept"))
    temperror_text: str = opt("DMARC policy of {domain} could not be checked (temporary DNS "
                              "failure), please try again later", "reply text of a "
                              "temperror deferral; {domain} is filled in")
    rfc: str = opt("9989", "which DMARC rules evaluate: 9989 = RFC 9989 (DNS tree walk "
                   "for policy and organizational domain, psd=, np= on NXDOMAIN, t= test "
                   "mode; pct/rf/ri ignored); 7489 = RFC 7489 (Public Suffix List, pct= "
                   "sampling, RFC 9091 np=)", choices=("9989", "7489"))
    honour_pct: bool = opt(True, "apply pct= sampling of the policy (rfc = \"7489\" only; "
                           "RFC 9989 removed pct=)")
    store_results: bool = opt(True, "keep per-message results for aggregate reports")
    failure_reports: bool = opt(False, "send DMARC failure reports (RFC 9991) to the ruf= "
                                "addresses of failing domains (off, as most receivers do)")
    failure_report_body: str = opt("headers", "what of the failing message a report carries: "
                                   "headers = its header only (text/rfc822-headers); full = "
                                   "also the body, links defanged, non-text parts removed",
                                   choices=("headers", "full"))
    failure_report_redact: bool = opt(True, "replace the local parts of addresses in reports "
                                      "by a keyed hash (RFC 6590)")
    failure_reports_per_domain_hour: int = opt(10, "failure reports per policy domain per "
                                               "clock hour (per worker process)", lo=1,
                                               hi=100000)
    failure_reports_per_hour: int = opt(100, "failure reports per clock hour in all (per "
                                        "worker process)", lo=1, hi=1000000)
    failure_report_from: str = opt("", "From and envelope sender of failure reports; empty: "
                                   "postmaster@ the authserv-id ([milter] authserv_id)")
    report_interval: str = opt("daily", "aggregate reports (RFC 9990): daily = the daemon "
                               "sends one report per UTC day and policy domain with rua=; "
                               "off = only `mxguard dmarc report --send` sends",
                               choices=("daily", "off"))
    report_org_name: str = opt("", "org_name of the reports (RFC 9990 §2.1.1); empty: the "
                               "domain of report_email")
    report_email: str = opt("", "From address and contact email of the reports, e.g. "
                            "dmarc-reports@mx.example.com; empty: reports are not sent")
    report_max_size: int = opt(10 * 1024 * 1024, "largest compressed report sent, bytes "
                               "(a destination's own !size limit may be smaller)",
                               lo=1024, hi=1024**3)
    sendmail: str = opt("/usr/sbin/sendmail", "command that submits aggregate and failure "
                        "report mail to the local Postfix (an absolute path, then options, "
                        'split like a shell would, e.g. "/usr/sbin/sendmail -C /etc/postfix"; '
                        "recipients are appended)")
    report_retries: int = opt(5, "attempts to send one report when sendmail refuses it; "
                              "back-off doubles from 5 minutes", lo=1, hi=50)
    results_max_age: int = opt(14, "days per-message results and sent-report bookkeeping "
                               "are kept; older ones are deleted", lo=2, hi=400)
    received_domains: list[str] = opt([], "domains whose received aggregate reports "
                                      "`mxguard dmarc ingest` keeps (our own, whose rua= "
                                      "points at us); empty: any domain")
    received_max_age_days: int = opt(400, "days a received aggregate report is kept, counted "
                                     "from the end of its date range; older ones are not "
                                     "stored and are purged at each ingest", lo=1, hi=3650)
    received_max_bytes: int = opt(32 * 1024 * 1024, "bytes of XML one received report may "
                                  "have once decompressed (gzip / zip bombs are refused)",
                                  lo=4096, hi=1024 * 1024 * 1024)
    received_max_records: int = opt(100000, "`<record>` elements one received report may "
                                    "have", lo=1, hi=10**7)


@dataclass(frozen=True)
class ContentConfig:
    mode: Mode = opt(Mode.ENFORCE, MODE_DOC + " (score actions from [actions])")
    builtin_rules: bool = opt(True, "use mxguard's own ruleset")
    rules_dirs: list[str] | str = opt("auto", '"auto": SpamAssassin\'s rules when installed '
                                      "(the newest /var/lib/spamassassin/<version>/"
                                      "updates_spamassassin_org, else /usr/share/spamassassin), "
                                      "else none; or a list of directories/.cf files; [] none")
    local_rules: list[str] = opt([], "your own .cf rule files, read last (scores override)")
    header_prefix: str = opt("X-Spam-", "prefix of the spam headers (X-Spam-Flag, "
                             "X-Spam-Status, X-Spam-Level)")
    add_report: bool = opt(False, "add an X-Spam-Report header listing every rule hit")
    subject_tag: str = opt("***SPAM*** ", "text put before the Subject at rewrite_subject")
    report_safe: bool = opt(False, "wrap spam in a report message with the original attached "
                            "(SpamAssassin's report_safe); off keeps the message as it is")
    max_parts: int = opt(1000, "MIME parts decoded per message; more are skipped (logged)",
                         lo=1, hi=100000)


@dataclass(frozen=True)
class ActionsConfig:
    add_header: float = opt(5.0, "score at which X-Spam-Flag: YES is added (SpamAssassin's "
                            "required_score)", lo=-1000, hi=1000)
    rewrite_subject: float = opt(0.0, "score at which the subject is tagged (0: never)",
                                 lo=-1000, hi=1000)
    greylist: float = opt(0.0, "score at which the message is deferred once (0: never)",
                          lo=-1000, hi=1000)
    reject: float = opt(15.0, "score at which the message is rejected (0: never)",
                        lo=-1000, hi=1000)
    reject_text: str = opt("Message rejected as spam (score {score})", "reply text at "
                           "reject; {score} and {required} are filled in")


@dataclass(frozen=True)
class BayesConfig:
    enabled: bool = opt(True, "score with the Bayes classifier once enough mail is learned")
    min_spam: int = opt(200, "spam messages learned before Bayes scores", lo=1, hi=10**7)
    min_ham: int = opt(200, "ham messages learned before Bayes scores", lo=1, hi=10**7)
    autolearn: bool = opt(True, "learn messages whose score is clearly spam or ham")
    autolearn_spam: float = opt(12.0, "score (without Bayes) at which a message is learned "
                                "as spam", lo=-1000, hi=1000)
    autolearn_ham: float = opt(0.1, "score (without Bayes) below which a message is learned "
                               "as ham", lo=-1000, hi=1000)
    max_tokens: int = opt(1000000, "tokens kept; the least recently seen expire first",
                          lo=1000, hi=10**9)
    token_ttl: int = opt(180 * DAY, "seconds a token not seen again is kept", lo=DAY,
                         hi=3650 * DAY)
    sqlite_cache_mb: int = opt(32, "page cache of the SQLite Bayes store, MiB per process "
                               "(more: faster learning of big mailboxes; less: smaller RSS)",
                               lo=1, hi=65536)
    cold_start: str = opt("strict", "autolearn while fewer than min_spam / min_ham are learned: "
                          "strict (spam only at autolearn_spam + cold_start_margin, ham only "
                          "with DMARC_PASS and no rule against it), normal (as once ready), "
                          "off (none)", choices=("strict", "normal", "off"))
    cold_start_margin: float = opt(3.0, "points above autolearn_spam that spam must score "
                                   "(without Bayes) to be autolearned in a strict cold start",
                                   lo=0, hi=1000)


@dataclass(frozen=True)
class DnsblConfig:
    mode: Mode = opt(Mode.OFF, MODE_DOC + " (off by default: public lists need registration)")
    client_zones: list[str] = opt([], 'client IP blocklists as "zone=score", e.g. '
                                  '"zen.spamhaus.org=5"')
    uri_zones: list[str] = opt([], 'body URI domain blocklists as "zone=score", e.g. '
                               '"multi.uribl.com=4"')
    timeout: float = opt(2.0, "seconds all blocklist lookups of a message may take", lo=0.05,
                         hi=60)
    max_uris: int = opt(20, "URI domains looked up per message", lo=0, hi=1000)


@dataclass(frozen=True)
class HistoryConfig:
    enabled: bool = opt(True, "keep one record per milter message and per refused or deferred "
                        "policy request (mxguard history, the dashboard)")
    max_age_days: int = opt(30, "days a record is kept", lo=1, hi=3650)
    max_records: int = opt(1000000, "records kept; the oldest go first", lo=100, hi=10**9)
    policy_actions: list[str] = opt(["reject", "defer", "defer_if_permit"], "policy decisions "
                                    "recorded (milter messages are always recorded)")
    privacy: bool = opt(False, "keep only keyed hashes of addresses, no Subject")
    queue_size: int = opt(10000, "records waiting to be written; past it the oldest are "
                          "dropped (counted, logged)", lo=100, hi=10**7)
    flush_interval: float = opt(1.0, "seconds between batched writes", lo=0.05, hi=60)


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = opt(True, "serve the dashboard, its API and /metrics")
    listen: str = opt("127.0.0.1:11380", 'dashboard socket "host:port" (loopback unless you '
                      "change it)")
    user: str = opt("admin", "login name of the dashboard")
    password_hash: str = opt("", "hash from `mxguard web passwd`; empty: read-only pages for "
                             "loopback clients only")
    session_ttl: int = opt(8 * 3600, "seconds a login session lasts", lo=60, hi=30 * DAY)
    metrics_networks: list[str] = opt(["127.0.0.0/8", "::1/128"], "client CIDRs that may "
                                      "read /metrics without a login")
    keep_messages: int = opt(0, "raw bytes of the last N milter messages kept for the "
                             "learn buttons (0: none)", lo=0, hi=100000)
    login_attempts: int = opt(5, "failed logins per client per minute before it must wait",
                              lo=1, hi=1000)


@dataclass(frozen=True)
class Config:
    observe: bool = opt(False, "turn every enforce into observe: log what would be done, "
                        "change nothing")
    server: ServerConfig = field(default_factory=ServerConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    log: LogConfig = field(default_factory=LogConfig)
    helo: HeloConfig = field(default_factory=HeloConfig)
    greylist: GreylistConfig = field(default_factory=GreylistConfig)
    spf: SpfConfig = field(default_factory=SpfConfig)
    milter: MilterConfig = field(default_factory=MilterConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    dmarc: DmarcConfig = field(default_factory=DmarcConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    actions: ActionsConfig = field(default_factory=ActionsConfig)
    bayes: BayesConfig = field(default_factory=BayesConfig)
    dnsbl: DnsblConfig = field(default_factory=DnsblConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    web: WebConfig = field(default_factory=WebConfig)
    scores: dict[str, float] = opt({}, "symbol = score overrides of the built-in scores")
    source: str = field(default="(defaults)", compare=False, metadata={"internal": True})

    def mode(self, section: str) -> Mode:
        """The effective mode of a check section (global ``observe`` applied)."""
        mode: Mode = getattr(self, section).mode
        if self.observe and mode is Mode.ENFORCE:
            return Mode.OBSERVE
        return mode

    def score(self, symbol: str) -> float:
        return self.scores.get(symbol, SYMBOL_SCORES.get(symbol, 0.0))

    @property
    def state_dir(self) -> str:
        return self.server.state_dir or default_state_dir()

    @property
    def storage_url(self) -> str:
        return self.storage.url or f"sqlite:///{self.state_dir.lstrip('/')}/mxguard.db"


# ---------------------------------------------------------------- loading


def _describe(tp: Any, meta: dict[str, Any]) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    desc = names.get(tp, "a list of strings" if typing.get_origin(tp) is list else str(tp))
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        desc += f" from {lo:g} to {hi:g}"
    return desc


def _convert(value: Any, tp: Any, meta: dict[str, Any]) -> Any:
    """Return the typed value or raise ValueError (message filled in by the caller)."""
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise ValueError
    elif typing.get_origin(tp) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError
        return list(value)
    if meta.get("choices") and value not in meta["choices"]:
        raise ValueError
    lo, hi = meta.get("lo"), meta.get("hi")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ValueError
    return value


def _build(cls: Any, data: dict[str, Any], where: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            allowed = ", ".join(sorted(known))
            raise ConfigError(f"{src}: unknown key '{name}' (known keys here: {allowed})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{src}: '{key}' must be a table [{key}]")
            kwargs[key] = _build(tp, value, name, src)
        elif key == "scores":
            kwargs[key] = _scores(value, src)
        else:
            meta = dict(known[key].metadata)
            try:
                kwargs[key] = _convert(value, tp, meta)
            except (ValueError, TypeError):
                raise ConfigError(f"{src}: key '{name}' = {value!r} is not allowed; "
                                  f"expected {_describe(tp, meta)}") from None
    obj = cls(**kwargs)
    _check_semantics(obj, where, src)
    return obj


def _scores(value: Any, src: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: [scores] must be a table of SYMBOL = number")
    out: dict[str, float] = {}
    for sym, score in value.items():
        if sym not in SYMBOL_SCORES:
            raise ConfigError(f"{src}: unknown symbol 'scores.{sym}' (known symbols: "
                              f"{', '.join(sorted(SYMBOL_SCORES))})")
        if isinstance(score, bool) or not isinstance(score, int | float):
            raise ConfigError(f"{src}: key 'scores.{sym}' = {score!r} is not allowed; "
                              "expected a number")
        out[sym] = float(score)
    return out


def _check_listen(value: str) -> bool:
    if value.startswith("unix:"):
        return len(value) > 5
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _check_semantics(obj: Any, where: str, src: str) -> None:
    """Checks that need more than a type: addresses, CIDRs, URLs."""
    def bad(key: str, value: Any, allowed: str) -> ConfigError:
        return ConfigError(f"{src}: key '{where}.{key}' = {value!r} is not allowed; "
                           f"expected {allowed}")

    if isinstance(obj, ServerConfig) and not (
            obj.workers == "auto" or (isinstance(obj.workers, int)
                                      and not isinstance(obj.workers, bool)
                                      and 1 <= obj.workers <= 256)):
        raise bad("workers", obj.workers, '"auto" or an integer from 1 to 256')
    if isinstance(obj, ContentConfig) and not (
            obj.rules_dirs == "auto" or (isinstance(obj.rules_dirs, list)
                                         and all(isinstance(v, str) for v in obj.rules_dirs))):
        raise bad("rules_dirs", obj.rules_dirs,
                  '"auto" or a list of rule directories/files (strings); [] for none')
    if isinstance(obj, PolicyConfig | MilterConfig) and not _check_listen(obj.listen):
        raise bad("listen", obj.listen, '"host:port" or "unix:/path"')
    if isinstance(obj, DnsConfig):
        for ns in obj.nameservers:
            host, port = split_hostport(ns, 53)
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise bad("nameservers", ns, 'IP addresses as "ip" or "ip:port"') from None
            if not 0 < port < 65536:
                raise bad("nameservers", ns, "a port from 1 to 65535")
    if isinstance(obj, StorageConfig) and obj.url and not obj.url.startswith(
            ("sqlite:///", "redis://", "rediss://", "redis+sentinel://")):
        raise bad("url", obj.url, '"sqlite:///path/to/mxguard.db", "redis://host:port/db", '
                  '"rediss://..." or "redis+sentinel://host:port/mastername/db"')
    if isinstance(obj, StorageConfig) and obj.url.startswith(
            ("redis://", "rediss://", "redis+sentinel://")):
        problem = storage_url_problem(obj.url)
        if problem:
            raise bad("url", obj.url, problem)
    if isinstance(obj, PipelineConfig):
        for name in obj.tempfail_on_error:
            if name not in CHECK_NAMES:
                raise bad("tempfail_on_error", name, "check names: " + ", ".join(CHECK_NAMES))
    if isinstance(obj, DmarcConfig):
        if obj.failure_report_from and not re.fullmatch(r"[^@\s<>,\"]+@[A-Za-z0-9.-]+\.?",
                                                        obj.failure_report_from):
            raise bad("failure_report_from", obj.failure_report_from,
                      'an address like "dmarc-reports@example.org" (or "" for the default)')
        import shlex

        try:
            argv = shlex.split(obj.sendmail)
        except ValueError:
            argv = []
        if not argv or not argv[0].startswith("/"):
            raise bad("sendmail", obj.sendmail,
                      'a command starting with an absolute path, e.g. "/usr/sbin/sendmail"')
    if isinstance(obj, HeloConfig):
        for net in obj.exempt_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise bad("exempt_networks", net, "CIDRs like 192.0.2.0/24") from None
    if isinstance(obj, GreylistConfig):
        try:
            obj.text.format(url="", seconds=0, recipient="", sender="", client="")
        except (KeyError, IndexError, ValueError):
            raise bad("text", obj.text, "text with only {url} {seconds} {recipient} "
                      "{sender} {client} placeholders") from None


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def _host_problem(host: str) -> str:
    if not host:
        return "a host"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.match(host):
            return "a host name or IP address"
    return ""


def storage_url_problem(url: str) -> str:
    """What is wrong with the host, port or db of a Redis storage URL ("" if nothing),
    so that ``config check`` catches what would otherwise fail at first use."""
    scheme, _, rest = url.partition("://")
    netloc, _, path = rest.partition("?")[0].partition("/")
    netloc = netloc.rpartition("@")[2]
    sentinel = scheme == "redis+sentinel"
    items = netloc.split(",") if sentinel else [netloc]
    form = ("redis+sentinel://host:port[,host:port]/mastername[/db]" if sentinel
            else f"{scheme}://host[:port][/db]")
    for item in items:
        if item.startswith("["):
            host, _, port = item[1:].partition("]")
            if port and not port.startswith(":"):
                return f"{form} ({item!r}: not host:port)"
            port = port[1:]
        else:
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        problem = _host_problem(host)
        if problem:
            return f"{form} with {problem} (got {item!r})"
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return f"{form} with a port from 1 to 65535 (got {port!r})"
    parts = [p for p in path.split("/") if p]
    if sentinel:
        if not parts or len(parts) > 2:
            return f"{form} (the master's name is missing)" if not parts else form
        parts = parts[1:]
    if len(parts) > 1 or (parts and not parts[0].isdigit()):
        return f"{form} with a database number (got /{'/'.join(parts)})"
    return ""


def split_hostport(value: str, default_port: int) -> tuple[str, int]:
    """``"127.0.0.1:5353"`` / ``"[::1]:53"`` / ``"::1"`` -> (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else default_port
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, int(port) if port.isdigit() else -1
    return value, default_port


def load(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate; ``None`` gives the embedded defaults."""
    if path is None:
        return Config()
    src = str(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{src}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{src}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{src}: not valid TOML: {exc}") from None
    cfg: Config = _build(Config, data, "", src)
    remember(cfg.storage.url)
    return dataclasses.replace(cfg, source=src)


# ---------------------------------------------------------------- showing


def toml_value(value: Any) -> str:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump(cfg: Config, *, docs: bool = True) -> str:
    """The effective configuration as TOML, with each key's doc as a comment."""
    lines = [f"# effective configuration from {cfg.source}"]
    sections: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            sections.append((f.name, value))
        elif f.name == "scores":
            continue
        else:
            if docs:
                lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {toml_value(value)}")
    # the storage URL without its password (config show is pasted into tickets)
    resolved = {("server", "state_dir"): cfg.state_dir,
                ("storage", "url"): redact(cfg.storage_url),
                ("web", "password_hash"): "***" if cfg.web.password_hash else ""}
    for name, section in sections:
        lines.append("")
        lines.append(f"[{name}]")
        for f in dataclasses.fields(section):
            value = resolved.get((name, f.name), getattr(section, f.name))
            if docs:
                lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{f.name} = {toml_value(value)}")
    lines.append("")
    lines.append("[scores]")
    for sym in sorted(SYMBOL_SCORES):
        lines.append(f"{sym} = {cfg.score(sym)!r}")
    return "\n".join(lines) + "\n"


def iter_keys(cls: Any = Config, prefix: str = "") -> typing.Iterator[tuple[str, Any, str]]:
    """(dotted key, default, doc) for every key -- used to document them all."""
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, f"{f.name}.")
        else:
            if f.default is not dataclasses.MISSING:
                default: Any = f.default
            else:
                default = f.default_factory()  # type: ignore[operator]
            yield prefix + f.name, default, f.metadata.get("doc", "")


__all__ = ["Config", "ConfigError", "dump", "iter_keys", "load", "split_hostport"]
