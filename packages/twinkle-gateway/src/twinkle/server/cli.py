"""The ``twinkle-server`` / ``python -m twinkle.server`` command line.

    python -m twinkle.server --config server.yaml [-t twinkle|tinker] [--namespace N] [--no-wait] [--log-level L]
    twinkle-server check-config server.yaml
    twinkle-server print-config server.yaml [--format yaml|json] [-t tinker]
    twinkle-server plan server.yaml [--topology cluster.yaml]     # placement table; live cluster if no file
    twinkle-server stop                                             # shut down Serve apps on the running cluster
    twinkle-server status [--format text|json]                      # applications, replicas, queues, adapters

Exit codes: 0 ok, 2 invalid config or placement, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys

from twinkle.common.config import ConfigError, dump_config, load_config
from twinkle.common.placement import PlacementError
from twinkle.common.topology import TopologyError

from .auth import AuthConfigError
from .launcher import LaunchError

_SUBCOMMANDS = ("launch", "check-config", "print-config", "plan", "stop", "status")


def _launch_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Deploy a Twinkle server from a YAML config onto Ray.")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("-t", "--server-type", choices=["twinkle", "tinker"], help="override server_type from the config")
    p.add_argument("--namespace", help="Ray namespace (default: the config's ray_namespace or twinkle_cluster)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, a local `ray start` cluster, "
                                     "or an embedded Ray)")
    p.add_argument("--no-wait", action="store_true", help="deploy and return (daemon mode)")
    p.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return p


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("config_pos", nargs="?", metavar="CONFIG", help="YAML config file")
    p.add_argument("-c", "--config", help="YAML config file")
    p.add_argument("-t", "--server-type", choices=["twinkle", "tinker"])


def _load(args: argparse.Namespace):
    path = args.config or args.config_pos
    if not path:
        raise SystemExit("a config file is required (positional or --config)")
    cfg = load_config(path)
    return cfg.with_server_type(args.server_type) if args.server_type else cfg


def main(argv: list[str] | None = None) -> int:
    from ._ray_runtime import use_token_auth_if_available

    use_token_auth_if_available()  # before anything imports Ray: it reads its auth mode once
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "twinkle-server"
    command = argv[0] if argv and argv[0] in _SUBCOMMANDS else "launch"
    if argv and argv[0] in _SUBCOMMANDS:
        argv = argv[1:]
    try:
        if command == "launch":
            args = _launch_parser(prog).parse_args(argv)
            from .launcher import launch_server

            launch_server(config_path=args.config, server_type=args.server_type, namespace=args.namespace,
                          wait=not args.no_wait, log_level=args.log_level, address=args.address)
            return 0
        p = argparse.ArgumentParser(prog=f"{prog} {command}")
        if command == "stop":
            p.add_argument("--address", default="auto")
            args = p.parse_args(argv)
            return _stop(args.address)
        if command == "status":
            p.add_argument("--address", default="auto")
            p.add_argument("--format", choices=["text", "json"], default="text")
            args = p.parse_args(argv)
            from .status import cluster_status, format_status

            report = cluster_status(args.address)
            print(json.dumps(report, indent=2) if args.format == "json" else format_status(report))
            return 0 if report["applications"] else 1
        _config_arg(p)
        if command == "print-config":
            p.add_argument("--format", choices=["yaml", "json"], default="yaml")
        if command == "plan":
            p.add_argument("--topology", help="YAML/JSON topology file for a dry run (default: the live cluster)")
            p.add_argument("--json", action="store_true", help="print the plan as JSON")
            p.add_argument("--allow-shared-gpus", action="store_true", default=None,
                           help="let applications share a GPU (default: only when a vLLM sampler sets "
                                "gpu_memory_utilization < 1)")
        args = p.parse_args(argv)
        cfg = _load(args)
        if command == "check-config":
            cfg.check_supported()
            print(f"{args.config or args.config_pos}: OK ({cfg.server_type}, {len(cfg.applications)} applications)")
        elif command == "print-config":
            sys.stdout.write(dump_config(cfg, args.format))
        elif command == "plan":
            plan = _plan(cfg, args.topology, args.allow_shared_gpus)
            print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.format_table())
        return 0
    except (ConfigError, PlacementError, TopologyError, LaunchError, AuthConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0 if command == "launch" else 130  # a stop signal during start-up: cleaned up, not a failure


def _plan(cfg, topology_path: str | None, allow_shared_gpus: bool | None):
    from twinkle.common.topology import load_topology, read_ray_topology

    from .launcher import plan_config

    if topology_path:
        return plan_config(cfg, load_topology(topology_path), allow_shared_gpus=allow_shared_gpus)
    import ray

    ray.init(address="auto", logging_level="WARNING", log_to_driver=False)
    try:
        return plan_config(cfg, read_ray_topology(), allow_shared_gpus=allow_shared_gpus)
    finally:
        ray.shutdown()


def _stop(address: str) -> int:
    import ray
    from ray import serve

    ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    try:
        serve.shutdown()
    finally:
        ray.shutdown()
    print("Twinkle applications stopped")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
