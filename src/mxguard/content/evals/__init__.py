"""``eval:`` functions of rules, and the :class:`ScanContext` they read.

An eval is ``fn(ctx, *args) -> bool | int`` registered in :data:`EVALS` under
its rule-file name. Arguments arrive as strings (quotes removed). An eval
must not raise on odd input; if it does, the engine logs it once and counts
the rule as not hit.

SpamAssassin evals implemented (same names, so their rule files work):

* headers: ``check_for_missing_to_header``, ``check_header_count_range``,
  ``check_for_shifted_date``, ``check_illegal_chars``, ``subject_is_all_caps``,
  ``check_for_to_in_subject``, ``check_equal_from_domains``,
  ``check_for_matching_env_and_hdr_from``, ``check_fromname_equals_to``,
  ``check_fromname_equals_replyto``, ``check_fromname_spoof``,
  ``check_unresolved_template``, ``check_messageid_not_usable``,
  ``check_ratware_envelope_from``;
* MIME and body: ``check_for_mime``, ``check_for_mime_html``,
  ``check_for_mime_html_only``, ``check_mime_multipart_ratio``,
  ``check_msg_parse_flags``, ``check_base64_length``, ``check_ma_non_text``,
  ``check_for_uppercase``, ``check_body_8bits``, ``check_body_length``,
  ``check_blank_line_ratio``, ``check_microsoft_executable``,
  ``check_abundant_unicode_ratio``, ``check_for_ascii_text_illegal``;
* HTML: ``html_tag_exists``, ``html_image_only``, ``html_image_ratio``,
  ``html_title_subject_ratio``, ``check_iframe_src``, ``html_text_match``;
* URIs: ``check_https_ip_mismatch``, ``check_https_http_mismatch``,
  ``check_uri_host_listed``, ``short_url``, ``check_uri_truncated``;
* FreeMail: ``check_freemail_from``, ``check_freemail_replyto``,
  ``check_freemail_header``;
* authentication (results the milter computed; absent in ``mxguard scan``):
  ``check_for_spf_*`` and ``check_for_spf_helo_*``, ``check_dkim_signed``,
  ``check_dkim_valid``, ``check_dkim_valid_author_sig``, ``check_dmarc_*``;
* Bayes: ``check_bayes(min, max)`` with the probability the scan was given.

mxguard's own (``mxg_*``) evals back the built-in ruleset ``mxguard.cf``;
those on the shape of a message (encodings, obfuscation, URL tricks, far
character sets) are in :mod:`.structure`; those on signs of a legitimate
bulk sender (a per-message bounce address in From's own domain,
List-Unsubscribe in From's domain: the negative rules) in :mod:`.sender`.

The registry, :class:`ScanContext` and the shared helpers live in
:mod:`.base`; the evals, one module per family, in :mod:`.headers` (headers,
addresses, FreeMail, dates), :mod:`.body` (MIME structure, body text, HTML,
attachments), :mod:`.uris` and :mod:`.auth` (SPF, DKIM, DMARC, HELO and Bayes
results). Importing this package imports every family, so every eval is
registered.
"""

from __future__ import annotations

# Importing the families registers their evals in EVALS.
from mxguard.content.evals import auth, body, headers, sender, structure, uris  # noqa: F401
from mxguard.content.evals.base import (
    EVALS,
    NET_EVALS,
    RuleLists,
    ScanContext,
    address,
    display_name,
    domain_of,
    org_domain,
    register,
)

__all__ = ["EVALS", "NET_EVALS", "RuleLists", "ScanContext", "address", "display_name",
           "domain_of", "org_domain", "register"]
