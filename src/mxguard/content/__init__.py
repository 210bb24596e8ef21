"""Content scoring: MIME parsing (:mod:`.mime`), SpamAssassin-syntax rules
(:mod:`.rules`, :mod:`.rules_parser`, :mod:`.evals`), Bayes and DNS blocklists."""
