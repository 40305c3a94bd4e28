"""``vramancer cluster``: several machines as one pool of devices.

    vramancer cluster start --host 192.168.1.10 [--port 6379] [--token-file F] [--devices SPEC]
        a Ray head with token auth on that address; prints this node's Link fingerprint and the
        exact line to run on the other machines
    vramancer cluster join 192.168.1.10:6379 --token T [--host MY_ADDRESS] [--devices SPEC]
    vramancer cluster status [ADDRESS] [--json] [--probe-bytes 16MiB]
        nodes, devices (node2/cuda:0), Link endpoints, key fingerprints, RTT and bandwidth of each link
    vramancer cluster stop          the Ray processes `start` / `join` started on this machine, nothing else

``vramancer plan MODEL --cluster ADDRESS`` and ``vramancer run MODEL --cluster ADDRESS`` plan over
every device of every node; ``run`` runs the stages on their nodes (pipeline.py). Their hops between
nodes are TLS; ``--trusted-network`` lets them go plaintext (tcp, or torch.distributed between CUDA
stages), ``--link auto|tls|tcp|torch`` forces one transport between nodes (planning.py).
``run --cluster`` samples as ``run`` does with --temperature / --top-p / --seed
(runtime/sampling.py's Sampler, the one run and serve use).
The token is read from ``--token``, ``--token-file`` or this node's token file (written by start / join).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import BadInputError
from ..units import format_bytes, parse_bytes

__all__ = ["configure", "main", "add_cluster_flags", "plan_on_cluster", "run_on_cluster", "connect_and_discover",
           "check_cluster_flags", "cluster_plan", "link_flags", "cluster_sampler",
           "refuse_link_flags_without_cluster"]


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """--cluster ADDRESS and its token file, for the commands that plan (plan, run, serve)."""
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="plan (and run) over every device of the Ray cluster at HOST:PORT (`vramancer cluster`)")
    p.add_argument("--cluster-token-file", default=None, metavar="FILE",
                   help="the cluster's token (default: the one `cluster start` / `join` wrote on this machine)")
    p.add_argument("--trusted-network", action="store_true",
                   help="with --cluster: hops between nodes may go plaintext (tcp; torch.distributed between "
                        "CUDA stages), without TLS's cost; only on a network you trust")
    p.add_argument("--link", default="auto", choices=("auto", "tls", "tcp", "torch"),
                   help="with --cluster: the transport of the hops between nodes (default auto: tls, or with "
                        "--trusted-network tcp / torch); tcp and torch need --trusted-network")


def refuse_link_flags_without_cluster(args: argparse.Namespace) -> None:
    """--trusted-network and --link only mean something with --cluster: alone they are bad input."""
    if not hasattr(args, "cluster") or args.cluster:
        return
    given = getattr(args, "given", frozenset())
    for dest, flag in (("trusted_network", "--trusted-network"), ("link", "--link")):
        if dest in given:
            raise BadInputError(f"{flag} is about the hops between a cluster's nodes: it goes with --cluster ADDRESS")


def configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    start = sub.add_parser("start", help="start a Ray head (token auth) on this machine")
    start.add_argument("--host", required=True, help="this machine's address Ray (and the Link) bind to")
    start.add_argument("--port", type=int, default=6379, help="Ray's port (default 6379)")
    start.add_argument("--token-file", default=None, help="where the new token is written (0600; default: "
                       "cluster/token next to the config file)")
    _node_flags(start)
    join = sub.add_parser("join", help="join this machine to a cluster")
    join.add_argument("address", help="the head's HOST:PORT")
    join.add_argument("--token", default=None, help="the token `cluster start` printed")
    join.add_argument("--token-file", default=None, help="read the token from this file instead")
    join.add_argument("--host", default=None, help="this machine's address Ray (and the Link) bind to")
    _node_flags(join)
    status = sub.add_parser("status", help="nodes, devices, keys and measured links")
    status.add_argument("address", nargs="?", default=None, help="HOST:PORT (default: the cluster this node runs)")
    status.add_argument("--token-file", default=None, help="the cluster's token file")
    status.add_argument("--probe-bytes", default="16MiB", help="bytes sent to measure each link (default 16MiB)")
    status.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("stop", help="stop the Ray processes started here by `cluster start` / `join`")


def _node_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--devices", default="auto", help="the devices this node offers (a device spec; default auto)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may schedule here (default: all)")


def _ensure_identity() -> str:
    """This node's Link fingerprint; an identity is made when there is none (`vramancer keys init`)."""
    from ..errors import VramancerError
    from ..link.keys import create_identity, load_identity

    try:
        return load_identity().fingerprint
    except VramancerError:
        ident = create_identity()
        print(f"made this node's Link identity (vramancer keys init): {ident.fingerprint}", file=sys.stderr)
        return ident.fingerprint


def _check_devices(spec: str) -> None:
    from ..devices.spec import parse_devices

    parse_devices(spec)   # a bad spec is refused here, not on the node later


def main(args: argparse.Namespace) -> int:
    from .control import check_address, check_host, join_cluster, read_token, start_head, stop_started

    if getattr(args, "num_cpus", None) is not None and args.num_cpus < 0:
        raise BadInputError(f"--num-cpus must be 0 or more, not {args.num_cpus}")
    if args.action == "start":   # every input checked before anything is written or started
        check_host(args.host)
        if not 0 < args.port < 65536:
            raise BadInputError(f"--port must be 1..65535, not {args.port}")
        _check_devices(args.devices)
        fp = _ensure_identity()
        st, token = start_head(args.host, args.port, args.token_file, args.devices, args.num_cpus)
        print(f"Ray head started at {st.address} (token auth; token in {st.token_file})")
        print(f"this node's Link fingerprint: {fp}")
        print("on each other machine, run:")
        print(f"  vramancer cluster join {st.address} --token {token}")
        return 0
    if args.action == "join":
        check_address(args.address)
        if args.host:
            check_host(args.host)
        _check_devices(args.devices)
        token = read_token(args.token, args.token_file) if (args.token or args.token_file) else None
        if token is None:
            raise BadInputError("cluster join needs --token (or --token-file): `cluster start` printed it")
        fp = _ensure_identity()
        st = join_cluster(args.address, token, args.host, args.devices, args.num_cpus)
        print(f"joined the cluster at {st.address}; this node's Link fingerprint: {fp}")
        return 0
    if args.action == "stop":
        st, n = stop_started()
        if st is None:
            print("no cluster started on this machine by `vramancer cluster start` / `join`")
            return 0
        print(f"stopped the cluster {st.role} of {st.address} ({n} processes)")
        return 0
    return _status(args)


def _address(given: str | None) -> str:
    from .control import ClusterState

    if given:
        return given
    st = ClusterState.load()
    if st is None:
        raise BadInputError("which cluster? give HOST:PORT (no cluster was started or joined on this machine)")
    return st.address


def connect_and_discover(address: str, token_file: str | None, probe_bytes: int, measure: bool = True) -> tuple:
    """(view, the driver's node name): connect with the token, discover every node and link."""
    from .control import check_address, connect, local_address_towards
    from .nodes import discover

    connect(address, token_file=token_file)
    view = discover(address, probe_bytes=probe_bytes, measure=measure)
    here = local_address_towards(check_address(address)[0])
    driver = next((n.name for n in view.nodes if n.address == here), "")
    return view, driver


def _status(args: argparse.Namespace) -> int:
    import ray

    address = _address(args.address)
    probe = parse_bytes(args.probe_bytes)
    if not 0 < probe <= 1 << 30:
        raise BadInputError("--probe-bytes must be between 1 byte and 1GiB")
    try:
        view, driver = connect_and_discover(address, args.token_file, probe)
    finally:
        ray.shutdown()
    if args.json:
        d = view.to_dict()
        d["driver_node"] = driver
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
        return 0
    print(f"cluster {address}: {len(view.nodes)} nodes")
    for n in view.nodes:
        role = "head" if n.is_head else "worker"
        here = ", this machine" if n.name == driver else ""
        print(f"  {n.name}  {n.address} ({n.hostname}, {role}{here})")
        print(f"      key   {n.fingerprint or '(none: run `vramancer keys init` there)'}")
        print(f"      link  {n.link_host}:{n.link_port}" if n.link_port else "      link  (none)")
        for d in n.devices:
            print(f"      {n.name}/{d.id:<14} {d.kind:<4} {format_bytes(d.free_bytes):>10} free  {d.name}")
        if n.note:
            print(f"      note  {n.note}")
    if view.links:
        print("links (measured over Link TLS):")
        for lk in view.links:
            print(f"  {lk.src} -> {lk.dst}  RTT {lk.rtt_s * 1000:.3f} ms  "
                  f"{lk.bandwidth_bytes_per_s / 1e9:.2f} GB/s ({format_bytes(lk.probe_bytes)} probe)")
    return 0


def check_cluster_flags(args: argparse.Namespace, command: str) -> None:
    """Flags that choose devices are refused with --cluster (the nodes offer theirs), and so are
    what the stage workers do not run yet: a KV-cache format, weights quantized on load."""
    given = getattr(args, "given", frozenset())
    for dest, flag in (("devices", "--devices"), ("split", "--split"), ("backing", "--backing")):
        if dest in given:
            raise BadInputError(f"{command} --cluster plans over the devices each node offers: drop {flag} "
                                "(set them with `cluster join --devices`)")
    for dest, flag in (("kv_dtype", "--kv-dtype"), ("quant_backend", "--quant-backend")):
        if getattr(args, dest, None) is not None:
            raise BadInputError(f"{command} --cluster: the stage workers keep the KV cache and weights in the "
                                f"checkpoint's float dtype; drop {flag}")
    dtype = getattr(args, "dtype", None)
    if dtype is not None:
        from ..models.dtypes import DTYPES

        dt = DTYPES.get(str(dtype).lower())
        if dt is not None and dt.on_load is not None:
            raise BadInputError(f"{command} --cluster: --dtype {dtype} (quantized on load) is not run by the "
                                "stage workers; use a float dtype")


def eos_token_ids(folder: Any, tokenizer: Any, config: dict | None = None) -> frozenset[int]:
    """The token ids that end a sequence, as serve's Engine finds them (runtime/sampling.py eos_id_set):
    the generation config's, the model config's (``config``: config.json when already read), the
    tokenizer's."""
    from ..models.checkpoint import read_config
    from ..runtime.sampling import eos_id_set

    if config is None:
        config = read_config(folder / "config.json")
    text_cfg = config.get("text_config") or config
    gen = folder / "generation_config.json"
    gen_cfg = read_config(gen) if gen.is_file() else {}
    return eos_id_set(gen_cfg.get("eos_token_id"), text_cfg.get("eos_token_id"),
                      getattr(tokenizer, "eos_token_id", None))


def link_flags(args: argparse.Namespace) -> tuple[bool, str]:
    """(--trusted-network, --link), checked: a plaintext --link without the flag is bad input."""
    from .planning import check_link

    trusted, link = bool(getattr(args, "trusted_network", False)), getattr(args, "link", None) or "auto"
    check_link(link, trusted)
    return trusted, link


def _plan(args: argparse.Namespace, model: Any, view: Any, driver: str) -> Any:
    from .planning import plan_cluster

    trusted, link = link_flags(args)
    return plan_cluster(model, view, context=args.context, batch=args.batch, dtype=args.dtype,
                        objective=args.objective, reserve_bytes=args.reserve, prefill_chunk=args.prefill_chunk,
                        driver=driver, trusted_network=trusted, link=link)


def plan_on_cluster(args: argparse.Namespace, console: Any) -> int:
    """`vramancer plan MODEL --cluster ADDRESS`."""
    import ray

    from ..plan.commands import render_plan

    check_cluster_flags(args, "plan")
    link_flags(args)
    try:
        view, driver = connect_and_discover(args.cluster, args.cluster_token_file, 4 << 20)
    finally:
        ray.shutdown()
    plan = _plan(args, args.model, view, driver)
    if args.output:
        plan.save(args.output)
    if args.json:
        sys.stdout.write(plan.to_json() + "\n")
    else:
        render_plan(plan, console)
    return 0


def cluster_plan(args: argparse.Namespace, folder: Any, view: Any, driver: str) -> Any:
    """The plan ``run`` / ``serve --cluster`` use: --plan FILE (saved by `plan --cluster -o FILE`; refused
    in one line when it names nodes the cluster lacks), else planned here over ``view``."""
    from .nodes import node_of

    if getattr(args, "plan", None):
        from ..plan.plan import Plan
        from .planning import check_hops

        plan = Plan.load(args.plan)
        check_hops(plan.hops, link_flags(args)[0])
        names = {n.name for n in view.nodes}
        missing = sorted({node_of(s.device) for s in plan.stages} - names)
        if missing:
            raise BadInputError(f"--plan {args.plan} places stages on {', '.join(missing) or 'this machine'}, "
                                f"which the cluster does not have ({', '.join(sorted(names))}): plan again")
        return plan
    return _plan(args, str(folder), view, driver)


def cluster_sampler(args: argparse.Namespace) -> Any:
    """runtime/sampling.py's Sampler for --temperature above 0 (with --top-p, --seed), None for greedy
    (the values were checked by run's check_generation_args before the cluster was reached)."""
    temperature = float(getattr(args, "temperature", 0.0) or 0.0)
    top_p = getattr(args, "top_p", None)
    if temperature == 0:
        return None
    from ..runtime.sampling import Sampler, SamplingParams

    return Sampler(SamplingParams(temperature=temperature, top_p=1.0 if top_p is None else float(top_p),
                                  seed=getattr(args, "seed", None)))


def run_on_cluster(args: argparse.Namespace, console: Any) -> int:
    """`vramancer run MODEL --cluster ADDRESS`: stages on their nodes, decoding here: greedy, or sampled
    with --temperature / --top-p / --seed by runtime/sampling.py's Sampler (its own seeded generator)."""
    import ray

    from ..runtime.commands import load_tokenizer
    from ..runtime.loader import weights_folder
    from .pipeline import ClusterPipeline

    check_cluster_flags(args, "run")
    trusted, link = link_flags(args)
    sampler = cluster_sampler(args)
    folder = weights_folder(args.model)
    tok = load_tokenizer(folder)
    try:
        view, driver = connect_and_discover(args.cluster, args.cluster_token_file, 4 << 20)
        plan = cluster_plan(args, folder, view, driver)
        if not args.json and not args.quiet:
            from ..plan.commands import render_plan

            render_plan(plan, console)
        ids = tok(args.prompt)["input_ids"]
        if len(ids) + args.max_new_tokens > plan.workload.context:   # refused before any worker starts
            raise BadInputError(f"{len(ids)} prompt + {args.max_new_tokens} new tokens is more than the "
                                f"{plan.workload.context} tokens of context planned (--context)")
        eos = eos_token_ids(folder, tok)
        with ClusterPipeline(plan, view, folder, trusted_network=trusted, link=link) as pipe:
            out = pipe.generate(list(ids), args.max_new_tokens, set(eos) or None, sampler=sampler)
            stats = pipe.stats()
    finally:
        ray.shutdown()
    text = tok.decode(out, skip_special_tokens=True)
    if args.json:
        sys.stdout.write(json.dumps({"text": text, "tokens": len(out), "decode_tokens_per_s": stats.decode_tokens_per_s,
                                     "prefill_s": stats.prefill_s, "plan": plan.to_dict(),
                                     "stages": [s.__dict__ for s in stats.stages]}, indent=2) + "\n")
        return 0
    from ..terminal import escape_control

    sys.stdout.write(args.prompt + escape_control(text) + "\n")
    if not args.quiet:
        console.print(f"{len(out)} tokens, {stats.decode_tokens_per_s:.2f} tokens/s decode over "
                      f"{len(plan.stages)} stages")
        for s in stats.stages:
            console.print(f"  stage {s.stage} {s.device}: {s.loaded_from}; compute {s.compute_s:.3f} s, waiting "
                          f"{s.wait_s:.3f} s, sending {s.send_s:.3f} s over {s.forwards} forwards")
    return 0
