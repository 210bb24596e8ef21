"""``mxguard metrics [--config F] [--json]``: the counters of the running daemon.

Reads the snapshot files every process of ``mxguard serve`` writes under
``<[server] state_dir>/metrics/`` (:mod:`mxguard.web.metrics`) and prints their
totals in the Prometheus text format, or as JSON with ``--json``: the numbers
``/metrics`` serves, without the web listener. Exit 1 when no daemon has
written a snapshot there (none is running, or another ``state_dir``).
"""

from __future__ import annotations

import json
import os

import click

from mxguard.cli.common import config_option, fail, load_or_exit


@click.command("metrics")
@config_option("TOML config file; its [server] state_dir holds the daemon's snapshots")
@click.option("--json", "as_json", is_flag=True, help="plain JSON instead of the text format")
def metrics(config_path: str | None, as_json: bool) -> None:
    """Print the running daemon's metrics (totals of all its worker processes)."""
    from mxguard.web import metrics as m

    cfg = load_or_exit(config_path)
    directory = os.path.join(cfg.state_dir, m.DIR_NAME)
    if not os.path.isdir(directory):
        fail(f"no metrics in {directory}: is mxguard serve running with this config "
             "([server] state_dir)?", 1)
    try:
        samples = m.gather(directory)
    except OSError as exc:
        fail(f"cannot read {directory}: {exc.strerror or exc}")
    if as_json:
        click.echo(json.dumps(m.to_json(samples), indent=2, sort_keys=True))
    else:
        click.echo(m.render(samples).decode(), nl=False)
