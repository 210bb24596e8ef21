"""The private servers on loopback that the tests, the benchmarks and
``mxguard demo`` share (one implementation each):

* :mod:`~mxguard.testing.postfix` -- a real Postfix under its own config
  and queue directory (``postfix -c DIR``), chroot off, wired to mxguard's
  policy and milter doors;
* :mod:`~mxguard.testing.dns` -- an authoritative DNS server serving zone data;
* :mod:`~mxguard.testing.sink` -- an SMTP sink, the Postfix's final hop;
* :mod:`~mxguard.testing.smtp` -- SMTP client sessions that keep every reply;
* :mod:`~mxguard.testing.ports` -- free loopback ports;
* :mod:`~mxguard.testing.procs` -- /proc helpers (reaping forked daemons).

Nothing here is imported by the daemon itself; everything needs only the
runtime dependencies (dnspython, not the test extras).
"""
