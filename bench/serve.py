"""Run the broker for the bench in its own process: ``run_server`` from a home, optionally under cProfile.

Used when ``medbroker serve`` is not available (broker/cli.py has no ``serve`` yet), and for the
cProfile fallback when py-spy cannot attach. The product code is unchanged: this is ``run_server`` with
the home opened by ``broker.app.open_app``.

    python bench/serve.py --home H --listen 127.0.0.1:PORT [--cprofile out.prof]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; with ``--cprofile`` dump the profile on the way out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", required=True)
    parser.add_argument("--listen", required=True, help="HOST:PORT")
    parser.add_argument("--cprofile", default=None, help="write cProfile stats to this file at exit")
    args = parser.parse_args(argv)

    from broker.app import open_app
    from broker.serve import run_server

    app = open_app(Path(args.home))

    def ready(port: int) -> None:  # the line `medbroker serve` prints (bench/world.py waits for it with workers > 1)
        print(f"medbroker listening on {args.listen.rpartition(':')[0]}:{port}", flush=True)

    try:
        if args.cprofile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
            try:
                run_server(app, args.listen, on_ready=ready)
            finally:
                prof.disable()
                prof.dump_stats(args.cprofile)
        else:
            run_server(app, args.listen, on_ready=ready)
    finally:
        app.close()


if __name__ == "__main__":
    main()
