"""``eval:`` functions on MIME structure, body text, HTML and attachments."""

from __future__ import annotations

import re

from mxguard.content.evals.base import ScanContext, num, register

# ------------------------------------------------------------------ MIME / body


def _mime_stats(ctx: ScanContext) -> dict[str, float]:
    def build() -> dict[str, float]:
        msg = ctx.msg
        html = sum(1 for p in msg.parts if p.is_html)
        plain = sum(1 for p in msg.parts if p.content_type == "text/plain")
        ctypes = [v.lower() for v in msg.get("Content-Type")]
        return {
            "mime_body_html_count": html, "mime_body_text_count": plain,
            "mime_multipart_alternative": float(any("multipart/alternative" in c
                                                    for c in ctypes)),
            "mime_missing_boundary": float(any("without a closing boundary" in p
                                               for p in msg.problems)),
            "mime_html_only": float(html > 0 and plain == 0),
        }
    value: dict[str, float] = ctx.memo("mime_stats", build)
    return value


@register("check_for_mime")
def for_mime(ctx: ScanContext, test: str) -> bool:
    return bool(_mime_stats(ctx).get(test, 0.0))


@register("check_for_mime_html")
def mime_html(ctx: ScanContext) -> bool:
    return any(p.is_html for p in ctx.msg.parts)


@register("check_for_mime_html_only")
@register("mxg_html_only")
def mime_html_only(ctx: ScanContext) -> bool:
    return bool(_mime_stats(ctx)["mime_html_only"])


@register("check_mime_multipart_ratio")
def multipart_ratio(ctx: ScanContext, lo: str, hi: str) -> bool:
    """Text length of the plain part over the HTML part's rendering."""
    plain = sum(len(p.text) for p in ctx.msg.parts if p.content_type == "text/plain")
    html = sum(len(p.text) for p in ctx.msg.parts if p.is_html)
    if not plain or not html:
        return False
    return num(lo) <= plain / html < num(hi)


@register("check_msg_parse_flags")
def msg_parse_flags(ctx: ScanContext, flag: str) -> bool:
    if flag == "truncated":
        return ctx.msg.truncated
    if flag == "missing_head_body_separator":
        return any("not ended by an empty line" in p for p in ctx.msg.problems)
    return False


@register("check_base64_length")
def base64_length(ctx: ScanContext, lo: str, hi: str = "inf") -> bool:
    lines = [len(line) for line in ctx.msg.raw_body.split("\n")
             if len(line) > 40 and re.fullmatch(r"[A-Za-z0-9+/=]+", line)]
    return bool(lines) and num(lo) <= max(lines) <= num(hi, float("inf"))


@register("check_ma_non_text")
def ma_non_text(ctx: ScanContext) -> bool:
    ctypes = " ".join(v.lower() for v in ctx.msg.get("Content-Type"))
    return "multipart/alternative" in ctypes and not ctx.msg.parts


_LETTER = re.compile(r"[^\W\d_]")
# capitals of the Latin, Greek and Cyrillic alphabets (their Unicode blocks)
_UPPER_LETTER = re.compile("[A-Z\u00c0-\u00d6\u00d8-\u00de\u0391-\u03a9\u0410-\u042f]")


# ASCII bytes that are not letters / not capitals: deleted by bytes.translate, what
# is left is counted (one C pass; the regex subn was ~20 % of a 52 KB
# message's milter CPU)
_ASCII_NOT_LETTER = bytes(c for c in range(256) if not (65 <= c <= 90 or 97 <= c <= 122))
_ASCII_NOT_UPPER = bytes(c for c in range(256) if not 65 <= c <= 90)


def uppercase_ratio(body: str) -> float:
    """Percent of the letters of ``body`` that are capitals (0 under 200 letters)."""
    if body.isascii():
        raw = body.encode("ascii")
        letters = len(raw.translate(None, _ASCII_NOT_LETTER))
        if letters < 200:
            return 0.0
        return 100.0 * len(raw.translate(None, _ASCII_NOT_UPPER)) / letters
    letters = _LETTER.subn("", body)[1]  # counted in C: a message may be long
    if letters < 200:
        return 0.0
    return 100.0 * _UPPER_LETTER.subn("", body)[1] / letters


@register("check_for_uppercase")
def for_uppercase(ctx: ScanContext, lo: str, hi: str) -> bool:
    """Share of upper-case letters in the body (percent) within [lo, hi)."""
    value: float = ctx.memo("uppercase",
                            lambda: uppercase_ratio(ctx.body.partition("\n")[2]))
    return num(lo) <= value < num(hi, 101)


@register("check_body_8bits")
def body_8bits(ctx: ScanContext) -> bool:
    return bool(re.search(r"[\x80-\xff]{20,}", ctx.msg.raw_body))


@register("check_body_length")
def body_length(ctx: ScanContext, maximum: str) -> bool:
    return len(ctx.body.partition("\n")[2]) <= num(maximum)


@register("check_blank_line_ratio")
def blank_line_ratio(ctx: ScanContext, lo: str, hi: str, minlines: str = "1") -> bool:
    lines = ctx.msg.text.split("\n")
    if len(lines) < num(minlines, 1):
        return False
    blank = sum(1 for line in lines if not line.strip())
    return num(lo) <= 100.0 * blank / len(lines) < num(hi, 101)


@register("check_microsoft_executable")
def microsoft_executable(ctx: ScanContext) -> bool:
    return any(a.magic == "pe" for a in ctx.msg.attachments)


@register("check_abundant_unicode_ratio")
def abundant_unicode(ctx: ScanContext, ratio: str = "0.02") -> bool:
    text = ctx.msg.raw_body
    if not text:
        return False
    found = len(re.findall(r"&#x?[0-9a-fA-F]{3,};|=[Ee][0-9A-F]=", text))
    return found / len(text) > num(ratio)


@register("check_for_ascii_text_illegal")
def ascii_text_illegal(ctx: ScanContext) -> bool:
    for part in ctx.msg.parts:
        if part.charset in ("ascii", "us-ascii") and re.search(r"[\x80-\xff]", part.raw):
            return True
    return False


# ------------------------------------------------------------------ HTML


@register("html_tag_exists")
def html_tag_exists(ctx: ScanContext, tag: str) -> bool:
    pat = re.compile(rf"(?i)<{re.escape(tag)}\b")
    return any(pat.search(p.raw) for p in ctx.msg.html_parts)


@register("html_image_only")
def html_image_only(ctx: ScanContext, lo: str, hi: str) -> bool:
    """HTML with images and only lo..hi characters of text."""
    html = ctx.msg.html_parts
    if not html or not any(u.tag == "img" for u in ctx.msg.uris):
        return False
    chars = sum(len("".join(p.text.split())) for p in html)
    return num(lo) <= chars <= num(hi)


@register("html_image_ratio")
def html_image_ratio(ctx: ScanContext, lo: str, hi: str) -> bool:
    html = ctx.msg.html_parts
    images = sum(1 for u in ctx.msg.uris if u.tag == "img")
    chars = sum(len(p.text) for p in html)
    if not html or not chars:
        return False
    return num(lo) <= images * 1000.0 / chars < num(hi, float("inf"))


@register("html_title_subject_ratio")
def html_title_subject_ratio(ctx: ScanContext, ratio: str) -> bool:
    for part in ctx.msg.html_parts:
        m = re.search(r"(?is)<title>(.*?)</title>", part.raw)
        subject = ctx.msg.subject
        if m and subject and m.group(1).strip():
            return len(m.group(1).strip()) / len(subject) > num(ratio)
    return False


@register("check_iframe_src")
def iframe_src(ctx: ScanContext) -> bool:
    return any(u.tag == "iframe" for u in ctx.msg.uris)


@register("html_text_match")
def html_text_match(ctx: ScanContext, what: str, pattern: str) -> bool:
    try:
        pat = re.compile(pattern)
    except re.error:
        return False
    return any(pat.search(p.text) for p in ctx.msg.html_parts)


# ------------------------------------------------------------------ attachments, MIME problems


@register("mxg_attachment_ext")
def attachment_ext(ctx: ScanContext, extensions: str) -> bool:
    """An attachment (or a zip member) whose name ends in one of the
    comma-separated extensions, or a Windows executable by its first bytes."""
    wanted = {e.strip().lower().lstrip(".") for e in extensions.split(",") if e.strip()}
    return any(att.extension in wanted for att in ctx.msg.attachments)


@register("mxg_archive_member_ext")
def archive_member_ext(ctx: ScanContext, extensions: str) -> bool:
    wanted = {e.strip().lower().lstrip(".") for e in extensions.split(",") if e.strip()}
    for att in ctx.msg.attachments:
        for name in att.inner_names:
            base = name.rstrip(". ").lower()
            if "." in base and base.rpartition(".")[2] in wanted:
                return True
    return False


@register("mxg_double_extension")
def double_extension(ctx: ScanContext) -> bool:
    """"invoice.pdf.exe": a document extension hiding an executable one."""
    pat = re.compile(r"(?i)\.(?:pdf|docx?|xlsx?|jpe?g|png|txt|zip)\s*\.(?:exe|scr|com|pif|"
                     r"bat|cmd|js|vbs|jar|lnk|hta)$")
    return any(pat.search(a.filename) for a in ctx.msg.attachments)


@register("mxg_executable_magic")
def executable_magic(ctx: ScanContext) -> bool:
    return any(a.magic in ("pe", "elf") for a in ctx.msg.attachments)


@register("mxg_mime_problem")
def mime_problem(ctx: ScanContext, what: str) -> bool:
    return any(what in p for p in ctx.msg.problems)
