"""Every rule of the built-in ``mxguard.cf`` fires on a crafted message, and a
control message close to it does not."""

from __future__ import annotations

import base64
import io
import zipfile
from dataclasses import dataclass, field
from typing import Any

import pytest

from mxguard.content.mime import parse_message
from mxguard.content.rules import BUILTIN_RULES, RuleSet, build_ruleset
from mxguard.core.transaction import CheckResult, Symbol

NOW = 1704067200.0  # 2024-01-01 00:00:00 UTC
GOOD_HEADERS = {
    "Received": "from mx.example.com by mx.example.org; Mon, 01 Jan 2024 00:00:00 +0000",
    "From": "Ann Example <ann@example.com>",
    "To": "bob@example.org",
    "Subject": "Lunch on Friday",
    "Date": "Mon, 01 Jan 2024 00:00:00 +0000",
    "Message-Id": "<20240101.1234@mail.example.com>",
}
GOOD_BODY = "Hi Bob,\n\nshall we meet at noon?\n\nAnn\n"

_RULES: list[RuleSet] = []


def rules() -> RuleSet:
    if not _RULES:
        _RULES.append(build_ruleset([BUILTIN_RULES]))
    return _RULES[0]


def make(headers: dict[str, str | None] | None = None, body: str = GOOD_BODY,
         extra: str = "") -> bytes:
    h: dict[str, str | None] = dict(GOOD_HEADERS)
    h.update(headers or {})
    head = "".join(f"{k}: {v}\n" for k, v in h.items() if v is not None)
    return (head + extra + "\n" + body).encode()


@dataclass
class FakeTx:
    sender: str = "ann@example.com"
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeDkim:
    result: str
    domain: str = "example.com"


def auth_tx(spf: str = "pass", dkim: str | None = "pass", dmarc: str = "pass",
            helo: str = "") -> FakeTx:
    tx = FakeTx()
    tx.results["spf"] = CheckResult("spf", extra={"spf": spf})
    tx.results["dkim_verify"] = CheckResult("dkim_verify", data=[FakeDkim(dkim)] if dkim else [])
    tx.results["dmarc"] = CheckResult("dmarc", extra={"dmarc": dmarc, "dmarc_policy": "reject"})
    if helo:
        tx.results["helo"] = CheckResult("helo", symbols=[Symbol(helo, 2.0)])
    return tx


def verp_tx(tx: FakeTx) -> FakeTx:
    """``tx`` with a per-message bounce address of From's domain as MAIL FROM."""
    tx.sender = "bounce-20240101-4711@news.example.com"
    return tx


def fired(raw: bytes, tx: Any = None) -> set[str]:
    return set(rules().scan(parse_message(raw), tx=tx, now=NOW).counts)


def multipart(parts: list[str]) -> str:
    return "".join(f"--B\n{p}\n" for p in parts) + "--B--\n"


MP = 'MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary="B"\n'


def attachment(name: str, data: bytes, ctype: str = "application/octet-stream") -> str:
    return (f'Content-Type: {ctype}; name="{name}"\nContent-Transfer-Encoding: base64\n'
            f'Content-Disposition: attachment; filename="{name}"\n\n'
            + base64.b64encode(data).decode())


def zipped(*names: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in names:
            zf.writestr(n, b"data")
    return buf.getvalue()


HTML_PART = "Content-Type: text/html\n\n<p>{}</p>"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

HTML_CT = "Content-Type: text/html\n"
TEXT_CHARSET = 'MIME-Version: 1.0\nContent-Type: text/plain; charset="{}"\n'
IMAGES = "".join(f'<img src="http://img.example/{i}.png">' for i in range(3))
FOOTER = ["Copyright 2024 Example Inc.", "All rights reserved.", "Read our privacy policy.",
          "Manage your subscription here."]


def enc_word(text: str) -> str:
    """``text`` as one RFC 2047 base64 encoded word."""
    return f"=?utf-8?B?{base64.b64encode(text.encode()).decode()}?="


# (rule, message that must fire it, control that must not, tx for both)
CASES: list[tuple[str, bytes, bytes, Any]] = [
    ("GTUBE", make(body=f"test {GTUBE}\n"), make(body="XJS*C4JDBQADN1 only\n"), None),
    ("MXG_MISSING_DATE", make({"Date": None}), make(), None),
    ("MXG_DATE_UNPARSEABLE", make({"Date": "yesterday at noon"}), make(), None),
    ("MXG_DATE_FUTURE", make({"Date": "Tue, 02 Jan 2024 06:00:00 +0000"}),
     make({"Date": "Mon, 01 Jan 2024 06:00:00 +0000"}), None),
    ("MXG_DATE_PAST", make({"Date": "Mon, 25 Dec 2023 00:00:00 +0000"}),
     make({"Date": "Sun, 31 Dec 2023 00:00:00 +0000"}), None),
    ("MXG_DATE_ANCIENT", make({"Date": "Fri, 01 Jan 1971 00:00:00 +0000"}), make(), None),
    ("MXG_MISSING_MID", make({"Message-Id": None}), make(), None),
    ("MXG_MID_MALFORMED", make({"Message-Id": "12345.no-at-sign"}), make({"Message-Id": None}),
     None),
    ("MXG_MID_RCPT_DOMAIN", make({"Message-Id": "<abc@example.org>"}),
     make({"Message-Id": "<abc@example.com>"}), None),
    ("MXG_REPLYTO_FREEMAIL", make({"Reply-To": "payments@gmail.com"}),
     make({"Reply-To": "ann@example.com"}), None),
    ("MXG_REPLYTO_OTHER_DOMAIN", make({"Reply-To": "desk@other.example"}),
     make({"Reply-To": "desk@lists.example.com"}), None),
    ("MXG_FROMNAME_SPOOF", make({"From": '"ceo@bank.example" <x@mailer.example>'}),
     make({"From": '"ann@example.com" <ann@example.com>'}), None),
    ("MXG_NO_RECIPIENT_HDR", make({"To": None}), make({"To": None}, extra="Cc: c@x.example\n"),
     None),
    ("MXG_MISSING_FROM", make({"From": None}), make(), None),
    ("MXG_FROM_NO_ADDRESS", make({"From": "Just A Name"}), make(), None),
    ("MXG_MISSING_SUBJECT", make({"Subject": None}), make({"Subject": ""}), None),
    ("MXG_SUBJ_ALL_CAPS", make({"Subject": "LIMITED OFFER FOR YOU"}),
     make({"Subject": "Meeting at IBM HQ"}), None),
    ("MXG_SUBJ_EXCLAIM", make({"Subject": "Act fast!!!"}), make({"Subject": "Great news!"}),
     None),
    ("MXG_SUBJ_MONEY_AMOUNT", make({"Subject": "Receive $1,500,000 today"}),
     make({"Subject": "Invoice for $150"}), None),
    ("MXG_SUBJ_FREE_OFFER", make({"Subject": "Your free gift inside"}),
     make({"Subject": "Free for lunch?"}), None),
    ("MXG_HTML_ONLY", make(extra="Content-Type: text/html\n", body="<p>Hello</p>"),
     make(extra=MP, body=multipart(["Content-Type: text/plain\n\nHello",
                                    HTML_PART.format("Hello")])), None),
    ("MXG_HTML_IMAGE_ONLY", make(extra="Content-Type: text/html\n",
                                 body='<img src="http://img.example/big.png">'),
     make(extra="Content-Type: text/html\n",
          body='<img src="http://img.example/logo.png"><p>' + "Real text. " * 60 + "</p>"),
     None),
    ("MXG_MIME_NO_CLOSE", make(extra=MP, body="--B\nContent-Type: text/plain\n\nhi\n"),
     make(extra=MP, body=multipart(["Content-Type: text/plain\n\nhi"])), None),
    ("MXG_MIME_BAD_BASE64",
     make(extra=MP, body=multipart(["Content-Type: application/pdf\n"
                                    "Content-Transfer-Encoding: base64\n\nA"])),
     make(extra=MP, body=multipart(["Content-Type: application/pdf\n"
                                    "Content-Transfer-Encoding: base64\n\nQUJD"])), None),
    ("MXG_HTML_HIDDEN_TEXT", make(extra="Content-Type: text/html\n",
                                  body='<div style="display:none">cheap pills</div>hi'),
     make(extra="Content-Type: text/html\n", body='<div style="display:block">hi</div>'),
     None),
    ("MXG_URI_IP_LITERAL", make(body="go to http://192.0.2.7/login now"),
     make(body="go to http://www.example.com/192.0.2.7 now"), None),
    ("MXG_URI_IPV6_LITERAL", make(body="go to http://[2001:db8::7]/login"),
     make(body="go to http://www.example.com/"), None),
    ("MXG_URI_ODD_PORT", make(body="see http://shop.example:8888/x"),
     make(body="see http://shop.example:443/x"), None),
    ("MXG_URI_SHORTENER", make(body="see https://bit.ly/3xyz"),
     make(body="see https://bitly.example/3xyz"), None),
    ("MXG_LINK_TEXT_MISMATCH",
     make(extra="Content-Type: text/html\n",
          body='<a href="http://evil.example/">www.paypal.com</a>'),
     make(extra="Content-Type: text/html\n",
          body='<a href="https://www.paypal.com/signin">www.paypal.com</a>'), None),
    ("MXG_HTTPS_TEXT_HTTP_LINK",
     make(extra="Content-Type: text/html\n",
          body='<a href="http://evil.example/">https://bank.example/</a>'),
     make(extra="Content-Type: text/html\n",
          body='<a href="https://bank.example/">https://bank.example/</a>'), None),
    ("MXG_EXE_ATTACHMENT", make(extra=MP, body=multipart([attachment("run.scr", b"x")])),
     make(extra=MP, body=multipart([attachment("report.pdf", b"%PDF-1.4")])), None),
    ("MXG_EXE_IN_ARCHIVE",
     make(extra=MP, body=multipart([attachment("a.zip", zipped("invoice.js"))])),
     make(extra=MP, body=multipart([attachment("a.zip", zipped("invoice.pdf"))])), None),
    ("MXG_EXE_MAGIC", make(extra=MP, body=multipart([attachment("photo.jpg", b"MZ" + b"\0" * 80)])),
     make(extra=MP, body=multipart([attachment("photo.jpg", b"\xff\xd8\xff\xe0")])), None),
    ("MXG_DOUBLE_EXTENSION",
     make(extra=MP, body=multipart([attachment("invoice.pdf.exe", b"x")])),
     make(extra=MP, body=multipart([attachment("invoice.2024.pdf", b"x")])), None),
    ("MXG_VERIFY_ACCOUNT", make(body="Please verify your account within 24 hours."),
     make(body="We verified the accounts yesterday."), None),
    ("MXG_PRIZE_WON", make(body="Congratulations, you have won 1,000,000 EUR"),
     make(body="We have won the match"), None),
    ("MXG_LARGE_SUM_FUND", make(body="the sum of USD 15,500,000 to your account"),
     make(body="the sum of USD 15 to your account"), None),
    ("MXG_BTC_RANSOM",
     make(body="Send 0.1 bitcoin to my wallet. You have 48 hours or the video goes out."),
     make(body="Bitcoin prices rose for 48 hours."), None),
    ("MXG_REMOVE_LIST", make(body="To be removed from our list, reply with REMOVE."),
     make(body="The old list was removed."), None),
    ("MXG_CLICK_HERE", make(body="Click here to see more"), make(body="I clicked it"), None),
    # structure and obfuscation
    ("MXG_SUBJ_ENCODED_ASCII", make({"Subject": enc_word("Cheap watches today")}),
     make({"Subject": enc_word("Grüße aus Köln")}), None),
    ("MXG_FROM_ENCODED_ASCII", make({"From": f"{enc_word('Best Deals')} <deals@example.com>"}),
     make({"From": f"{enc_word('Jürgen Groß')} <jg@example.com>"}), None),
    ("MXG_SUBJ_RANDOM_TAIL", make({"Subject": "Great offer for you x7k2q9"}),
     make({"Subject": "Patch for bug 12345 in RH8"}), None),
    ("MXG_TO_UNDISCLOSED", make({"To": "undisclosed-recipients:;"}), make(), None),
    ("MXG_PRIORITY_HIGH", make(extra="X-Priority: 1 (Highest)\n"),
     make(extra="X-Priority: 3 (Normal)\n"), None),
    ("MXG_CHARSET_FAR_SCRIPT", make(extra=TEXT_CHARSET.format("gb2312")),
     make(extra=TEXT_CHARSET.format("utf-8")), None),
    ("MXG_HTML_WORD_SPLIT", make(extra=HTML_CT, body="<p>Buy V<!-- zq -->iagra</p>"),
     make(extra=HTML_CT, body="<p>Hello <!-- note --> world</p>"), None),
    ("MXG_HTML_FONT_HUGE", make(extra=HTML_CT, body='<font size="6">BIG</font>'),
     make(extra=HTML_CT, body='<font size="3">small</font>'), None),
    ("MXG_HTML_IMAGES_NO_TEXT", make(extra=HTML_CT, body=IMAGES + "<p>Buy now</p>"),
     make(extra=HTML_CT, body=IMAGES + "<p>" + "Real words here. " * 40 + "</p>"), None),
    ("MXG_URI_OBSCURED_HOST", make(body="see http://3232235777/login now"),
     make(body="see http://www.example.com/%7Euser/3232235777 now"), None),
    ("MXG_URI_USERINFO", make(body="see http://www.bank.example@evil.example/login"),
     make(body="see http://www.bank.example/login?who=ann@example.com"), None),
    # spam offers
    ("MXG_NOT_SPAM_CLAIM", make(body="This is not spam. Sent under Bill S.1618."),
     make(body="Is this spam? I am not sure."), None),
    ("MXG_BULK_MAIL_OFFER", make(body="Buy 10 million email addresses on CD"),
     make(body="I changed my email address"), None),
    ("MXG_OPTED_IN_CLAIM", make(body="You opted in to receive special offers."),
     make(body="The opt-out checkbox is on the left."), None),
    ("MXG_MORTGAGE_OFFER", make(body="Refinance now and lower your monthly payments"),
     make(body="The finance team meets on Monday"), None),
    ("MXG_PHARMA_OFFER", make(body="Online pharmacy, no prescription needed"),
     make(body="The pharmacist filled my prescription"), None),
    ("MXG_PHARMA_OBFUSCATED", make(body="Get V-i-a-g-r-a here"), make(body="Get Viagra here"),
     None),
    ("MXG_WEIGHT_LOSS_OFFER", make(body="Lose 30 pounds in 30 days"),
     make(body="We lost 30 pounds sterling on the deal"), None),
    ("MXG_ENLARGE_OFFER", make(body="Male enlargement pills"),
     make(body="Enlarge the picture, please"), None),
    ("MXG_INCOME_OFFER", make(body="Work from home and earn $5,000 per week"),
     make(body="I work in the home office on Fridays"), None),
    ("MXG_GUARANTEE_PITCH", make(body="Try it risk-free with a money-back guarantee"),
     make(body="The guarantee ran out last year"), None),
    ("MXG_URGENCY_PITCH", make(body="Order now, limited time offer"),
     make(body="The order arrived in time"), None),
    ("MXG_DEAR_STRANGER", make(body="Dear Friend,\n\nI write to you"),
     make(body="Dear Ann,\n\nmy friend wrote to you"), None),
    ("MXG_ADVANCE_FEE", make(body="As next of kin you will receive the transfer of funds"),
     make(body="The funds transfer cleared"), None),
    ("MXG_STOCK_PROMO", make(body="Investor alert: strong buy, symbol: ABCD"),
     make(body="The stock room is full"), None),
    ("MXG_REPLICA_OFFER", make(body="Replica watches and OEM software"),
     make(body="A watch and some software"), None),
    ("MXG_ADULT_OFFER", make(body="Meet local singles and horny housewives"),
     make(body="Single malt at the local pub"), None),
    ("MXG_ALL_CAPS_BODY", make(body="BUY THE BEST PRODUCT on THE MARKET TODAY " * 8),
     make(body="Buy the best product on the market today. " * 8), None),
    ("MXG_OFFERS_SEVERAL",
     make(body="Dear Friend,\n\nRefinance now. Order now, it is risk-free."),
     make(body="Dear Friend,\n\nRefinance now."), None),
    ("MXG_SUBJ_ADV_TAG", make({"Subject": "ADV: cheap toner"}),
     make({"Subject": "Advice on the toner"}), None),
    ("MXG_SUBJ_ADV_TAG", make({"Subject": "Free cards for you Adv:"}),
     make({"Subject": "Free cards for you, adv. course"}), None),
    ("MXG_SUBJ_SPACE_RUN", make({"Subject": "Get out of debt fast              29521"}),
     make({"Subject": "Get out of debt fast 29521"}), None),
    ("MXG_FREEMAIL_HTML", make({"From": "deals@gmail.com"}, extra="Content-Type: text/html\n",
                               body="<p>Deals</p>"),
     make({"From": "deals@gmail.com"}, body="Deals"), None),
    ("MXG_TRICKS_SEVERAL", make({"Subject": enc_word("Your offer x7k2q9")}),
     make({"Subject": enc_word("Your offer")}), None),
    # signs of a legitimate sender (negative scores)
    ("MXG_COMPANY_FOOTER", make(body=FOOTER[0] + " " + FOOTER[1]), make(body=FOOTER[1]), None),
    ("MXG_COMPANY_FOOTER_FULL", make(body=" ".join(FOOTER[:4])),
     make(body=" ".join(FOOTER[:3])), None),
    ("MXG_BULK_BOUNCE_SAME_ORG", make({"Return-Path": "<bounce-20240101-4711@news.example.com>"}),
     make({"Return-Path": "<ann@example.com>"}), None),
    ("MXG_BULK_BOUNCE_SAME_ORG", make({"Return-Path": "<bounce-20240101-4711@news.example.com>"}),
     make({"Return-Path": "<bounce-20240101-4711@news.example.com>"}),
     (verp_tx(auth_tx(spf="pass", dkim=None)), verp_tx(auth_tx(spf="softfail", dkim=None)))),
    ("MXG_LIST_UNSUB_SAME_ORG",
     make({"List-Unsubscribe": "<mailto:leave-1@lists.example.com>"}),
     make({"List-Unsubscribe": "<https://mailer.example.net/u?id=1>"}), None),
    ("MXG_LIST_UNSUB_SAME_ORG",
     make({"List-Unsubscribe": "<mailto:leave-1@lists.example.com>"}),
     make({"List-Unsubscribe": "<mailto:leave-1@lists.example.com>"}),
     (auth_tx(spf="none", dkim="pass"), auth_tx(spf="none", dkim="fail"))),
    # authentication results from the transaction
    ("MXG_UNAUTH_EXECUTABLE", make(extra=MP, body=multipart([attachment("x.exe", b"x")])),
     make(extra=MP, body=multipart([attachment("x.exe", b"x")])),
     (auth_tx(spf="fail", dkim=None), auth_tx(spf="pass"))),
    ("MXG_UNAUTH_LINK_MISMATCH",
     make(extra="Content-Type: text/html\n", body='<a href="http://e.example/">a.example</a>'),
     make(extra="Content-Type: text/html\n", body='<a href="http://e.example/">a.example</a>'),
     (auth_tx(spf="softfail", dkim="fail"), None)),
    ("MXG_SPF_AND_DKIM_FAIL", make(), make(),
     (auth_tx(spf="fail", dkim="fail"), auth_tx(spf="fail", dkim="pass"))),
    ("MXG_DMARC_FAIL_REPLYTO", make({"Reply-To": "x@gmail.com"}), make({"Reply-To": "x@gmail.com"}),
     (auth_tx(dmarc="fail"), auth_tx(dmarc="pass"))),
    ("MXG_BAD_HELO_HTML_ONLY", make(extra="Content-Type: text/html\n", body="<p>x</p>"),
     make(extra="Content-Type: text/html\n", body="<p>x</p>"),
     (auth_tx(helo="HELO_NOT_FQDN"), auth_tx())),
    ("MXG_UNAUTH_VERIFY_ACCOUNT", make(body="Please confirm your password"),
     make(body="Please confirm your password"), (auth_tx(spf="none", dkim=None), auth_tx())),
]


@pytest.mark.parametrize(("rule", "hit", "control", "txs"), CASES, ids=[c[0] for c in CASES])
def test_builtin_rule(rule: str, hit: bytes, control: bytes, txs: Any) -> None:
    tx_hit, tx_control = txs if isinstance(txs, tuple) else (txs, txs)
    assert rule in fired(hit, tx_hit)
    assert rule not in fired(control, tx_control)


def test_every_scored_builtin_rule_is_tested_and_described() -> None:
    scored = {n for n, r in rules().rules.items() if not n.startswith("__")}
    assert scored == {c[0] for c in CASES}
    for name in scored:
        assert rules().describe(name), name


def test_builtin_rules_load_cleanly() -> None:
    st = rules().stats
    assert not st.errors and not st.warnings and not st.unsupported_evals


def test_plain_message_scores_nothing() -> None:
    assert rules().scan(parse_message(make()), tx=auth_tx(), now=NOW).hits == []


def test_gtube_alone_is_spam() -> None:
    res = rules().scan(parse_message(make(body=GTUBE)), now=NOW)
    assert res.score >= 1000
