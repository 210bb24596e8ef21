"""mxguard: one daemon that makes a Postfix mail server spam-resistant."""

__version__ = "0.1.0"
