"""The `cluster` command: many engines (one per GPU) behind one address, on Ray Serve.

    python run_agent.py cluster [--address RAY_ADDRESS | --num-cpus N] [--replicas N]
        [--min-replicas A --max-replicas B] [--max-sessions SLOTS] [--checkpoint C] [--device D]
        [--threads T] [--host H] [--port P] [serve's security and limit flags]

A layer above `serve`, not a second server:

- Each Serve replica (`EngineReplica`, streams/cluster/replica.py) is one `Agent` (one engine,
  its slot table) served by the `serve` app itself (`server.create_app`) on its own port. Only the
  gateway knows the token that app requires. Its WebRTC peers use the replica's own UDP ports, so
  media never passes the gateway.
- A conversation holds its slot as one streaming handle call, `EngineReplica.hold()`, which yields
  the replica's URL and a one-use ticket, then lasts as long as the conversation. With
  `max_ongoing_requests` = slots, Serve's router places each new conversation on a replica with a
  free slot (power of two choices among running, healthy replicas), its autoscaler sees slot
  occupancy, and its graceful shutdown drains a replica (it waits for the holds to end).
- The gateway (streams/cluster/gateway.py, in this process) is the one public address: it relays
  the websockets, forwards WebRTC offers, sums the replicas' figures, and refuses at once, with
  `serve`'s refusal shapes, when every running replica's slots are held.

This module deploys the replicas and runs the command. Why a relaying gateway rather than Serve's HTTP proxy: see bench/results/README.md ("Cluster
gateway"). Ray is imported only inside the functions that need it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys

from duplex_agent.streams.cluster.gateway import APP_NAME, DEPLOYMENT, Gateway
from duplex_agent.streams.cluster.replica import NAMESPACE, EngineReplica, Registry
from duplex_agent.streams.limits import DEFAULT_MAX_CONVERSATION_S

log = logging.getLogger(__name__)

DRAIN_MARGIN_S = 30.0
AUTOSCALE_TARGET = 0.75  # of a replica's slots in use, on average, before Serve adds replicas


def deploy(settings: dict, *, replicas: int | None, min_replicas: int | None = None,
           max_replicas: int | None = None, num_gpus: float = 0):
    """Start Serve (no HTTP proxy: the gateway is ours) and the engine replicas; returns the
    deployment handle. Fixed `replicas`, or autoscaling between min and max on slot occupancy."""
    from ray import serve
    slots = settings["max_sessions"]
    length = settings["max_conversation_s"] or DEFAULT_MAX_CONVERSATION_S
    options = dict(
        name=DEPLOYMENT, max_ongoing_requests=slots,
        # Never shed in Serve's queue: the gateway refuses when full; the rare call that finds no
        # room waits ADMISSION_TIMEOUT_S at most.
        max_queued_requests=-1,
        ray_actor_options={"num_cpus": settings["threads"], "num_gpus": num_gpus},
        graceful_shutdown_timeout_s=length + DRAIN_MARGIN_S,  # drain: live conversations finish
        health_check_period_s=2.0, health_check_timeout_s=30.0)
    if min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": min_replicas, "max_replicas": max_replicas,
            "target_ongoing_requests": max(1.0, AUTOSCALE_TARGET * slots),
            "upscale_delay_s": 5.0, "downscale_delay_s": 60.0}
    else:
        options["num_replicas"] = replicas
    serve.start(proxy_location="Disabled")
    app = serve.deployment(EngineReplica, **options).bind(settings)
    return serve.run(app, name=APP_NAME, route_prefix=None)


# == command line ==================================================================================

def register(subparsers) -> None:
    from duplex_agent.agent.options import add_checkpoint_args, add_persona_args
    from duplex_agent.streams.server import (_positive_int, add_listen_args, add_phone_args,
                                             add_policy_args, add_realtime_args, add_threads_arg)
    p = subparsers.add_parser("cluster", help="serve what `serve` serves from many engines "
                                              "(one per GPU) on a Ray cluster, at one address")
    p.set_defaults(func=run_cluster)
    add_listen_args(p)
    add_checkpoint_args(p)
    add_persona_args(p, conversation=False)  # each client picks its persona
    add_threads_arg(p)
    c = p.add_argument_group("cluster")
    c.add_argument("--address", default=None,
                   help="a running Ray cluster (e.g. ray://head:10001 or auto); default: start a "
                        "local one on this machine")
    c.add_argument("--num-cpus", type=_positive_int, default=None,
                   help="CPUs of the local Ray cluster (default: all of this machine's)")
    c.add_argument("--replicas", type=_positive_int, default=None,
                   help="engine replicas, each with --max-sessions slots (default: one per GPU "
                        "Ray sees; 1 on CPU)")
    c.add_argument("--min-replicas", type=_positive_int, default=None,
                   help="autoscale between --min-replicas and --max-replicas on slot occupancy "
                        "(at least 1: a full cluster refuses, so it never shows demand beyond "
                        "its slots)")
    c.add_argument("--max-replicas", type=_positive_int, default=None)
    c.add_argument("--media-host", default=None,
                   help="address WebRTC media uses on each replica (default: all the node's "
                        "addresses); e.g. 127.0.0.1 on a single machine without a network")
    add_policy_args(p)
    add_realtime_args(p)
    add_phone_args(p)


def run_cluster(args) -> int:
    from duplex_agent.streams.server import (phone_settings_from_args, policy_from_args,
                                             ssl_context_from_args)
    if (args.min_replicas is None) != (args.max_replicas is None):
        print("error: --min-replicas and --max-replicas go together", file=sys.stderr)
        return 2
    if args.min_replicas is not None and args.min_replicas > args.max_replicas:
        print("error: --min-replicas is more than --max-replicas", file=sys.stderr)
        return 2
    if args.address and args.num_cpus:
        print("error: --num-cpus is for a local cluster; not with --address", file=sys.stderr)
        return 2
    try:
        ssl_context = ssl_context_from_args(args)
        args.phone = phone_settings_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        import ray
    except ModuleNotFoundError:
        print("error: the cluster command needs Ray Serve: bash scripts/setup.sh installs it",
              file=sys.stderr)
        return 2
    policy = policy_from_args(args)
    # Ray starts workers at niceness 15, for a responsive raylet; here the workers are the
    # engines, and niced they lose every tick to anything else on the machine. (On a cluster
    # started with `ray start`, set this variable there.)
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=args.address, num_cpus=args.num_cpus, namespace=NAMESPACE,
             include_dashboard=False, logging_level=logging.WARNING)
    try:
        return asyncio.run(_run(args, policy, ssl_context))
    finally:
        _shutdown(local=args.address is None)


def _settings(args, resources: dict) -> tuple[dict, int, float]:
    """What each replica is given, the replica count, and the GPUs per replica."""
    from duplex_agent.agent.options import weight_options
    from duplex_agent.streams.server import utterance_rule_from_args
    gpus = int(resources.get("GPU", 0))
    device = args.device or ("cuda" if gpus else "cpu")
    replicas = args.replicas or (gpus if device == "cuda" else 1)
    threads = args.threads or max(1, min(4, int(resources.get("CPU", 1)) // max(1, replicas)))
    settings = {
        "checkpoint": args.checkpoint, "device": device, "kv_cache": args.kv_cache,
        # Files (--lora, --voice-prompt-dir) must exist at the same path on every node.
        "weights": {**weight_options(args), "voice_prompt_dir": args.voice_prompt_dir},
        "utterance_rule": utterance_rule_from_args(args),
        "max_sessions": args.max_sessions, "threads": threads,
        "internal_token": secrets.token_urlsafe(24), "registry": f"registry-{os.getpid()}",
        "bind_host": "127.0.0.1" if args.address is None else "0.0.0.0",
        "media_host": args.media_host,
        "max_message_bytes": args.max_message_bytes, "max_offer_bytes": args.max_offer_bytes,
        "idle_timeout_s": args.idle_timeout or None,
        "max_conversation_s": args.max_conversation_s or None,
        "profile_stages": args.profile_stages or None,
        "phone": args.phone,  # each replica answers the webhooks the gateway forwards
    }
    return settings, replicas, 1.0 if device == "cuda" else 0.0


async def _run(args, policy, ssl_context) -> int:
    import ray
    from duplex_agent.streams.server import _warn_if_exposed, serve_until_signal
    resources = ray.cluster_resources()
    settings, replicas, num_gpus = _settings(args, resources)
    if num_gpus and not resources.get("GPU"):
        print("error: --device cuda, but the Ray cluster has no GPU", file=sys.stderr)
        return 2
    registry = ray.remote(num_cpus=0)(Registry).options(name=settings["registry"],
                                                        namespace=NAMESPACE).remote()
    autoscale = args.min_replicas is not None
    handle = await asyncio.to_thread(
        deploy, settings, replicas=replicas, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, num_gpus=num_gpus)
    gateway = Gateway(handle, registry, args.max_sessions, policy, settings["internal_token"],
                      phone=args.phone)
    _warn_if_exposed(args.host, policy, ssl_context)
    size = (f"{args.min_replicas}-{args.max_replicas} replicas (autoscaling)" if autoscale
            else f"{replicas} replicas")
    await serve_until_signal(gateway.create_app(), args.host, args.port, ssl_context, lambda url: (
        f"cluster serving on {url} ({size} x {args.max_sessions} conversations; "
        f"{args.checkpoint} on {settings['device']}, {settings['threads']} CPU threads each)"))
    return 0


def _shutdown(local: bool) -> None:
    """Remove the app (replicas drain: their holds were released) and leave Ray."""
    import ray
    from ray import serve
    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    except Exception:
        log.exception("Serve did not shut down cleanly")
    ray.shutdown()
