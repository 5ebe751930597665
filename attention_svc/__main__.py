"""python -m attention_svc: run the attention service (started by `herd up` or a Deployment)."""
import argparse
import json
import logging
import os
from pathlib import Path

from attention_svc import DISPATCH_MODES
from attention_svc.http_api import create_app, serve_http
from attention_svc.server import build, serve
from llama4.dtypes import DTYPE_NAMES, torch_dtype
from llama4.quant import EXPERT_DTYPES
from plumbing.auth import API_KEYS_ENV, CLUSTER_TOKEN_ENV, read_secrets
from plumbing.grpc_server import MAX_MESSAGE_BYTES
from plumbing.lifecycle import serve_until_signalled


def main() -> None:
    ap = argparse.ArgumentParser(prog="attention_svc")
    ap.add_argument("--model", required=True)
    ap.add_argument("--router", help="router address; without it the experts run in-process")
    ap.add_argument("--dispatch", default="router", choices=DISPATCH_MODES,
                    help="router: MoE rows go through the router; direct: gated here and sent to the workers")
    ap.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    ap.add_argument("--expert-dtype", default="auto", choices=EXPERT_DTYPES,
                    help="how routed experts are held (in-process, or by the router's workers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--batching", default="{}", help="JSON: max_num_seqs, max_step_tokens, max_cache_tokens, ...")
    ap.add_argument("--route-timeout", type=float, default=60.0)
    ap.add_argument("--kv-ttl", type=int, default=3600, help="seconds a KV block stays in Redis")
    ap.add_argument("--no-kv-tier", action="store_true", help="do not use Redis for KV (HERD_REDIS_URL)")
    ap.add_argument("--max-message-bytes", type=int, default=MAX_MESSAGE_BYTES, help="gRPC message cap, each way")
    ap.add_argument("--drain", type=float, default=30.0, help="on SIGTERM, seconds in-flight requests may take")
    ap.add_argument("--max-streams", type=int, default=256, help="concurrent Generate/Score calls")
    ap.add_argument("--tls-cert", help="PEM certificate chain for the public listener (with --tls-key)")
    ap.add_argument("--tls-key", help="PEM private key for the public listener")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--http-port", type=int, help="serve the OpenAI-compatible HTTP API and /metrics on this port "
                                                  "(0 = any free port; absent = no HTTP)")
    ap.add_argument("--served-model-name", help="the model id of the HTTP API (default: the model directory's name)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s attention %(levelname)s %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # URLs carry passwords and secrets are secrets: both come from the environment, never argv.
    redis_url = None if args.no_kv_tier else os.environ.get("HERD_REDIS_URL")
    state_url = None if args.no_kv_tier else os.environ.get("HERD_STATE_REDIS_URL")
    token = os.environ.get(CLUSTER_TOKEN_ENV) or None
    servicer, _ = build(args.model, args.router, torch_dtype(args.dtype), args.device, json.loads(args.batching),
                        args.route_timeout, redis_url, args.kv_ttl, args.max_message_bytes, state_url, token,
                        args.expert_dtype, args.dispatch)
    tls = (Path(args.tls_cert).read_bytes(), Path(args.tls_key).read_bytes()) if args.tls_cert else None
    api_keys = read_secrets(API_KEYS_ENV)
    server, port = serve(servicer, args.host, args.port, args.max_message_bytes, args.max_streams, api_keys, token, tls)
    listening = f"ATTENTION_LISTENING {args.host}:{port}"
    http = None
    if args.http_port is not None:
        app = create_app(servicer, args.served_model_name or Path(args.model).name, api_keys, token,
                         servicer.loop.metrics)
        http, http_port = serve_http(app, args.host, args.http_port,
                                     (args.tls_cert, args.tls_key) if args.tls_cert else None)
        listening += f" HTTP {args.host}:{http_port}"
    print(listening, flush=True)

    def stop() -> None:
        servicer.readiness.drain()
        if http is not None:
            http.should_exit = True

    serve_until_signalled(server, grace_s=args.drain, on_stop=stop)


if __name__ == "__main__":
    main()
